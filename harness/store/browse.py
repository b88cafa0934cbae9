"""What the web viewer (``harness view``) reads: one page of runs, one run's task outcomes, one
episode by id. Read-only, and each query fetches only what a page shows.

Why here: model classes stay inside ``harness.store`` (see ``schema``); the viewer gets plain dicts.

Decisions:

- The run list is paged with LIMIT/OFFSET over the ``runs`` table alone (sorted by one of its own
  columns); the per-run numbers (episodes, pass^1, cost) are then aggregated for the page's runs
  only, so a page costs the same with 10 runs or 10,000, however many episodes they hold.
- pass^1 here is τ-bench's: per task the success rate over its scored (non-infra) episodes, then
  the mean over tasks; success is reward within ``SUCCESS_TOL`` of 1 (``harness.results.stats``).
  A train run's score is instead the held-out ``eval/success`` its training logged last, as
  ``harness results list`` gives it (see ``runs_page``).
- A run's task outcomes read the scalar columns of its episodes (no messages, no breakdowns); a
  train run's recorded sibling groups read the scalar columns of its ``token_credit`` rows (no
  messages, no tokens).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from sqlalchemy import Float, and_, case, cast, func, inspect, or_, select
from sqlalchemy.orm import Session

from harness.errors import ConfigError
from harness.store.core import RunRecord, Store, eval_point_name
from harness.store.schema import Episode, Run, TokenCreditRow, TrainStep
from harness.types import SUCCESS_TOL, task_order_key

__all__ = ["RUN_SORTS", "runs_page", "run_scores", "task_outcomes", "recorded_groups", "episode_by_id"]

RUN_SORTS = ("id", "name", "kind", "env", "status", "created_at", "agent_model")
"""Columns the run list can be sorted by (its own columns, so sorting needs no aggregate)."""

_SUCCESS = case((func.abs(Episode.reward - 1.0) <= SUCCESS_TOL, 1.0), else_=0.0)


def _record(row: Run) -> dict[str, Any]:
    return {f.name: getattr(row, f.name) for f in fields(RunRecord)}


def runs_page(store: Store, *, kind: str | None = None, env: str | None = None, status: str | None = None,
              search: str | None = None, sort: str = "id", descending: bool = True, limit: int = 50,
              offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
    """(number of runs matching the filters, the page of them), each run a dict of its columns plus
    ``episodes``, ``scored_episodes``, ``pass^1`` (None without a scored episode), ``cost`` and, for
    a train run, ``held_out``: its last held-out evaluation point ``{"step", "success", "name",
    "run_id"}`` or None. ``success`` is the ``eval/success`` training logged at the last step that
    logged one, the score ``harness results list`` and ``results show`` give a train run;
    ``name`` its eval run ``<run>/eval-step-NNNNNN``, ``run_id`` that run's id (None if not stored)."""
    if sort not in RUN_SORTS:
        raise ConfigError(f"cannot sort runs by {sort!r}; use one of {', '.join(RUN_SORTS)}")
    where = []
    if kind:
        where.append(Run.kind == kind)
    if env:
        where.append(Run.env == env)
    if status:
        where.append(Run.status == status)
    if search:
        pattern = f"%{search}%"
        where.append(or_(Run.name.ilike(pattern), Run.agent_model.ilike(pattern), Run.agent.ilike(pattern)))
    column = getattr(Run, sort)
    order = [column.desc() if descending else column.asc(), Run.id.desc() if descending else Run.id.asc()]
    with Session(store.engine) as s:
        total = s.scalar(select(func.count(Run.id)).where(*where))
        rows = s.scalars(select(Run).where(*where).order_by(*order).limit(limit).offset(offset)).all()
        runs = [_record(r) for r in rows]
        stats = _run_stats(s, [r["id"] for r in runs])
        for run in runs:
            if run["kind"] == "train":
                run["held_out"] = _last_eval_point(s, run["id"], run["name"])
    empty = {"episodes": 0, "scored_episodes": 0, "pass^1": None, "cost": 0.0}
    for run in runs:
        run |= stats.get(run["id"], empty)
    return int(total or 0), runs


_HELD_OUT = TrainStep.metrics["eval/success"].as_float()


def _last_eval_point(s: Session, run_id: int, name: str) -> dict[str, Any] | None:
    """A train run's last logged held-out evaluation (``eval/success``) and its eval run. The value
    is read from the log rather than recomputed from the eval run's episodes: it is the score every
    other view of a train run gives (results list and show, the training page), and the two part
    ways where an infra error leaves tasks with unequal trial counts (per-episode vs per-task mean)."""
    row = s.execute(select(TrainStep.step, _HELD_OUT).where(TrainStep.run_id == run_id, _HELD_OUT.is_not(None))
                    .order_by(TrainStep.step.desc()).limit(1)).first()
    if row is None:
        return None
    step, success = int(row[0]), float(row[1])
    eval_run = eval_point_name(name, step)
    return {"step": step, "success": success, "name": eval_run,
            "run_id": s.scalar(select(Run.id).where(Run.name == eval_run))}


def run_scores(store: Store) -> dict[str, float | None]:
    """Every run's headline number by name (None when it has none yet): an eval run's pass^1, a
    train run's last logged held-out success; the numbers the run list pages give. Three aggregate
    queries whatever the number of runs and episodes (``harness results list`` read every run's
    episodes into a frame before)."""
    with Session(store.engine) as s:
        runs = s.execute(select(Run.id, Run.name, Run.kind)).all()
        stats = _run_stats(s, None)
        last = (select(TrainStep.run_id.label("run_id"), func.max(TrainStep.step).label("step"))
                .where(_HELD_OUT.is_not(None)).group_by(TrainStep.run_id).subquery())
        held_out = dict(s.execute(select(TrainStep.run_id, _HELD_OUT).join(
            last, and_(TrainStep.run_id == last.c.run_id, TrainStep.step == last.c.step))).all())
    return {name: (None if held_out.get(run_id) is None else float(held_out[run_id])) if kind == "train"
            else stats.get(run_id, {}).get("pass^1") for run_id, name, kind in runs}


