"""Noise statistics (pass^1 across trials, bootstrap CIs, sibling groups, paired flips) on a real
SQLite store, checked against hand-computed values."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from harness.results import compare_table, group_labels, render, show_table, stats, summarize
from harness.store import Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination


def _ep(task: str, trial: int, reward: float | None, group: str | None = None) -> EpisodeResult:
    """reward None = an infra failure."""
    infra = reward is None
    return EpisodeResult(task_id=task, trial=trial, seed=trial, messages=[{"role": "user", "content": "hi"}],
                         termination=Termination.INFRASTRUCTURE_ERROR if infra else Termination.USER_STOP,
                         score=Score(reward=0.0 if infra else reward, success=reward == 1.0),
                         error_class=ErrorClass.INFRA if infra else ErrorClass.NONE, group_id=group)


def _fill(store: Store, run: str, outcomes: dict[str, list[float | None]], groups: dict[str, str] | None = None):
    store.create_run(run, "eval", "tau-airline", "tau3", "base", "litellm", "m", "llm", "u", {})
    for task, rewards in outcomes.items():
        for trial, r in enumerate(rewards):
            store.add_episode(run, _ep(task, trial, r, (groups or {}).get(task)))


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'stats.db'}")
    yield s
    s.close()


# -- pass^1 across trials ---------------------------------------------------------------------------

def test_trial_mean_and_std_hand_computed(store):
    # Trial rates over the 4 tasks: t0 = 2/4, t1 = 2/4, t2 = 3/4. The infra trial 3 of A is excluded.
    _fill(store, "r", {"A": [1, 1, 1, None], "B": [1, 0, 1], "C": [0, 0, 0], "D": [0, 1, 1]})
    row = show_table(store, "r").loc["r"]
    assert row["pass^1/trial_mean"] == pytest.approx(7 / 12)
    assert row["pass^1/trial_std"] == pytest.approx(math.sqrt(3) / 12)  # ddof=1: sqrt((1+1+4)/144 / 2)
    assert row["pass^1"] == pytest.approx(7 / 12)
    assert row["pass^1/ci95_low"] <= row["pass^1"] <= row["pass^1/ci95_high"]
    # One record per run in machine formats, the new columns included.
    rec = json.loads(render(show_table(store, "r"), "json", echo=False))[0]
    assert rec["pass^1/trial_std"] == pytest.approx(math.sqrt(3) / 12)


def test_trial_rates_use_the_tasks_scored_in_that_trial():
    df = pd.DataFrame({"task_id": ["A", "A", "B", "B"], "trial": [0, 1, 0, 1], "reward": [1.0, 0.0, 0.0, 1.0],
                       "error_class": ["none", "infra", "none", "none"]})
    assert stats.trial_pass1(df) == pytest.approx((0.75, math.sqrt(0.125)))  # t0 = 1/2, t1 = 1/1


def test_single_trial_std_is_undefined_and_empty_run_has_no_stats():
    one = summarize(pd.DataFrame({"task_id": ["A", "B"], "trial": [0, 0], "reward": [1.0, 0.0],
                                  "error_class": ["none", "none"]}))
    assert one["pass^1/trial_mean"] == 0.5 and math.isnan(one["pass^1/trial_std"])
    empty = summarize(pd.DataFrame(columns=["task_id", "trial", "reward", "error_class"]))
    assert not any(k.startswith(("pass^", "groups")) for k in empty)


# -- bootstrap CI -------------------------------------------------------------------------------------

def test_bootstrap_ci_contains_estimate_shrinks_and_is_deterministic():
    small = np.tile([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0], 2)  # 20 tasks, mean 0.6
    large = np.tile(small, 10)  # same mean, 200 tasks
    lo_s, hi_s = stats.bootstrap_ci(small)
    lo_l, hi_l = stats.bootstrap_ci(large)
    assert lo_s < 0.6 < hi_s and lo_l < 0.6 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # ~1/sqrt(10) as wide
    # Normal approximation: half-width 1.96 * sd / sqrt(n).
    sd = small.std()
    assert (hi_s - lo_s) / 2 == pytest.approx(1.96 * sd / math.sqrt(20), rel=0.1)
    assert stats.bootstrap_ci(small) == (lo_s, hi_s)
    assert stats.bootstrap_ci(small, seed=1) != (lo_s, hi_s)


def test_bootstrap_ci_edge_cases_and_chunking(monkeypatch):
    assert stats.bootstrap_ci([0.25]) == (0.25, 0.25)
    assert stats.bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))
    values = np.linspace(0, 1, 37)
    whole = stats.bootstrap_ci(values)
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 37 * 7)  # many chunks: same random stream, same answer
    assert stats.bootstrap_ci(values) == pytest.approx(whole)


def test_bootstrap_is_fast_for_a_large_run():
    values = np.random.default_rng(3).random(5000)
    start = time.perf_counter()
    lo, hi = stats.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert time.perf_counter() - start < 10  # 10,000 x 5,000 draws, vectorised


# -- sibling groups -----------------------------------------------------------------------------------

def test_group_labels_and_counts(store):
    _fill(store, "g", {"A": [1, 1], "B": [0, 0.5], "C": [1, 0], "D": [None], "E": [1, None], "F": [0]},
          groups={"A": "gA", "B": "gB", "C": "gC", "D": "gD", "E": "gE"})  # F has no group
    labels = group_labels(store.episodes_df("g"))
    assert list(labels.columns) == ["group_id", "task_id", "n", "successes", "label"]
    assert labels.set_index("group_id")[["task_id", "n", "successes", "label"]].to_dict("index") == {
        "gA": {"task_id": "A", "n": 2, "successes": 2, "label": "all_success"},
        "gB": {"task_id": "B", "n": 2, "successes": 0, "label": "all_fail"},  # 0.5 is not a success
        "gC": {"task_id": "C", "n": 2, "successes": 1, "label": "mixed"},
        "gD": {"task_id": "D", "n": 0, "successes": 0, "label": "unscored"},
        "gE": {"task_id": "E", "n": 1, "successes": 1, "label": "all_success"},  # infra sibling excluded
    }
    row = show_table(store, "g").loc["g"]
    assert (row["groups"], row["groups/all_success"], row["groups/all_fail"], row["groups/mixed"],
            row["groups/unscored"]) == (5, 2, 1, 1, 1)


def test_no_groups_no_group_columns(store):
    _fill(store, "plain", {"A": [1]})
    assert group_labels(store.episodes_df("plain")).empty
    assert not any(c.startswith("groups") for c in show_table(store, "plain").columns)


# -- paired comparison --------------------------------------------------------------------------------

@pytest.fixture
def two_runs(store):
    # Success rates.   task:  0     1     2     3     4     5 (base only)  6 (new only)
    _fill(store, "base", {"0": [1, 1], "1": [0, 0], "2": [1, 0], "3": [1, 0], "4": [0, 0], "5": [1, 1]})
    _fill(store, "new", {"0": [0, 0], "1": [1, 1], "2": [0, 0], "3": [1, 1], "4": [1, 0], "6": [1, 1]})
    return store


def test_paired_flips_hand_computed(two_runs):
    summary, per_task = compare_table(two_runs, ["base", "new"])
    # Shared tasks 0-4. Up (rate < .5 -> >= .5): 1 (0 -> 1), 4 (0 -> .5). Down: 0 (1 -> 0), 2 (.5 -> 0).
    # Task 3 goes .5 -> 1: a success in both. Deltas -1, +1, -.5, +.5, +.5: mean 0.1.
    p = summary["new"]
    assert (p["paired/new/tasks"], p["paired/new/flipped_up"], p["paired/new/flipped_down"]) == (5, 2, 2)
    assert p["paired/new/mean_delta"] == pytest.approx(0.1)
    assert p["paired/new/delta_ci95_low"] < 0.1 < p["paired/new/delta_ci95_high"]
    assert summary.loc[[i for i in summary.index if i.startswith("paired/")], "base"].isna().all()
    # The CLI's use is unchanged: (summary, per_task) with a boolean "differs" to filter on.
    assert list(per_task.columns) == ["base", "new", "delta", "differs"]
    assert list(per_task[per_task["differs"]].index) == ["0", "1", "2", "3", "4", "5", "6"]
    assert per_task.loc["4", "new"] == 0.5
    md = render(summary, "markdown", echo=False)
    assert "| paired/new/mean_delta | - | +0.100 |" in md and "| paired/new/flipped_up | - | 2 |" in md


def test_paired_with_three_runs_and_no_shared_tasks(two_runs):
    _fill(two_runs, "other", {"99": [1]})
    summary, per_task = compare_table(two_runs, ["base", "new", "other"])
    assert summary.loc["paired/new/flipped_up", "new"] == 2
    assert summary.loc["paired/other/tasks", "other"] == 0
    assert math.isnan(summary.loc["paired/other/mean_delta", "other"])
    assert pd.isna(summary.loc["paired/other/tasks", "new"])
    assert list(per_task.columns) == ["base", "new", "other", "differs"]
    for fmt in ("csv", "json", "markdown", "table"):
        render(summary, fmt, echo=False)


def test_paired_function_directly():
    a = pd.Series({"x": 1.0, "y": 0.0, "z": 0.25})
    b = pd.Series({"x": 0.5, "y": 0.5, "w": 1.0})
    out = stats.paired(a, b)
    assert (out["tasks"], out["flipped_up"], out["flipped_down"]) == (2, 1, 0)  # x stays a success at .5
    assert out["mean_delta"] == pytest.approx(0.0)
