"""Held-out evaluation during training, stored as its own eval run: greedy with one trial per task
by default, or sampled (``--eval-temperature``) with ``--eval-trials`` fixed-seed trials per task.

Each evaluation point becomes an eval run named ``<train run>/eval-step-000020`` (config links it
to the train run), so every tool that reads eval runs works on it: ``harness results show``,
``results compare <run>/eval-step-000000 <run>/eval-step-000020``, exports. Either way the number
is deterministic for given weights (greedy, or fixed sampling seeds), which is what a learning
curve should show.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.episode_runner import EpisodeJob
from harness.errors import ConfigError
from harness.policy.local_policy import LocalPolicy
from harness.store import Store
from harness.types import ErrorClass, Task
from trainers.rollout import episode_seed, play

__all__ = ["eval_run_name", "evaluate"]


def eval_run_name(run: str, step: int) -> str:
    return f"{run}/eval-step-{step:06d}"


def evaluate(policy: LocalPolicy, factory: Any, tasks: list[Task], store: Store, run: str, step: int,
             split: str, temperature: float = 0.0, trials: int = 1) -> dict[str, float]:
    sampler = LocalPolicy(replace(policy.cfg, temperature=temperature, batch_wait_s=None), model=policy.model,
                          tokenizer=policy.tokenizer)
    # The same seeds at every step: evaluation points differ only by the weights (paired).
    jobs = [EpisodeJob(task=t, trial=i, seed=episode_seed(-1, 0, t.id, i)) for t in tasks for i in range(trials)]
    results = play(sampler, factory, jobs)
    name = eval_run_name(run, step)
    try:
        store.delete_run(name)  # a resumed run re-evaluates this step from the same weights
    except ConfigError:  # no such run yet
        pass
    store.create_run(name=name, kind="eval", env=factory.name, data_version=factory.data_version, split=split,
                     agent="hf", agent_model=policy.cfg.path, user=None, user_model=None,
                     config={"train_run": run, "step": step, "temperature": temperature, "trials": trials,
                             "tasks": [t.id for t in tasks]})
    for result in results:
        result.trace = None
        store.add_episode(name, result)
    store.set_run_status(name, "finished")
    scored = [r for r in results if r.error_class is not ErrorClass.INFRA]
    n = max(len(scored), 1)
    return {
        "eval/reward": sum(r.score.reward for r in scored) / n,
        "eval/success": sum(1.0 for r in scored if r.score.success) / n,
        "eval/infra_errors": float(len(results) - len(scored)),
    }
