"""A results database filled by real runs, and `harness view` serving it, for the viewer's tests.

The eval runs are played as a user plays them (the `harness eval` subprocess): an oracle τ-airline
run with the scripted user (tasks 0 and 7, two trials) and a run of the real litellm client against
the fake OpenAI-compatible server, whose agent looks up a user id holding HTML (`HOSTILE`) on
tasks 0 and 7. It fails task 7 (which needs bookings changed) and passes task 0 (which needs
none); its stored user turns, tool calls and tool results all carry the HTML. A third (`GROUPS`)
plays task 7 as a sibling group of two (`--group-size 2`) against the same fake server: one
sibling looks the hostile id up, the other says goodbye at once, so they diverge at the agent's
first reply.

`fill_training` adds a toy SGCD training run (`TRAIN`: the tiny toy policy, the built-in ``diff``
summarizer, two steps, credit recorded at each, held-out evaluations at steps 0 and 2, which are
eval runs of their own). An untrained tiny policy never succeeds and SGCD only trains (and so
records) groups with a success and a failure, so, as in the method tests (tests/toy_groups.py),
the rollouts' rewards are rewritten to alternate 1 / 0; the rollouts, SGCD's reference, teacher
and salience, the recording, the update and the store are the real code. It calls
``trainers.loop.train`` (in a child Python), the only way to rewrite the rewards."""

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
ORACLE, HOSTILE_RUN, GROUPS, TRAIN = "oracle", "hostile", "groups", "toy-sgcd"


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
    script = ScriptedResponder({  # whichever sibling gets the tool call also gets the apology
        "fake-agent": [{"tool_calls": [{"name": "get_user_details", "arguments": {"user_id": HOSTILE}}]},
                       {"content": "Sorry, I could not find you."}, {"content": f"Goodbye {HOSTILE}"}],
        "fake-user": [{"content": f"Hi, I am {HOSTILE}"}, {"content": "###STOP###"}] * 2,
    })
    with FakeOpenAIServer(script) as server:
        proc = harness("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--user-model",
                       "openai/fake-user", "--api-base", server.base_url, "--tasks", "7", "--run", GROUPS,
                       "--group-size", "2", "--temperature", "1", "--concurrency", "1", "--db", db, "--quiet")
    assert proc.returncode == 0, proc.stderr


def fill_training(db: str, out_dir: Path) -> None:
    """Train ``TRAIN`` into ``db`` (see the module's docstring), in a child Python: the training
    runs its own event loop, which cannot start inside a test that drives Playwright's."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "import sys, view_server; view_server._train(*sys.argv[1:])", db,
                           str(out_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train(db: str, out_dir: str) -> None:
    import pytest
    from toy_groups import alternate_rewards

    import trainers.loop as loop
    from trainers.config import TrainConfig

    cfg = TrainConfig(env="toy", policy="tiny-toy", run=TRAIN, db=db, out_dir=out_dir, steps=2, tasks_per_step=2,
                      group_size=3, eval_every=2, eval_tasks=2, lr=3e-3, max_new_tokens=12, checkpoint_every=10,
                      seed=5, quiet=True, method="sgcd", summarizer="diff", log_credit_every=1, log_credit_groups=1,
                      method_overrides={"control": "off", "kl_floor": 0.0})  # per-token W that varies (test_view_data)
    real = loop.collect_groups
    with pytest.MonkeyPatch.context() as mp:  # the rollouts are real; their rewards alternate (see above)
        mp.setattr(loop, "collect_groups", lambda *a, **k: alternate_rewards(real(*a, **k)))
        loop.train(cfg, echo=lambda _: None)


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
