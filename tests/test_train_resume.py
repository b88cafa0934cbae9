"""Training runs resume exactly, refuse changed settings, and work from the command line.

Resume: N steps straight must equal N/2 steps, a checkpoint, a resume and N/2 steps, in weights
and in every logged metric (timings aside). Both runs use the tiny toy policy, untrained, so the
test is about the loop's state handling (weights, optimizer, schedule, RNG, task position, eval
runs), not about learning.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402
from test_cli import harness  # noqa: E402

from harness.errors import ConfigError  # noqa: E402
from harness.store import (  # noqa: E402
    Store,  # noqa: E402
    checkpoints,
    train_steps,
)
from trainers.config import TrainConfig  # noqa: E402
from trainers.loop import train  # noqa: E402


def _cfg(tmp_path: Path, run: str, **kw) -> TrainConfig:
    base = TrainConfig(env="toy", policy="tiny-toy", run=run, db=f"sqlite:///{tmp_path}/h.db",
                       out_dir=str(tmp_path / run), steps=4, tasks_per_step=2, group_size=3, eval_every=2,
                       eval_tasks=3, lr=3e-3, lr_schedule="cosine", warmup_steps=1, max_new_tokens=12,
                       checkpoint_every=10, seed=5, warm_start=3, warm_start_batch=4, quiet=True)
    return replace(base, **kw)


def _weights(summary) -> dict:
    return load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))


def _comparable(frame):
    keep = [c for c in frame.columns if not c.startswith(("time/", "perf/tokens_per_s"))]
    return frame[keep].to_dict("records")


def test_resume_equals_a_straight_run(tmp_path):
    straight = train(_cfg(tmp_path, "straight"), echo=lambda _: None)
    first = train(_cfg(tmp_path, "split", stop_after=2), echo=lambda _: None)
    assert not first["finished"] and first["checkpoint"].endswith("step-000002")
    store = Store(f"sqlite:///{tmp_path}/h.db")
    assert store.get_run("split").status == "interrupted"
    resumed = train(_cfg(tmp_path, "split", resume=True), echo=lambda _: None)
    assert resumed["finished"] and resumed["checkpoint"].endswith("step-000004")

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"weights differ by {worst}"
    # and training really moved them (the comparison is not between two untouched models)
    init = load_file(str(tmp_path / "straight" / "init-tiny-toy" / "model.safetensors"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3

    steps_a, steps_b = train_steps(store, "straight"), train_steps(store, "split")
    assert list(steps_a["step"]) == list(steps_b["step"]) == [0, 1, 2, 3, 4]
    rows_a, rows_b = _comparable(steps_a), _comparable(steps_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key in ra:
            va, vb = ra[key], rb[key]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), key
            else:
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-6), (ra["step"], key, va, vb)
    assert "eval/success" in steps_b.columns and "sft/loss" in steps_b.columns
    assert store.get_run("split").status == "finished"
    assert [s for s, _ in checkpoints(store, "split")] == [0, 2, 4]
    # eval points are their own eval runs, one per evaluated step, not duplicated by the resume
    names = [r.name for r in store.list_runs()]
    assert sorted(n for n in names if n.startswith("split/")) == [
        "split/eval-step-000000", "split/eval-step-000002", "split/eval-step-000004"]


def test_existing_run_needs_resume_and_the_same_settings(tmp_path):
    train(_cfg(tmp_path, "r", steps=1, eval_every=0, warm_start=0), echo=lambda _: None)
    with pytest.raises(ConfigError, match="exists; pass --resume"):
        train(_cfg(tmp_path, "r", steps=1, eval_every=0, warm_start=0), echo=lambda _: None)
    with pytest.raises(ConfigError, match="different settings.*lr"):
        train(_cfg(tmp_path, "r", steps=2, eval_every=0, warm_start=0, lr=1.0, resume=True), echo=lambda _: None)
    with pytest.raises(ConfigError, match="no run named 'nope'"):
        train(_cfg(tmp_path, "nope", resume=True), echo=lambda _: None)
    # only --steps may grow
    summary = train(_cfg(tmp_path, "r", steps=2, eval_every=0, warm_start=0, resume=True), echo=lambda _: None)
    assert summary["finished"]
    assert list(train_steps(Store(f"sqlite:///{tmp_path}/h.db"), "r")["step"]) == [0, 1, 2]


def test_a_method_default_changed_since_the_run_started_is_refused_with_the_pin_that_resumes_it(tmp_path):
    """A newer harness must not silently train the rest of a run with other method settings: an
    effective setting that differs from the stored one (a changed default) is refused with the
    --method-arg that continues the run as it started; one the older harness did not have yet is
    named in a note."""
    train(_cfg(tmp_path, "r", steps=1, eval_every=0, warm_start=0), echo=lambda _: None)
    con = sqlite3.connect(tmp_path / "h.db")
    with con:  # what an older harness stored: another KL estimator, and no dual-clip setting yet
        config = json.loads(con.execute("SELECT config FROM runs WHERE name = 'r'").fetchone()[0])
        config["method_settings"]["kl_estimator"] = "k1"
        del config["method_settings"]["dual_clip"]
        con.execute("UPDATE runs SET config = ? WHERE name = 'r'", (json.dumps(config),))
    con.close()
    with pytest.raises(ConfigError, match=r"other method settings \(kl_estimator: 'k1' then, 'k3\+' now\); "
                                          r"resume it as it started with --method-arg kl_estimator=k1"):
        train(_cfg(tmp_path, "r", steps=2, eval_every=0, warm_start=0, resume=True), echo=lambda _: None)
    said: list[str] = []
    summary = train(_cfg(tmp_path, "r", steps=2, eval_every=0, warm_start=0, resume=True,
                         method_overrides={"kl_estimator": "k1"}), echo=said.append)
    assert summary["finished"]
    assert [line for line in said if line.startswith("note:")] == [
        "note: run 'r' was started by a harness without the method settings dual_clip; they take their values "
        "now: dual_clip=3.0"]


def test_bad_training_settings_fail_before_any_row(tmp_path):
    db = f"sqlite:///{tmp_path}/h.db"
    for kw, needle in (({"method": "ppo2"}, "unknown method 'ppo2'"),
                       ({"group_size": 1}, "at least 2"),
                       ({"temperature": 0.0}, "temperature must be > 0"),
                       ({"method_overrides": {"loss_agg": "sum"}}, "unknown --loss-agg"),
                       ({"train_split": "dev"}, "unknown split 'dev'"),
                       ({"tracker": "mlflow"}, "unknown --tracker")):
        with pytest.raises(ConfigError, match=needle):
            train(_cfg(tmp_path, "bad", **kw), echo=lambda _: None)
    assert Store(db).list_runs() == []


def test_train_curves_and_eval_from_the_command_line(tmp_path):
    db = f"sqlite:///{tmp_path}/cli.db"
    out = tmp_path / "run"
    proc = harness("train", "--env", "toy", "--policy", "tiny-toy", "--run", "cli", "--db", db, "--out-dir", str(out),
                   "--steps", "2", "--tasks-per-step", "2", "--group-size", "2", "--eval-every", "1",
                   "--eval-tasks", "2", "--max-new-tokens", "8", "--warm-start", "2", "--lr", "1e-3",
                   "--method", "dapo", "--clip-high", "0.3", "--tracker", "tensorboard", check=True)
    assert "curves:" in proc.stdout and (out / "curves.png").stat().st_size > 1000
    # the tensorboard mirror holds the same per-step metrics as the database, in the run's directory
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/success")] == [0, 1, 2]
    from harness.store import train_steps

    frame = train_steps(Store(db), "cli")
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx(list(frame["reward/mean"].dropna()),
                                                                             rel=1e-6)
    assert "step    2" in proc.stdout
    table = harness("results", "curves", "cli", "--db", db, "--out", str(tmp_path / "c.png"), "--format", "json",
                    check=True)
    rows = json.loads(table.stdout.split("plot:")[0])
    assert [r["step"] for r in rows] == [0, 1, 2] and "reward/mean" in rows[1] and "eval/success" in rows[0]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    stored = Store(db).get_run("cli").config
    assert stored["method_settings"]["clip_high"] == 0.3 and stored["method_settings"]["loss_agg"] == "token-mean"
    # the checkpoint is a loadable policy for `harness eval`
    ckpt = out / "checkpoints" / "step-000002"
    harness("eval", "--env", "toy", "--policy", str(ckpt), "--tasks", "0,1", "--max-new-tokens", "8", "--run", "ev",
            "--db", db, "--quiet", check=True)
    row = json.loads(harness("results", "show", "ev", "--db", db, "--format", "json", check=True).stdout)[0]
    assert row["episodes"] == 2 and row["agent"] == "hf"
    # user errors: one line, exit 2, no traceback
    for args, needle in ((["--policy", str(tmp_path)], "without config.json"),
                         (["--policy", "tiny-toy", "--method", "nope"], "unknown method")):
        bad = harness("train", "--env", "toy", *args, "--db", db, "--run", "x")
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr
    bad = harness("results", "curves", "ev", "--db", db)
    assert bad.returncode == 2 and "eval run" in bad.stderr
    # siblings of a local policy must be sampled, as for an API model
    bad = harness("eval", "--env", "toy", "--policy", str(ckpt), "--group-size", "4", "--db", db, "--run", "g")
    assert bad.returncode == 2 and "--group-size needs sampled siblings" in bad.stderr


def test_out_of_memory_names_the_micro_batch_and_the_setting(tmp_path):
    """An OOM inside a micro-batch stops with which batch, how many tokens and what to change."""
    from harness.policy.trace import TokenTrace
    from trainers.methods import Prepared, make_method
    from trainers.update import MicroBatchOOM, UpdateSettings, policy_update

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    traces = []
    for n in (6, 5, 7):
        t = TokenTrace()
        t.add_prompt(list(range(1, n)))
        t.add_response([3, 4], [-0.5, -0.7])
        traces.append(t)
    model = Exploding()
    with pytest.raises(MicroBatchOOM, match=r"micro-batch 1/3 \(8 tokens\).*--micro-batch-tokens \(now 10\)"):
        policy_update(model, torch.optim.AdamW(model.parameters()), Prepared(traces, [1.0, -1.0, 0.5]),
                      make_method("grpo"), UpdateSettings(micro_batch_tokens=10), pad_token_id=0, seed=0)


def test_lora_run_resumes_and_its_adapter_checkpoint_is_a_policy(tmp_path):
    pytest.importorskip("peft")
    from harness.policy.local_policy import LocalPolicy, PolicyConfig

    cfg = _cfg(tmp_path, "lora", steps=2, eval_every=0, warm_start=0, lora_rank=4, stop_after=1)
    train(cfg, echo=lambda _: None)
    summary = train(replace(cfg, stop_after=None, resume=True), echo=lambda _: None)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "config.json").exists()
    policy = LocalPolicy(PolicyConfig(path=str(ckpt), device="cpu"))
    trained = [n for n, p in policy.model.named_parameters() if "lora_" in n]
    assert trained, "the adapter's LoRA weights are loaded"


def test_a_sequence_over_the_micro_batch_budget_is_a_user_error_and_resume_may_raise_it(tmp_path):
    db = f"sqlite:///{tmp_path}/h.db"
    args = ("train", "--env", "toy", "--policy", "tiny-toy", "--run", "mb", "--db", db,
            "--out-dir", str(tmp_path / "mb"), "--steps", "1", "--tasks-per-step", "1", "--group-size", "2",
            "--eval-every", "0", "--max-new-tokens", "8")
    bad = harness(*args, "--micro-batch-tokens", "16")
    assert bad.returncode == 2 and "raise --micro-batch-tokens" in bad.stderr and "Traceback" not in bad.stderr
    # micro-batching does not change the math, so the stopped run resumes with a bigger budget
    harness(*args, "--micro-batch-tokens", "4096", "--resume", check=True)
    assert Store(db).get_run("mb").status == "finished"
