"""A `harness eval` process killed with SIGKILL mid-run loses only the episodes in flight: the
database (a SQLite file, and a PostgreSQL database) stays consistent, nothing is stored twice, and
re-running the same command plays exactly the missing (task, trial) pairs. The fake server lives
in this process and keeps serving across both subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import Delayed, TauPolicy
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

AGENT, USER = "fake-agent", "fake-user"
TASKS = [str(i) for i in range(20)]
TRIALS = 2
TOTAL = len(TASKS) * TRIALS


def _query(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _stored(url: str) -> int:
    try:
        return _query(url, "SELECT COUNT(*) FROM episodes e JOIN runs r ON e.run_id = r.id WHERE r.name = 'k'")[0][0]
    except DBAPIError:  # schema not created yet
        return 0


def _rows(url: str) -> dict[tuple[str, int], tuple]:
    rows = _query(url, "SELECT e.task_id, e.trial, e.id, e.created_at, e.seed, e.reward, e.error_class, "
                       "e.termination FROM episodes e JOIN runs r ON e.run_id = r.id WHERE r.name = 'k'")
    out = {(r[0], r[1]): r[2:] for r in rows}
    assert len(out) == len(rows), "duplicate (task, trial) rows"
    return out


def test_sigkill_mid_run_then_resume_completes_exactly(db_url):
    policy = TauPolicy(AGENT, USER)
    with FakeOpenAIServer(Delayed(policy, 0.05)) as server:
        cmd = [sys.executable, "-m", "harness.cli", "eval", "--env", "tau-airline", "--model", f"openai/{AGENT}",
               "--user-model", f"openai/{USER}", "--api-base", server.base_url, "--tasks", ",".join(TASKS),
               "--trials", str(TRIALS), "--concurrency", "3", "--run", "k", "--db", db_url,
               "--quiet", "--max-retries", "1", "--retry-backoff", "0.01", "--timeout", "30"]
        env = {**os.environ, "OPENAI_API_KEY": ""}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 120
            while _stored(db_url) < 5:
                if proc.poll() is not None:
                    raise AssertionError(f"eval ended (rc {proc.returncode}) before it could be killed:\n"
                                         f"{proc.stderr.read().decode()[-3000:]}")
                assert time.monotonic() < deadline, "no episodes stored after 120 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        time.sleep(0.3)  # let requests already in the server's threads finish counting
        openings_at_kill = dict(policy.openings)

        # The killed run: a consistent file, some but not all episodes, no duplicates.
        if db_url.startswith("sqlite"):
            assert _query(db_url, "PRAGMA integrity_check") == [("ok",)]
        before = _rows(db_url)
        assert 5 <= len(before) < TOTAL, len(before)
        assert not _query(db_url, "SELECT run_id, task_id, trial FROM episodes GROUP BY run_id, task_id, trial "
                                   "HAVING COUNT(*) > 1")
        assert _query(db_url, "SELECT status FROM runs WHERE name = 'k'") == [("running",)]

        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]

        after = _rows(db_url)
        assert len(after) == TOTAL
        assert set(after) == {(t, n) for t in TASKS for n in range(TRIALS)}
        assert {r[4] for r in after.values()} == {"none"}  # all scored
        assert all(r[3] == policy.expected_reward(t, r[2]) for (t, _), r in after.items())
        # Episodes stored before the kill were kept as they were (same row, same time stamp)...
        assert {k: after[k] for k in before} == before
        # ... and the re-run played each missing episode exactly once (one opening line each).
        for task in TASKS:
            missing = sum((task, n) not in before for n in range(TRIALS))
            assert policy.openings[task] - openings_at_kill.get(task, 0) == missing, task
        assert _query(db_url, "SELECT status FROM runs WHERE name = 'k'") == [("finished",)]
        assert _query(db_url, "SELECT COUNT(*) FROM episodes")[0][0] == TOTAL
