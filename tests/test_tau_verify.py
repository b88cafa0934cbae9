"""`harness results export --format tau2` passes the OFFICIAL leaderboard verification.

The official ``tau2 submit verify-trajs`` (``tests/differential/tau2_verify.py`` in the reference
venv, ``$HARNESS_TAU2_PYTHON``; skipped without it unless ``HARNESS_REQUIRE_DIFFERENTIAL=1``) checks
three things: the file loads with the official models, its ``tasks`` equal the pinned ``base`` tasks
object for object, and every task has exactly ``info.num_trials`` simulations. Runs are made,
exported and packaged (``results submission``) with the real CLI (oracle agent, scripted user: no
LLM), as a user would.

The negatives keep the positive honest: a task-subset run and a run whose file claims 4 trials but
carries 2 for one task (two infrastructure errors, which the export leaves out) must both fail it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import official_tau2_python
from sqlalchemy import text

from envs.tau.data import airline_paths, load_airline_tasks
from harness.store import Store

REPO = Path(__file__).resolve().parents[1]
VERIFY = REPO / "tests" / "differential" / "tau2_verify.py"
REGRADE = REPO / "tests" / "differential" / "tau2_regrade.py"


def _harness(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tau_mirror) -> str:
    """A sqlite store with oracle runs: all base tasks with 4 trials on τ³ (``full-tau3``) and τ²
    (``full-tau2``), three τ³ tasks with 4 trials (``subset``), and ``lost-trials``: the τ² run
    again, with trials 2 and 3 of task 0 turned into infrastructure errors; ``lost-small`` is
    ``lost-trials`` on three tasks (the official re-grade takes about a second per episode)."""
    db = f"sqlite:///{tmp_path_factory.mktemp('verify')}/runs.db"
    oracle = ("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--trials", "4",
              "--db", db, "--quiet")
    _harness(*oracle, "--run", "full-tau3")
    _harness(*oracle, "--run", "full-tau2", "--data-version", "tau2")
    _harness(*oracle, "--run", "lost-trials", "--data-version", "tau2")
    _harness(*oracle, "--run", "subset", "--tasks", "0,1,2")
    _harness(*oracle, "--run", "lost-small", "--data-version", "tau2", "--tasks", "0,1,2")
    store = Store(db)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE episodes SET error_class = 'infra', termination = 'infrastructure_error', "
                          "reward = 0.0, success = 0 WHERE task_id = '0' AND trial IN (2, 3) AND run_id IN "
                          "(SELECT id FROM runs WHERE name IN ('lost-trials', 'lost-small'))"))
    store.close()
    return db


def _export(db: str, run: str, out: Path) -> dict:
    _harness("results", "export", run, "--format", "tau2", "--out", str(out), "--db", db)
    return json.loads(out.read_text(encoding="utf-8"))


def _verify(path: Path, version: str) -> subprocess.CompletedProcess:
    """The official verification; for τ³ against the pinned τ³ tasks (see the driver's docstring)."""
    override = ["--airline-tasks", str(airline_paths("tau3").tasks)] if version == "tau3" else []
    return subprocess.run([official_tau2_python(), str(VERIFY), *override, str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})


@pytest.mark.differential
@pytest.mark.parametrize("version", ["tau3", "tau2"])
def test_oracle_export_passes_official_verification(runs, tmp_path, version):
    path = tmp_path / f"{version}.json"
    _export(runs, f"full-{version}", path)
    proc = _verify(path, version)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Tasks validation" in proc.stdout and "Trial count validation" in proc.stdout
    assert "❌" not in proc.stdout


@pytest.mark.differential
def test_packaged_submission_passes_official_verification(runs, tmp_path):
    """The trajectories of `harness results submission` (the same export) pass it too."""
    out = tmp_path / "submission"
    _harness("results", "submission", "full-tau3", "--out", str(out), "--db", runs, "--model-name", "oracle",
             "--model-organization", "None (test)", "--submitting-organization", "harness tests",
             "--contact-email", "tests@example.org")
    files = sorted((out / "trajectories").glob("*.json"))
    assert len(files) == 1
    proc = _verify(out / "trajectories", "tau3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All files passed all checks" in proc.stdout


@pytest.mark.differential
@pytest.mark.parametrize(("run", "version", "failed_check"), [("subset", "tau3", "Tasks validation: Missing tasks"),
                                                               ("lost-trials", "tau2", "Trial count validation")])
def test_incomplete_runs_fail_official_verification(runs, tmp_path, run, version, failed_check):
    path = tmp_path / f"{run}.json"
    doc = _export(runs, run, path)
    assert doc["info"]["num_trials"] == 4
    proc = _verify(path, version)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"❌ {failed_check}" in proc.stdout


def test_export_embeds_pinned_tasks_trials_seeds_and_grader(runs, tmp_path):
    doc = _export(runs, "full-tau3", tmp_path / "r.json")
    assert doc["tasks"] == load_airline_tasks("tau3", "base")  # the pinned objects, key for key
    info = doc["info"]
    assert (info["num_trials"], info["seed"], info["grader"]) == (4, 300, "tau-1.0.1")
    assert info["agent_info"]["implementation"] == "harness:oracle"
    assert info["user_info"]["implementation"] == "harness:scripted"
    seeds = {(s["task_id"], s["trial"]): s["seed"] for s in doc["simulations"]}
    assert len(seeds) == 200 and len({seeds[("0", t)] for t in range(4)}) == 4  # one seed per trial
    assert all(seeds[(t, k)] == seeds[("0", k)] for t, k in seeds)  # the official draw: per trial, not per task

    store = Store(runs)
    assert store.get_run("full-tau2").config["grader"] == "tau-0.2.0"  # stamped by harness eval
    assert _export(runs, "full-tau2", tmp_path / "r2.json")["info"]["grader"] == "tau-0.2.0"
    with store.engine.begin() as conn:  # a run stored before --grader existed: its data version's grader
        conn.execute(text("UPDATE runs SET config = json_remove(config, '$.grader') WHERE name = 'lost-small'"))
    store.close()
    assert _export(runs, "lost-small", tmp_path / "r3.json")["info"]["grader"] == "tau-0.2.0"


@pytest.mark.differential
def test_official_metrics_truncate_pass_k_like_ours(runs, tmp_path):
    """The pass^k truncation rule (1.0.1 ``agent_metrics``: only up to the fewest trials any task
    has once infra errors are dropped), on a run with two of task 0's trials lost: the official
    ``compute_metrics`` on our export reports exactly the pass^k that ``results show`` reports."""
    path = tmp_path / "lost.json"
    _export(runs, "lost-small", path)
    proc = subprocess.run([official_tau2_python(), str(REGRADE), str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]["pass_hat_ks"]
    shown = json.loads(_harness("results", "show", "lost-small", "--db", runs, "--format", "json").stdout)[0]
    ours = {key[len("pass^"):]: value for key, value in shown.items() if re.fullmatch(r"pass\^\d+", key)}
    assert ours == theirs == {"1": 1.0, "2": 1.0}
    assert shown["infra_episodes"] == 2 and shown["trials"] == 2
