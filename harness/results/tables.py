"""Results tables: pass^k and friends from the store, one run or several side by side.

Why: the numbers users quote must be computed exactly as τ-bench does, so pass^k is the unbiased
estimator C(c,k)/C(n,k) averaged over tasks (tau-bench ``run.py``, tau2 ``agent_metrics.py``).

Decisions:

- An episode is a success when its reward is within 1e-6 of 1 (τ-bench's rule), not via the stored
  ``success`` flag, so re-graded or imported rows score the same way.
- ``infra`` episodes (error_class) are excluded from every score (pass^k, avg_reward, per-task
  success) but counted: ``infra_episodes``, termination and error-class counts, tokens, cost and time
  include them (the money and time were spent). Agent errors count as failures.
- pass^k is reported for k = 1 .. the smallest number of scored trials of any task, each task using
  its own n. Tasks whose episodes are all infra have no score and are counted in ``unscored_tasks``.
- ``summarize`` (``harness.results.metrics``: every registered run metric) returns a flat dict
  whose names follow the episode columns (``agent_prompt_tokens``, ``agent_cost``; counts as
  ``termination/<reason>``, ``error/<class>``), so runs line up in one table. Time:
  ``wall_seconds`` is the run's wall time, from its creation to its last end (blank while it runs;
  a resumed run's includes the time it stood stopped), and ``episode_seconds`` the episodes' wall
  times added up (larger than the run's when episodes run concurrently).
- A run's facts come first: its settings, its decoding (``harness.decoding``: greedy or a
  temperature, samples per task).
- Orientation: ``show_table`` gives one row per run (so ``--format json`` is a list of run records
  and ``csv`` a leaderboard line); ``compare_table``'s summary has one column per run. Frames meant
  to be read metric-by-metric carry ``df.attrs["transpose_for_display"]``, which ``render`` honours
  for the human formats (a 30-column single row is unreadable in a terminal).
- ``compare_table``'s per-task frame keeps every task and a boolean ``differs`` column (filter on
  it to show only differing tasks); human formats render it as ``*`` / blank.
- Noise statistics (``harness.results.stats``): ``pass^1/trial_mean`` / ``pass^1/trial_std`` (per-trial
  success rate over tasks, std with ddof=1), ``pass^1/ci95_low`` / ``pass^1/ci95_high`` (bootstrap
  over tasks, fixed seed), and sibling-group counts (``groups``, ``groups/<label>``) when episodes
  carry a ``group_id``. ``compare_table``'s summary adds, for each run after the first, rows
  ``paired/<run>/...`` (value in that run's column, other columns blank): tasks both scored, tasks
  that flipped (a task succeeds in a run when its success rate is >= 0.5), the mean per-task
  success-rate delta (run minus first run) and its paired bootstrap 95% CI.
- Human formats (``table``, ``markdown``) show pass^k and rates with 3 decimals (leaderboard style),
  cost with 4; machine formats (``csv``, ``json``) keep full precision. Markdown is built here, so
  the optional ``tabulate`` dependency is not needed. ``render`` prints (to stdout by default) and
  returns the text, so the CLI and tests share one code path.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

import pandas as pd
from rich.console import Console

from harness.decoding import check_one_decoding, run_decoding
from harness.errors import ConfigError
from harness.results import stats
from harness.results.metrics import format_for, pass_hat_k, summarize
from harness.results.stats import SUCCESS_TOL, group_labels
from harness.results.terminal_table import RUNS_ARE_COLUMNS, print_fitted
from harness.types import Termination, task_order_key

__all__ = ["SUCCESS_TOL", "FORMATS", "pass_hat_k", "summarize", "runs_table", "show_table", "compare_table",
           "render", "render_show", "group_labels", "main_score", "task_set", "check_one_task_set",
           "check_one_grader", "check_decodings", "run_wall_seconds"]

FORMATS = ("table", "csv", "markdown", "json")
_PASS_K = re.compile(r"pass\^(\d+)$")
_RUN_FIELDS = ("env", "data_version", "split", "agent", "agent_model", "user", "user_model", "status")


EnvMetrics = Callable[[Any, Any], dict[str, Any]]
"""``(store, run record) -> rows``: an env's own summary rows (``EnvFactory.run_metrics``, e.g.
AppWorld's TGC/SGC), supplied by the caller, which knows the envs."""