def _run_stats(s: Session, ids: list[int] | None) -> dict[int, dict[str, Any]]:
    """Per run id: episodes, scored episodes, pass^1 and cost, of runs ``ids`` (None: every run)."""
    if ids is not None and not ids:
        return {}
    chosen = [] if ids is None else [Episode.run_id.in_(ids)]
    totals = s.execute(select(Episode.run_id, func.count(Episode.id),
                              func.coalesce(func.sum(Episode.agent_cost + Episode.user_cost), 0.0))
                       .where(*chosen).group_by(Episode.run_id)).all()
    per_task = (select(Episode.run_id.label("run_id"), func.count(Episode.id).label("n"),
                       func.avg(cast(_SUCCESS, Float)).label("rate"))
                .where(*chosen, Episode.error_class != "infra")
                .group_by(Episode.run_id, Episode.task_id).subquery())
    passes = s.execute(select(per_task.c.run_id, func.avg(per_task.c.rate), func.sum(per_task.c.n))
                       .group_by(per_task.c.run_id)).all()
    out = {run_id: {"episodes": int(n), "scored_episodes": 0, "pass^1": None, "cost": float(cost)}
           for run_id, n, cost in totals}
    for run_id, rate, scored in passes:
        out[run_id] |= {"pass^1": float(rate), "scored_episodes": int(scored)}
    return out


def task_outcomes(store: Store, run_id: int, only: str = "all") -> list[dict[str, Any]]:
    """The run's tasks in task order, each ``{task_id, trials: [{episode_id, trial, reward, success,
    error_class, termination}], successes, scored, group_id}`` (``group_id``: the first trial's
    sibling group, None for independent trials). ``only``: ``all``, ``failed`` (a scored trial
    failed) or ``all_failed`` (scored, and no trial succeeded)."""
    if only not in ("all", "failed", "all_failed"):
        raise ConfigError(f"unknown task filter {only!r}; use all, failed or all_failed")
    with Session(store.engine) as s:
        rows = s.execute(select(Episode.id, Episode.task_id, Episode.trial, Episode.reward, Episode.error_class,
                                Episode.termination, Episode.group_id).where(Episode.run_id == run_id)).all()
    tasks: dict[str, dict[str, Any]] = {}
    for episode_id, task_id, trial, reward, error_class, termination, group_id in rows:
        success = abs(float(reward) - 1.0) <= SUCCESS_TOL
        task = tasks.setdefault(task_id, {"task_id": task_id, "trials": [], "successes": 0, "scored": 0,
                                          "group_id": None})
        task["group_id"] = task["group_id"] or group_id
        task["trials"].append({"episode_id": episode_id, "trial": trial, "reward": float(reward),
                               "success": success, "error_class": error_class, "termination": termination})
        if error_class != "infra":
            task["scored"] += 1
            task["successes"] += int(success)
    out = sorted(tasks.values(), key=lambda t: task_order_key(t["task_id"]))
    for task in out:
        task["trials"].sort(key=lambda t: t["trial"])
    if only == "failed":
        out = [t for t in out if t["successes"] < t["scored"]]
    elif only == "all_failed":
        out = [t for t in out if t["scored"] and not t["successes"]]
    return out


def recorded_groups(store: Store, run_id: int) -> list[dict[str, Any]]:
    """The sibling groups ``harness train --log-credit-every`` recorded for a train run, by step
    then in recording order: ``{step, group_id, task_id, siblings, successes}``. A database made
    before the ``token_credit`` table existed has none."""
    if not inspect(store.engine).has_table(TokenCreditRow.__tablename__):
        return []
    with Session(store.engine) as s:
        rows = s.execute(select(TokenCreditRow.step, TokenCreditRow.group_id, TokenCreditRow.task_id,
                                func.count(TokenCreditRow.id), func.sum(cast(TokenCreditRow.success, Float)),
                                func.min(TokenCreditRow.id))
                         .where(TokenCreditRow.run_id == run_id)
                         .group_by(TokenCreditRow.step, TokenCreditRow.group_id, TokenCreditRow.task_id)
                         .order_by(TokenCreditRow.step, func.min(TokenCreditRow.id))).all()
    return [{"step": step, "group_id": group_id, "task_id": task_id, "siblings": int(n), "successes": int(ok or 0)}
            for step, group_id, task_id, n, ok, _ in rows]


def episode_by_id(store: Store, episode_id: int) -> dict[str, Any]:
    """Every stored field of one episode (messages, breakdown, usage, times) and its run's id and
    name; unknown raises ``ConfigError``."""
    with Session(store.engine) as s:
        row = s.get(Episode, episode_id)
        if row is None:
            raise ConfigError(f"no episode with id {episode_id}")
        run = s.get(Run, row.run_id)
        out = {c.name: getattr(row, c.name) for c in Episode.__table__.columns}
        siblings = s.execute(select(Episode.id, Episode.trial).where(
            and_(Episode.run_id == row.run_id, Episode.task_id == row.task_id)).order_by(Episode.trial)).all()
    out["run_name"] = run.name
    out["trials"] = [{"episode_id": i, "trial": t} for i, t in siblings]
    return out
