"""Held-out evaluation during training, stored as its own eval run: greedy with one trial per task
by default, or sampled (``--eval-temperature``) with ``--eval-trials`` fixed-seed trials per task.

Each evaluation point becomes an eval run named ``<train run>/eval-step-000020`` (config links it
to the train run), so every tool that reads eval runs works on it: ``harness results show``,
``results compare <run>/eval-step-000000 <run>/eval-step-000020``, exports. Either way the number
is deterministic for given weights (greedy, or fixed sampling seeds), which is what a learning
curve should show.

An evaluation point is labelled like an eval run of the same weights: ``agent_model`` names the
weights it evaluated (the step's checkpoint directory, or, at a step no checkpoint is written for,
``<train run> step N (not checkpointed)``; never the initial policy), and its config holds the
env's settings (flat and as ``env_settings``), the task ids, the decoding
(``harness.decoding``) and the tokens per turn, as ``harness eval`` stores them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from harness.decoding import Decoding
from harness.episode_runner import EpisodeJob
from harness.errors import ConfigError
from harness.policy.local_policy import LocalPolicy
from harness.store import Store
from harness.store.core import eval_point_name
from harness.types import ErrorClass, Task
from trainers.rollout import episode_seed, play

__all__ = ["eval_run_name", "evaluate", "check_eval_points", "unsaved_weights"]


def eval_run_name(run: str, step: int) -> str:
    return eval_point_name(run, step)


def unsaved_weights(run: str, step: int) -> str:
    """The ``agent_model`` of an evaluation point whose weights no checkpoint keeps."""
    return f"{run} step {step} (not checkpointed)"


def _belongs(record, run: str) -> bool:
    """Whether the stored run ``record`` is an evaluation point of train run ``run``."""
    return record.kind == "eval" and (record.config or {}).get("train_run") == run


def check_eval_points(store: Store, run: str) -> None:
    """Refuse train run ``run`` when a run named like one of its evaluation points exists and is not
    one (a user's eval run called ``<run>/eval-step-000000``): evaluating would replace it."""
    prefix = eval_run_name(run, 0)[: -len("000000")]
    for record in store.list_runs():
        if record.name.startswith(prefix) and not _belongs(record, run):
            raise ConfigError(f"run '{record.name}' exists and is not an evaluation point of train run '{run}', "
                              "whose evaluations would replace it; pick another --run")


def evaluate(policy: LocalPolicy, factory: Any, tasks: list[Task], store: Store, run: str, step: int,
             split: str, temperature: float = 0.0, trials: int = 1, *, weights: str,
             env_settings: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
             every_s: float | None = None) -> dict[str, float]:
    """Play ``tasks`` with the policy's current weights and store them as the eval run of ``step``.
    ``weights``: what the run records as its agent model (the checkpoint the step writes, see
    ``unsaved_weights`` otherwise); ``env_settings``: the env's settings, defaults filled in, stored
    flat as ``harness eval`` stores them. ``progress`` gets a line every ``every_s`` seconds (``play``'s
    default) while the episodes play (episodes done, elapsed): on a busy CPU an evaluation takes minutes."""
    sampler = LocalPolicy(replace(policy.cfg, temperature=temperature, batch_wait_s=None), model=policy.model,
                          tokenizer=policy.tokenizer, engine=policy.engine)  # the same rollout servers
    # The same seeds at every step: evaluation points differ only by the weights (paired).
    jobs = [EpisodeJob(task=t, trial=i, seed=episode_seed(-1, 0, t.id, i)) for t in tasks for i in range(trials)]
    total = len(jobs)

    def report(done: int, elapsed: float) -> None:
        progress(f"held-out evaluation at step {step}: {done}/{total} episodes ({elapsed:.0f} s)")

    results = play(sampler, factory, jobs, report=report if progress is not None else None, every_s=every_s)
    name = eval_run_name(run, step)
    try:
        old = store.get_run(name)
    except ConfigError:  # no such run yet
        old = None
    if old is not None:
        if not _belongs(old, run):  # checked at the start too (check_eval_points); never delete another run
            raise ConfigError(f"run '{name}' exists and is not an evaluation point of train run '{run}'")
        store.delete_run(name)  # a resumed run re-evaluates this step from the same weights
    ids = [t.id for t in tasks]
    config = {**(env_settings or {}), "train_run": run, "step": step, "initial_policy": policy.cfg.path,
              "temperature": temperature, "trials": trials, "max_new_tokens": policy.cfg.max_new_tokens,
              "decoding": Decoding(temperature, trials).stored(), "tasks": ids, "task_ids": ids,
              "env_settings": factory.describe()}
    user = factory.describe().get("user")
    user_kind, user_model = (user.get("kind"), user.get("model")) if isinstance(user, dict) else (None, None)
    store.create_run(name=name, kind="eval", env=factory.name, data_version=factory.data_version, split=split,
                     agent="hf", agent_model=weights, user=user_kind,
                     user_model=user_model if user_kind == "litellm" else None, config=config)
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
