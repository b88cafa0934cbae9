"""`harness results show` on a τ-airline run: the official termination breakdown, and per task the
DB match and the partial action reward, read from what the grader stored.

The store is real: a CLI oracle run (trial 0 of three τ³ tasks, all solved) plus hand-made
episodes graded by the real grader at trial 1 (a wrong booking, a gold replay cut off by
max_steps, an agent that did nothing) and an infrastructure error at trial 2, which no score counts.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_airline_tools import gold_calls, make_trajectory

from envs.tau.airline import grading
from envs.tau.airline.db import AirlineState, load_base
from envs.tau.data import airline_paths, load_airline_tasks
from harness.store import Store
from harness.types import EpisodeResult, ErrorClass, Termination

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_REASONS = ("user_stop", "agent_stop", "max_steps", "too_many_errors", "agent_error", "user_error",
                    "timeout", "infrastructure_error", "context_window_exceeded")


def _harness(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def db(tmp_path_factory, tau_mirror) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('show')}/runs.db"
    _harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "1,11,14",
             "--db", url, "--run", "r", "--quiet")
    base = load_base(airline_paths("tau3").db)
    tasks = {str(t["id"]): t for t in load_airline_tasks("tau3")}
    wrong = copy.deepcopy(gold_calls(tasks["14"]))  # cancels right, books with a wrong passenger name
    wrong[1][1]["passengers"][0]["first_name"] = "Rajesh"
    cases = [("14", wrong, "user_stop"), ("1", gold_calls(tasks["1"]), "max_steps"), ("11", [], "user_stop")]
    store = Store(url)
    for task_id, calls, termination in cases:
        messages = make_trajectory(calls, AirlineState(base), "Your total is 327, 1000 and 1786; 5244.")
        score = grading.grade(tasks[task_id], messages, termination, base)
        assert score.reward == 0.0
        store.add_episode("r", EpisodeResult(task_id=task_id, trial=1, seed=1, messages=messages, score=score,
                                             termination=Termination(termination)))
    messages = make_trajectory([], AirlineState(base), None)
    store.add_episode("r", EpisodeResult(
        task_id="1", trial=2, seed=2, messages=messages, termination=Termination.INFRASTRUCTURE_ERROR,
        score=grading.grade(tasks["1"], messages, "infrastructure_error", base), error_class=ErrorClass.INFRA))
    store.close()
    return url


def test_show_json_has_every_official_termination_and_per_task_checks(db):
    row = json.loads(_harness("results", "show", "r", "--db", db, "--format", "json"))[0]
    terminations = {key.split("/", 1)[1]: value for key, value in row.items() if key.startswith("termination/")}
    assert terminations == {reason: 0 for reason in OFFICIAL_REASONS} | {
        "user_stop": 5, "max_steps": 1, "infrastructure_error": 1}
    assert row["db_match"] == pytest.approx(4 / 6)  # scored episodes only; the infra one is left out
    assert row["action_reward"] == pytest.approx((3 + 0.5 + 1 + 0) / 6)
    per_task = {t["task_id"]: t for t in row["per_task"]}
    assert list(per_task) == ["1", "11", "14"]
    assert per_task["1"] == {"task_id": "1", "episodes": 2, "success": 0.5, "db_match": 1.0, "action_reward": 1.0,
                             "gold_actions": 2}
    assert per_task["11"] == {"task_id": "11", "episodes": 2, "success": 0.5, "db_match": 0.5, "action_reward": 0.5,
                              "gold_actions": 1}
    assert per_task["14"] == {"task_id": "14", "episodes": 2, "success": 0.5, "db_match": 0.5,
                              "action_reward": 0.75, "gold_actions": 2}


def test_show_table_lists_terminations_in_order_and_fits_100_columns(db):
    text = _harness("results", "show", "r", "--db", db)
    lines = text.splitlines()
    # The per-task table fits 100 columns; so would the summary, were it not for the one-line
    # nonstandard_reasons cell of this (oracle, scripted user, 3-task) run.
    start = next(i for i, line in enumerate(lines) if "Per task (scored episodes)" in line)
    assert max(len(line) for line in lines[start:]) <= 100
    assert max(len(line.split("│")[1]) for line in lines[:start] if line.startswith("│")) <= 40  # metric names
    assert {t.value for t in Termination} == set(OFFICIAL_REASONS)  # the harness's names are the official ones
    order = [next(i for i, line in enumerate(lines) if f" termination/{t.value} " in line) for t in Termination]
    assert order == list(range(order[0], order[0] + len(order)))  # one block, in Termination order
    task_14 = next(line for line in lines if line.startswith("│ 14 "))
    assert [cell.strip() for cell in task_14.strip("│").split("│")] == ["14", "2", "0.500", "0.500", "0.750", "2"]
    # csv stays one leaderboard line; markdown keeps the two tables apart
    assert len(_harness("results", "show", "r", "--db", db, "--format", "csv").splitlines()) == 2
    assert "|\n\n| task_id |" in _harness("results", "show", "r", "--db", db, "--format", "markdown")
