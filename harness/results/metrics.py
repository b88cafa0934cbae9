"""Run metrics, registered by name: each one a function of a run's episodes, declaring how its
values are shown.

    @run_metric("my_metric", formats={"my_metric/rate": "{:.1%}"})
    def my_metric(df: pd.DataFrame) -> dict[str, Any]:
        return {"my_metric/rate": float((df["env_seconds"] > 10).mean())}

``summarize`` runs every registered metric in registration order and merges their rows (the
built-in ones below: scores, noise statistics, sibling groups, terminations and error classes,
tokens, cost, time). A metric's ``formats`` map a row name, or a regular expression matching row
names, to a ``str.format`` pattern for the human formats (``table``, ``markdown``); machine
formats (``csv``, ``json``) keep full precision. Env-specific rows (AppWorld's TGC/SGC) come from
the env (``EnvFactory.run_metrics``), not from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from math import comb
from typing import Any, Callable

import pandas as pd

from harness.plugins import load_plugins
from harness.results import stats

__all__ = ["RunMetric", "run_metric", "run_metrics", "summarize", "format_for", "pass_hat_k"]

MetricFn = Callable[[pd.DataFrame], dict[str, Any]]


@dataclass(frozen=True)
class RunMetric:
    name: str
    fn: MetricFn
    formats: dict[str, str] = field(default_factory=dict)
    """Row name or regular expression -> ``str.format`` pattern (human formats only)."""


_METRICS: dict[str, RunMetric] = {}
_DEFAULT_FORMAT = "{:.3f}"


def run_metric(name: str, formats: dict[str, str] | None = None) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(episodes_df) -> {row: value}`` under ``name`` (a second registration replaces it)."""

    def wrap(fn: MetricFn) -> MetricFn:
        _METRICS[name] = RunMetric(name, fn, dict(formats or {}))
        return fn

    return wrap


def run_metrics() -> list[RunMetric]:
    load_plugins()  # metrics registered by HARNESS_PLUGINS modules
    return list(_METRICS.values())


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Every registered metric of one run's episodes (``Store.episodes_df`` columns; only
    ``task_id``, ``trial``, ``reward`` and ``error_class`` are required), merged in registration order."""
    df = df.copy()
    df["task_id"] = df["task_id"].astype(str)
    out: dict[str, Any] = {}
    for metric in run_metrics():
        out |= metric.fn(df)
    return out


def format_for(row: str) -> str:
    """The human format of a row: the first registered pattern that names or matches it."""
    for metric in run_metrics():
        for pattern, fmt in metric.formats.items():
            if pattern == row or re.fullmatch(pattern, row):
                return fmt
    return _DEFAULT_FORMAT


# -- the built-in metrics -------------------------------------------------------------------------
def pass_hat_k(n: int, c: int, k: int) -> float:
    """Probability that k trials drawn without replacement from n (c successes) all succeed."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass^k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return comb(c, k) / comb(n, k) if c >= k else 0.0


def _col_sum(df: pd.DataFrame, col: str) -> float:
    return float(df[col].fillna(0).sum()) if col in df.columns else 0.0


@run_metric("scores", formats={r"pass\^\d+": "{:.3f}", "avg_reward": "{:.3f}"})
def _scores(df: pd.DataFrame) -> dict[str, Any]:
    """Counts, pass^1..pass^k (τ-bench's unbiased estimator, each task with its own n) and the mean
    reward, over scored (non-infra) episodes."""
    scored = df[df["error_class"] != "infra"]
    per_task = scored.assign(ok=stats.successes(scored["reward"])).groupby("task_id")["ok"].agg(["size", "sum"])
    trials = int(per_task["size"].min()) if len(per_task) else 0
    out: dict[str, Any] = {
        "tasks": len(per_task),
        "trials": trials,
        "episodes": len(df),
        "scored_episodes": len(scored),
        "infra_episodes": int((df["error_class"] == "infra").sum()),
        "unscored_tasks": int(df["task_id"].nunique() - len(per_task)),
    }
    for k in range(1, trials + 1):
        out[f"pass^{k}"] = float(sum(pass_hat_k(int(n), int(c), k) for n, c in per_task.itertuples(index=False))
                                 / len(per_task))
    if len(per_task):
        out["pass^1/trial_mean"], out["pass^1/trial_std"] = stats.trial_pass1(df)
        out["pass^1/ci95_low"], out["pass^1/ci95_high"] = stats.bootstrap_ci(per_task["sum"] / per_task["size"])
    out["avg_reward"] = float(scored["reward"].astype(float).mean()) if len(scored) else math.nan
    return out


@run_metric("groups")
def _groups(df: pd.DataFrame) -> dict[str, Any]:
    """Sibling-group counts by label, when episodes carry a ``group_id``."""
    return stats.group_counts(df)


@run_metric("endings")
def _endings(df: pd.DataFrame) -> dict[str, Any]:
    """How episodes ended (``termination/<reason>``) and their error classes (``error/<class>``)."""
    out: dict[str, Any] = {}
    if "termination" in df.columns:
        for term, count in df["termination"].value_counts().sort_index().items():
            out[f"termination/{term}"] = int(count)
    for cls in ("none", "agent", "infra"):
        out[f"error/{cls}"] = int((df["error_class"] == cls).sum())
    return out


@run_metric("usage", formats={r".*cost": "{:.4f}", r".*seconds": "{:.1f}"})
def _usage(df: pd.DataFrame) -> dict[str, Any]:
    """Tokens, cost and time, infra episodes included (the money and time were spent). The time
    rows are sums over episodes, which overlap when episodes run concurrently: ``episode_seconds``
    (the episodes' own wall times added up) is not the run's wall time, which the run record gives
    (``wall_seconds`` in ``results show``, ``harness.results.tables``)."""
    out: dict[str, Any] = {}
    for col in ("agent_prompt_tokens", "agent_completion_tokens", "user_prompt_tokens", "user_completion_tokens"):
        out[col] = int(_col_sum(df, col))
    out["agent_cost"], out["user_cost"] = _col_sum(df, "agent_cost"), _col_sum(df, "user_cost")
    out["total_cost"] = out["agent_cost"] + out["user_cost"]
    out["episode_seconds"] = _col_sum(df, "wall_seconds")
    for col in ("llm_seconds", "env_seconds"):
        out[col] = _col_sum(df, col)
    return out
