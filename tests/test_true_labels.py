"""Labels that are true (issue 21): what a stored run says about itself matches what happened.

- A train run's evaluation points name the weights they evaluated (the step's checkpoint, or the
  step when no checkpoint keeps those weights), never the initial policy, and store the env's
  settings and their decoding as ``harness eval`` does.
- ``results show`` of a train run is its train summary, not an eval table of zeros.
- ``wall_seconds`` is the run's wall time; the episodes' summed times are ``episode_seconds``.
- Eval runs state their decoding, and ``results compare`` refuses runs that decode differently
  unless ``--allow-different-decoding`` (then it warns).

One real toy training run (the CLI in a subprocess, the tiny toy policy, 2 steps) serves the
module; the eval runs are real ``harness eval`` runs of its checkpoint.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("torch")

from test_cli import harness  # noqa: E402

from harness.results import show_table  # noqa: E402
from harness.store import Store, checkpoints  # noqa: E402
from harness.types import EpisodeResult, Score, Termination  # noqa: E402

RUN = "labels"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path]:
    """A finished 2-step toy run evaluated at steps 0, 1 and 2 (sampled: temperature 1, 2 samples
    per task) that checkpoints at steps 0 and 2 only."""
    root = tmp_path_factory.mktemp("labels")
    db = f"sqlite:///{root}/h.db"
    harness("train", "--env", "toy", "--policy", "tiny-toy", "--method", "grpo", "--steps", "2",
            "--tasks-per-step", "1", "--group-size", "2", "--eval-every", "1", "--eval-tasks", "3",
            "--eval-temperature", "1", "--eval-trials", "2", "--max-new-tokens", "8", "--checkpoint-every", "2",
            "--env-arg", "max_steps=5", "--run", RUN, "--db", db, "--out-dir", str(root / "out"), check=True)
    return db, root


def test_evaluation_points_name_the_weights_they_evaluated_and_their_settings(trained):
    db, root = trained
    store = Store(db)
    saved = dict(checkpoints(store, RUN))
    assert sorted(saved) == [0, 2]
    for step in (0, 2):
        point = store.get_run(f"{RUN}/eval-step-{step:06d}")
        assert point.agent_model == saved[step] and Path(point.agent_model).is_dir()
    unsaved = store.get_run(f"{RUN}/eval-step-000001")
    assert unsaved.agent_model == f"{RUN} step 1 (not checkpointed)"
    for step in (0, 1, 2):
        cfg = store.get_run(f"{RUN}/eval-step-{step:06d}").config
        # the env's settings, flat and described, as harness eval stores them
        assert cfg["max_steps"] == 5 and cfg["env_settings"]["max_steps"] == 5
        assert cfg["task_ids"] == ["0", "1", "2"] and cfg["max_new_tokens"] == 8
        assert cfg["decoding"] == {"sampling": "temperature 1", "temperature": 1.0, "samples": 2}
        assert cfg["initial_policy"] == str(root / "out" / "init-tiny-toy")


def test_results_show_of_a_train_run_is_its_train_summary(trained):
    db, _ = trained
    shown = harness("results", "show", RUN, "--db", db, check=True)
    for row in ("method", "eval/decoding", "eval/success/final", "eval/success/final_ci95_low",
                "eval/success/best", "reward/mean/last5", "loss/policy/last5", "wall_seconds"):
        assert row in shown.stdout, row
    assert "agent_prompt_tokens" not in shown.stdout and "pass^1" not in shown.stdout
    record = json.loads(harness("results", "show", RUN, "--db", db, "--format", "json", check=True).stdout)[0]
    assert record["run"] == RUN and record["method"] == "grpo" and record["steps"] == 2
    assert record["eval/decoding"] == "temperature 1, 2 samples per task"
    assert record["config/max_new_tokens"] == "8"
    # the CI brackets the final held-out success (from the last evaluation point's episodes)
    low, final, high = (record[f"eval/success/{k}"] for k in ("final_ci95_low", "final", "final_ci95_high"))
    assert low <= final <= high
    run = Store(db).get_run(RUN)
    assert record["wall_seconds"] == pytest.approx((run.finished_at - run.created_at).total_seconds())


def _episode(task: str, seconds: float) -> EpisodeResult:
    return EpisodeResult(task_id=task, trial=0, seed=0, messages=[], termination=Termination.USER_STOP,
                         score=Score(reward=1.0, success=True), wall_seconds=seconds)


def test_wall_seconds_is_the_runs_wall_time_and_episode_seconds_their_sum(tmp_path):
    """Three 100 s episodes that ran side by side in a run that took 120 s: the run's wall time is
    120 s, not the 300 s the episodes add up to."""
    store = Store(f"sqlite:///{tmp_path}/w.db")
    store.create_run("side-by-side", "eval", "toy", "toy-v2", "test", "oracle", None, None, None, {})
    for task in ("0", "1", "2"):
        store.add_episode("side-by-side", _episode(task, 100.0))
    store.set_run_status("side-by-side", "finished")
    with store.engine.begin() as conn:  # the run started 120 s before it finished
        from sqlalchemy import update

        from harness.store.schema import Run

        finished = store.get_run("side-by-side").finished_at
        conn.execute(update(Run).values(created_at=finished - timedelta(seconds=120)))
    row = show_table(store, "side-by-side").iloc[0]
    assert row["wall_seconds"] == pytest.approx(120.0) and row["episode_seconds"] == pytest.approx(300.0)


def test_eval_states_its_decoding_and_compare_refuses_different_ones(trained):
    db, _ = trained
    checkpoint = dict(checkpoints(Store(db), RUN))[2]
    common = ("eval", "--env", "toy", "--policy", checkpoint, "--tasks", "0,1,2", "--max-new-tokens", "8",
              "--db", db)
    greedy = harness(*common, "--run", "greedy", check=True)
    assert "decoding: greedy" in " ".join(greedy.stderr.split())  # the line may wrap at the terminal's width
    assert Store(db).get_run("greedy").config["decoding"]["sampling"] == "greedy"
    sampled = harness(*common, "--temperature", "1", "--run", "sampled", check=True)
    assert "decoding: temperature 1" in " ".join(sampled.stderr.split())
    shown = json.loads(harness("results", "show", "sampled", "--db", db, "--format", "json", check=True).stdout)[0]
    assert shown["decoding"] == "temperature 1, 1 sample per task"

    refused = harness("results", "compare", "greedy", "sampled", "--db", db)
    assert refused.returncode == 2 and refused.stdout == ""
    [line] = refused.stderr.strip().splitlines()
    assert "greedy: greedy, 1 sample per task" in line and "sampled: temperature 1" in line
    assert "--allow-different-decoding" in line
    # training's held-out evaluation sampled at temperature 1: not comparable with greedy either
    assert harness("results", "compare", "greedy", f"{RUN}/eval-step-000002", "--db", db).returncode == 2
    # and the same decoding compares as before (the sample count may differ: pass^k shows it)
    harness("results", "compare", "sampled", f"{RUN}/eval-step-000002", "--db", db, check=True)

    allowed = harness("results", "compare", "greedy", "sampled", "--allow-different-decoding", "--db", db, check=True)
    assert "warning: these runs decode differently" in allowed.stderr and "decoding" in allowed.stdout


def test_compare_refuses_train_runs_whose_held_out_evaluations_decode_differently(trained):
    """A train run stored with greedy held-out evaluation (as ``harness train`` stores its settings)
    against the module's sampled one."""
    db, root = trained
    store = Store(db)
    settings = dict(store.get_run(RUN).config, train={**store.get_run(RUN).config["train"], "eval_temperature": 0.0,
                                                         "eval_trials": 1})
    store.create_run("greedy-train", "train", "toy", "toy-v2", "train", "hf", "tiny-toy", None, None, settings)
    store.set_run_status("greedy-train", "finished")
    refused = harness("results", "compare", RUN, "greedy-train", "--db", db, "--out", str(root / "compare.png"))
    assert refused.returncode == 2 and "decode differently" in refused.stderr
    # a train run that never evaluated shows no held-out decoding (nor a table of zeros)
    shown = json.loads(harness("results", "show", "greedy-train", "--db", db, "--format", "json", check=True).stdout)
    assert shown[0]["eval/decoding"] is None and shown[0]["method"] == "grpo" and "pass^1" not in shown[0]
