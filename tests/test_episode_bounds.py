"""What keeps an episode finite whatever the model or the provider does (docs/reliability.md
"Deadlines and bounds"): a per-episode wall-clock budget, a cap on tool calls per message, and a
concurrency that fits the process's file-descriptor limit. Real commands or the real runner, the
real litellm client against the fake OpenAI-compatible server, real SQLite files."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys

import pytest
from fakes.openai_server import FakeOpenAIServer, ScriptedResponder
from fakes.tau_policy import Delayed, TauPolicy

from envs.registry import make_env_factory
from harness.cli.eval import EvalOptions, run_eval
from harness.store import Store

AGENT, USER = "fake-agent", "fake-user"


def _harness(*args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": ""}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **popen)


def _episodes(db_file, run: str) -> list[tuple]:
    con = sqlite3.connect(db_file, timeout=30)
    try:
        return con.execute("SELECT e.task_id, e.error_class, e.error FROM episodes e JOIN runs r ON e.run_id = r.id "
                           "WHERE r.name = ? ORDER BY e.task_id", (run,)).fetchall()
    finally:
        con.close()


@pytest.mark.timeout(120)
def test_an_episode_past_its_deadline_is_an_infra_error_that_resume_replays(tmp_path):
    """--episode-timeout 1 against a provider that takes 0.4 s a reply: each τ episode (several
    replies) ends after about a second as an infra error naming the deadline, so the run scores
    nothing and fails. The deadline is a transport setting: the same run resumed without it (the
    provider now quick) plays exactly those episodes and scores them."""
    db_file = tmp_path / "deadline.db"
    provider = Delayed(TauPolicy(AGENT, USER), delay=0.4)
    with FakeOpenAIServer(provider) as server:
        args = ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                "--api-base", server.base_url, "--tasks", "0,1", "--run", "r", "--db", f"sqlite:///{db_file}",
                "--quiet", "--timeout", "10", "--max-retries", "0"]
        slow = _harness(*args, "--episode-timeout", "1")
        assert slow.returncode == 1, slow.stderr[-3000:]
        assert "Traceback" not in slow.stderr
        timed_out = _episodes(db_file, "r")
        provider.delay = 0.0
        quick = _harness(*args)
    assert [e[1] for e in timed_out] == ["infra", "infra"]
    assert all("not finished within 1s (--episode-timeout)" in e[2] for e in timed_out), timed_out
    assert quick.returncode == 0, quick.stderr[-3000:]
    assert [(e[0], e[1]) for e in _episodes(db_file, "r")] == [("0", "none"), ("1", "none")]


def test_tool_calls_past_the_cap_are_answered_with_errors_not_run(tmp_path):
    """A model that emits 500 tool calls in one message: the env runs the first --max-tool-calls
    (20) of them, every other call id gets a tool error, the next request to the model is
    well-formed (one answer per call id, in order), and the episode ends normally and is scored."""
    task = make_env_factory("toy").tasks("test")[0]
    item = task.data["items"][0]
    calls = [{"id": f"c{i}", "name": "lookup", "arguments": {"name": item}} for i in range(500)]
    script = ScriptedResponder({"fake": [{"tool_calls": calls}, {"content": "done"}]})
    db = f"sqlite:///{tmp_path / 'cap.db'}"
    with FakeOpenAIServer(script) as server:
        run_eval(EvalOptions(env="toy", model="openai/fake", api_base=server.base_url, tasks=[task.id], run="cap",
                             db=db, quiet=True, max_tool_calls=20))
        second = server.requests[1]["messages"]
    episode = Store(db).get_episode("cap", task.id, 0)
    assert episode.error_class.value == "none" and episode.termination.value == "agent_stop"
    answers = [m for m in episode.messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in answers] == [f"c{i}" for i in range(500)]
    assert [m["content"] for m in answers[:20]] == [task.data["codes"][item]] * 20
    assert all(m["content"].startswith("Error: not run: this message made 500 tool calls and at most 20")
               for m in answers[20:])
    assistant = next(m for m in second if m["role"] == "assistant")
    assert [c["id"] for c in assistant["tool_calls"]] == [f"c{i}" for i in range(500)]
    assert [m["tool_call_id"] for m in second if m["role"] == "tool"] == [f"c{i}" for i in range(500)]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"name": item}


def _limit_open_files(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@pytest.mark.timeout(180)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-descriptor limits")
@pytest.mark.parametrize("hard", [256, 8192])
def test_concurrency_fits_the_open_file_limit(tmp_path, hard):
    """`--concurrency 400` in a process allowed 256 open files: with a hard limit above what the
    run needs the soft limit is raised quietly; at a hard limit of 256 the run plays fewer episodes
    at a time and says so in one warning line. Either way every episode is scored: none is lost to
    "too many open files" on a socket or the database."""
    db_file = tmp_path / "fds.db"
    with FakeOpenAIServer(lambda body: {"content": "done", "delay": 0.3}) as server:
        proc = _harness("eval", "--env", "toy", "--model", "openai/fake", "--api-base", server.base_url,
                        "--trials", "8", "--concurrency", "400", "--run", "r", "--db", f"sqlite:///{db_file}",
                        "--quiet", "--timeout", "10", "--max-retries", "0",
                        preexec_fn=_limit_open_files(256, hard))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    if hard > 256:
        assert warnings == [], proc.stderr
    else:
        assert len(warnings) == 1 and "--concurrency 400" in warnings[0] and "open files" in warnings[0], proc.stderr
    episodes = _episodes(db_file, "r")
    assert len(episodes) == 8 * len(make_env_factory("toy").tasks("test"))
    assert {e[1] for e in episodes} == {"none"}, [e for e in episodes if e[1] != "none"][:3]


def test_a_run_stored_before_max_tool_calls_existed_still_resumes(tmp_path):
    """A run row written before --max-tool-calls existed has no such key in its settings: it
    resumes as long as the setting keeps its default (the cap it was played without never bit
    then either), and a different value is refused as a different setting."""
    db_file = tmp_path / "old.db"
    args = ["eval", "--env", "toy", "--agent", "oracle", "--tasks", "0,1", "--run", "old", "--db",
            f"sqlite:///{db_file}", "--quiet"]
    assert _harness(*args).returncode == 0
    con = sqlite3.connect(db_file)
    with con:
        (config,) = con.execute("SELECT config FROM runs WHERE name = 'old'").fetchone()
        config = json.loads(config)
        del config["max_tool_calls"]
        con.execute("UPDATE runs SET config = ? WHERE name = 'old'", (json.dumps(config),))
        con.execute("DELETE FROM episodes WHERE task_id = '1'")
    con.close()
    changed = _harness(*args, "--max-tool-calls", "5")
    assert changed.returncode == 2 and "different settings (max_tool_calls)" in changed.stderr, changed.stderr
    resumed = _harness(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(e[0], e[1]) for e in _episodes(db_file, "old")] == [("0", "none"), ("1", "none")]
