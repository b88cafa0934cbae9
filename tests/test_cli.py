"""The ``harness`` command as a user runs it: a real subprocess, a real SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def harness(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("version", ["tau3", "tau2"])
def test_oracle_scores_pass1_one_on_all_50_tasks(tmp_path, version):
    db = f"sqlite:///{tmp_path}/runs.db"
    harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted",
            "--data-version", version, "--run", f"oracle-{version}", "--db", db, "--quiet", check=True)
    shown = harness("results", "show", f"oracle-{version}", "--db", db, "--format", "json", check=True)
    row = json.loads(shown.stdout)[0]
    assert row["tasks"] == 50 and row["episodes"] == 50
    assert row["pass^1"] == pytest.approx(1.0)
    assert row["data_version"] == version


def test_trials_give_pass_hat_k_and_rerun_resumes_without_duplicates(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    args = ["eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0,7",
            "--trials", "3", "--run", "r", "--db", db, "--quiet"]
    harness(*args, check=True)
    again = harness(*[a for a in args if a != "--quiet"], check=True)
    assert "0 to play, 6 already stored" in again.stderr
    row = json.loads(harness("results", "show", "r", "--db", db, "--format", "json", check=True).stdout)[0]
    assert row["episodes"] == 6
    assert row["pass^1"] == pytest.approx(1.0) and row["pass^3"] == pytest.approx(1.0)
    changed = harness(*[a if a != "3" else "2" for a in args])
    assert changed.returncode == 2 and "different settings" in changed.stderr


def test_compare_two_runs(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    for name in ("a", "b"):
        harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "1,2",
                "--run", name, "--db", db, "--quiet", check=True)
    out = harness("results", "compare", "a", "b", "--db", db, "--format", "csv", check=True)
    assert "pass^1" in out.stdout
    listed = harness("results", "list", "--db", db, "--format", "csv", check=True)
    assert "a" in listed.stdout and "b" in listed.stdout
    # a run of another data version: not paired task by task, one line and exit 2; --unpaired shows both
    harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "1,2",
            "--data-version", "tau2", "--run", "c", "--db", db, "--quiet", check=True)
    refused = harness("results", "compare", "a", "c", "--db", db)
    assert refused.returncode == 2 and "different task sets" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    side = harness("results", "compare", "a", "c", "--db", db, "--unpaired", "--format", "csv", check=True)
    assert "pass^1" in side.stdout and "paired/" not in side.stdout


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_unknown_env(tmp_path):
    proc = harness("eval", "--env", "tau-bogus", "--agent", "oracle", "--user", "scripted", "--db", f"sqlite:///{tmp_path}/x.db")
    _assert_clean_error(proc, "unknown env 'tau-bogus'", "tau-airline")


@pytest.mark.parametrize("args", [["eval", "--env", "nosuch", "--model", "openai/x"], ["results", "list", "--help"],
                                  ["eval", "--env", "toy", "--model", "openai/x", "--trials", "0"]])
def test_an_instant_error_does_not_wait_for_litellm(args):
    """litellm takes seconds to import (10 s on a busy machine): a command that is refused at its
    flags, or only asks for help, answers without importing it."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['harness', *{args!r}]\n"
            "try:\n    runpy.run_module('harness.cli', run_name='__main__')\n"
            "except SystemExit as exc:\n    print('exit', exc.code)\n"
            "print('litellm imported:', 'litellm' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "litellm imported: False", proc.stdout + proc.stderr


def test_unknown_task_id(tmp_path):
    proc = harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "999",
                   "--db", f"sqlite:///{tmp_path}/x.db")
    _assert_clean_error(proc, "unknown task id", "999")


def test_unknown_run(tmp_path):
    proc = harness("results", "show", "nope", "--db", f"sqlite:///{tmp_path}/x.db")
    _assert_clean_error(proc, "nope")


def test_missing_data_says_how_to_get_it(tmp_path):
    env = {"HARNESS_DATA_DIR": "", "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    proc = harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted",
                   "--db", f"sqlite:///{tmp_path}/x.db", env=env)
    _assert_clean_error(proc, "harness data pull tau-airline")
    assert not (tmp_path / "x.db").exists() or "episodes" not in proc.stdout


def test_missing_api_key_is_caught_before_any_episode(tmp_path):
    env = {k: "" for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    proc = harness("eval", "--env", "tau-airline", "--model", "openai/gpt-4.1", "--user-model", "openai/gpt-4.1",
                   "--run", "k", "--db", f"sqlite:///{tmp_path}/x.db", env=env)
    _assert_clean_error(proc, "OPENAI_API_KEY")
    listed = harness("results", "list", "--db", f"sqlite:///{tmp_path}/x.db", "--format", "csv")
    assert "k," not in listed.stdout  # no run row was created


def test_eval_with_llm_agent_through_cli_against_fake_server(tmp_path, fake_llm):
    fake_llm.script.extend("fake-user", [{"content": "What is the status of HAT001 on 2024-05-16?"},
                                         {"content": "###STOP###"}])
    fake_llm.script.extend("fake-agent", [
        {"tool_calls": [{"name": "get_flight_status", "arguments": {"flight_number": "HAT001", "date": "2024-05-16"}}]},
        {"content": "It is available."},
    ])
    db = f"sqlite:///{tmp_path}/runs.db"
    proc = harness("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--user-model", "openai/fake-user",
                   "--api-base", fake_llm.base_url, "--tasks", "1", "--run", "llm", "--db", db, "--quiet",
                   env={"OPENAI_API_KEY": ""}, check=True)
    row = json.loads(harness("results", "show", "llm", "--db", db, "--format", "json", check=True).stdout)[0]
    assert row["episodes"] == 1 and row["agent_model"] == "openai/fake-agent"
    assert row["agent_prompt_tokens"] > 0
    assert "pass^1" in proc.stdout


def test_sibling_groups_are_stored_labelled_and_counted(tmp_path):
    from harness.store import Store

    db = f"sqlite:///{tmp_path}/runs.db"
    harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0,7,20",
            "--group-size", "3", "--run", "g", "--db", db, "--quiet", check=True)
    groups = Store(db).groups("g")
    assert [g.task_id for g in groups] == ["0", "7", "20"]
    assert all(len(g.episodes) == 3 and g.label == "all_success" for g in groups)
    assert len({e.seed for e in groups[0].episodes}) == 3  # distinct sibling seeds
    row = json.loads(harness("results", "show", "g", "--db", db, "--format", "json", check=True).stdout)[0]
    assert row["groups"] == 3 and row["groups/all_success"] == 3 and row["groups/mixed"] == 0
    refused = harness("eval", "--env", "tau-airline", "--model", "openai/x", "--api-base", "http://127.0.0.1:9/v1",
                      "--user", "scripted", "--group-size", "4", "--db", db)
    _assert_clean_error(refused, "--temperature")


def test_force_new_and_json_logs(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    base = ["eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--run", "j", "--db", db]
    harness(*base, "--tasks", "1", check=True)
    proc = harness(*base, "--tasks", "1,2", "--force-new", "--log-format", "json", check=True)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["run_start", "episode", "episode", "run_end"]
    assert events[-1]["done"] == 2 and events[-1]["pass_rate"] == 1.0
    row = json.loads(harness("results", "show", "j", "--db", db, "--format", "json", check=True).stdout)[0]
    assert row["episodes"] == 2
