"""τ² export and offline re-grading.

One module-scoped store is built with the real CLI (oracle agent, scripted user, τ² tasks) plus
hand-made episodes stored through ``Store.add_episode``: a wrong booking, a missing communicate
message, a max_steps and a timeout termination (reward 0), a read-only episode with two tool calls
in one message, a failing call and a malformed call (reward 1), and an infra failure (excluded).

The differential test loads the export with the OFFICIAL package (``tests/differential/
tau2_regrade.py`` in the reference venv, ``$HARNESS_TAU2_PYTHON``, default ``.venv-tau2/bin/python``;
skipped without it unless ``HARNESS_REQUIRE_DIFFERENTIAL=1``) and checks its re-grade gives exactly
our reward for every simulation.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import official_tau2_python
from sqlalchemy import text

from envs.registry import env_class
from envs.tau.airline import grading, tools
from envs.tau.airline.db import AirlineState, load_base
from envs.tau.data import airline_paths, load_airline_tasks
from envs.tau.export import convert_messages, export_tau2
from harness.errors import ConfigError
from harness.rescore import rescore
from harness.store import Store
from harness.types import EpisodeResult, ErrorClass, Termination, Usage

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "differential" / "tau2_regrade.py"
RUN = "oracle-tau2"
TAU_REGRADER = env_class("tau-airline").regrader
CLI_TASKS = "0,1,3,11,14"
GREETING = "Hi! How can I help you today?"


def _messages(calls, final: str | None, base, *, per_message: int = 1) -> list[dict]:
    """Greeting, a user line, tool calls executed on our engine (``per_message`` per assistant
    message; raw-string arguments are kept verbatim), a final text and the user's stop."""
    state = AirlineState(base)
    msgs = [{"role": "assistant", "content": GREETING}, {"role": "user", "content": "I need help."}]
    for start in range(0, len(calls), per_message):
        chunk = calls[start:start + per_message]
        tcs, results = [], []
        for i, (name, args) in enumerate(chunk, start):
            raw = args if isinstance(args, str) else json.dumps(args)
            tcs.append({"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": raw}})
            if isinstance(args, str):
                content = "Error: tool arguments are not valid JSON"
            else:
                content = tools.execute(state, name, args).content
            results.append({"role": "tool", "tool_call_id": f"call_{i}", "name": name, "content": content})
        msgs += [{"role": "assistant", "content": None, "tool_calls": tcs}, *results]
    if final is not None:
        msgs.append({"role": "assistant", "content": final})
    msgs.append({"role": "user", "content": "Thanks. ###STOP###"})
    return msgs


def _gold(task) -> list[tuple[str, dict]]:
    return [(a["name"], copy.deepcopy(a["arguments"])) for a in task["evaluation_criteria"]["actions"]]


