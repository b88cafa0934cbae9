"""AppWorld adapter, Tier A (appworld.md §9.1): the real litellm client -> fake OpenAI server,
our env -> fake AppWorld environment server (tests/fakes/appworld_server.py), both on 127.0.0.1.

The scripted agent picks its reply from the task instruction in the system prompt and the number
of assistant turns so far, so episodes may run concurrently in any order. Each test pins TGC/SGC
or an episode ending."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fakes.appworld_server import PASSWORD, SUPERVISOR, TASKS, FakeAppWorldServer
from fakes.openai_server import FakeOpenAIServer

from envs.appworld.env import NO_CODE_MESSAGE, AppWorldFactory, StaticServers, extract_code
from envs.appworld.metrics import tgc_sgc
from harness.agents import make_agent_spec
from harness.episode_runner import EpisodeJob, play_episode, run_episodes
from harness.types import ErrorClass, Termination

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-agent"
LOGIN = f'tok = apis.simple_note.login(username="{SUPERVISOR["email"]}", password="{PASSWORD}")["access_token"]\n'


def block(code: str) -> dict[str, Any]:
    return {"content": f"Let me do this.\n```python\n{code}\n```"}


def right(task_id: str) -> str:
    task = TASKS[task_id]
    if task["kind"] == "question":
        if task_id == "fake001_1":
            return LOGIN + "apis.supervisor.complete_task(answer=len(apis.simple_note.search_notes(access_token=tok)))"
        return LOGIN + ("ids = [n['note_id'] for n in apis.simple_note.search_notes(access_token=tok) "
                        "if n['title'] == 'work']\n"
                        "apis.supervisor.complete_task(answer=ids[0])")
    return (LOGIN + f"apis.simple_note.create_note(access_token=tok, title={task['title']!r}, "
            f"content={task['content']!r})\n"
            "apis.supervisor.complete_task()")


def wrong(task_id: str) -> str:
    if TASKS[task_id]["kind"] == "question":
        return "apis.supervisor.complete_task(answer=99)"
    return LOGIN + ("apis.simple_note.create_note(access_token=tok, title='oops', content='')\n"
                    "apis.supervisor.complete_task()")


class Policy:
    """responder(request) for FakeOpenAIServer: ``scripts[task_id][turn]`` (the last reply repeats)."""

    def __init__(self, scripts: dict[str, list[dict[str, Any]]], on_request=None):
        self.scripts = scripts
        self.on_request = on_request

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        system = request["messages"][0]["content"]
        task_id = next(t for t, spec in TASKS.items() if spec["instruction"] in system)
        turn = sum(m["role"] == "assistant" for m in request["messages"])
        if self.on_request:
            self.on_request(task_id, turn)
        replies = self.scripts[task_id]
        return replies[min(turn, len(replies) - 1)]


@pytest.fixture
def aw_root(tmp_path):
    from fakes.appworld_server import write_root

    return write_root(tmp_path / "aw")


@pytest.fixture
def aw_servers(aw_root):
    servers = [FakeAppWorldServer(aw_root).start() for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def _agent(llm: FakeOpenAIServer):
    return make_agent_spec("litellm", model=f"openai/{MODEL}", api_base=llm.base_url, max_retries=0)


def _play_all(scripts, aw_root, urls, task_ids=None, **factory_opts):
    factory = AppWorldFactory(appworld_root=str(aw_root), server_urls=urls, **factory_opts)
    tasks = factory.tasks("dev", task_ids)
    results = []
    with FakeOpenAIServer(Policy(scripts)) as llm:
        jobs = [EpisodeJob(task=t, trial=0, seed=1) for t in tasks]
        asyncio.run(run_episodes(factory, _agent(llm), jobs, concurrency=4, on_result=results.append))
    df = pd.DataFrame([{"task_id": r.task_id, "trial": r.trial, "reward": r.score.reward} for r in results])
    return factory, {r.task_id: r for r in results}, df


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb ```python\ny\n```") == "x = 1"
    assert extract_code("```\nprint(1)\n```") == "print(1)"
    assert extract_code("no code here") is None and extract_code(None) is None


def test_all_correct_agent_scores_tgc_and_sgc_one(aw_root, aw_servers):
    scripts = {t: [block(right(t))] for t in TASKS}
    factory, results, df = _play_all(scripts, aw_root, [s.base_url for s in aw_servers])
    assert tgc_sgc(df) == (1.0, 1.0)
    for r in results.values():
        assert r.error_class is ErrorClass.NONE and r.termination is Termination.AGENT_STOP
        assert r.score.success and r.score.reward == 1.0
        assert r.score.breakdown["num_tests"] == 2 and r.score.breakdown["num_passed"] == 2
        assert r.score.breakdown["interactions"] == 1
    bd = results["fake002_2"].score.breakdown
    assert bd["difficulty"] == 2 and bd["experiment_name"].startswith("harness-fake002_2-0-")
    # Both servers served episodes, each world was closed, and the StaticServers queue is full again.
    assert all(any(p == "/initialize" for p, _ in s.requests) for s in aw_servers)
    assert sorted(factory.servers._free) == sorted(s.base_url for s in aw_servers)
    assert all(s.world is None for s in aw_servers)
    # The agent saw a system prompt with the task and supervisor, and no tools.
    first = results["fake001_1"].messages
    assert first[0]["role"] == "user" and TASKS["fake001_1"]["instruction"] in first[0]["content"]
    assert first[-1]["role"] == "user" and first[-1]["content"].startswith("Output:")


@pytest.mark.parametrize("good, expected", [
    ({"fake001_1", "fake002_1"}, (0.5, 0.0)),   # one task right per scenario
    ({"fake001_1", "fake001_2"}, (0.5, 0.5)),   # only the question scenario
])
def test_partial_agents(aw_root, aw_servers, good, expected):
    scripts = {t: [block(right(t) if t in good else wrong(t))] for t in TASKS}
    _, results, df = _play_all(scripts, aw_root, [s.base_url for s in aw_servers])
    assert tgc_sgc(df) == expected
    assert {t for t, r in results.items() if r.score.success} == good
    failed = results[next(t for t in TASKS if t not in good)].score.breakdown
    assert failed["num_failed"] == 1 and failed["failures"][0]["label"] == "no_op_fail"


def test_do_nothing_agent_passes_only_no_op_tests(aw_root, aw_servers):
    scripts = {t: [block("apis.supervisor.complete_task()")] for t in TASKS}
    _, results, df = _play_all(scripts, aw_root, [s.base_url for s in aw_servers])
    assert tgc_sgc(df) == (0.0, 0.0)
    for r in results.values():
        assert r.termination is Termination.AGENT_STOP
        assert r.score.breakdown["num_passed"] == 1
        assert r.score.breakdown["passes"][0]["label"] == "no_op_pass"


def test_interaction_cap_ends_with_max_steps(aw_root, aw_servers):
    chatter = [{"content": "I will think about it."}, block("print(apis.supervisor.show_profile()['first_name'])"),
               block("x = 1/0")]
    _, results, _ = _play_all({"fake001_1": chatter}, aw_root, [aw_servers[0].base_url], ["fake001_1"],
                              max_interactions=3)
    r = results["fake001_1"]
    assert r.termination is Termination.MAX_STEPS and r.error_class is ErrorClass.NONE
    assert r.score.reward == 0.0 and r.score.breakdown["interactions"] == 3
    observations = [m["content"] for m in r.messages if m["role"] == "user"][1:]
    assert observations[0] == NO_CODE_MESSAGE
    assert observations[1] == "Output:\n```\nAda\n\n```"
    assert "Execution failed. Traceback:" in observations[2] and "ZeroDivisionError" in observations[2]


def test_infinite_loop_hits_execute_timeout_and_episode_goes_on(aw_root, aw_servers):
    scripts = {"fake002_1": [block("while True:\n    pass"), block(right("fake002_1"))]}
    started = time.monotonic()
    _, results, _ = _play_all(scripts, aw_root, [aw_servers[0].base_url], ["fake002_1"], timeout_seconds=1)
    assert time.monotonic() - started < 15
    r = results["fake002_1"]
    assert "Execution timed out after 1 seconds." in r.messages[2]["content"]
    assert r.termination is Termination.AGENT_STOP and r.score.success


def test_server_dying_mid_episode_is_infra_and_released_unhealthy(aw_root):
    server = FakeAppWorldServer(aw_root).start()
    released = []

    class Recording(StaticServers):
        def release(self, url, healthy):
            released.append((url, healthy))
            super().release(url, healthy)

    def kill(task_id, turn):
        if turn == 1:
            server.stop()

    pool = Recording([server.base_url])
    factory = AppWorldFactory(appworld_root=str(aw_root), pool=pool, http_timeout=5)
    (task,) = factory.tasks("dev", ["fake001_1"])
    with FakeOpenAIServer(Policy({"fake001_1": [block("print(1)"), block("print(2)")]}, on_request=kill)) as llm:
        r = asyncio.run(play_episode(factory, _agent(llm), task, trial=0, seed=1))
    assert r.error_class is ErrorClass.INFRA and r.termination is Termination.INFRASTRUCTURE_ERROR
    assert "ServerGone" in r.error or "is gone" in r.error
    assert released == [(server.base_url, False)]


def test_unknown_split_and_task_are_config_errors(aw_root):
    from harness.errors import ConfigError

    factory = AppWorldFactory(appworld_root=str(aw_root), server_urls=["http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match="unknown AppWorld split 'nope'.*dev"):
        factory.tasks("nope")
    with pytest.raises(ConfigError, match="unknown task id.*fake009_1"):
        factory.tasks("dev", ["fake009_1"])
    with pytest.raises(ConfigError, match="--appworld-url"):
        AppWorldFactory(appworld_root=str(aw_root))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fake_server_runs_as_a_subprocess(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/fakes/appworld_server.py"), "--port", str(port),
                             "--root", str(tmp_path / "root")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks/fake001_1", timeout=1).read())
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert body["output"]["task_id"] == "fake001_1"
        assert (tmp_path / "root/data/datasets/test_normal.txt").read_text().split() == list(TASKS)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode in (0, -15) and out == b"" and err == b""


def test_cli_eval_stores_episodes_and_results_show_tgc_sgc(tmp_path, aw_root, aw_servers):
    db = f"sqlite:///{tmp_path}/runs.db"
    scripts = {t: [block(right(t) if t in ("fake001_1", "fake002_1", "fake002_2") else wrong(t))] for t in TASKS}
    env = {**os.environ, "OPENAI_API_KEY": "sk-fake", "APPWORLD_ROOT": str(aw_root)}

    def harness(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc

    with FakeOpenAIServer(Policy(scripts)) as llm:
        harness("eval", "--env", "appworld", "--split", "dev", "--model", f"openai/{MODEL}", "--api-base",
                llm.base_url, "--appworld-url", aw_servers[0].base_url, "--appworld-url", aw_servers[1].base_url,
                "--max-interactions", "5", "--run", "aw", "--db", db, "--quiet")
    row = json.loads(harness("results", "show", "aw", "--db", db, "--format", "json").stdout)[0]
    assert row["env"] == "appworld" and row["split"] == "dev" and row["episodes"] == 4
    assert row["tgc"] == pytest.approx(0.75) and row["sgc"] == pytest.approx(0.5)
    assert row["tgc/d1"] == pytest.approx(1.0) and row["sgc/d1"] == pytest.approx(1.0)
    assert row["tgc/d2"] == pytest.approx(0.5) and row["sgc/d2"] == pytest.approx(0.5)
    table = harness("results", "show", "aw", "--db", db).stdout
    assert "tgc" in table and "sgc" in table
    # Unknown split: one clean line, exit 2.
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "eval", "--env", "appworld", "--split", "nope",
                          "--model", f"openai/{MODEL}", "--api-base", "http://127.0.0.1:9/v1", "--appworld-url",
                          "http://127.0.0.1:9", "--db", db], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "unknown AppWorld split 'nope'" in bad.stderr and "Traceback" not in bad.stderr