_RUN_FACTS = ("grader", "standard", "nonstandard_reasons")
"""Env rows that describe how a run was made rather than measure it: shown with its settings, first."""


def run_wall_seconds(record) -> float | None:
    """Seconds from the run's creation to its last end; None while it runs."""
    if record.finished_at is None:
        return None
    return (record.finished_at - record.created_at).total_seconds()


def _run_summary(store, run: str, df: pd.DataFrame | None = None,
                 env_metrics: EnvMetrics | None = None) -> dict[str, Any]:
    record = store.get_run(run)
    meta = {f: getattr(record, f) for f in _RUN_FIELDS}
    decoding = run_decoding(record)
    meta["decoding"] = None if decoding is None else str(decoding)
    env_rows = env_metrics(store, record) if env_metrics is not None else {}
    meta |= {k: env_rows.pop(k) for k in _RUN_FACTS if k in env_rows}
    measured: dict[str, Any] = {}
    for key, value in summarize(store.episodes_df(run) if df is None else df).items():
        if key == "episode_seconds":  # the run's own wall time beside the episodes' sum
            measured["wall_seconds"] = run_wall_seconds(record)
        measured[key] = value
    return meta | measured | env_rows


def _summary_frame(summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Metric rows × run columns; missing counts become 0, missing pass^k stay NaN."""
    keys: list[str] = []
    for summary in summaries.values():
        keys += [k for k in summary if k not in keys]
    # Keep pass^k rows together and in k order even when runs have different trial counts; the
    # pass^1/... statistics follow them, before avg_reward.
    passes = sorted((k for k in keys if _PASS_K.match(k)), key=lambda k: int(k[5:]))
    passes += [k for k in keys if k.startswith("pass^") and not _PASS_K.match(k)]
    first = next((i for i, k in enumerate(keys) if k.startswith("pass^")), None)
    rest = [k for k in keys if not k.startswith("pass^")]
    if first is not None:
        rest[first:first] = passes
    rest = _terminations_together(rest)
    frame = pd.DataFrame({run: [s.get(k) for k in rest] for run, s in summaries.items()}, index=rest, dtype=object)
    counts = [k for k in rest if k.startswith(("termination/", "error/"))]
    frame.loc[counts] = frame.loc[counts].fillna(0)
    frame.index.name = "metric"
    return frame


_TERMINATION_ORDER = [f"termination/{t.value}" for t in Termination]


def _terminations_together(keys: list[str]) -> list[str]:
    """``termination/*`` rows in one block, in ``Termination`` order, where the first one stood: the
    shared metric lists the reasons that occurred, an env may add the rest (τ-airline: all nine)."""
    terms = [k for k in keys if k.startswith("termination/")]
    if not terms:
        return keys
    at = keys.index(terms[0])
    rest = [k for k in keys if not k.startswith("termination/")]
    order = {k: i for i, k in enumerate(_TERMINATION_ORDER)}
    rest[at:at] = sorted(terms, key=lambda k: (order.get(k, len(order)), k))
    return rest


def main_score(store, record) -> float | None:
    """A run's headline number: pass^1 of an eval run (per-task success rate over scored episodes,
    averaged over tasks), the last held-out success of a train run; None when it has none yet."""
    from harness.store.browse import run_scores

    return run_scores(store).get(record.name)


def runs_table(store) -> pd.DataFrame:
    """All runs, oldest first: one row per run (indexed by name) with its main score
    (``main_score``, from one store aggregate for all runs), settings and episode count."""
    from harness.store.browse import run_scores

    counts, scores = store.episode_counts(), run_scores(store)
    rows = [{"run": r.name, "kind": r.kind, "score": scores.get(r.name), **{f: getattr(r, f) for f in _RUN_FIELDS},
             "status_reason": r.status_reason, "episodes": counts.get(r.name, 0),
             "created_at": r.created_at.strftime("%Y-%m-%d %H:%M")}
            for r in store.list_runs()]
    cols = ["run", "kind", "score", *_RUN_FIELDS, "status_reason", "episodes", "created_at"]
    return pd.DataFrame(rows, columns=cols).set_index("run")


def show_table(store, run: str, env_metrics: EnvMetrics | None = None) -> pd.DataFrame:
    """Summary of one run: one row (index ``run``), one column per metric; shown transposed."""
    frame = _summary_frame({run: _run_summary(store, run, env_metrics=env_metrics)}).T
    frame.index.name, frame.columns.name = "run", None
    frame.attrs["transpose_for_display"] = True
    return frame


_task_success_rates = stats.task_rates


def task_set(record) -> tuple[str, str | None, str | None]:
    """What a task id means in a run: (env, data version, split). Task "0" of the toy's test split
    and task "0" of τ-airline are different tasks, so runs are paired only within one task set."""
    return record.env, record.data_version, record.split


def check_one_task_set(store, runs: list[str]) -> None:
    """A ``ConfigError`` naming each run's task set when the runs do not share one."""
    sets = {run: task_set(store.get_run(run)) for run in runs}
    if len(set(sets.values())) > 1:
        described = "; ".join(f"{run}: {env} {version or '-'} {split or '-'}" for run, (env, version, split)
                              in sets.items())
        raise ConfigError(f"these runs play different task sets (env, data version, split: {described}), so their "
                          f"task ids cannot be paired; compare runs of one task set, or pass --unpaired to see "
                          f"their summaries side by side without pairing")


def check_one_grader(summaries: dict[str, dict[str, Any]]) -> None:
    """A ``ConfigError`` naming each run's grader version when the runs were not all graded under
    one (a run whose env declares none has ``-``): their scores are not comparable."""
    graders = {run: summary.get("grader") for run, summary in summaries.items()}
    if len(set(graders.values())) > 1:
        described = "; ".join(f"{run}: {grader or '-'}" for run, grader in graders.items())
        raise ConfigError(f"these runs were graded under different grader versions ({described}), so their scores "
                          "are not comparable; compare runs of one grader version, or pass --unpaired to see their "
                          "summaries side by side without pairing")


def check_decodings(store, runs: list[str], allow: bool) -> str | None:
    """Refuse (``ConfigError``) runs that decode differently, unless ``allow``; then return the
    warning to show beside the table (None when they decode alike)."""
    problem = check_one_decoding([store.get_run(run) for run in runs])
    if problem is not None and not allow:
        raise ConfigError(f"{problem}; compare runs of one decoding, or pass --allow-different-decoding to see "
                          "them side by side anyway")
    return None if problem is None else f"warning: {problem}"


def compare_table(store, runs: list[str], env_metrics: EnvMetrics | None = None,
                  unpaired: bool = False, allow_different_decoding: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: metric × run, per-task: task_id × run success rate).

    Runs of different task sets (``task_set``) or grader versions (the env's ``grader`` row) are
    refused unless ``unpaired``: then the summary has no paired rows and the per-task frame is empty
    (a task id means nothing across them). Runs of different decodings (greedy against a
    temperature, ``harness.decoding``) are refused unless ``allow_different_decoding``.

    The summary ends with ``paired/<run>/{tasks,flipped_up,flipped_down,mean_delta,delta_ci95_low,
    delta_ci95_high}`` rows for every run after the first, compared with the first run over the tasks
    both scored (value in ``<run>``'s column; see the module docstring for the flip rule).
    The per-task frame has every task, a boolean ``differs`` column (rates differ, a task missing
    from a run included) and, for exactly two runs, ``delta`` = second run minus first.
    """
    if len(set(runs)) != len(runs) or not runs:
        raise ConfigError(f"compare needs distinct run names, got {runs}")
    if not unpaired:
        check_one_task_set(store, runs)
    check_decodings(store, runs, allow_different_decoding)
    frames = {run: store.episodes_df(run) for run in runs}
    summaries = {run: _run_summary(store, run, frames[run], env_metrics) for run in runs}
    if not unpaired:
        check_one_grader(summaries)
    summary = _summary_frame(summaries)
    summary.attrs[RUNS_ARE_COLUMNS] = True  # a terminal may show it pivoted (terminal_table)
    if unpaired:
        return summary, pd.DataFrame(index=pd.Index([], name="task_id"))
    rates = {run: _task_success_rates(frames[run]) for run in runs}
    for run in runs[1:]:
        for key, value in stats.paired(rates[runs[0]], rates[run]).items():
            summary.loc[f"paired/{run}/{key}"] = pd.Series({run: value}, dtype=object)
    tasks = sorted(set().union(*(r.index for r in rates.values())), key=task_order_key)
    per_task = pd.DataFrame({run: r.reindex(tasks) for run, r in rates.items()}, index=tasks, dtype=float)
    per_task.index.name = "task_id"
    values = per_task[runs]
    spread = values.max(axis=1) - values.min(axis=1)
    differs = (spread > 1e-9) | (values.isna().any(axis=1) & values.notna().any(axis=1))
    if len(runs) == 2:
        per_task["delta"] = per_task[runs[1]] - per_task[runs[0]]
    per_task["differs"] = differs.astype(bool)
    return summary, per_task


# -- rendering ----------------------------------------------------------------------------------

def render_show(summary: pd.DataFrame, per_task: pd.DataFrame | None, fmt: str = "table") -> str:
    """``results show``: the run summary, then the env's per-task rows when it has some. ``json``
    stays one list with one run record, which gains a ``per_task`` list of task records; ``csv``
    stays one leaderboard line (the per-task rows are in the other formats)."""
    if per_task is None or fmt == "csv":
        return render(summary, fmt)
    if fmt == "json":
        doc = json.loads(render(summary, "json", echo=False))
        doc[0]["per_task"] = json.loads(render(per_task, "json", echo=False))
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        Console().print(text, end="", markup=False, highlight=False, soft_wrap=True)
        return text
    text = render(summary, fmt)
    Console().print()  # a blank line: two markdown tables in a row would read as one
    return text + "\n" + render(per_task, fmt, title="Per task (scored episodes)" if fmt == "table" else None)


def _fmt(value: Any, row: str, col: str) -> str:
    """Human formatting of one cell: the format its metric declares (``format_for``), looked up by
    the metric's name (the row label, or the column label in a per-run frame)."""
    kind = getattr(getattr(value, "dtype", None), "kind", "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or kind == "b":
        return ("*" if value else "") if col == "differs" else str(bool(value))
    if isinstance(value, int) or kind in ("i", "u"):
        return str(int(value))
    if isinstance(value, float) or kind == "f":
        value = float(value)
        if (col == "delta" or row.endswith("/delta")
                or (row.startswith("paired/") and "delta" in row.rsplit("/", 1)[-1])):
            return f"{value:+.3f}"
        name = col if format_for(col) != format_for("") else row
        return format_for(name).format(value)
    return str(value)


def _cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [str(df.index.name or "")] + [str(c) for c in df.columns]
    rows = [[str(idx)] + [_fmt(v, str(idx), str(col)) for col, v in zip(df.columns, row)]
            for idx, row in zip(df.index, df.itertuples(index=False))]
    return header, rows


def _markdown(df: pd.DataFrame) -> str:
    header, rows = _cells(df)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    align = ["---"] + ["---:" if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
                       else "---" for c in df.columns]
    return "\n".join([line(header), "| " + " | ".join(align) + " |", *map(line, rows)]) + "\n"


def render(df: pd.DataFrame, fmt: str = "table", *, console: Console | None = None,
           title: str | None = None, echo: bool = True) -> str:
    """Render ``df`` as ``table`` (rich), ``csv``, ``markdown`` or ``json`` (list of records, the index
    as first field) and return the text. With ``echo`` it is also printed to ``console`` (default:
    stdout): the rich table in colour, machine formats verbatim (no wrapping, no markup)."""
    if echo and console is None:
        console = Console()
    if not echo:
        console = None
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt in ("table", "markdown") and df.attrs.get("transpose_for_display"):
        label = df.index.name
        df = df.T
        df.index.name, df.columns.name = "metric", label
        df.attrs[RUNS_ARE_COLUMNS] = True  # the headers are run names: never broken
    if fmt == "table":  # fitted to the terminal, names whole (terminal_table)
        return print_fitted(df, *_cells(df), title, console)
    if fmt == "csv":
        text = df.to_csv()
    elif fmt == "markdown":
        text = _markdown(df)
    else:
        frame = df.reset_index()
        frame.columns = [str(c) for c in frame.columns]
        # Through pandas for NaN -> null and numpy scalars, then re-dumped for unescaped "/" and indent.
        records = json.loads(frame.to_json(orient="records", double_precision=15))
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    if console is not None:
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    return text
