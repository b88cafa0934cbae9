"""AppWorld faults through the managed server pool: a server killed mid-episode gives that episode
``infra_error``, the pool restarts the server, the run goes on (and a resume replays only that
episode); afterwards no server process is left. Servers are the Tier A fake, spawned by
``ServerPool`` as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from fakes.appworld_server import TASKS, write_root
from fakes.openai_server import FakeOpenAIServer
from test_appworld_fake import Policy, block, right

from envs.appworld.env import AppWorldFactory
from envs.appworld.server_pool import ServerPool
from harness.agents import make_agent_spec
from harness.episode_runner import EpisodeJob, run_episodes
from harness.types import ErrorClass

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_killed_server_gives_infra_error_restart_and_the_run_goes_on(tmp_path):
    root = write_root(tmp_path / "aw")
    command = [sys.executable, str(REPO / "tests" / "fakes" / "appworld_server.py"), "--port", "{port}",
               "--root", str(root)]
    pool = ServerPool(2, command=command, startup_timeout=30, kill_grace=1.0)
    killed: list[int] = []

    def on_request(task_id: str, turn: int) -> None:
        # The first time the agent is asked for fake002_1's second turn, the servers die (all of
        # them, so the one this episode holds surely does).
        if task_id == "fake002_1" and turn == 1 and not killed:
            for pid in list(pool.pids):
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)

    # two turns per task: a harmless print first, then the solution
    scripts = {t: [block("print('looking around')"), block(right(t))] for t in TASKS}
    results = []
    with FakeOpenAIServer(Policy(scripts, on_request=on_request)) as llm, pool:
        pool.start()
        before = list(pool.pids)
        factory = AppWorldFactory(appworld_root=str(root), pool=pool, max_interactions=5, run_name="faults")
        agent = make_agent_spec("litellm", model="openai/fake-agent", api_base=llm.base_url, max_retries=0)
        tasks = factory.tasks("test_normal")
        jobs = [EpisodeJob(task=t, trial=0, seed=1) for t in tasks]
        asyncio.run(run_episodes(factory, agent, jobs, concurrency=1, on_result=results.append))
        assert killed, "the fault was never injected"
        assert pool.restart_count >= 1
        after = list(pool.pids)
        # the run went on: the episodes after the kill were played on a healthy server
        asyncio.run(run_episodes(factory, agent, [j for j in jobs if j.task.id == "fake002_1"],
                                 concurrency=1, on_result=results.append))
    by_task = {}
    for r in results:
        by_task.setdefault(r.task_id, []).append(r)
    first_try = by_task["fake002_1"][0]
    assert first_try.error_class is ErrorClass.INFRA, first_try
    assert all(r.score.success for t, rs in by_task.items() for r in rs if t != "fake002_1")
    assert by_task["fake002_1"][-1].score.success  # the retry (as resume would do) succeeds
    assert set(before) != set(after)
    # no server process survives the pool
    assert not [p for p in before + after if _alive(p)]
