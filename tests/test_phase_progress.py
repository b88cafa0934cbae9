"""Held-out evaluation and rollouts during ``harness train`` say how far they got (issue 21: every
phase over ~10 s prints progress; on a busy machine an evaluation of 60 tasks took minutes in
silence). A real tiny toy run; only the cadence is shortened so that a short run speaks."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from trainers import sft  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.loop import train  # noqa: E402


def _train(tmp_path, tiny_toy_dir, quiet: bool):
    cfg = TrainConfig(env="toy", policy=str(tiny_toy_dir), run="progress", db=f"sqlite:///{tmp_path}/h.db",
                      out_dir=str(tmp_path / "out"), steps=1, tasks_per_step=2, group_size=2, eval_every=1,
                      eval_tasks=3, max_new_tokens=8, quiet=quiet)
    return train(cfg, echo=lambda _: None)


def test_train_reports_evaluation_and_rollout_progress_on_stderr(tmp_path, tiny_toy_dir, monkeypatch, capfd):
    monkeypatch.setattr(sft, "PROGRESS_EVERY_S", 0.001)
    assert _train(tmp_path, tiny_toy_dir, quiet=False)["finished"]
    out, err = capfd.readouterr()
    lines = err.splitlines()
    for step in (0, 1):  # the baseline and the final evaluation
        evals = [x for x in lines if x.startswith(f"held-out evaluation at step {step}:")]
        assert evals, err
        assert all(re.fullmatch(rf"held-out evaluation at step {step}: [0-3]/3 episodes \(\d+ s\)", x) for x in evals)
    rollouts = [x for x in lines if x.startswith("rollout of step 1:")]
    assert rollouts and all(re.fullmatch(r"rollout of step 1: [0-4]/4 episodes \(\d+ s\)", x) for x in rollouts), err
    assert "episodes (" not in out, "progress goes to stderr; stdout keeps the step lines"


def test_quiet_train_prints_no_progress(tmp_path, tiny_toy_dir, monkeypatch, capfd):
    monkeypatch.setattr(sft, "PROGRESS_EVERY_S", 0.001)
    assert _train(tmp_path, tiny_toy_dir, quiet=True)["finished"]
    assert "episodes (" not in capfd.readouterr().err
