"""Run-to-run noise statistics: pass^1 across trials, bootstrap CIs, sibling groups, paired flips.

Why: single τ-bench runs swing 5–10 points (sierra-research/tau-bench#57, tau2-bench#540), so a
score needs an error bar and a comparison needs to be paired by task, not eyeballed.

Decisions:

- Success is reward within ``SUCCESS_TOL`` of 1 (τ-bench's rule); ``infra`` episodes are excluded
  from every statistic here, as from pass^k.
- ``trial_pass1``: for each trial index t, the success rate over the tasks scored in trial t; the
  mean and the sample std (ddof=1) of those rates. With one trial the std is NaN (undefined).
- ``bootstrap_ci``: percentile bootstrap of the mean, resampling TASKS with replacement (tasks are
  the unit of sampling; trials of one task are not independent draws of the benchmark). 10,000
  resamples with a fixed seed, so the same data always gives the same interval. Vectorised in
  numpy, chunked so memory stays bounded (~32 MB of indices) for any task count.
- A pass^1 CI resamples per-task success rates c/n, whose mean is exactly pass^1.
- ``paired``: over the tasks both runs have scored, a task "succeeds" in a run when its success
  rate across trials is >= 0.5 (majority, ties count as success). ``flipped_up`` = failed in the
  first run and succeeded in the other, ``flipped_down`` the reverse. ``mean_delta`` = mean over
  those tasks of (other rate - first rate), with a paired bootstrap CI (resampling tasks, so both
  runs' rates of a task move together).
- ``group_labels``: episodes with a non-null ``group_id`` form sibling groups. ``n`` and
  ``successes`` count scored (non-infra) episodes; the label is ``all_success``, ``all_fail``,
  ``mixed``, or ``unscored`` when a group has no scored episode.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.types import SUCCESS_TOL

__all__ = ["SUCCESS_TOL", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "MAJORITY", "GROUP_LABELS", "successes",
           "trial_pass1", "bootstrap_ci", "task_rates", "group_labels", "group_counts", "paired"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MAJORITY = 0.5
GROUP_LABELS = ("all_success", "all_fail", "mixed", "unscored")
_CHUNK_CELLS = 4_000_000  # resample indices materialised at once (int64: 32 MB)


def successes(rewards: pd.Series) -> pd.Series:
    """Boolean series: ``harness.types.is_success`` of each reward (within ``SUCCESS_TOL`` of 1)."""
    return (rewards.astype(float) - 1.0).abs() <= SUCCESS_TOL


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    scored = df[df["error_class"] != "infra"]
    return scored.assign(task_id=scored["task_id"].astype(str), ok=successes(scored["reward"]))


def trial_pass1(df: pd.DataFrame) -> tuple[float, float]:
    """(mean, std with ddof=1) over trial indices of the per-trial success rate; NaN where undefined."""
    scored = _scored(df)
    if not len(scored):
        return math.nan, math.nan
    rates = scored.groupby("trial")["ok"].mean().to_numpy(dtype=float)
    std = float(rates.std(ddof=1)) if len(rates) >= 2 else math.nan
    return float(rates.mean()), std


def bootstrap_ci(values, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (one value per task, resampled with
    replacement). Empty input gives (NaN, NaN); a single value gives (v, v)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=float)
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def task_rates(df: pd.DataFrame) -> pd.Series:
    """Per-task success rate over scored episodes (index: task id as str)."""
    scored = _scored(df)
    return scored.groupby("task_id")["ok"].mean().astype(float)


def group_labels(df: pd.DataFrame) -> pd.DataFrame:
    """One row per sibling group (episodes with a non-null ``group_id``), in order of first appearance:
    ``group_id``, ``task_id`` (comma-joined if a group spans several), ``n`` scored episodes,
    ``successes`` and ``label`` (all_success / all_fail / mixed / unscored)."""
    cols = ["group_id", "task_id", "n", "successes", "label"]
    if "group_id" not in df.columns:
        return pd.DataFrame(columns=cols)
    grouped = df[df["group_id"].notna()]
    if not len(grouped):
        return pd.DataFrame(columns=cols)
    grouped = grouped.assign(group_id=grouped["group_id"].astype(str), task_id=grouped["task_id"].astype(str),
                             scored=grouped["error_class"] != "infra")
    grouped = grouped.assign(ok=successes(grouped["reward"]) & grouped["scored"])
    rows = []
    for gid, g in grouped.groupby("group_id", sort=False):
        n, c = int(g["scored"].sum()), int(g["ok"].sum())
        label = "unscored" if n == 0 else "all_success" if c == n else "all_fail" if c == 0 else "mixed"
        rows.append((gid, ",".join(dict.fromkeys(g["task_id"])), n, c, label))
    return pd.DataFrame(rows, columns=cols)


def group_counts(df: pd.DataFrame) -> dict[str, int]:
    """``groups`` and ``groups/<label>`` counts; empty when no episode has a group id."""
    labels = group_labels(df)
    if not len(labels):
        return {}
    counts = labels["label"].value_counts()
    return {"groups": len(labels), **{f"groups/{lab}": int(counts.get(lab, 0)) for lab in GROUP_LABELS}}


def paired(first: pd.Series, other: pd.Series, **ci_kwargs: Any) -> dict[str, Any]:
    """Paired comparison of per-task success rates (``task_rates``) of two runs over shared tasks:
    ``tasks``, ``flipped_up``, ``flipped_down``, ``mean_delta`` (other - first) and its bootstrap
    ``delta_ci95_low`` / ``delta_ci95_high``."""
    both = pd.concat([first.rename("a"), other.rename("b")], axis=1).dropna()
    a_ok, b_ok = both["a"] >= MAJORITY, both["b"] >= MAJORITY
    delta = (both["b"] - both["a"]).to_numpy(dtype=float)
    low, high = bootstrap_ci(delta, **ci_kwargs)
    return {"tasks": len(both), "flipped_up": int((~a_ok & b_ok).sum()), "flipped_down": int((a_ok & ~b_ok).sum()),
            "mean_delta": float(delta.mean()) if len(delta) else math.nan,
            "delta_ci95_low": low, "delta_ci95_high": high}
