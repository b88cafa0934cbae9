"""``harness train`` on tau-airline: the env settings (user simulator, data version, episode
limits) reach the training loop, and rollouts, grading and held-out eval runs use the real τ env.

The policy is the tiny toy model with 16k positions (the τ airline system prompt alone is ~6.5k
tokens in its toy tokenizer); it cannot solve τ tasks, so the test is about plumbing: the run
finishes, its step and eval rows exist, and the eval run is graded by the τ grader.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from test_cli import harness  # noqa: E402

from envs.toy.policy import toy_texts  # noqa: E402
from harness.policy.tiny_model import build_tiny_policy  # noqa: E402
from harness.store import (
    Store,  # noqa: E402
    train_steps,  # noqa: E402
)


def test_train_on_tau_airline_with_a_scripted_user(tmp_path):
    policy = build_tiny_policy(tmp_path / "tiny16k", toy_texts(), max_positions=16384)
    db = f"sqlite:///{tmp_path}/h.db"
    proc = harness("train", "--env", "tau-airline", "--user", "scripted", "--policy", str(policy), "--method", "grpo",
                   "--steps", "1", "--tasks-per-step", "1", "--group-size", "2", "--eval-every", "1",
                   "--eval-tasks", "1", "--max-new-tokens", "8", "--max-steps", "6", "--micro-batch-tokens", "16384",
                   "--run", "tau",
                   "--db", db, "--out-dir", str(tmp_path / "out"), check=True)
    assert "run tau finished" in proc.stdout
    store = Store(db)
    run = store.get_run("tau")
    assert run.env == "tau-airline" and run.split == "train"
    assert run.config["train"]["env_options"] == {"user": "scripted", "max_steps": 6}
    steps = train_steps(store, "tau")
    assert list(steps["step"]) == [0, 1] and steps.iloc[-1]["len/turns"] >= 1
    evaluated = store.get_run("tau/eval-step-000001")
    assert evaluated.env == "tau-airline" and evaluated.split == "test"
    # labelled as harness eval labels a run: its user simulator and the env's settings
    assert evaluated.user == "scripted" and evaluated.config["max_steps"] == 6
    assert evaluated.config["env_settings"]["user"]["kind"] == "scripted"
    # a tau run without a user model gets the user simulator's own clear error
    bad = harness("train", "--env", "tau-airline", "--policy", str(policy), "--run", "nouser", "--db", db)
    assert bad.returncode == 2 and "--user-model" in bad.stderr


def test_train_on_appworld_against_a_fake_server(tmp_path):
    """AppWorld settings reach the loop: pre-started servers (``--appworld-url``), the data root,
    the interaction limit; rollouts and the held-out eval run go through the AppWorld env."""
    from fakes.appworld_server import FakeAppWorldServer, write_root

    from trainers.config import TrainConfig
    from trainers.loop import train

    root = write_root(tmp_path / "aw")
    policy = build_tiny_policy(tmp_path / "tiny8k", toy_texts(), max_positions=8192)
    server = FakeAppWorldServer(root).start()
    try:
        cfg = TrainConfig(env="appworld", policy=str(policy), run="aw", db=f"sqlite:///{tmp_path}/h.db",
                          out_dir=str(tmp_path / "out"), steps=1, tasks_per_step=1, group_size=2, eval_every=1,
                          eval_tasks=1, max_new_tokens=8, micro_batch_tokens=8192, quiet=True, train_split="train",
                          env_options={"appworld_root": str(root), "appworld_urls": [server.base_url],
                                       "max_interactions": 2})
        summary = train(cfg, echo=lambda _: None)
    finally:
        server.stop()
    assert summary["finished"]
    store = Store(cfg.db)
    assert cfg.eval_split == "dev"  # appworld's default held-out split
    assert store.get_run("aw").config["train"]["env_options"] == {"max_interactions": 2}  # URLs/root are volatile
    assert store.get_run("aw/eval-step-000001").env == "appworld"
    assert list(train_steps(store, "aw")["step"]) == [0, 1]
    assert any(path == "/initialize" for path, _ in server.requests)
