"""``harness results curves RUN``: learning curves of a training run, as a PNG and a table.

The table has one row per logged step and the headline metrics as columns (missing ones are left
out); the PNG has one panel per metric worth drawing (``harness.results.plots``: the default
metrics that have one point or do not vary are left out and named in the caption; metrics named
with ``--metrics`` are always drawn). Held-out success is drawn on a 0-1 axis with each evaluation
point's 95% bootstrap interval. matplotlib draws off-screen (Agg), so it works on a headless
cluster node.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.errors import ConfigError
from harness.results import plots
from harness.store import Store, train_steps

__all__ = ["DEFAULT_METRICS", "curves_frame", "curves_figure", "plot_curves", "plot_run_curves"]

DEFAULT_METRICS = ("reward/mean", "eval/success", "eval/reward", "groups/mixed_frac", "loss/policy", "entropy",
                   "clip/frac", "kl/ref", "len/response", "sft/loss")


def curves_frame(store: Store, run: str, metrics: list[str] | None = None) -> pd.DataFrame:
    record = store.get_run(run)
    if record.kind != "train":
        raise ConfigError(f"run '{run}' is an {record.kind} run; curves are drawn for train runs")
    frame = train_steps(store, run)
    if frame.empty or len(frame.columns) <= 1:
        raise ConfigError(f"run '{run}' has no logged steps yet")
    wanted = list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in frame.columns]
    unknown = [m for m in wanted if m not in frame.columns]
    if unknown:
        known = ", ".join(sorted(c for c in frame.columns if c != "step"))
        raise ConfigError(f"run '{run}' has no metric {', '.join(unknown)}; it has: {known}")
    return frame.set_index("step")[wanted]


def curves_figure(frame: pd.DataFrame, title: str, intervals: pd.DataFrame | None = None,
                  always: tuple[str, ...] = ()):
    """The figure of ``frame``'s metrics, one panel each, and ``{metric: reason}`` of those left
    out; ``intervals`` (``plots.held_out_intervals``) adds error bars to held-out success, metrics in
    ``always`` are drawn whatever their values."""
    not_drawn = {}
    for name in frame.columns:
        why = None if name in always else plots.why_not_drawn(name, frame[name].dropna())
        if why:
            not_drawn[name] = why
    columns = [name for name in frame.columns if name not in not_drawn]
    cols = max(1, min(3, len(columns)))
    rows = max(1, -(-len(columns) // cols))
    fig, axes = plots.new_figure(4.2 * cols, 2.8 * rows + 0.6, rows, cols)
    for ax, name in zip(axes.flat, columns):
        series = frame[name].dropna()
        style = {"marker": "o" if len(series) < 30 else None, "markersize": 3, "color": plots.RUN_COLOURS[0]}
        if name == plots.SUCCESS:
            _success_panel(ax, series, intervals, style)
        else:
            ax.plot(series.index, series.values, **style)
            ax.set_title(name, fontsize=10)
        plots.step_axis(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    if not columns:
        axes.flat[0].text(0.5, 0.5, "no metric worth a panel", ha="center", va="center", fontsize=9)
    plots.finish(fig, title, plots.not_drawn_note(not_drawn))
    return fig, not_drawn


def _success_panel(ax, series: pd.Series, intervals: pd.DataFrame | None, style: dict) -> None:
    plots.held_out_line(ax, series, intervals, style)
    with_bars = plots.has_intervals(series, intervals)
    ax.set_title(plots.SUCCESS + (" (95% CI over tasks)" if with_bars else ""), fontsize=10)
    plots.success_axis(ax)


def plot_curves(frame: pd.DataFrame, path: Path, title: str, intervals: pd.DataFrame | None = None,
                always: tuple[str, ...] = ()) -> plots.Plot:
    """``curves_figure`` written to ``path`` as PNG."""
    fig, not_drawn = curves_figure(frame, title, intervals, always)
    return plots.Plot(plots.save_figure(fig, path), not_drawn)


def plot_run_curves(store: Store, run: str, path: Path, metrics: list[str] | None = None):
    """Train run ``run``'s curves (``metrics``, default the headline ones) with held-out intervals,
    written to ``path``: the table frame and the ``plots.Plot``."""
    frame = curves_frame(store, run, metrics)
    plot = plot_curves(frame, path, run, plots.held_out_intervals(store, [run])[run], always=tuple(metrics or ()))
    return frame, plot
