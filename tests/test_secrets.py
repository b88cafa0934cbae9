"""Secrets never land in anything the harness writes (docs/reliability.md, "Secrets"): the SQLite
file (with its -wal and -shm), the response cache, the exports, and the console output (rich and
JSON logs) of eval / results / rescore. Covered: the provider API key, also when the provider
echoes it in an error body (400, 500, and the 401 that stops the run); the password and the
credential query parameter of an ``--api-base`` URL; the password of a ``--db`` URL in the store's
error paths. The fake server records the request headers, so we know the key was really sent."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.recording_server import HeaderRecordingServer
from fakes.tau_policy import TauPolicy

from harness.episode_runner import run_loop

AGENT, USER = "fake-agent", "fake-user"
TASKS = ["0", "1", "2", "3", "7"]


def _echo(secret: str) -> str:
    """A provider error text quoting ``secret`` many times: the harness cuts error texts to a few
    hundred characters, and some copy straddles the cut, so a redaction applied only after the cut
    would leave the start of the key behind."""
    return " ".join([f"key {secret}"] * 24)


def _responder(policy: TauPolicy, secret: str):
    """The oracle-like policy, except: task 1's user calls fail with 500, task 2's agent calls are
    rejected with 400, task 7's with 409 (every body quotes the key, as some providers and proxies
    do; litellm passes a 409 on as a plain exception, not one of the errors it maps), task 3's
    agent calls time out, so stored episodes carry provider errors. (A 401 would stop the run:
    every call shares the key; the test runs that case separately.)"""

    def respond(body: dict) -> dict:
        messages = body.get("messages") or []
        if body.get("model") == USER and policy.task_for_user_prompt(messages[0]["content"]) == "1":
            return {"status": 500, "message": f"upstream exploded: {_echo(secret)}"}
        if body.get("model") == AGENT:
            task = policy.task_for_agent_messages(messages)
            if task == "2":
                return {"status": 400, "message": f"Request rejected: {_echo(secret)}"}
            if task == "7":
                return {"status": 409, "message": f"Conflict: {_echo(secret)}"}
            if task == "3":  # past --timeout (4 s: no other call nears it even on a loaded machine)
                return {**policy(body), "delay": 9.0}
        return policy(body)

    return respond


class _Harness:
    """Runs the real CLI in ``cwd`` with ``env`` and keeps every stdout and stderr it printed."""

    def __init__(self, cwd, env: dict[str, str]):
        self.cwd, self.env = cwd, env
        self.outputs: list[str] = []

    def __call__(self, *args: str, status: int | None = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                              env=self.env, cwd=self.cwd, timeout=180)
        self.outputs.extend([proc.stdout, proc.stderr])
        if status is not None:
            assert proc.returncode == status, f"harness {' '.join(args)}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.cwd)


def _assert_nowhere(root, outputs: list[str], needles: list[str]) -> dict[str, bytes]:
    """No needle, in any letter case, in any file under ``root`` or in any of ``outputs``."""
    blobs = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    blobs.update({f"output {i}": text.encode() for i, text in enumerate(outputs)})
    for needle in needles:
        leaks = [name for name, data in blobs.items() if needle.lower().encode() in data.lower()]
        assert not leaks, f"{needle!r} (any case) found in {leaks}"
    return blobs


def _query(db_file, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(db_file)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("client, log_format", [("litellm", "json"), ("direct", "rich")])
def test_api_key_never_written_anywhere(tmp_path, client, log_format):
    secret = f"sk-test-SECRET-{secrets.token_hex(12)}"
    harness = _Harness(tmp_path, {**os.environ, "OPENAI_API_KEY": secret})
    db_file = tmp_path / "secrets.db"
    db = f"sqlite:///{db_file}"
    export = tmp_path / "export.json"
    episodes = tmp_path / "episodes.jsonl"
    policy = TauPolicy(AGENT, USER)

    with HeaderRecordingServer(_responder(policy, secret)) as server:
        harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                "--api-base", server.base_url, "--tasks", ",".join(TASKS), "--trials", "2", "--concurrency", "10",
                "--run", "s", "--db", db, "--max-retries", "0", "--timeout", "4", "--retry-backoff", "0.01",
                "--cache", "--llm-client", client, "--log-format", log_format)
        harness("results", "show", "s", "--db", db)
        harness("results", "show", "s", "--db", db, "--format", "json")
        harness("results", "list", "--db", db)
        harness("results", "export", "s", "--format", "tau2", "--out", str(export), "--db", db)
        harness("results", "export", "s", "--format", "jsonl", "--out", str(episodes), "--db", db)
        harness("rescore", "s", "--db", db)
        # Every episode a 409 quoting the key: the run fails, its reason quotes the last error.
        server.responder = lambda body: {"status": 409, "message": f"Conflict: {_echo(secret)}"}
        harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                "--api-base", server.base_url, "--tasks", "0", "--run", "s409", "--db", db, "--max-retries", "0",
                "--llm-client", client, "--log-format", log_format, status=1)
    # A key the provider refuses (401) stops a run with a line quoting the provider's error, which
    # quotes the key (a lower-cased copy of it too).
    refused = {"status": 401, "message": f"Incorrect API key provided: {secret}, {secret.lower()}. {_echo(secret)}"}
    with HeaderRecordingServer(lambda body: refused) as bad_key:
        stop = harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                       "--api-base", bad_key.base_url, "--tasks", "0", "--run", "s401", "--db", db,
                       "--llm-client", client, "--log-format", log_format, status=1)
        assert "Incorrect API key provided: ***" in stop.stderr
    assert set(bad_key.header_values("authorization")) == {f"Bearer {secret}"}

    # The key was sent: every request carried it.
    auth = server.header_values("authorization")
    assert auth and set(auth) == {f"Bearer {secret}"}, set(auth)

    # The runs have the provider-error episodes and reasons whose texts we grep (so the grep covers
    # them), with the key masked, not dropped.
    errors = dict(_query(db_file, "SELECT e.task_id, e.error FROM episodes e JOIN runs r ON e.run_id = r.id "
                                  "WHERE r.name = 's' AND e.error_class = 'infra' AND e.trial = 0"))
    assert set(errors) == {"1", "2", "3", "7"}, errors
    for task in ("1", "2", "7"):
        assert "key ***" in errors[task], errors[task]
    reasons = dict(_query(db_file, "SELECT name, status_reason FROM runs WHERE status = 'failed'"))
    assert set(reasons) == {"s401", "s409"} and all("key ***" in r for r in reasons.values()), reasons
    assert export.exists() and episodes.exists()

    token = secret.rsplit("-", 1)[1]
    blobs = _assert_nowhere(tmp_path, harness.outputs, [secret, token, "sk-test-SECRET", "Authorization", "Bearer"])
    names = {Path(name).name for name in blobs}
    assert {"secrets.db", "export.json", "episodes.jsonl", "llm_cache.db"} <= names, names  # --cache: under the CWD


@pytest.mark.parametrize("client, log_format", [("litellm", "json"), ("direct", "rich")])
def test_credentials_in_urls_never_written_anywhere(tmp_path, client, log_format):
    """An ``--api-base`` may carry credentials: a ``?key=`` query parameter (some gateways), or a
    user and password. Neither reaches the stored config, the logs, the printed resume commands
    (after a stop by SIGTERM, after a refused key) or the exports; the config keeps the URL with
    the credential masked, and a resumed run with the same URL is not refused as changed."""
    query_key, password = f"qk{secrets.token_hex(10)}", f"pw{secrets.token_hex(10)}"
    harness = _Harness(tmp_path, {**os.environ, "OPENAI_API_KEY": ""})
    db_file = tmp_path / "urls.db"
    db = f"sqlite:///{db_file}"
    policy = TauPolicy(AGENT, USER)
    common = ["--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}", "--db", db,
              "--max-retries", "0", "--llm-client", client, "--log-format", log_format]

    with HeaderRecordingServer(lambda body: {**policy(body), "delay": 0.3}) as server:
        keyed = f"{server.base_url}?key={query_key}"
        args = ["eval", *common, "--api-base", keyed, "--tasks", "0,1,2,3", "--concurrency", "1", "--run", "q"]
        proc = harness.popen(*args)
        try:
            deadline = time.monotonic() + 120
            while not server.headers:  # stopped once the provider was reached
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "no request reached the server"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        harness.outputs.extend([out, err])
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert "interrupted: run q" in err and "key=***" in err, err[-3000:]
        # The same command resumes it (the stored URL is masked, so compared masked); this time
        # the provider refuses the key, quoting the URL's key.
        server.responder = lambda body: {"status": 401, "message": f"invalid key {query_key} (from {keyed})"}
        stop = harness(*args, status=1)
        assert "invalid key *** (from" in stop.stderr and "key=***" in stop.stderr, stop.stderr[-3000:]
        requests = len(server.headers)
        # User and password in the URL: neither client gets a reply from such a URL here (litellm
        # reports a connection error, aiohttp refuses user info next to a key), so the run fails
        # and prints its resume command, with the URL in it.
        userinfo = server.base_url.replace("http://", f"http://alice:{password}@")
        harness("eval", *common, "--api-base", userinfo, "--tasks", "0", "--run", "u", status=1)
        for run in ("q", "u"):
            harness("results", "show", run, "--db", db, "--format", "json")
            harness("results", "export", run, "--format", "jsonl", "--out", str(tmp_path / f"{run}.jsonl"), "--db", db)
        harness("results", "list", "--db", db)
    assert requests > 1

    stored = {name: json.loads(config)["api_base"] for name, config in _query(db_file, "SELECT name, config FROM runs")}
    assert stored == {"q": f"{server.base_url}?key=***", "u": server.base_url.replace("http://", "http://alice:***@")}
    _assert_nowhere(tmp_path, harness.outputs, [query_key, password])


def test_database_password_never_printed(tmp_path):
    """A ``--db`` URL's password stays out of what the store's error paths print: a server that
    does not answer, a dialect whose driver is missing, an unknown run (the message names the
    database), for eval and results alike."""
    password = f"dbpw{secrets.token_hex(10)}"
    harness = _Harness(tmp_path, {**os.environ, "OPENAI_API_KEY": ""})
    unreachable = f"postgresql+psycopg://harness:{password}@127.0.0.1:1/harness"
    no_driver = f"mysql+nosuchdriver://harness:{password}@127.0.0.1:1/harness"
    sqlite_query = f"sqlite:///{tmp_path / 'db.sqlite'}?password={password}"  # SQLite ignores it (and warns)
    for db in (unreachable, no_driver):
        assert harness("results", "list", "--db", db, status=None).returncode != 0
        assert harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0",
                       "--db", db, "--quiet", status=None).returncode != 0
    unknown = harness("results", "show", "nosuch", "--db", sqlite_query, status=2)
    assert "unknown run 'nosuch'" in unknown.stderr and "password=***" in unknown.stderr, unknown.stderr
    _assert_nowhere(tmp_path, harness.outputs, [password])


def test_database_password_stays_out_of_a_training_run(tmp_path):
    """A training run prints where its results are and records its database in ``run.json``: the
    password of the ``--db`` URL is in neither (here a query parameter SQLite ignores; user-info
    passwords are dropped from ``run.json`` altogether)."""
    pytest.importorskip("torch")
    password = f"dbpw{secrets.token_hex(10)}"
    harness = _Harness(tmp_path, {**os.environ, "OPENAI_API_KEY": ""})
    db = f"sqlite:///{tmp_path / 'train.db'}?password={password}"
    done = harness("train", "--env", "toy", "--policy", "tiny-toy", "--steps", "1", "--tasks-per-step", "2",
                   "--group-size", "2", "--eval-every", "0", "--max-new-tokens", "8", "--run", "t", "--db", db,
                   "--out-dir", str(tmp_path / "t"))
    assert "password=***" in done.stdout, done.stdout
    assert json.loads((tmp_path / "t" / "run.json").read_text())["db"].endswith("?password=***")
    _assert_nowhere(tmp_path, harness.outputs, [password])


@pytest.mark.parametrize("client", ["litellm", "direct"])
def test_no_half_key_survives_the_cut_of_a_provider_error(monkeypatch, client):
    """Provider error texts are cut to a few hundred characters; a key the cut splits must not
    leave its first half behind (masking after the cut would: the half is no longer the key).
    The key has no well-known shape here, so only its value identifies it; every offset of the
    cut inside a quoted key is tried (400, 401 and 500, through the real client)."""
    from harness.errors import InfraError
    from harness.llm import LLMConfig, complete

    key = f"test-SECRET-{secrets.token_hex(12)}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    half = key[:len("test-SECRET-") + 1]  # one character of the random part is already a leak

    async def errors(cfg: LLMConfig) -> list[str]:
        texts = []
        for status in (400, 401, 500):
            for shift in range(len(key) + 1):
                server.responder = lambda body: {"status": status, "message": "x" * shift + " " + " ".join([key] * 12)}
                with pytest.raises(InfraError) as caught:
                    await complete(cfg, [{"role": "user", "content": "hi"}])
                texts.append(str(caught.value))
        return texts

    with FakeOpenAIServer(lambda body: {"content": "unused"}) as server:
        cfg = LLMConfig(model="openai/fake", api_base=server.base_url, max_retries=0, client=client)
        texts = run_loop(errors(cfg))
    assert all("***" in t for t in texts), texts[0]  # the key was quoted, and masked
    cut = [t for t in texts if half.lower() in t.lower()]
    assert not cut, cut[0]


def test_redaction_rules(monkeypatch):
    """What ``harness.redact`` treats as a secret (its docstring and docs/reliability.md): values
    of credential-named variables (8+ characters, any letter case), explicit keys, URL credentials,
    well-known key shapes; and what it leaves alone."""
    from harness.llm import LLMConfig
    from harness.redact import redact, redact_data

    monkeypatch.setattr(sys, "argv", ["harness", "--db", "postgresql://u:argvpass99@db/x"])
    for name, value in [("MY_PROVIDER_API_KEY", "k-value-1234"), ("HF_TOKEN", "tok-value-99"),
                        ("AWS_SECRET_ACCESS_KEY", "aws/secret+99"), ("PGPASSWORD", "pg-pass-123"),
                        ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/creds.json"), ("SHORT_TOKEN", "1234567"),
                        ("MAX_TOKENS", "not-a-secret-value"), ("TOKENIZERS_PARALLELISM", "falsefalse")]:
        monkeypatch.setenv(name, value)
    LLMConfig(model="openai/x", api_key="explicit-key-77")  # a key given explicitly, not from the environment
    text = ("k-value-1234 TOK-VALUE-99 aws/secret+99 pg-pass-123 /etc/creds.json explicit-key-77 argvpass99 | "
            "1234567 not-a-secret-value falsefalse")
    assert redact(text) == "*** *** *** *** *** *** *** | 1234567 not-a-secret-value falsefalse"
    assert redact("see postgresql+psycopg://bob:p/w@host:5432/db and http://tok@h/v1, not sqlite:///a.db or a@b") == (
        "see postgresql+psycopg://bob:***@host:5432/db and http://***@h/v1, not sqlite:///a.db or a@b")
    assert redact("http://h/v1?api-version=2&key=abc&SIG=x;") == "http://h/v1?api-version=2&key=***&SIG=***;"
    shapes = "sk-proj-abcdefghijklmnop12 hf_abcdefghijklmnopqrstu AKIAABCDEFGHIJKLMNOP Authorization: Bearer a.b-12345"
    assert redact(shapes) == "*** *** *** Authorization: Bearer ***"
    assert redact("task-abcdefghijklmnopqrst asks for 2 tokens") == "task-abcdefghijklmnopqrst asks for 2 tokens"
    assert redact_data({"api_base": "http://u:p@h", "api_key": "short", "n": [1, "k-value-1234"], "max_tokens": 5}) == {
        "api_base": "http://u:***@h", "api_key": "***", "n": [1, "***"], "max_tokens": 5}
    assert redact(redact(text)) == redact(text)  # stored values are masked again on resume: same result
