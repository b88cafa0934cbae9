"""``harness results compare`` for training runs: held-out curves and final scores side by side.

When every named run is a train run, ``results compare`` shows, instead of the episode tables:

- ``per_step_table``: one row per step at which any run evaluated on the held-out split, columns
  ``eval/success <run>`` (and ``eval/reward <run>`` when logged) per run; a run that did not
  evaluate at that step is blank (NaN);
- ``summary_table``: one column per run, rows: ``method``, the method settings and train settings
  that differ between the runs (``settings/<key>``, ``config/<key>``), ``status``, ``steps`` (last
  logged step), ``eval/last_step``, for ``eval/success`` and ``eval/reward`` the value at step 0,
  at the last eval step (``final``), ``final - step 0`` (``delta``), the best success and its first
  step, ``reward/mean/last5`` (mean train reward of the last 5 logged steps), ``time/total_seconds``
  (sum of ``time/rollout`` + ``time/prepare`` + ``time/update``; ``time/prepare``, where a method
  times its summarizer or teacher work, counts when logged, so such a method is not flattered),
  ``eval/success/first_step>=T`` (the first eval step whose held-out success reached the
  threshold ``T``, ``--threshold``, default 0.5; blank when never), ``tokens/rollout`` and
  ``tokens/trained`` (tokens sampled and tokens trained over the run; dynamic sampling shows up
  here) and ``summarizer/total_cost`` (sum of ``summarizer/cost_usd``, only when some run logs it);
- ``plot_compare``: one PNG with the runs overlaid, held-out success (0-1, each run's 95% interval
  over tasks as error bars, set side by side) and train ``reward/mean`` vs step, in the colours,
  legend placement and panel rule of ``harness.results.plots``; more than three runs are titled
  ``N train runs``.

With ``--episodes`` it also runs the ordinary episode comparison (``results.compare_table``) on
each run's last eval-step run ``<run>/eval-step-N``: pass^k, paired per-task deltas with their
bootstrap CI, per-task differences. Mixing train and eval runs is an error (``train_runs``).
pandas and matplotlib load only when a train comparison runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError

__all__ = ["train_runs", "eval_step_run", "default_plot_path", "load_steps", "per_step_table", "summary_table",
           "compare_title", "compare_figure", "train_show_table", "plot_compare", "compare_train_runs"]

EVAL_METRICS = ("eval/success", "eval/reward")
DEFAULT_THRESHOLD = 0.5
TRAIN_REWARD = "reward/mean"
LAST_N = 5
# Train settings that name or place a run rather than change what it learns; the method's own
# settings are compared as ``settings/<key>`` instead of ``method_overrides``.
_NOT_SETTINGS = ("run", "db", "out_dir", "method", "method_overrides", "resume", "stop_after", "quiet", "tracker")


def eval_step_run(run: str, step: int) -> str:
    """The eval run a train run stored for ``step``."""
    from harness.store.core import eval_point_name  # lazily, as this module's other store imports

    return eval_point_name(run, step)


def train_runs(store, runs: list[str]) -> bool:
    """True when every run is a train run, False when none is; unknown names raise the store's
    error and a mix of train and eval runs raises ``ConfigError``."""
    if len(set(runs)) != len(runs) or not runs:
        raise ConfigError(f"compare needs distinct run names, got {runs}")
    kinds = {run: store.get_run(run).kind for run in runs}
    train = [r for r in runs if kinds[r] == "train"]
    if not train:
        return False
    if len(train) < len(runs):
        other = [r for r in runs if kinds[r] != "train"]
        raise ConfigError(
            f"cannot compare train runs ({', '.join(train)}) with eval runs ({', '.join(other)}): compare "
            f"train runs with each other, or a train run's held-out evaluation "
            f"(e.g. {eval_step_run(train[0], 0)}, see `harness results list`) with eval runs")
    return True


# Longest default plot file name: file systems refuse names over 255 bytes (a train-suite compares 15 runs).
_MAX_NAME_BYTES = 200


def default_plot_path(runs: list[str]) -> Path:
    """``results/compare-<run1>-vs-<run2>....png``; when that name would be too long for a file
    system, ``compare-<run1>-and-<N>-more-<hash of all names>.png`` (the same runs, the same file)."""
    safe = [r.replace("/", "_") for r in runs]
    name = "compare-" + "-vs-".join(safe) + ".png"
    if len(name.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256("\0".join(runs).encode()).hexdigest()[:10]
        name = f"compare-{safe[0][:120]}-and-{len(runs) - 1}-more-{digest}.png"
    return Path("results") / name


def load_steps(store, run: str):
    """One run's ``train_steps`` as a float frame indexed by step (empty when nothing is logged)."""
    import pandas as pd

    from harness.store import train_steps

    frame = train_steps(store, run).set_index("step")
    frame.index = frame.index.astype(int)
    return frame.apply(pd.to_numeric, errors="coerce").astype(float).sort_index()


