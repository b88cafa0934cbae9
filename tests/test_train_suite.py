"""``harness train-suite`` and ``harness methods list``, from the command line, on the toy env.

The suite trains each method from one shared warm start with the same seeds and budget, then
prints one comparison; finished runs are kept on a rerun; a method that cannot run is reported
and the rest are still compared.
Run: .venv/bin/python -m pytest tests/test_train_suite.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.cli.suite import SUITE_METHODS
from harness.store import Store
from trainers.method_settings import family_sources, source_names

SMALL = ["--steps", "1", "--tasks-per-step", "2", "--group-size", "2", "--eval-every", "1", "--eval-tasks", "2",
         "--eval-trials", "1", "--max-new-tokens", "8", "--warm-start", "2", "--lr", "1e-3"]


def harness(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_methods_list_names_every_method_with_its_needs():
    proc = harness("methods", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert set(SUITE_METHODS) <= set(rows), sorted(set(SUITE_METHODS) - set(rows))
    for row in rows.values():
        assert row["description"] and row["paper"] and isinstance(row["defaults"], dict)
    assert rows["sgcd"]["requires"] == ["summarizer"] and rows["grpo"]["requires"] == []
    assert "teacher_model" in rows["rlad"]["requires"] and "privileged_info" in rows["rlsd"]["requires"]
    assert rows["rlsd"]["code"] == "iie-ycx/RLSD" and rows["rlcsd"]["paper"] == "2606.11709"
    assert "rlcsd" in SUITE_METHODS
    # every method says where its code is and where every default setting comes from: a setting
    # added without a source fails here (a sources key may group settings: "clip_low, clip_high")
    for name, row in rows.items():
        assert row["code"] and row["sources"], name
        missing = set(row["defaults"]) - source_names(row["sources"])
        assert not missing, f"{name}: no source for {sorted(missing)}"
    assert rows["dapo"]["code"].startswith("volcengine/verl recipe/dapo")
    assert rows["sdpo"]["code"].startswith("lasgroup/SDPO") and rows["opsd"]["code"] == "siyan-zhao/OPSD"
    text = harness("methods", "list").stdout
    assert "rlsd" in text and "defaults:" in text
    assert "official code: iie-ycx/RLSD" in text and "rlsd_lambda_decay_steps=60" in text
    assert "not recorded yet" not in text  # every built-in method is sourced (plugins: tests/test_plugin_env.py)


def test_family_sources_refuses_to_call_a_changed_default_the_familys():
    """A method that changes a shared block default must say where its value comes from."""
    from dataclasses import replace

    from trainers.method_settings import FAMILY_DEFAULT, GRPOSettings

    kept = family_sources(GRPOSettings(), {"clip_low, clip_high": "paper"})
    assert kept["clip_low, clip_high"] == "paper"
    assert source_names(kept) >= {"dynamic_sampling", "kl_estimator"} and FAMILY_DEFAULT in kept.values()
    with pytest.raises(ValueError, match="clip_high differs"):
        family_sources(replace(GRPOSettings(), clip_high=0.28), {"kl_coef": "paper"})


def test_suite_trains_each_method_from_one_start_and_compares(tmp_path):
    db = f"sqlite:///{tmp_path}/suite.db"
    out = tmp_path / "suite"
    args = ["train-suite", "--methods", "grpo,rlad", "--prefix", "s", "--db", db, "--out-dir", str(out),
            "--teacher-steps", "2", *SMALL]
    proc = harness(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one warm start and one built teacher, shared
    assert (out / "start" / "config.json").exists() and (out / "teacher" / "config.json").exists()
    store = Store(db)
    for method in ("grpo", "rlad"):
        run = store.get_run(f"s-{method}")
        assert run.status == "finished"
        assert run.config["train"]["policy"] == str(out / "start")
    assert store.get_run("s-rlad").config["train"]["teacher"] == str(out / "teacher")
    assert store.get_run("s-grpo").config["train"]["teacher"] is None
    assert "Train runs compared" in proc.stdout and "tokens/rollout" in proc.stdout
    assert "first_step>=0.5" in proc.stdout
    # a rerun keeps finished runs and only compares (json: one document after the progress lines)
    again = harness(*args, "--format", "json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stdout
    doc = json.loads(again.stdout[again.stdout.index("{"):])
    assert {r["metric"] for r in doc["summary"]} >= {"eval/success/final", "tokens/trained", "time/total_seconds"}


def test_an_arm_runs_a_method_beside_its_own_ablation(tmp_path):
    """SGCD's control arm: ``sgcd_placebo=sgcd`` trains SGCD as its own run with its own settings."""
    db = f"sqlite:///{tmp_path}/arms.db"
    proc = harness("train-suite", "--methods", "sgcd,sgcd_placebo=sgcd",
                   "--method-arg", "sgcd_placebo:reference=placebo", "--prefix", "a", "--db", db,
                   "--out-dir", str(tmp_path / "arms"), *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = Store(db)
    plain, placebo = store.get_run("a-sgcd"), store.get_run("a-sgcd_placebo")
    assert plain.status == placebo.status == "finished"
    assert plain.config["train"]["method"] == placebo.config["train"]["method"] == "sgcd"
    assert plain.config["method_settings"]["reference"] == "summary"
    assert placebo.config["method_settings"]["reference"] == "placebo"
    assert "a-sgcd_placebo" in proc.stdout


def test_suite_user_errors_are_one_line(tmp_path):
    db = f"sqlite:///{tmp_path}/e.db"
    for extra, needle in ((["--methods", "grpo,nope"], "unknown method"),
                          (["--methods", "grpo", "--method-arg", "rlsd:lam_start=1"], "not in --methods"),
                          (["--methods", "grpo", "--method-arg", "gamma=2"], "no selected method has a setting"),
                          (["--methods", "grpo,x/y=sgcd"], "arm name 'x/y'"),
                          (["--methods", "grpo,grpo=sgcd"], "distinct")):
        proc = harness("train-suite", "--db", db, "--out-dir", str(tmp_path / "x"), *extra, *SMALL)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert Store(db).list_runs() == []


def test_an_env_without_demonstrations_is_refused_before_any_model_loads(tmp_path):
    """`harness sft` and the suite's warm start need the env's demonstrations (tau-airline has none)."""
    proc = harness("sft", "--env", "tau-airline", "--policy", "tiny-toy", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "harness sft needs demonstrations; env 'tau-airline' has none" in proc.stderr
    assert not (tmp_path / "o").exists()
    db = f"sqlite:///{tmp_path}/d.db"
    proc = harness("train-suite", "--env", "tau-airline", "--methods", "grpo", "--db", db, "--out-dir",
                   str(tmp_path / "s"), "--warm-start", "2")
    assert proc.returncode == 2 and "--warm-start needs demonstrations; env 'tau-airline' has none" in proc.stderr
    assert not (tmp_path / "s" / "start").exists()


def test_a_setting_a_method_does_not_use_is_a_one_line_error(tmp_path):
    """Settings are composed from the blocks a method reads: the self-distillation methods have
    no clip and no advantage, so those knobs are refused instead of silently ignored."""
    import pytest

    from harness.errors import ConfigError
    from trainers.method_settings import AdvantageBlock, ClipBlock
    from trainers.methods import make_method

    ignored = [f for block in (ClipBlock, AdvantageBlock) for f in block.__dataclass_fields__]
    for method in ("opsd", "sdpo"):
        for key in ignored:
            with pytest.raises(ConfigError, match=f"method {method} does not take {key}"):
                make_method(method, **{key: make_method("grpo").settings[key]})
        make_method(method, kl_coef=0.1, loss_agg="token-mean", dynamic_sampling="drop")  # blocks it reads
    proc = harness("train", "--env", "toy", "--policy", "tiny-toy", "--method", "sdpo", "--clip-high", "0.5",
                   "--db", f"sqlite:///{tmp_path}/k.db", "--steps", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not take clip_high" in proc.stderr
