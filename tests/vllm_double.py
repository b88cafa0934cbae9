"""`harness serve-policy` (the vLLM test double) as a real subprocess on 127.0.0.1, for tests.

    from vllm_double import serve_policy
    with serve_policy(tiny_toy_dir) as double:          # double.url: "http://127.0.0.1:PORT"
        httpx.post(f"{double.url}/v1/completions", json={...})

    serve_policy_fixture = vllm_double.fixture(scope="module")   # in a test module: a pytest fixture
                                                                   # whose value is a `start(policy, ...)`

It runs the CLI as a user would (``sys.executable -m harness.cli serve-policy --port 0``), reads
the port from the line it prints once listening, waits for ``/health``, and stops it with SIGTERM
(then SIGKILL after a grace period). ``stop()`` / ``kill()`` are there for tests of a dead
replica. The server's output goes to a log file, shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

__all__ = ["Double", "serve_policy", "fixture"]

_LISTENING = re.compile(r"harness serve-policy: (http://127\.0\.0\.1:\d+)/")


class Double:
    """One running ``harness serve-policy`` process."""

    def __init__(self, policy: str | Path, *args: str, start_timeout: float = 180):
        self.policy = str(policy)
        self.args = list(args)
        self.log_path = Path(tempfile.mkstemp(prefix="serve-policy-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.start(start_timeout)

    def start(self, timeout: float = 180) -> None:
        """Start (or restart) the process on a free port; returns once ``/health`` answers 200."""
        cmd = [sys.executable, "-m", "harness.cli", "serve-policy", "--policy", self.policy, "--port", "0",
               *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-policy exited with {self.proc.returncode}:\n{self.log()}")
            found = _LISTENING.findall(self.log())
            if found:
                self.url = found[-1]
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"serve-policy did not answer /health within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 15) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds; its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (a replica that dies)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def serve_policy(policy: str | Path, *args: str, start_timeout: float = 180) -> Iterator[Double]:
    """A running double for the ``with`` block; extra ``args`` go to the CLI (e.g. ``"--max-logprobs", "5"``)."""
    double = Double(policy, *args, start_timeout=start_timeout)
    try:
        yield double
    finally:
        double.close()


def fixture(scope: str = "function"):
    """A pytest fixture (assign it to a name in a test module) whose value starts doubles,
    ``start(policy, *args) -> Double``; all that it started stop when the fixture ends."""

    @pytest.fixture(scope=scope)
    def start_double():
        started: list[Double] = []

        def start(policy: str | Path, *args: str, start_timeout: float = 180) -> Double:
            started.append(Double(policy, *args, start_timeout=start_timeout))
            return started[-1]

        yield start
        for double in started:
            double.close()

    return start_double
