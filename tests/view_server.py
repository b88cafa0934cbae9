"""A results database filled by real runs, and `harness view` serving it, for the viewer's tests.

The runs are played as a user plays them (the `harness eval` subprocess): an oracle τ-airline run
with the scripted user (tasks 0 and 7, two trials) and a run of the real litellm client against
the fake OpenAI-compatible server, whose agent looks up a user id holding HTML (`HOSTILE`) on
tasks 0 and 7. It fails task 7 (which needs bookings changed) and passes task 0 (which needs
none); its stored user turns, tool calls and tool results all carry the HTML."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fakes.openai_server import FakeOpenAIServer, ScriptedResponder

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
ORACLE, HOSTILE_RUN = "oracle", "hostile"


def harness(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def fill(db: str) -> None:
    """Play the two runs into ``db``."""
    proc = harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0,7",
                   "--trials", "2", "--run", ORACLE, "--db", db, "--quiet")
    assert proc.returncode == 0, proc.stderr
    script = ScriptedResponder({  # one episode at a time (--concurrency 1): each takes the next two replies
        "fake-agent": [{"tool_calls": [{"name": "get_user_details", "arguments": {"user_id": HOSTILE}}]},
                       {"content": "Sorry, I could not find you."}] * 2,
        "fake-user": [{"content": f"Hi, I am {HOSTILE}"}, {"content": "###STOP###"}] * 2,
    })
    with FakeOpenAIServer(script) as server:
        proc = harness("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--user-model",
                       "openai/fake-user", "--api-base", server.base_url, "--tasks", "0,7", "--run", HOSTILE_RUN,
                       "--concurrency", "1", "--db", db, "--quiet")
    assert proc.returncode == 0, proc.stderr


class ViewServer:
    """``harness view --port 0`` on ``db`` in a subprocess; ``url`` is the address it printed."""

    def __init__(self, db: str, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "view", "--db", db, "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        found = re.search(r"(http://\S+?)/ ", line)
        if not found:
            self.stop()
            raise AssertionError(f"harness view printed no URL: {line!r} {self.proc.stderr.read()}")
        self.url = found.group(1)
        self.first_line = line
        deadline = time.monotonic() + 30
        while True:  # the socket listens already; wait until uvicorn answers
            try:
                urllib.request.urlopen(self.url + "/api/runs", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> str:
        """Stop the server; its standard error."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()


def db_url(path: Path) -> str:
    return f"sqlite:///{path}"
