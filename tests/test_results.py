"""pass^k, summaries, comparisons and rendering, on a real SQLite store."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from rich.console import Console

from harness.errors import ConfigError
from harness.results import compare_table, pass_hat_k, render, runs_table, show_table, summarize
from harness.store import Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage


def test_pass_hat_k_hand_computed():
    assert pass_hat_k(4, 2, 1) == 0.5
    assert pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)
    assert pass_hat_k(4, 2, 3) == 0.0 and pass_hat_k(4, 2, 4) == 0.0
    assert [pass_hat_k(4, 3, k) for k in (1, 2, 3, 4)] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert pass_hat_k(5, 5, 5) == 1.0 and pass_hat_k(8, 0, 1) == 0.0
    assert pass_hat_k(8, 5, 3) == pytest.approx(10 / 56)
    with pytest.raises(ValueError):
        pass_hat_k(4, 2, 5)
    with pytest.raises(ValueError):
        pass_hat_k(4, 2, 0)


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["task_id", "trial", "reward", "error_class", "termination",
                                       "agent_prompt_tokens", "agent_cost", "user_cost", "wall_seconds"])


def _rows(successes: dict[str, list[float]], infra: dict[str, int] | None = None):
    rows = []
    for task, rewards in successes.items():
        for trial, r in enumerate(rewards):
            rows.append((task, trial, r, "none" if r >= 0 else "agent", "user_stop", 100, 0.01, 0.002, 1.0))
    for task, trial in (infra or {}).items():
        rows.append((task, trial, 0.0, "infra", "infrastructure_error", 7, 0.001, 0.0, 2.0))
    return [(t, n, max(r, 0.0), e, term, *rest) for t, n, r, e, term, *rest in rows]


def test_summarize_pass_k_and_infra_exclusion():
    # Task A: 2/4, B: 3/4 (+ one infra episode that must not count), C: 4/4 (one reward 1 - 5e-7).
    df = _frame(_rows({"A": [1, 0, 1, 0], "B": [1, 1, 0.5, 1], "C": [1, 1, 0.9999995, 1]}, infra={"B": 4}))
    s = summarize(df)
    assert (s["episodes"], s["scored_episodes"], s["infra_episodes"], s["tasks"], s["trials"]) == (13, 12, 1, 3, 4)
    assert s["pass^1"] == pytest.approx((0.5 + 0.75 + 1) / 3)
    assert s["pass^2"] == pytest.approx((1 / 6 + 1 / 2 + 1) / 3)
    assert s["pass^3"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert s["pass^4"] == pytest.approx(1 / 3)
    assert "pass^5" not in s
    assert s["avg_reward"] == pytest.approx((2 + 3.5 + 4 - 5e-7) / 12)
    assert s["error/infra"] == 1 and s["error/none"] == 12
    assert s["termination/infrastructure_error"] == 1 and s["termination/user_stop"] == 12
    # Infra episodes are not scored but their spend is counted.
    assert s["agent_prompt_tokens"] == 12 * 100 + 7 and s["user_prompt_tokens"] == 0
    assert s["total_cost"] == pytest.approx(12 * 0.012 + 0.001)
    assert s["episode_seconds"] == pytest.approx(14.0) and "wall_seconds" not in s  # the run record has that


def test_pass_k_stops_at_the_fewest_trials_left_after_infra_errors():
    """tau2-bench 1.0.1 ``agent_metrics.get_metrics_df``: infra errors are dropped first, then pass^k
    is reported only up to the smallest number of trials any task has (official check:
    ``test_tau_verify.py::test_official_metrics_truncate_pass_k_like_ours``)."""
    # A: 3/4. B: 1/2, its trials 2 and 3 ended in infrastructure errors.
    infra = [("B", trial, 0.0, "infra", "infrastructure_error", 7, 0.001, 0.0, 2.0) for trial in (2, 3)]
    s = summarize(_frame(_rows({"A": [1, 1, 0, 1], "B": [1, 0]}) + infra))
    assert (s["tasks"], s["trials"], s["scored_episodes"], s["infra_episodes"]) == (2, 2, 6, 2)
    assert s["pass^1"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert s["pass^2"] == pytest.approx((3 / 6 + 0) / 2)
    assert "pass^3" not in s and "pass^4" not in s


def test_summarize_all_infra_task_and_empty():
    s = summarize(_frame(_rows({"A": [1, 1]}, infra={"B": 0})))
    assert s["tasks"] == 1 and s["unscored_tasks"] == 1 and s["pass^2"] == 1.0
    empty = summarize(_frame([]))
    assert empty["tasks"] == 0 and empty["trials"] == 0 and "pass^1" not in empty


def _ep(task: str, trial: int, reward: float, error_class=ErrorClass.NONE) -> EpisodeResult:
    return EpisodeResult(task_id=task, trial=trial, seed=trial, messages=[{"role": "user", "content": "hi"}],
                         termination=Termination.INFRASTRUCTURE_ERROR if error_class == ErrorClass.INFRA
                         else Termination.USER_STOP,
                         score=Score(reward=reward, success=reward == 1.0), error_class=error_class,
                         agent_usage=Usage(prompt_tokens=10, completion_tokens=2, cost=0.5, calls=1),
                         user_usage=Usage(prompt_tokens=5, completion_tokens=1, cost=0.25, calls=1),
                         wall_seconds=1.5)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcomes = {  # run -> task -> rewards per trial
        "base": {"0": [1, 1], "1": [0, 0], "2": [1, 0], "10": [1, 1]},
        "new": {"0": [1, 1], "1": [1, 0], "2": [1, 0], "10": [0, 0]},
    }
    for run, tasks in outcomes.items():
        s.create_run(run, "eval", "tau-airline", "tau3", "base", "litellm", f"m-{run}", "llm", "u", {})
        for task, rewards in tasks.items():
            for trial, r in enumerate(rewards):
                s.add_episode(run, _ep(task, trial, float(r)))
    s.add_episode("new", _ep("2", 2, 0.0, ErrorClass.INFRA))
    yield s
    s.close()


def test_show_table(store):
    table = show_table(store, "base")
    assert list(table.index) == ["base"] and table.index.name == "run"
    assert table.loc["base", "pass^1"] == pytest.approx(5 / 8)
    assert table.loc["base", "pass^2"] == pytest.approx(0.5)
    assert table.loc["base", "agent_model"] == "m-base" and table.loc["base", "data_version"] == "tau3"
    assert table.loc["base", "total_cost"] == pytest.approx(8 * 0.75)
    # Machine formats: one record per run (what `harness results show --format json` prints).
    row = json.loads(render(table, "json", echo=False))[0]
    assert row["run"] == "base" and row["tasks"] == 4 and row["episodes"] == 8 and row["pass^1"] == 0.625
    assert row["agent_prompt_tokens"] == 80
    # Human formats: metric per line.
    md = render(table, "markdown", echo=False)
    assert md.splitlines()[0] == "| metric | base |" and "| pass^2 | 0.500 |" in md


def test_compare_deltas_and_marks(store):
    summary, per_task = compare_table(store, ["base", "new"])
    assert list(summary.columns) == ["base", "new"]
    assert summary.loc["infra_episodes", "new"] == 1 and summary.loc["infra_episodes", "base"] == 0
    assert summary.loc["termination/infrastructure_error", "base"] == 0
    assert list(per_task.index) == ["0", "1", "2", "10"]
    assert list(per_task["delta"]) == pytest.approx([0.0, 0.5, 0.0, -1.0])
    assert list(per_task["differs"]) == [False, True, False, True]
    assert per_task.loc["2", "new"] == 0.5  # infra trial excluded
    with pytest.raises(ConfigError, match="unknown run"):
        compare_table(store, ["base", "ghost"])
    with pytest.raises(ConfigError, match="distinct"):
        compare_table(store, ["base", "base"])


def test_compare_refuses_to_pair_tasks_of_different_task_sets(store):
    """Toy task "0" is not airline task "0": runs of different envs, data versions or splits are
    never paired task by task; --unpaired shows the summaries alone."""
    store.create_run("toy", "eval", "toy", "toy-v2", "test", "oracle", None, None, None, {})
    store.create_run("tau2", "eval", "tau-airline", "tau2", "base", "litellm", "m", "llm", "u", {})
    store.create_run("train-split", "eval", "tau-airline", "tau3", "train", "litellm", "m", "llm", "u", {})
    for run in ("toy", "tau2", "train-split"):
        store.add_episode(run, _ep("0", 0, 1.0))
    for other, shown in (("toy", "toy toy-v2 test"), ("tau2", "tau-airline tau2 base"),
                         ("train-split", "tau-airline tau3 train")):
        with pytest.raises(ConfigError, match="different task sets") as err:
            compare_table(store, ["base", other])
        assert shown in str(err.value) and "base: tau-airline tau3 base" in str(err.value)
    summary, per_task = compare_table(store, ["base", "toy"], unpaired=True)
    assert list(summary.columns) == ["base", "toy"] and summary.loc["env", "toy"] == "toy"
    assert per_task.empty and not any(str(row).startswith("paired/") for row in summary.index)


def test_compare_three_runs_has_no_delta(store):
    store.create_run("third", "eval", "tau-airline", "tau3", "base", "litellm", "m", "llm", "u", {})
    store.add_episode("third", _ep("0", 0, 1.0))
    summary, per_task = compare_table(store, ["base", "new", "third"])
    assert "delta" not in per_task.columns and list(per_task.columns) == ["base", "new", "third", "differs"]
    assert bool(per_task.loc["1", "differs"])  # missing in 'third' counts as a difference
    assert pd.isna(summary.loc["pass^2", "third"]) and summary.loc["pass^1", "third"] == 1.0


@pytest.mark.parametrize("which", ["summary", "per_task"])
def test_every_format_is_parseable(store, which):
    summary, per_task = compare_table(store, ["base", "new"])
    df = summary if which == "summary" else per_task

    parsed = pd.read_csv(io.StringIO(render(df, "csv", echo=False)), index_col=0, dtype=str)
    assert list(parsed.columns) == [str(c) for c in df.columns] and len(parsed) == len(df)

    records = json.loads(render(df, "json", echo=False))
    assert len(records) == len(df) and set(records[0]) == {df.index.name, *map(str, df.columns)}

    md = render(df, "markdown", echo=False).strip().splitlines()
    assert len(md) == len(df) + 2 and md[1].startswith("| ---")
    assert all(line.startswith("|") and line.endswith("|") for line in md)
    assert len({line.count(" | ") for line in md}) == 1

    out = io.StringIO()
    text = render(df, "table", console=Console(file=out, width=120), title="cmp")
    assert "base" in text and "new" in text and "base" in out.getvalue()


def test_render_prints_to_stdout_by_default(store, capsys):
    text = render(show_table(store, "base"), "csv")
    assert capsys.readouterr().out == text
    render(show_table(store, "base"), "table")
    assert "pass^1" in capsys.readouterr().out
    render(show_table(store, "base"), "json", echo=False)
    assert capsys.readouterr().out == ""


def test_runs_table(store):
    runs = runs_table(store)
    assert list(runs.index) == ["base", "new"] and list(runs["episodes"]) == [8, 9]
    assert runs.loc["new", "agent_model"] == "m-new"
    assert len(json.loads(render(runs, "json", echo=False))) == 2


def test_leaderboard_decimals(store):
    table = show_table(store, "base")
    md = render(table, "markdown", echo=False)
    assert "| pass^1 | 0.625 |" in md and "| pass^2 | 0.500 |" in md
    assert "| total_cost | 6.0000 |" in md and "| tasks | 4 |" in md and "| episode_seconds | 12.0 |" in md
    assert "| wall_seconds | - |" in md  # still running: no wall time yet
    txt = render(table, "table", echo=False)
    assert "0.625" in txt
    _, per_task = compare_table(store, ["base", "new"])
    md = render(per_task, "markdown", echo=False)
    assert "| 10 | 1.000 | 0.000 | -1.000 | * |" in md and "| 0 | 1.000 | 1.000 | +0.000 |  |" in md
    with pytest.raises(ConfigError, match="valid: table, csv, markdown, json"):
        render(table, "html")


def test_a_run_metric_is_one_registered_function_with_its_format(store):
    """Adding a metric: one function registered by name, declaring how its rows are shown."""
    from harness.results import metrics

    @metrics.run_metric("probe_share", formats={"probe/share": "{:.1%}"})
    def probe(df):
        return {"probe/share": float((df["reward"] >= 1).mean())}

    try:
        assert summarize(Store(store.url).episodes_df("base"))["probe/share"] == pytest.approx(5 / 8)
        text = render(show_table(store, "base"), "markdown", echo=False)
        assert "| probe/share | 62.5% |" in text  # the declared format, not the default 0.625
        assert render(show_table(store, "base"), "csv", echo=False).rstrip().endswith(",0.625")  # machine formats: raw
    finally:
        metrics._METRICS.pop("probe_share")


def test_runs_table_scores_are_pass1_over_tasks_and_the_last_held_out_success(tmp_path):
    """``results list``'s score column, from one store aggregate: an eval run's pass^1 averages per
    task (not per episode: uneven trial counts make the two differ) and skips infra episodes; a
    train run's is the held-out success of the last step that logged one, not of its last step."""
    from harness.store import log_train_step

    s = Store(f"sqlite:///{tmp_path / 'scores.db'}")
    s.create_run("uneven", "eval", "toy", None, "test", "oracle", None, None, None, {})
    s.add_episode("uneven", _ep("0", 0, 1.0))
    for trial in range(3):
        s.add_episode("uneven", _ep("1", trial, 0.0))
    s.add_episode("uneven", _ep("1", 3, 1.0, ErrorClass.INFRA))  # infra: not scored, whatever its reward
    s.create_run("empty", "eval", "toy", None, "test", "oracle", None, None, None, {})
    s.create_run("trained", "train", "toy", None, "train", "policy", None, None, None, {})
    for step, metrics in ((0, {"eval/success": 0.2}), (3, {"eval/success": 0.6}), (4, {"reward/mean": 0.9})):
        log_train_step(s, "trained", step, metrics)
    s.create_run("untrained", "train", "toy", None, "train", "policy", None, None, None, {})
    log_train_step(s, "untrained", 0, {"reward/mean": 0.1})
    scores = runs_table(s)["score"]
    assert scores["uneven"] == pytest.approx(0.5)  # (1/1 + 0/3) / 2; per episode it would be 0.25
    assert scores["trained"] == pytest.approx(0.6)
    assert pd.isna(scores["empty"]) and pd.isna(scores["untrained"])
    s.close()