def _metric(frame, name: str):
    import pandas as pd

    return frame[name].dropna() if name in frame.columns else pd.Series(dtype=float)


def per_step_table(steps: dict[str, Any]):
    """Held-out scores at every eval step (rows) of every run (columns ``<metric> <run>``)."""
    import pandas as pd

    from harness.results.terminal_table import RUNS_ARE_COLUMNS

    metrics = [m for m in EVAL_METRICS if any(not _metric(f, m).empty for f in steps.values())]
    columns = {f"{m} {run}": _metric(frame, m) for m in metrics for run, frame in steps.items()}
    table = pd.DataFrame(columns, dtype=float).dropna(how="all") if columns else pd.DataFrame(dtype=float)
    table.index = table.index.astype(int)
    table.index.name = "step"
    table = table.sort_index()
    table.attrs[RUNS_ARE_COLUMNS] = True  # a terminal may show it pivoted (terminal_table)
    return table


def _setting(value: Any) -> str | None:
    """A setting as text, so ``5e-4`` does not print as ``0.001`` beside scores."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return format(value, "g") if isinstance(value, float) else str(value)


def _differing(dicts: dict[str, dict[str, Any]], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{prefix/key: {run: value}}`` for the keys whose values are not the same in every run."""
    keys: list[str] = []
    for d in dicts.values():
        keys += [k for k in d if k not in keys and k not in skip]
    out = {}
    for key in keys:
        values = {run: _setting(d.get(key)) for run, d in dicts.items()}
        if len(set(values.values())) > 1:
            out[f"{prefix}/{key}"] = values
    return out


