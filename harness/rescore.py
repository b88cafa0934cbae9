"""Re-grade a stored run with the current grader, without any LLM call.

Why: graders get fixed (and τ task data gets corrected); stored trajectories are complete, so every
episode can be re-scored offline. ``rescore`` lists the verdicts that would change and, with
``apply=True``, writes the new reward / success / breakdown back in ONE transaction (all or
nothing), so a run is never left half re-graded.

Decisions:

- Infra-error episodes are skipped (they are unscored and get replayed on resume anyway).
- A "changed verdict" is a reward that moved by more than 1e-9 or a flipped success flag. With
  ``apply=True`` every row whose reward, success or breakdown differs is written (a breakdown-only
  refresh is counted in ``breakdown_updates``, not listed as a changed verdict).
- Each write is conditioned on the row still holding the reward/success that was read; if another
  process changed it meanwhile, the whole transaction is rolled back with a ``HarnessError``.
- The regrader comes from the run's env (``EnvFactory.regrader``, passed in by the caller, which
  knows the envs); an env without one is a ``ConfigError``. It is built once per run (task data
  and DB loaded once) and maps ``(task_id, messages, termination) -> Score``.
- Episodes are write-once; re-grading is the one place that rewrites scores, through
  ``harness.store.records.rewrite_scores``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.env_spec import Regrade
from harness.errors import ConfigError
from harness.store import RunRecord, Store
from harness.store.records import GradedRow, graded_rows, rewrite_scores
from harness.types import ErrorClass, Score, task_order_key

__all__ = ["ChangedVerdict", "RescoreReport", "RegraderFor", "rescore"]

RegraderFor = Callable[[RunRecord], Regrade | None]
"""``EnvFactory.regrader`` of the run's env: ``run record -> Regrade`` (or None: cannot)."""


@dataclass(frozen=True)
class ChangedVerdict:
    task_id: str
    trial: int
    old_reward: float
    new_reward: float
    old_success: bool
    new_success: bool


@dataclass
class RescoreReport:
    run: str
    episodes: int
    """Episodes re-graded (infra excluded)."""
    skipped_infra: int
    changed: list[ChangedVerdict] = field(default_factory=list)
    breakdown_updates: int = 0
    """Rows whose verdict is unchanged but whose breakdown differs (written only with apply)."""
    applied: bool = False


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def rescore(store: Store, run_name: str, regrader: RegraderFor | None, apply: bool = False) -> RescoreReport:
    """Re-grade every non-infra episode of ``run_name`` with ``regrader(run)`` (the run's env's);
    report (and with ``apply``, store) the changes."""
    run = store.get_run(run_name)
    regrade = regrader(run) if regrader is not None else None
    if regrade is None:
        raise ConfigError(f"cannot rescore run {run.name!r}: no regrader for env {run.env!r}")
    rows = graded_rows(store, run.name)
    report = RescoreReport(run=run.name, episodes=0, skipped_infra=0)
    writes: list[tuple[GradedRow, Score]] = []
    for row in rows:
        if row.error_class == ErrorClass.INFRA.value:
            report.skipped_infra += 1
            continue
        report.episodes += 1
        score = regrade(row.task_id, row.messages, row.termination)
        verdict_changed = abs(float(score.reward) - float(row.reward)) > 1e-9 or bool(score.success) != row.success
        if verdict_changed:
            report.changed.append(ChangedVerdict(row.task_id, row.trial, float(row.reward), float(score.reward),
                                                 bool(row.success), bool(score.success)))
        elif _canonical(score.breakdown or {}) != _canonical(row.score_breakdown or {}):
            report.breakdown_updates += 1
        else:
            continue
        writes.append((row, score))
    report.changed.sort(key=lambda c: (task_order_key(c.task_id), c.trial))
    if apply and writes:
        rewrite_scores(store, run.name, writes)  # one transaction: all rows or none
    report.applied = apply
    return report
