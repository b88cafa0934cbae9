"""The provider API key never lands in anything the harness writes: the SQLite file (with its -wal
and -shm), the response cache, the τ² export, and the console output of eval / results / rescore,
including episodes that failed with provider errors (their error texts are stored). The fake
server records the request headers, so we know the key was really sent."""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys

import pytest
from fakes.recording_server import HeaderRecordingServer
from fakes.tau_policy import TauPolicy

AGENT, USER = "fake-agent", "fake-user"
TASKS = ["0", "1", "2", "3", "7"]


def _responder(policy: TauPolicy):
    """The oracle-like policy, except: task 1's user calls fail with 500, task 2's agent calls are
    rejected with 400, task 3's agent calls time out, so stored episodes carry provider errors. (A
    401 would stop the run: every call shares the key; the test runs that case separately.)"""

    def respond(body: dict) -> dict:
        messages = body.get("messages") or []
        if body.get("model") == USER and policy.task_for_user_prompt(messages[0]["content"]) == "1":
            return {"status": 500, "message": "upstream exploded"}
        if body.get("model") == AGENT:
            task = policy.task_for_agent_messages(messages)
            if task == "2":
                return {"status": 400, "message": "Request rejected for this API key. You can find your API key at ..."}
            if task == "3":
                return {**policy(body), "delay": 2.0}
        return policy(body)

    return respond


@pytest.mark.parametrize("client, log_format", [("litellm", "rich"), ("direct", "json")])
def test_api_key_never_written_anywhere(tmp_path, client, log_format):
    secret = f"sk-test-SECRET-{secrets.token_hex(12)}"
    env = {**os.environ, "OPENAI_API_KEY": secret}
    db_file = tmp_path / "secrets.db"
    db = f"sqlite:///{db_file}"
    export = tmp_path / "export.json"
    policy = TauPolicy(AGENT, USER)
    outputs: list[str] = []

    def harness(*args: str, status: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=180)
        outputs.extend([proc.stdout, proc.stderr])
        assert proc.returncode == status, f"harness {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
        return proc

    with HeaderRecordingServer(_responder(policy)) as server:
        harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                "--api-base", server.base_url, "--tasks", ",".join(TASKS), "--trials", "2", "--concurrency", "10",
                "--run", "s", "--db", db, "--max-retries", "0", "--timeout", "1", "--retry-backoff", "0.01",
                "--cache", "--llm-client", client, "--log-format", log_format)
        harness("results", "show", "s", "--db", db)
        harness("results", "show", "s", "--db", db, "--format", "json")
        harness("results", "list", "--db", db)
        harness("results", "export", "s", "--format", "tau2", "--out", str(export), "--db", db)
        harness("rescore", "s", "--db", db)
    # A key the provider refuses (401) stops a run with a line quoting the provider's error.
    refused = {"status": 401, "message": "Incorrect API key provided. You can find your API key at ..."}
    with HeaderRecordingServer(lambda body: refused) as bad_key:
        stop = harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                       "--api-base", bad_key.base_url, "--tasks", "0", "--run", "s401", "--db", db,
                       "--llm-client", client, "--log-format", log_format, status=1)
        assert "Incorrect API key provided" in stop.stderr
    assert set(bad_key.header_values("authorization")) == {f"Bearer {secret}"}

    # The key was sent: every request carried it.
    auth = server.header_values("authorization")
    assert auth and set(auth) == {f"Bearer {secret}"}, set(auth)

    # The run has the provider-error episodes whose texts we grep (so the grep covers them).
    con = sqlite3.connect(db_file)
    errors = con.execute("SELECT task_id, error_class, error FROM episodes e JOIN runs r ON e.run_id = r.id "
                         "WHERE r.name = 's' AND error_class = 'infra'").fetchall()
    con.close()
    assert {t for t, _, _ in errors} == {"1", "2", "3"}, errors
    assert export.exists()

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"secrets.db", "export.json", "llm_cache.db"} <= names, names  # --cache writes under the CWD
    blobs = {str(p.relative_to(tmp_path)): p.read_bytes() for p in files}
    blobs.update({f"output {i}": text.encode() for i, text in enumerate(outputs)})
    token = secret.rsplit("-", 1)[1]
    for needle in (secret, token, "SECRET", "Authorization", "Bearer"):
        leaks = [name for name, data in blobs.items() if needle.encode() in data]
        assert not leaks, f"{needle!r} found in {leaks}"
    # ... in any letter case either (e.g. lower-cased header dumps).
    for needle in (secret.lower(), "authorization", "bearer"):
        leaks = [name for name, data in blobs.items() if needle.encode() in data.lower()]
        assert not leaks, f"{needle!r} (any case) found in {leaks}"