def _run_summary(record, frame, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    out: dict[str, Any] = {"status": record.status,
                           "steps": int(frame.index.max()) if len(frame.index) else None}
    evaluated = [_metric(frame, m) for m in EVAL_METRICS]
    if any(not s.empty for s in evaluated):
        out["eval/last_step"] = int(max(s.index.max() for s in evaluated if not s.empty))
    for name, series in zip(EVAL_METRICS, evaluated):
        if series.empty:
            continue
        start = float(series.loc[0]) if 0 in series.index else None
        final = float(series.iloc[-1])
        out[f"{name}/step0"], out[f"{name}/final"] = start, final
        out[f"{name}/delta"] = final - start if start is not None else None
        if name == "eval/success":
            out[f"{name}/best"], out[f"{name}/best_step"] = float(series.max()), int(series.idxmax())
            reached = series[series >= threshold]
            out[f"{name}/first_step>={threshold:g}"] = int(reached.index[0]) if len(reached) else None
    reward = _metric(frame, TRAIN_REWARD)
    if not reward.empty:
        out[f"{TRAIN_REWARD}/last{LAST_N}"] = float(reward.iloc[-LAST_N:].mean())
    timed = [c for c in ("time/rollout", "time/prepare", "time/update") if c in frame.columns]
    if timed:
        out["time/total_seconds"] = float(frame[timed].fillna(0).to_numpy().sum())
    for name in ("tokens/rollout", "tokens/trained"):
        if name in frame.columns:
            out[name] = int(frame[name].fillna(0).sum())
    if "summarizer/cost_usd" in frame.columns:
        out["summarizer/total_cost"] = float(frame["summarizer/cost_usd"].fillna(0).sum())
    return out


def summary_table(store, runs: list[str], steps: dict[str, Any], threshold: float = DEFAULT_THRESHOLD):
    """Metric rows x run columns (object dtype: method names, counts and scores side by side)."""
    import pandas as pd

    from harness.results.terminal_table import RUNS_ARE_COLUMNS

    records = {run: store.get_run(run) for run in runs}
    configs = {run: r.config or {} for run, r in records.items()}
    rows: dict[str, dict[str, Any]] = {
        "method": {run: (c.get("train") or {}).get("method") for run, c in configs.items()}}
    rows |= _differing({run: c.get("method_settings") or {} for run, c in configs.items()}, "settings")
    rows |= _differing({run: c.get("train") or {} for run, c in configs.items()}, "config", _NOT_SETTINGS)
    summaries = {run: _run_summary(records[run], steps[run], threshold) for run in runs}
    keys: list[str] = []
    for summary in summaries.values():
        keys += [k for k in summary if k not in keys]
    order = ["status", "steps", "eval/last_step"]
    for name in EVAL_METRICS:
        order += [f"{name}/{part}" for part in ("step0", "final", "delta", "best", "best_step",
                                                 f"first_step>={threshold:g}")]
    keys.sort(key=lambda k: order.index(k) if k in order else len(order))  # stable: the rest keep their order
    rows |= {key: {run: summaries[run].get(key) for run in runs} for key in keys}
    frame = pd.DataFrame({run: [rows[k].get(run) for k in rows] for run in runs}, index=list(rows), dtype=object)
    frame.index.name = "metric"
    frame.attrs[RUNS_ARE_COLUMNS] = True
    return frame


def compare_title(runs: list[str]) -> str:
    """``a vs b vs c`` for up to three runs; past that ``N train runs`` (the legend names them),
    with the prefix the names share (a train-suite's ``suite-toy-s0-``)."""
    if len(runs) <= 3:
        return " vs ".join(runs)
    prefix = os.path.commonprefix(runs)
    return f"{len(runs)} train runs" + (f" {prefix}*" if prefix else "")


_SHOWN_SETTINGS = ("steps", "tasks_per_step", "group_size", "lr", "max_new_tokens", "temperature", "warm_start",
                   "eval_split", "eval_tasks")
"""The train settings ``results show`` lists for a train run (all of them: ``--format json``'s config)."""


def train_show_table(store, run: str):
    """``results show`` of a train run: what it trained (env, policy, method, the main settings),
    how its held-out evaluation decoded, and what it reached: the ``summary_table`` rows, the final
    held-out success's 95% CI (bootstrap over tasks, from the last evaluation point's episodes),
    the mean of each ``loss/*`` over the last 5 logged steps, and the run's wall time."""
    import pandas as pd

    from harness.decoding import run_decoding
    from harness.results.metrics import summarize
    from harness.results.tables import run_wall_seconds

    record = store.get_run(run)
    train = (record.config or {}).get("train") or {}
    steps = load_steps(store, run)
    summary = summary_table(store, [run], {run: steps})[run].to_dict()
    rows: dict[str, Any] = {"env": record.env, "data_version": record.data_version, "split": record.split,
                            "policy": record.agent_model, "method": summary.pop("method")}
    rows |= {f"config/{key}": _setting(train.get(key)) for key in _SHOWN_SETTINGS if key in train}
    last = summary.get("eval/last_step")
    rows["eval/decoding"] = str(run_decoding(record)) if last is not None else None  # no held-out evaluation
    for key, value in summary.items():
        rows[key] = value
        if key == "eval/success/final":  # its confidence interval beside it
            try:
                final = summarize(store.episodes_df(eval_step_run(run, int(last))))
            except ConfigError:  # the evaluation point's run was deleted: no CI to give
                final = {}
            for end in ("low", "high"):
                rows[f"eval/success/final_ci95_{end}"] = final.get(f"pass^1/ci95_{end}")
    for name in (c for c in steps.columns if c.startswith("loss/")):
        rows[f"{name}/last{LAST_N}"] = float(_metric(steps, name).iloc[-LAST_N:].mean())
    rows["wall_seconds"] = run_wall_seconds(record)
    # one row per run, shown transposed: ``--format json`` is one run record, as for an eval run
    frame = pd.DataFrame([rows], index=pd.Index([run], name="run"), dtype=object)
    frame.attrs["transpose_for_display"] = True
    return frame


def compare_figure(steps: dict[str, Any], title: str, intervals: dict[str, Any] | None = None):
    """Held-out success (0-1, each run's 95% intervals from ``intervals`` as error bars, the runs' bars
    set side by side: ``plots.dodge``) and train ``reward/mean`` vs step, one line per run in
    ``plots.run_style`` order, one panel per metric that some run logged at two steps or more; the
    legend right of the panels. Returns the figure and ``{metric: reason}`` of the panels left out."""
    from harness.results import plots

    panels = (("eval/success", "held-out success (eval/success)"), (TRAIN_REWARD, "train reward (reward/mean)"))
    not_drawn = {}
    for name, _ in panels:
        reasons = {plots.why_not_drawn(name, _metric(frame, name)) for frame in steps.values()}
        if None not in reasons:  # no run has a curve of it
            not_drawn[name] = "not logged" if reasons == {"not logged"} else f"under {plots.MIN_POINTS} points"
    drawn = [(name, label) for name, label in panels if name not in not_drawn] or panels[:1]
    widest = max(len(run) for run in steps)
    fig, axes = plots.new_figure(4.6 * len(drawn) + 0.9 + 0.065 * widest, max(3.4, 0.9 + 0.2 * len(steps)),
                                 1, len(drawn))
    eval_steps = [step for frame in steps.values() for step in _metric(frame, plots.SUCCESS).index]
    shifts = plots.dodge(len(steps), eval_steps)
    for ax, (name, label) in zip(axes.flat, drawn):
        bars = False
        for i, (run, frame) in enumerate(steps.items()):
            series = _metric(frame, name)
            if series.empty:
                continue
            style = plots.run_style(i) | {"markersize": 3}
            if len(series) >= 30:
                style["marker"] = None
            if name == plots.SUCCESS:
                band = (intervals or {}).get(run)
                bars = bars or plots.has_intervals(series, band)
                plots.held_out_line(ax, series, band, style, label=run, shift=shifts[i])
            else:
                ax.plot(series.index, series.values, label=run, **style)
        ax.set_title(label + (" with 95% CI over tasks" if bars else ""), fontsize=10)
        plots.step_axis(ax)
        ax.grid(alpha=0.3)
        if name == plots.SUCCESS:
            plots.success_axis(ax)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    plots.legend_outside(fig, list(axes.flat))
    plots.finish(fig, title, plots.not_drawn_note(not_drawn))
    return fig, not_drawn


def plot_compare(steps: dict[str, Any], path: Path, title: str, intervals: dict[str, Any] | None = None) -> Path:
    """``compare_figure`` written to ``path`` as PNG."""
    from harness.results import plots

    fig, _ = compare_figure(steps, title, intervals)
    return plots.save_figure(fig, path)


def _episode_tables(store, runs: list[str], summary, all_tasks: bool, allow_different_decoding: bool = False):
    from harness import results

    finals = []
    for run in runs:
        last = summary.at["eval/last_step", run] if "eval/last_step" in summary.index else None
        if last is None or (isinstance(last, float) and math.isnan(last)):
            raise ConfigError(f"--episodes: train run '{run}' has no held-out evaluation to compare")
        name = eval_step_run(run, int(last))
        try:
            store.get_run(name)
        except ConfigError:
            raise ConfigError(f"--episodes: train run '{run}' logged a held-out score at step {int(last)} "
                              f"but its eval run '{name}' is not in {store.url}") from None
        finals.append(name)
    ep_summary, per_task = results.compare_table(store, finals, allow_different_decoding=allow_different_decoding)
    if not all_tasks:
        per_task = per_task[per_task["differs"]].drop(columns=["differs"])
    return ep_summary, per_task


def compare_train_runs(store, runs: list[str], fmt: str = "table", out: str | None = None,
                       episodes: bool = False, all_tasks: bool = False, threshold: float = DEFAULT_THRESHOLD,
                       echo: Callable[[str], None] = print, note: Callable[[str], None] = print,
                       allow_different_decoding: bool = False) -> dict[str, Any]:
    """Print the train comparison in ``fmt`` (tables, then the plot path) and return its parts.
    ``echo`` writes to stdout, ``note`` takes headings and messages that must not mix into csv."""
    from harness import results

    if fmt not in results.FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; valid: {', '.join(results.FORMATS)}")
    steps = {run: load_steps(store, run) for run in runs}
    per_step = per_step_table(steps)
    summary = summary_table(store, runs, steps, threshold)
    from harness.results.plots import held_out_intervals

    path = plot_compare(steps, Path(out) if out else default_plot_path(runs), compare_title(runs),
                        held_out_intervals(store, runs))
    tables = [("per_step", "Held-out score per eval step", per_step), ("summary", "Train runs compared", summary)]
    if episodes:
        ep_summary, per_task = _episode_tables(store, runs, summary, all_tasks, allow_different_decoding)
        tables += [("episodes", "Final held-out evaluation, episode level", ep_summary),
                   ("episodes_per_task", f"Final held-out per-task success rate "
                                         f"({'all tasks' if all_tasks else 'tasks that differ'})", per_task)]
    parts: dict[str, Any] = {key: df for key, _, df in tables} | {"plot": path}
    if fmt == "json":  # one parseable document
        doc = {key: json.loads(results.render(df, "json", echo=False)) for key, _, df in tables}
        echo(json.dumps(doc | {"plot": str(path)}, indent=2, ensure_ascii=False))
        return parts
    for i, (_, title, df) in enumerate(tables):
        if fmt == "table":
            if i:
                echo("")
            results.render(df, fmt, title=title)  # rich, in colour on a terminal
        elif fmt == "markdown":
            echo(f"{'' if i == 0 else chr(10)}### {title}\n")
            echo(results.render(df, fmt, echo=False).rstrip("\n"))
        else:  # csv: tables separated by a blank line, titles kept off stdout
            note(title)
            echo(("" if i == 0 else "\n") + results.render(df, fmt, echo=False).rstrip("\n"))
    (note if fmt == "csv" else echo)(f"plot: {path}")
    return parts
