"""τ-airline rows of ``harness results show``: the official termination breakdown, and per task the
DB match and the partial action reward.

Why: the official tooling (tau2-bench ``agent_metrics``, ``tau2 view``) tells a researcher how the
episodes ended and, per simulation, whether the replayed DB matched the gold one and which gold
actions the agent performed; that separates "wrong booking" from "ran out of steps" or "never
called the tool". Everything here is read from what the grader stored (``score_breakdown``,
``envs/tau/airline/grading.py``); nothing is re-graded.

Decisions:

- **Terminations**: a ``termination/<reason>`` row for each of the nine official reasons, zeros
  included (the shared ``endings`` metric lists only those that occurred). The harness's
  ``Termination`` values are the official names one for one. Two never occur in a τ-airline run:
  ``agent_stop`` (the official LLM agent never stops by itself either; only its solo agent does)
  and ``timeout`` (``--episode-timeout`` ends an episode as ``infrastructure_error``, which resume
  plays again).
- **Per task**, over scored (non-infra) episodes: ``success`` (rate), ``db_match`` (share of
  episodes whose replayed DB equals the gold one; blank for a task without evaluation criteria),
  ``action_reward`` (mean of matched / expected gold actions: the official partial action reward)
  and ``gold_actions`` (expected). Episodes graded before the grader stored per-action checks have
  none: blank until ``harness rescore RUN --apply`` refreshes their breakdowns.
- The run rows ``db_match`` and ``action_reward`` are the same means over all scored episodes.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.types import Termination, is_success, task_order_key

__all__ = ["tau_run_rows", "tau_task_rows"]

TASK_COLUMNS = ["episodes", "success", "db_match", "action_reward", "gold_actions"]


def _action_reward(breakdown: dict[str, Any]) -> float:
    """Matched / expected gold actions of one episode; NaN when unknown or there are none."""
    actions = breakdown.get("actions")
    if not actions:
        return math.nan
    return sum(bool(v) for v in actions.values()) / len(actions)


def _db_match(breakdown: dict[str, Any]) -> float:
    value = breakdown.get("db_match")
    return math.nan if value is None else float(bool(value))


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    """Scored episodes with their breakdown fields as columns."""
    scored = df[df["error_class"] != "infra"]
    breakdowns = scored["score_breakdown"].map(lambda b: b or {})
    return scored.assign(task_id=scored["task_id"].astype(str),
                         ok=scored["reward"].map(lambda r: is_success(float(r))),
                         db=breakdowns.map(_db_match), act=breakdowns.map(_action_reward),
                         gold=breakdowns.map(lambda b: len(b["actions"]) if b.get("actions") is not None
                                             else math.nan))


def tau_run_rows(df: pd.DataFrame, terminations: pd.Series) -> dict[str, Any]:
    """``termination/<reason>`` for every official reason, ``db_match`` and ``action_reward``.
    ``df``: ``episode_breakdowns`` rows; ``terminations``: every episode's termination."""
    counts = terminations.value_counts()
    out: dict[str, Any] = {f"termination/{t.value}": int(counts.get(t.value, 0)) for t in Termination}
    scored = _scored(df)
    out["db_match"] = float(scored["db"].mean()) if scored["db"].notna().any() else math.nan
    out["action_reward"] = float(scored["act"].mean()) if scored["act"].notna().any() else math.nan
    return out


def tau_task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per task (natural task order) with ``TASK_COLUMNS``; ``df``: ``episode_breakdowns`` rows."""
    scored = _scored(df)
    grouped = scored.groupby("task_id")
    frame = pd.DataFrame({
        "episodes": grouped.size(),
        "success": grouped["ok"].mean().astype(float),
        "db_match": grouped["db"].mean(),
        "action_reward": grouped["act"].mean(),
        # ints, or None where unknown (shown "-", JSON null), not a float column
        "gold_actions": grouped["gold"].max().map(lambda n: None if math.isnan(n) else int(n)).astype(object),
    }, columns=TASK_COLUMNS)
    frame = frame.reindex(sorted(frame.index, key=task_order_key))
    frame.index.name = "task_id"
    return frame