def _handmade(tasks: dict, base) -> list[tuple[EpisodeResult, float]]:
    """(episode, expected reward) pairs, all at trial 1 of tasks the CLI played at trial 0."""
    wrong = _gold(tasks["14"])
    wrong[1][1]["passengers"][1]["first_name"] = "Rajesh"  # books successfully, but the wrong name
    cases = [
        ("14", _messages(wrong, "Done.", base), "user_stop", 0.0),
        ("11", _messages(_gold(tasks["11"]), "Your flights are changed.", base), "user_stop", 0.0),  # no "5244"
        ("0", _messages(_gold(tasks["0"]), "Done.", base), "max_steps", 0.0),
        ("1", _messages(_gold(tasks["1"]), "Done.", base), "timeout", 0.0),
        ("3", _messages(_gold(tasks["3"]) + [("get_user_details", {"user_id": "nobody_1"}),
                                              ("get_user_details", "{not json")],
                        "There are 4 passengers on that reservation.", base, per_message=2), "agent_stop", 1.0),
    ]
    out = []
    for task_id, msgs, termination, expected in cases:
        score = grading.grade(tasks[task_id], msgs, termination, base)
        out.append((EpisodeResult(task_id=task_id, trial=1, seed=7, messages=msgs, termination=Termination(termination),
                                  score=score, agent_usage=Usage(cost=0.25), wall_seconds=1.5), expected))
    infra = EpisodeResult(task_id="3", trial=2, seed=9, messages=msgs[:2], score=grading.grade(
        tasks["3"], msgs[:2], "infrastructure_error", base), termination=Termination.INFRASTRUCTURE_ERROR,
        error_class=ErrorClass.INFRA, error="HTTP 503 from provider")
    out.append((infra, 0.0))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tau_mirror):
    """A sqlite store with the CLI oracle run plus the hand-made episodes (do not mutate: copy)."""
    root = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{root}/r.db"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "eval", "--env", "tau-airline", "--agent", "oracle", "--user",
         "scripted", "--db", url, "--run", RUN, "--quiet", "--data-version", "tau2", "--tasks", CLI_TASKS],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    base = load_base(airline_paths("tau2").db)
    tasks = {str(t["id"]): t for t in load_airline_tasks("tau2")}
    store = Store(url)
    for episode, expected in _handmade(tasks, base):
        assert episode.score.reward == expected, (episode.task_id, episode.termination, episode.score)
        store.add_episode(RUN, episode)
    store.close()
    return root / "r.db"


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the built store."""
    for f in built.parent.glob(built.name + "*"):
        shutil.copy(f, tmp_path / f.name)
    s = Store(f"sqlite:///{tmp_path / built.name}")
    yield s
    s.close()


def _tau2_python() -> str:
    return official_tau2_python()


# --- export ------------------------------------------------------------------------------------

@pytest.mark.differential
def test_official_package_loads_export_and_regrades_identically(store, tmp_path):
    python = _tau2_python()
    path = export_tau2(store, RUN, tmp_path / "out" / "results.json")
    proc = subprocess.run([python, str(DRIVER), str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    official = json.loads(proc.stdout.strip().splitlines()[-1])

    df = store.episodes_df(RUN)
    ours = {(r.task_id, int(r.trial)): float(r.reward) for r in df.itertuples() if r.error_class != "infra"}
    theirs = {(s["task_id"], s["trial"]): s["reward"] for s in official["simulations"]}
    assert theirs == ours
    assert all(s["stored_reward"] == s["reward"] for s in official["simulations"])
    assert set(ours.values()) == {0.0, 1.0}
    assert sum(v == 0.0 for v in ours.values()) == 4
    assert official["num_tasks"] == len(CLI_TASKS.split(","))
    assert official["metrics"]["avg_reward"] == pytest.approx(sum(ours.values()) / len(ours))


def test_export_shapes(store, tmp_path):
    doc = json.loads(export_tau2(store, RUN, tmp_path / "r.json").read_text())
    assert doc["info"]["environment_info"]["domain_name"] == "airline"
    assert doc["info"]["environment_info"]["policy"] == airline_paths("tau2").policy.read_text()
    assert doc["harness"] == {"run": RUN, "data_version": "tau2", "excluded_infra": 1}
    assert sorted(t["id"] for t in doc["tasks"]) == sorted(CLI_TASKS.split(","))
    sims = {(s["task_id"], s["trial"]): s for s in doc["simulations"]}
    assert ("3", 2) not in sims and len(sims) == 10  # 5 CLI + 5 hand-made; the infra one is left out
    assert sims[("1", 1)]["termination_reason"] == "agent_error"
    assert sims[("1", 1)]["reward_info"]["info"]["harness"]["termination"] == "timeout"
    assert sims[("14", 1)]["reward_info"]["db_check"] == {"db_match": False, "db_reward": 0.0}
    # the official per-gold-action checks: task 14's booking has a wrong passenger name
    checks = sims[("14", 1)]["reward_info"]["action_checks"]
    assert [(c["action"]["name"], c["action_match"]) for c in checks] == [("cancel_reservation", True),
                                                                         ("book_reservation", False)]
    assert checks[1]["action"] == doc["tasks"][[t["id"] for t in doc["tasks"]].index("14")][
        "evaluation_criteria"]["actions"][1]
    assert sims[("11", 1)]["reward_info"]["communicate_checks"][0]["met"] is False
    assert len({s["id"] for s in sims.values()}) == 10
    assert sims[("0", 0)]["agent_cost"] == 0.0 and sims[("3", 1)]["agent_cost"] == 0.25
    # re-export is byte-identical (stable ids, no wall-clock fields)
    assert export_tau2(store, RUN, tmp_path / "again.json").read_text() == (tmp_path / "r.json").read_text()


def test_convert_messages_shapes():
    msgs = [
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_user_details", "arguments": '{"user_id": "x"}'}},
            {"id": "b", "type": "function", "function": {"name": "list_all_airports", "arguments": ""}},
            {"id": "c", "type": "function", "function": {"name": "calculate", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "a", "name": "get_user_details", "content": "Error: User x not found"},
        {"role": "tool", "tool_call_id": "b", "name": "list_all_airports", "content": "{}"},
        {"role": "tool", "tool_call_id": "c", "name": "calculate", "content": "Error: tool arguments must be ..."},
    ]
    out = convert_messages(msgs)
    assert [m["turn_idx"] for m in out] == list(range(5))
    call = out[2]
    assert [tc["arguments"] for tc in call["tool_calls"]] == [{"user_id": "x"}, {}]
    assert call["tool_calls"][0] == {"id": "a", "name": "get_user_details", "arguments": {"user_id": "x"},
                                     "requestor": "assistant"}
    assert call["raw_data"]["harness_dropped_tool_calls"][0]["id"] == "c"
    assert [(m["id"], m["error"], m["requestor"]) for m in out[3:]] == [("a", True, "assistant"),
                                                                        ("b", False, "assistant")]
    assert out[0] == {"role": "assistant", "content": GREETING, "tool_calls": None, "turn_idx": 0, "timestamp": None}


def test_export_rejects_unknown_run(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown run"):
        export_tau2(store, "nope", tmp_path / "x.json")


# --- rescore -----------------------------------------------------------------------------------

def test_rescore_unchanged_store_reports_nothing(store):
    report = rescore(store, RUN, TAU_REGRADER)
    assert report.changed == [] and report.breakdown_updates == 0
    assert report.episodes == 10 and report.skipped_infra == 1 and report.applied is False


def test_rescore_finds_and_fixes_a_tampered_reward(store):
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE episodes SET reward = 0.0, success = 0 WHERE task_id = '14' AND trial = 0"))
    report = rescore(store, RUN, TAU_REGRADER)
    assert [(c.task_id, c.trial, c.old_reward, c.new_reward, c.new_success) for c in report.changed] == [
        ("14", 0, 0.0, 1.0, True)]
    assert store.get_episode(RUN, "14", 0).score.reward == 0.0  # report only: nothing written

    fixed = rescore(store, RUN, TAU_REGRADER, apply=True)
    assert fixed.applied and len(fixed.changed) == 1
    episode = store.get_episode(RUN, "14", 0)
    assert (episode.score.reward, episode.score.success, episode.score.breakdown["db_match"]) == (1.0, True, True)
    assert rescore(store, RUN, TAU_REGRADER).changed == []


def test_rescore_refreshes_a_stale_breakdown(store):
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE episodes SET score_breakdown = '{}' WHERE task_id = '0' AND trial = 0"))
    report = rescore(store, RUN, TAU_REGRADER, apply=True)
    assert report.changed == [] and report.breakdown_updates == 1
    assert store.get_episode(RUN, "0", 0).score.breakdown["db_match"] is True
    assert rescore(store, RUN, TAU_REGRADER).breakdown_updates == 0


def test_rescore_unknown_env_is_a_config_error(store):
    store.create_run("other", "eval", "appworld", None, None, None, None, None, None, {})
    with pytest.raises(ConfigError, match="no regrader for env 'appworld'"):
        rescore(store, "other", env_class("appworld").regrader)
