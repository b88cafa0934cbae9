"""AppWorld's TGC and SGC (appworld.md §6), from stored episodes.

- TGC (task goal completion): share of tasks whose tests all pass (``success``).
- SGC (scenario goal completion): share of scenarios in which every task succeeded; the scenario
  is the task id before its last ``_`` (``fake001_2`` -> ``fake001``).
- Both are computed per trial and averaged over trials (one trial = one pass over the split, as
  an AppWorld experiment is), as fractions in [0, 1] (the leaderboard shows 100x, rounded to 0.1).
- Per difficulty (``tgc/d1`` ... ``sgc/d3``): the tasks of that difficulty (from the evaluator's
  tracker, stored in the score breakdown), their scenarios judged on those tasks only, as the
  official report does for its "level" rows.
- The split is the run's split (one split per run), so per-split numbers are per-run numbers.
- ``infra`` episodes are left out (not graded); a scenario is judged on the tasks that were graded.
- Success is ``harness.types.is_success`` (reward within 1e-6 of 1), the rule everywhere else uses.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.results.stats import successes

__all__ = ["scenario_of", "tgc_sgc", "appworld_summary", "episodes_with_breakdown"]


def scenario_of(task_id: str) -> str:
    return str(task_id).rsplit("_", 1)[0]


def tgc_sgc(df: pd.DataFrame) -> tuple[float, float]:
    """(TGC, SGC) averaged over trials; ``df`` has ``task_id``, ``trial``, ``reward`` (graded
    episodes only). NaN when empty."""
    if not len(df):
        return math.nan, math.nan
    ok = successes(df["reward"])
    frame = df.assign(ok=ok, scenario=df["task_id"].map(scenario_of))
    tgcs, sgcs = [], []
    for _, trial in frame.groupby("trial"):
        tgcs.append(float(trial["ok"].mean()))
        sgcs.append(float(trial.groupby("scenario")["ok"].all().mean()))
    return sum(tgcs) / len(tgcs), sum(sgcs) / len(sgcs)


def episodes_with_breakdown(store, run: str) -> pd.DataFrame:
    """``task_id``, ``trial``, ``reward``, ``error_class``, ``difficulty``, ``interactions`` of a run."""
    from harness.store.records import episode_breakdowns

    df = episode_breakdowns(store, run)
    breakdown = df.pop("score_breakdown").map(lambda b: b or {})
    return df.assign(difficulty=breakdown.map(lambda b: b.get("difficulty")),
                     interactions=breakdown.map(lambda b: b.get("interactions")))


def appworld_summary(df: pd.DataFrame) -> dict[str, Any]:
    """``tgc``, ``sgc``, ``scenarios``, per-difficulty ``tgc/dN`` / ``sgc/dN`` and the mean number of
    interactions per graded episode, from ``episodes_with_breakdown`` rows."""
    graded = df[df["error_class"] != "infra"]
    tgc, sgc = tgc_sgc(graded)
    out: dict[str, Any] = {"tgc": tgc, "sgc": sgc, "scenarios": int(graded["task_id"].map(scenario_of).nunique())}
    for level in sorted({int(d) for d in graded["difficulty"].dropna()}):
        out[f"tgc/d{level}"], out[f"sgc/d{level}"] = tgc_sgc(graded[graded["difficulty"] == level])
    counts = pd.to_numeric(graded["interactions"], errors="coerce").dropna()
    out["interactions/mean"] = float(counts.mean()) if len(counts) else math.nan
    return out
