"""Rollouts: G sibling episodes per task from the current local policy, as ``Group`` objects.

The episodes run through the same async runner as evaluation (``run_episodes``), so a training
rollout exercises exactly the env, protocol and grading code that ``harness eval`` does. The
policy batches all in-flight episodes' turns into one generation (lock-step, see
``LocalPolicy``), and each agent's ``TokenTrace`` comes back on its ``EpisodeResult``.

Seeds derive from (run seed, step, task, sibling) only, so a resumed run replays a step with the
same samples, whatever ran before it in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import torch

from harness.agents.base import AgentSpec
from harness.episode_runner import EpisodeJob, run_episodes
from harness.policy.local_policy import LocalPolicy
from harness.types import EpisodeResult, Group, Task
from trainers import distributed

__all__ = ["episode_seed", "play", "collect_groups"]


def episode_seed(seed: int, step: int, task_id: str, sibling: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{task_id}:{sibling}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def play(policy: LocalPolicy, factory: Any, jobs: list[EpisodeJob]) -> list[EpisodeResult]:
    """Play ``jobs`` all at once with ``policy``; results in job order."""
    spec = AgentSpec(name="hf", model=policy.cfg.path, build=lambda task, seed: policy.agent(seed))
    done: dict[tuple[str, int], EpisodeResult] = {}

    def keep(result: EpisodeResult) -> None:
        done[(result.task_id, result.trial)] = result

    async def main() -> None:
        device = policy.device
        if device.type == "cuda" and distributed.enabled():
            # Generation runs on the loop's worker threads, where the current CUDA device is the
            # default (cuda:0), not this rank's: set it in each worker thread.
            from concurrent.futures import ThreadPoolExecutor

            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(initializer=torch.cuda.set_device, initargs=(device,)))
        await run_episodes(factory, spec, jobs, concurrency=max(1, len(jobs)), on_result=keep)

    asyncio.run(main())
    return [done[(job.task.id, job.trial)] for job in jobs]


def collect_groups(policy: LocalPolicy, factory: Any, tasks: list[Task], group_size: int, *, step: int,
                   seed: int) -> list[Group]:
    jobs = [EpisodeJob(task=task, trial=i, seed=episode_seed(seed, step, task.id, i),
                       group_id=f"{task.id}/step{step}")
            for task in tasks for i in range(group_size)]
    results = play(policy, factory, jobs)
    return [Group(task_id=task.id, group_id=f"{task.id}/step{step}",
                  episodes=results[n * group_size:(n + 1) * group_size])
            for n, task in enumerate(tasks)]
