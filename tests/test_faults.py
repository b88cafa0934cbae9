"""Provider faults at scale: hundreds of τ-airline episodes through the real litellm client against
the fake server, once clean and once with injected 429s, 500s, client timeouts and malformed
bodies. Retries must hide every fault: same episodes, same trajectories, same rewards. A provider
that keeps failing gives infra errors (excluded from scores), and a re-run after it recovers
completes exactly those episodes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import FaultInjector, Switchable, TauPolicy, body_key

from harness.cli.eval import EvalOptions, run_eval
from harness.store import Store

AGENT, USER = "fake-agent", "fake-user"
TRIALS = 4  # x 50 tasks = 200 episodes per run


def _options(server: FakeOpenAIServer, run: str, db: str, **overrides) -> EvalOptions:
    settings = dict(
        env="tau-airline", model=f"openai/{AGENT}", env_settings={"user_model": f"openai/{USER}",
                                                                   "user_api_base": server.base_url},
        api_base=server.base_url, trials=TRIALS, concurrency=48,
        run=run, db=db, quiet=True, timeout=1.0, max_retries=3, retry_backoff=0.01,
    )
    settings.update(overrides)
    return EvalOptions(**settings)


def _eval_args(server: FakeOpenAIServer, run: str, db: str, *extra: str) -> list[str]:
    return ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
            "--api-base", server.base_url, "--run", run, "--db", db, "--quiet", *extra]


def _harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": ""}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _start_harness(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": ""}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"harness eval did not finish in {timeout}s:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"harness eval failed ({proc.returncode}):\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return out, err


def _query(db_file: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db_file)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _rows(db_file: Path, run: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(
            "SELECT e.id, e.task_id, e.trial, e.seed, e.reward, e.termination, e.error_class, e.error "
            "FROM episodes e JOIN runs r ON e.run_id = r.id WHERE r.name = ? ORDER BY e.task_id, e.trial",
            (run,),
        ).fetchall()
    finally:
        con.close()


def _attempts(db_file: Path, run: str) -> tuple[int, int]:
    """(attempts, timed-out attempts) recorded in the episodes' per-call logs. Every request the
    server saw is an attempt; a timed-out attempt may not have reached the server (the --timeout
    deadline also covers the wait for a connection on a loaded machine)."""
    logs = _query(db_file, "SELECT e.llm_call_log FROM episodes e JOIN runs r ON e.run_id = r.id "
                           f"WHERE r.name = '{run}'")
    calls = [c for (log,) in logs for c in json.loads(log or "[]")]
    return sum(c.get("attempts", 1) for c in calls), sum(c.get("timeouts", 0) for c in calls)


def _accounts_for(recorded: tuple[int, int], requests: int) -> bool:
    attempts, timeouts = recorded
    return requests <= attempts <= requests + timeouts


@pytest.mark.parametrize("client, trials", [("litellm", TRIALS), ("direct", 2)])
def test_injected_faults_change_nothing_but_the_request_count(tmp_path, client, trials):
    """50 tasks x 4 trials through `harness eval` (the real litellm client), clean and with faults;
    the same for 50 x 2 with the lean `--llm-client direct`. Both runs go in parallel
    subprocesses (one core each; the fake servers live in this process)."""
    db_file = tmp_path / "faults.db"
    db = f"sqlite:///{db_file}"
    Store(db).close()  # create the schema once, before two processes open the file
    policy = TauPolicy(AGENT, USER)
    # Every fault is retried away: --max-retries 6 is well above the most faults one request body
    # can get (2), with room for slow answers of the fake server when the whole suite loads both
    # cores. An injected timeout holds its episode for --timeout seconds, so they are rare.
    faults = FaultInjector(policy, seed=11, p429=0.03, p500=0.03, p_timeout=0.004, p_malformed=0.03,
                           timeout_delay=4.5, max_per_kind=1, max_per_body=2)
    common = ("--trials", str(trials), "--concurrency", "48", "--timeout", "4", "--max-retries", "6",
              "--retry-backoff", "0.01", "--llm-client", client)
    started = time.perf_counter()
    with FakeOpenAIServer(policy) as clean_server, FakeOpenAIServer(faults) as faulty_server:
        clean_proc = _start_harness(*_eval_args(clean_server, "clean", db, *common))
        faulty_proc = _start_harness(*_eval_args(faulty_server, "faulty", db, *common))
        _finish(clean_proc)
        _finish(faulty_proc)
        time.sleep(0.5)  # requests the client gave up on may still be in the server's threads
        clean_bodies = {body_key(b) for b in clean_server.requests}
        clean_requests = len(clean_server.requests)
        faulty_requests = len(faulty_server.requests)
    seconds = time.perf_counter() - started

    # 1. No faults: the oracle-like policy gets exactly the rewards it planned (1, or 0 where it
    #    sabotages itself on purpose).
    store = Store(db)
    clean = store.episodes_df("clean")
    assert len(clean) == 50 * trials
    assert not clean.duplicated(["task_id", "trial"]).any()
    assert set(clean["error_class"]) == {"none"}, clean[clean["error_class"] != "none"]["error"].tolist()
    expected = {(r.task_id, r.trial): policy.expected_reward(r.task_id, r.seed) for r in clean.itertuples()}
    got = {(r.task_id, r.trial): float(r.reward) for r in clean.itertuples()}
    assert got == expected
    assert 0.0 in got.values() and 1.0 in got.values()  # the comparison below is not all-ones
    # The per-call log accounts for every request sent (a retry only after a slow answer).
    assert _accounts_for(_attempts(db_file, "clean"), clean_requests), (_attempts(db_file, "clean"), clean_requests)

    # 2. With faults: every kind was injected, nothing crashed, every episode was scored (or at
    #    worst an infra error), and each (task, trial) got the clean run's reward.
    for kind in FaultInjector.KINDS:
        assert faults.injected[kind] > 0, faults.injected
    faulty = store.episodes_df("faulty")
    assert len(faulty) == 50 * trials
    assert not faulty.duplicated(["task_id", "trial"]).any()
    assert set(faulty["error_class"]) <= {"none", "infra"}
    assert (faulty["error_class"] == "infra").sum() == 0, faulty[faulty["error_class"] == "infra"]["error"].tolist()
    assert {(r.task_id, r.trial): float(r.reward) for r in faulty.itertuples()} == got
    assert list(faulty["termination"]) == list(clean["termination"])
    assert list(faulty["seed"]) == list(clean["seed"])
    # Retries replayed the very same requests: the distinct bodies are exactly the clean run's,
    # every fault cost one more request, and the call log counted every attempt.
    assert faults.distinct_bodies == clean_bodies
    assert faulty_requests >= len(clean_bodies) + sum(faults.injected.values())
    assert _accounts_for(_attempts(db_file, "faulty"), faulty_requests), (_attempts(db_file, "faulty"),
                                                                          faulty_requests)
    # ... and the stored trajectories are identical, message for message.
    for r in clean.itertuples():
        a = store.get_episode("clean", r.task_id, r.trial).messages
        b = store.get_episode("faulty", r.task_id, r.trial).messages
        assert a == b, (r.task_id, r.trial)
    print(f"{client}: clean+faulty in parallel {seconds:.1f}s: {clean_requests} / {faulty_requests} requests, "
          f"faults {dict(faults.injected)}")


def test_provider_outage_gives_infra_errors_and_rerun_completes_them(tmp_path):
    db_file = tmp_path / "outage.db"
    db = f"sqlite:///{db_file}"
    policy = TauPolicy(AGENT, USER)
    provider = Switchable(policy, down=True)
    tasks, trials = ["0", "1", "3", "7", "14"], 2
    episodes = len(tasks) * trials
    with FakeOpenAIServer(provider) as server:
        args = _eval_args(server, "outage", db, "--tasks", ",".join(tasks), "--trials", str(trials),
                          "--concurrency", "8", "--max-retries", "2", "--retry-backoff", "0.01", "--timeout", "5")
        down = _harness(*args)
        # Not one episode scored: the run failed, loudly (exit 1, one line with the reason and the
        # command that resumes it), and kept what it stored.
        assert down.returncode == 1, down.stderr
        assert "Traceback" not in down.stderr, down.stderr
        assert "error: run outage failed: no episode was scored" in down.stderr, down.stderr
        assert _query(db_file, "SELECT status FROM runs WHERE name = 'outage'") == [("failed",)]
        rows = _rows(db_file, "outage")
        assert len(rows) == episodes
        assert {r["error_class"] for r in rows} == {"infra"}
        assert {r["termination"] for r in rows} == {"infrastructure_error"}
        assert all("500" in (r["error"] or "") or "InternalServerError" in (r["error"] or "") for r in rows)
        # Each episode's first call (the user's opening line) was tried, and retried at most 2 times.
        assert episodes <= provider.failed <= episodes * 3

        shown = _harness("results", "show", "outage", "--db", db, "--format", "json")
        assert shown.returncode == 0, shown.stderr
        summary = json.loads(shown.stdout)[0]
        assert summary["episodes"] == episodes
        assert summary["infra_episodes"] == episodes
        assert summary["error/infra"] == episodes
        assert summary["scored_episodes"] == 0
        assert summary["termination/infrastructure_error"] == episodes

        before = {(r["task_id"], r["trial"]): r["id"] for r in rows}
        provider.down = False
        up = _harness(*args)
        assert up.returncode == 0, up.stderr
        assert _query(db_file, "SELECT status, status_reason FROM runs WHERE name = 'outage'") == [("finished", None)]
        # Every episode was played again from its start: one opening line per episode.
        assert policy.openings == {t: trials for t in tasks}

        rows = _rows(db_file, "outage")
        keys = [(r["task_id"], r["trial"]) for r in rows]
        assert len(rows) == episodes and len(set(keys)) == episodes  # no duplicate rows
        assert set(keys) == set(before)
        assert {r["error_class"] for r in rows} == {"none"}
        assert all(r["reward"] == policy.expected_reward(r["task_id"], r["seed"]) for r in rows)



def test_partial_outage_rerun_replays_only_infra_episodes(tmp_path):
    """One task's user-model calls fail; a re-run plays only that task's episodes and leaves the
    scored ones untouched (same row ids)."""
    db_file = tmp_path / "partial.db"
    db = f"sqlite:///{db_file}"
    policy = TauPolicy(AGENT, USER)
    broken = {"on": True}

    def responder(body):
        messages = body.get("messages") or []
        if broken["on"] and body.get("model") == USER:
            if policy.task_for_user_prompt(messages[0]["content"]) == "7":
                return {"status": 503, "message": "task 7 is cursed"}
        return policy(body)

    with FakeOpenAIServer(responder) as server:
        opts = _options(server, "partial", db, tasks=["1", "2", "7", "12"], trials=3, max_retries=1)
        run_eval(opts)
        rows = _rows(db_file, "partial")
        infra = {(r["task_id"], r["trial"]) for r in rows if r["error_class"] == "infra"}
        assert infra == {("7", t) for t in range(3)}
        scored_ids = {(r["task_id"], r["trial"]): r["id"] for r in rows if r["error_class"] == "none"}
        assert len(scored_ids) == 9

        broken["on"] = False
        run_eval(opts)
    rows = _rows(db_file, "partial")
    assert len(rows) == 12 and len({(r["task_id"], r["trial"]) for r in rows}) == 12
    assert {r["error_class"] for r in rows} == {"none"}
    # The scored episodes were not replayed (same rows); the infra ones were filled in.
    assert {(r["task_id"], r["trial"]): r["id"] for r in rows if r["task_id"] != "7"} == scored_ids
    assert all(r["reward"] == policy.expected_reward(r["task_id"], r["seed"]) for r in rows)
