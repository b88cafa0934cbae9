"""Failing loudly (docs/reliability.md): a run that cannot do its work says so, stops paying for
calls, and exits non-zero with the reason and the command that resumes it.

Every test drives `harness eval` as a user does: a real subprocess, a real SQLite file, the real
litellm client (or the direct one) against the fake OpenAI-compatible server in this process."""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
import sys

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import Switchable, TauPolicy

AGENT, USER = "fake-agent", "fake-user"
TASKS = [str(i) for i in range(10)]


def _harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": ""}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _eval_args(server: FakeOpenAIServer, db: str, *extra: str) -> list[str]:
    return ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
            "--api-base", server.base_url, "--tasks", ",".join(TASKS), "--run", "r", "--db", db, "--quiet",
            "--max-retries", "2", "--retry-backoff", "0.01", "--timeout", "10", *extra]


def _query(db_file, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(db_file, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _run_row(db_file, run: str = "r") -> tuple:
    return _query(db_file, "SELECT status, status_reason FROM runs WHERE name = ?", run)[0]


def _episodes(db_file, run: str = "r") -> list[tuple]:
    return _query(db_file, "SELECT e.task_id, e.trial, e.error_class, e.error FROM episodes e JOIN runs r "
                           "ON e.run_id = r.id WHERE r.name = ?", run)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _resume(stderr: str) -> list[str]:
    """The arguments of the command the one error line says resumes the run."""
    line = _error_lines(stderr)[-1]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "harness"
    return command[1:]


@pytest.mark.parametrize("status, client", [(401, "litellm"), (403, "litellm"), (404, "litellm"), (401, "direct")])
def test_a_refused_key_or_model_stops_the_run_at_once(tmp_path, status, client):
    """401 / 403 / 404 will refuse every request alike: the run stops at the first refused episode
    (no retries, no further episodes), is stored as failed with the reason, exits 1 with one line,
    and the printed command resumes it once the key is fixed."""
    db_file = tmp_path / "refused.db"
    kind = f"HTTP {status}"
    db = f"sqlite:///{db_file}"
    policy = TauPolicy(AGENT, USER)
    provider = Switchable(policy, down=True, outage={"status": status, "message": "fake provider refuses"})
    with FakeOpenAIServer(provider) as server:
        proc = _harness(*_eval_args(server, db, "--concurrency", "1", "--llm-client", client))
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        assert "run r failed" in lines[0] and kind in lines[0] and "resume with: harness eval" in lines[0]
        stored = _episodes(db_file)
        assert len(stored) == 1 and stored[0][2] == "infra"  # stopped after the first episode
        assert provider.failed == 1  # a refusal is not retried, and nothing else was asked
        run_status, reason = _run_row(db_file)
        assert run_status == "failed" and kind in reason and "refused" in reason

        provider.down = False  # the key is fixed: the printed command finishes the run
        again = _harness(*_resume(proc.stderr))
        assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_episodes(db_file)) == sorted((t, 0, "none", None) for t in TASKS)
    assert _run_row(db_file) == ("finished", None)


def test_consecutive_infra_errors_stop_the_run(tmp_path):
    """A provider that is down (HTTP 500 after every retry) stops the run after
    --max-consecutive-infra episodes in a row, instead of trying every task."""
    db_file = tmp_path / "down.db"
    db = f"sqlite:///{db_file}"
    provider = Switchable(TauPolicy(AGENT, USER), down=True)
    with FakeOpenAIServer(provider) as server:
        proc = _harness(*_eval_args(server, db, "--concurrency", "1", "--max-retries", "1",
                                    "--max-consecutive-infra", "3"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "3 episodes in a row" in lines[0] and "--run r" in lines[0], proc.stderr
    assert [e[2] for e in _episodes(db_file)] == ["infra"] * 3
    assert provider.failed == 3 * 2  # three episodes, one retry each, then nothing more
    run_status, reason = _run_row(db_file)
    assert run_status == "failed" and "3 episodes in a row" in reason and "InternalServerError" in reason
