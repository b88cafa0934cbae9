"""The τ-bench leaderboard side of tau-airline runs, as a user meets it (real subprocess CLI runs,
real SQLite): the grader version stamped on every run and shown, refused when it is 2.x or does not
match the data version, ``compare`` refusing runs of different graders, the non-standard flag with
each reason, and ``results submission`` (schema-valid, standard or custom, identity never invented)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import jsonschema
import pytest
from test_cli import harness

from envs.tau.submission import SCHEMA_PATH
from harness.store import Store

ORACLE = ("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted")
IDENTITY = ("--model-organization", "Org", "--submitting-organization", "Lab", "--contact-email", "me@lab.org")


def _show(run: str, db: str) -> dict:
    return json.loads(harness("results", "show", run, "--db", db, "--format", "json", check=True).stdout)[0]


def _set_grader(db_file: Path, run: str, grader: str | None) -> None:
    """Edit a stored run's config as an older (no grader key) or another harness would have stored it."""
    with sqlite3.connect(db_file) as con:
        if grader is None:
            con.execute("UPDATE runs SET config = json_remove(config, '$.grader') WHERE name = ?", (run,))
        else:
            con.execute("UPDATE runs SET config = json_set(config, '$.grader', ?) WHERE name = ?", (grader, run))


def _only_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_grader_is_stamped_shown_and_follows_the_data_version(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    harness(*ORACLE, "--tasks", "0", "--run", "t3", "--db", db, "--quiet", check=True)
    harness(*ORACLE, "--tasks", "0", "--data-version", "tau2", "--run", "t2", "--db", db, "--quiet", check=True)
    harness(*ORACLE, "--tasks", "0", "--grader", "tau-1.0.1", "--run", "explicit", "--db", db, "--quiet", check=True)
    store = Store(db)
    assert store.get_run("t3").config["grader"] == "tau-1.0.1"
    assert store.get_run("t2").config["grader"] == "tau-0.2.0"
    assert _show("t3", db)["grader"] == "tau-1.0.1" and _show("t2", db)["grader"] == "tau-0.2.0"
    table = harness("results", "show", "explicit", "--db", db, check=True).stdout
    assert "grader" in table and "tau-1.0.1" in table


_OUR_PROMPT = "agent prompt: the harness's wording, not tau2's llm_agent prompt (official: --agent-prompt official)"
_REFUSED_2X = ("τ-bench 2.x is not reproduced: it grades \"communicate\" with an LLM judge", "docs/evaluation.md")


@pytest.mark.parametrize("flag, grader, needles", [
    ("--grader", "tau-2.0", _REFUSED_2X),
    ("--env-arg", "2.1", _REFUSED_2X),
    ("--grader", "tau-0.2.0", ("--grader tau-0.2.0 grades the tau2 task set, but this run plays --data-version tau3",)),
    ("--env-arg", "bogus", ("unknown --grader 'bogus'",)),
])
def test_a_grader_not_reproduced_is_refused_with_one_line(tmp_path, flag, grader, needles):
    db = f"sqlite:///{tmp_path}/runs.db"
    value = grader if flag == "--grader" else f"grader={grader}"
    proc = harness(*ORACLE, "--tasks", "0", flag, value, "--run", "r", "--db", db)
    assert proc.returncode == 2
    line = _only_line(proc)
    assert all(needle in line for needle in needles), line
    assert Store(db).list_runs() == []  # refused before the run row was made


def test_compare_refuses_runs_of_different_graders_and_accepts_one_grader(tmp_path):
    db_file = tmp_path / "runs.db"
    db = f"sqlite:///{db_file}"
    for name in ("a", "b", "old"):
        harness(*ORACLE, "--tasks", "1,2", "--run", name, "--db", db, "--quiet", check=True)
    # a run stored before grader stamps: shown under its data version's grader, compared with stamped ones,
    # flagged non-standard, and resumable under the same settings
    _set_grader(db_file, "old", None)
    old = _show("old", db)
    assert old["grader"] == "tau-1.0.1" and "grader: not recorded" in old["nonstandard_reasons"]
    resumed = harness(*ORACLE, "--tasks", "1,2", "--run", "old", "--db", db, check=True)
    assert "0 to play, 2 already stored" in resumed.stderr
    harness("results", "compare", "a", "b", "old", "--db", db, "--format", "csv", check=True)
    # a run stamped by a harness that reproduces another release: not comparable
    _set_grader(db_file, "b", "tau-1.0.0")
    refused = harness("results", "compare", "a", "b", "--db", db)
    assert refused.returncode == 2
    assert "graded under different grader versions (a: tau-1.0.1; b: tau-1.0.0)" in _only_line(refused)
    side = harness("results", "compare", "a", "b", "--db", db, "--unpaired", "--format", "csv", check=True)
    assert "grader,tau-1.0.1,tau-1.0.0" in side.stdout


def test_nonstandard_runs_are_flagged_with_each_reason(tmp_path, fake_llm):
    db = f"sqlite:///{tmp_path}/runs.db"
    # the oracle on 2 tasks with 2 trials: each difference named, in the eval's warning and in results show
    proc = harness(*ORACLE, "--tasks", "0,7", "--trials", "2", "--run", "o", "--db", db, "--quiet", check=True)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "not the official tau-airline setup" in warning[0]
    row = _show("o", db)
    assert row["standard"] == "no"
    for reason in ("agent: the oracle", "user simulator: scripted", "tasks: 2 of 50", "trials: 2 (official: 4"):
        assert reason in row["nonstandard_reasons"] and reason in warning[0]

    # an LLM agent with a non-standard user model (openai/gpt-4o) on one task, 2 trials, changed limits,
    # and today's ending of an empty reply
    def script(user_model: str, trials: int) -> None:
        for _ in range(trials):
            fake_llm.script.extend(user_model, [{"content": "What is the status of HAT001 on 2024-05-16?"},
                                                {"content": "###STOP###"}])
            fake_llm.script.extend("fake-agent", [{"content": "It is available."}])

    llm = ("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--api-base", fake_llm.base_url,
           "--tasks", "1", "--db", db, "--quiet")
    script("gpt-4o", 2)
    harness(*llm, "--user-model", "openai/gpt-4o", "--trials", "2", "--max-steps", "100",
            "--env-arg", "empty_reply=agent-error", "--run", "u", env={"OPENAI_API_KEY": ""}, check=True)
    reasons = _show("u", db)["nonstandard_reasons"].split("; ")
    assert reasons == [_OUR_PROMPT,
                       "user model: openai/gpt-4o (official: gpt-4.1)",
                       "user guidelines: ours (official: --user-guidelines official)",
                       "tasks: 1 of 50 (official: all of the base split)",
                       "trials: 2 (official: 4 or more)",
                       "max_steps: 100 (official: 200)",
                       "empty agent reply: ends the episode as agent_error (official: replayed, then an "
                       "infrastructure error: --env-arg empty_reply=retry)"]
    # the official user simulator settings raise none of the user reasons (either litellm spelling)
    script("gpt-4.1", 4)
    harness(*llm, "--user-model", "openai/gpt-4.1", "--user-guidelines", "official", "--trials", "4", "--run", "g",
            env={"OPENAI_API_KEY": ""}, check=True)
    assert _show("g", db)["nonstandard_reasons"].split("; ") == [
        _OUR_PROMPT,
        "tasks: 1 of 50 (official: all of the base split)"]


def _validate(out: Path) -> dict:
    doc = json.loads((out / "submission.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    return doc


def test_oracle_submission_is_schema_valid_custom_and_carries_the_trajectories(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    harness(*ORACLE, "--trials", "4", "--run", "o4", "--db", db, "--quiet", check=True)
    out = tmp_path / "sub"
    proc = harness("results", "submission", "o4", "--out", str(out), "--db", db, "--model-name", "Oracle",
                   *IDENTITY, check=True)
    doc = _validate(out)
    assert doc["submission_type"] == "custom"  # the oracle reads the answers and the user is scripted
    assert doc["results"]["airline"] == {"pass_1": 100.0, "pass_2": 100.0, "pass_3": 100.0, "pass_4": 100.0,
                                         "cost": None}
    assert doc["methodology"]["tau2_bench_version"] == "1.0.1"
    assert doc["methodology"]["verification"] == {
        "modified_prompts": True, "omitted_questions": False,
        "details": "agent: the oracle (replays the gold actions); user simulator: scripted (official: gpt-4.1)"}
    assert (doc["model_name"], doc["model_organization"], doc["contact_info"]) == (
        "Oracle", "Org", {"email": "me@lab.org"})
    trajectories = out / "trajectories" / doc["trajectory_files"]["airline"]
    assert f"wrote {trajectories}" in proc.stdout
    exported = json.loads(trajectories.read_text())
    assert len(exported["simulations"]) == 200 and len(exported["tasks"]) == 50
    # never over an existing package
    again = harness("results", "submission", "o4", "--out", str(out), "--db", db, "--model-name", "Oracle", *IDENTITY)
    assert again.returncode == 2 and "is not empty" in _only_line(again)


def test_missing_identity_flags_are_refused_in_one_line(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    harness(*ORACLE, "--tasks", "0", "--run", "o", "--db", db, "--quiet", check=True)
    out = tmp_path / "sub"
    proc = harness("results", "submission", "o", "--out", str(out), "--db", db, "--contact-email", "me@lab.org")
    assert proc.returncode == 2
    line = _only_line(proc)
    for flag in ("--model-name", "--model-organization", "--submitting-organization"):
        assert flag in line
    assert "--contact-email" not in line.split(":")[0] and not out.exists()


def test_a_trained_policy_submission_is_custom_and_short_runs_have_null_pass_k(tmp_path):
    """A train run's evaluation point (agent hf, config train_run, as ``harness train`` stores it) that
    played every base task 4 times against the official user simulator settings: custom because of
    the policy alone. And a 2-trial run has no pass^3 / pass^4."""
    db = f"sqlite:///{tmp_path}/runs.db"
    harness(*ORACLE, "--trials", "4", "--run", "o4", "--db", db, "--quiet", check=True)
    harness(*ORACLE, "--trials", "2", "--tasks", "0,7", "--run", "o2", "--db", db, "--quiet", check=True)
    store = Store(db)
    point = "policy/eval-step-000020"
    store.create_run(point, "eval", "tau-airline", "tau3", "base", "hf", "results/runs/policy/checkpoints/step-000020",
                     "litellm", "openai/gpt-4.1",
                     {"train_run": "policy", "step": 20, "temperature": 0.0, "trials": 4,
                      "tasks": [str(i) for i in range(50)], "grader": "tau-1.0.1", "user_guidelines": "official",
                      "user_temperature": 0.0, "max_steps": 200, "max_errors": 10, "empty_reply": "retry"})
    for trial in range(4):
        for task in range(50):
            store.add_episode(point, store.get_episode("o4", str(task), trial))
    store.set_run_status(point, "finished")
    out = tmp_path / "trained"
    harness("results", "submission", point, "--out", str(out), "--db", db, "--model-name", "Policy", *IDENTITY,
            check=True)
    doc = _validate(out)
    assert doc["submission_type"] == "custom"
    assert doc["methodology"]["verification"]["details"] == (
        f"agent: a local or trained policy (always custom); {_OUR_PROMPT}")
    assert doc["methodology"]["user_simulator"] == "openai/gpt-4.1"
    assert doc["results"]["airline"]["cost"] is None
    # the model name is required: a local policy's path is not one
    refused = harness("results", "submission", point, "--out", str(tmp_path / "x"), "--db", db, *IDENTITY)
    assert refused.returncode == 2 and "--model-name" in _only_line(refused)

    harness("results", "submission", "o2", "--out", str(tmp_path / "short"), "--db", db, "--model-name", "O",
            *IDENTITY, check=True)
    short = _validate(tmp_path / "short")["results"]["airline"]
    assert (short["pass_1"], short["pass_2"], short["pass_3"], short["pass_4"]) == (100.0, 100.0, None, None)


def test_submission_takes_finished_eval_runs_one_per_domain(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    for name in ("a", "b"):
        harness(*ORACLE, "--tasks", "0", "--run", name, "--db", db, "--quiet", check=True)
    submit = ("results", "submission", "--db", db, "--model-name", "O", *IDENTITY, "--out")
    both = harness(*submit, str(tmp_path / "both"), "a", "b")
    assert both.returncode == 2 and "runs 'a' and 'b' are both airline results" in _only_line(both)
    Store(db).set_run_status("a", "interrupted", "stopped by SIGINT")
    stopped = harness(*submit, str(tmp_path / "stopped"), "a")
    assert stopped.returncode == 2 and "run 'a' is interrupted, not finished" in _only_line(stopped)
    # an episode left as an infrastructure error: the export would drop it and verification would fail
    from harness.types import EpisodeResult, ErrorClass, Score, Termination

    Store(db).add_episode("b", EpisodeResult(task_id="0", trial=1, seed=1, messages=[],
                                             score=Score(reward=0.0, success=False),
                                             termination=Termination.INFRASTRUCTURE_ERROR,
                                             error_class=ErrorClass.INFRA))
    infra = harness(*submit, str(tmp_path / "infra"), "b")
    assert infra.returncode == 2 and "run 'b' has 1 episode(s) that ended in an infrastructure error" in (
        _only_line(infra))
    assert not (tmp_path / "both").exists() and not (tmp_path / "stopped").exists()
    assert not (tmp_path / "infra").exists()
