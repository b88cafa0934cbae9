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
import time
from typing import Any, Callable

import torch

from harness.agents.base import AgentSpec
from harness.episode_runner import EpisodeJob, run_episodes
from harness.policy.local_policy import LocalPolicy
from harness.types import EpisodeResult, Group, Task
from trainers import distributed, sft

__all__ = ["episode_seed", "play", "collect_groups"]


def episode_seed(seed: int, step: int, task_id: str, sibling: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{task_id}:{sibling}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def play(policy: LocalPolicy, factory: Any, jobs: list[EpisodeJob], *,
         report: Callable[[int, float], None] | None = None, every_s: float | None = None) -> list[EpisodeResult]:
    """Play ``jobs`` all at once with ``policy``; results in job order.

    ``report(done, elapsed_s)`` is called every ``every_s`` seconds while episodes are in flight:
    the episodes play in lock-step and may all end together, so a clock, not a finished episode,
    says when to speak (a busy machine can stretch a phase to minutes). ``every_s`` defaults to
    the warm start's cadence, ``sft.PROGRESS_EVERY_S``."""
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
        every = sft.PROGRESS_EVERY_S if every_s is None else every_s
        reporter = asyncio.ensure_future(_report_every(every, report, done)) if report is not None else None
        try:
            await run_episodes(factory, spec, jobs, concurrency=max(1, len(jobs)), on_result=keep)
        finally:
            if reporter is not None:
                reporter.cancel()

    asyncio.run(main())
    if policy.engine.failure is not None:  # e.g. every rollout server is gone: the run cannot go on
        raise policy.engine.failure
    return [done[(job.task.id, job.trial)] for job in jobs]


async def _report_every(every_s: float, report: Callable[[int, float], None], done: dict) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        report(len(done), time.monotonic() - started)


def collect_groups(policy: LocalPolicy, factory: Any, tasks: list[Task], group_size: int, *, step: int,
                   seed: int, report: Callable[[int, float], None] | None = None) -> list[Group]:
    jobs = [EpisodeJob(task=task, trial=i, seed=episode_seed(seed, step, task.id, i),
                       group_id=f"{task.id}/step{step}")
            for task in tasks for i in range(group_size)]
    results = play(policy, factory, jobs, report=report)
    return [Group(task_id=task.id, group_id=f"{task.id}/step{step}",
                  episodes=results[n * group_size:(n + 1) * group_size])
            for n, task in enumerate(tasks)]
