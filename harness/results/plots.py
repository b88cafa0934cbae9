"""What every result plot shares: run colours, which panels are worth drawing, the held-out
intervals, the success axis, a legend outside the data, a title and caption that fit, the PNG.

Decisions (written down for users in docs/training.md, "Plots"):

- Run colours: runs 1-8 take the Okabe-Ito palette (solid lines, round markers), runs 9-16 eight of
  Paul Tol's "muted" colours (dashed lines, square markers). 16 runs get 16 distinct colours, and
  where a muted hue is close to an Okabe-Ito one the line style still tells them apart. Past 16 the
  colours repeat, dotted.
- A panel is drawn when its metric has at least ``MIN_POINTS`` logged points and varies: its range
  (max - min) exceeds ``FLAT_ABS`` (1e-6) and ``FLAT_REL`` (0.1%) of its largest magnitude.
  Held-out panels (``eval/...``) skip the second rule: a flat held-out score is a finding, not an
  empty panel. Panels left out are named in the figure's caption (and by the commands that draw
  it).
- Held-out success (``eval/success``) is drawn on a fixed 0-1 axis, never auto-zoomed, with each
  evaluation point's 95% interval: the percentile bootstrap over tasks of the per-task success
  rates of that point's eval run (``stats.bootstrap_ci`` on ``stats.task_rates``, the interval
  ``results show`` prints as ``pass^1/ci95_low`` / ``pass^1/ci95_high``).

matplotlib loads only inside the drawing functions, and draws off-screen (Agg).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RUN_COLOURS", "SUCCESS", "MIN_POINTS", "FLAT_ABS", "FLAT_REL", "Plot", "not_drawn_note", "run_style",
           "why_not_drawn", "held_out_intervals", "new_figure", "success_axis", "has_intervals", "held_out_line",
           "dodge", "step_axis", "legend_outside", "finish", "save_figure"]

# Okabe & Ito, "Color Universal Design" (2002), the eight colours in the order used here: blue, orange,
# bluish green, vermillion, reddish purple, sky blue, black, yellow (yellow last: faint on white).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
# Paul Tol, "Colour schemes" (SRON technical note SRON/EPS/TN/09-002), the "muted" scheme without its
# pale grey (the missing-data colour) and cyan (closest to Okabe-Ito's sky blue): indigo, rose, green,
# wine, teal, olive, purple, sand.
TOL_MUTED = ("#332288", "#CC6677", "#117733", "#882255", "#44AA99", "#999933", "#AA4499", "#DDCC77")
RUN_COLOURS = OKABE_ITO + TOL_MUTED
_LINE_STYLES = ("-", "--", ":")
_MARKERS = ("o", "s", "^")

SUCCESS = "eval/success"
HELD_OUT_PREFIX = "eval/"
MIN_POINTS = 2
FLAT_ABS = 1e-6
FLAT_REL = 1e-3  # a change under 0.1% of a metric's size tells no learning story (an entropy of 6.0948 -> 6.0947)


@dataclass
class Plot:
    """A written figure: its path, and the panels left out with why (``{metric: reason}``)."""

    path: Path
    not_drawn: dict[str, str] = field(default_factory=dict)

    def note(self) -> str:
        return not_drawn_note(self.not_drawn)


def not_drawn_note(not_drawn: dict[str, str]) -> str:
    """``not drawn: a (1 point), b (constant 0)``, or "" when every panel was drawn."""
    if not not_drawn:
        return ""
    return "not drawn: " + ", ".join(f"{name} ({why})" for name, why in not_drawn.items())


def run_style(index: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``index``-th run (0-based) of a multi-run plot."""
    group = min(index // len(OKABE_ITO), len(_LINE_STYLES) - 1)
    return {"color": RUN_COLOURS[index % len(RUN_COLOURS)], "linestyle": _LINE_STYLES[group],
            "marker": _MARKERS[group]}


def why_not_drawn(name: str, values) -> str | None:
    """Why metric ``name``'s logged ``values`` make an empty panel, or None when they are worth one."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return "not logged"
    if len(finite) < MIN_POINTS:
        return f"{len(finite)} point"
    if name.startswith(HELD_OUT_PREFIX):
        return None
    spread = max(finite) - min(finite)
    if spread > max(FLAT_ABS, FLAT_REL * max(abs(v) for v in finite)):
        return None
    return f"constant {finite[0]:.3g}" if spread == 0 else f"flat: range {spread:.1g}"


def held_out_intervals(store, runs: list[str]) -> dict[str, Any]:
    """95% bootstrap interval of held-out success at each evaluation point of each train run in
    ``runs``: ``{run: frame indexed by step, columns low and high}`` (empty when no eval run of it
    is stored). Only each train run's own child runs (``<run>/...``) are read, not every run's record."""
    import pandas as pd

    from harness.results import stats

    rows: dict[str, dict[int, tuple[float, float]]] = {run: {} for run in runs}
    for run in runs:
        for name in store.run_names(prefix=f"{run}/"):
            record = store.get_run(name)
            config = record.config or {}
            if record.kind != "eval" or config.get("train_run") != run or "step" not in config:
                continue
            rates = stats.task_rates(store.episodes_df(record.name))
            if len(rates):
                rows[run][int(config["step"])] = stats.bootstrap_ci(rates.to_numpy())
    out = {}
    for run, points in rows.items():
        frame = pd.DataFrame.from_dict(points, orient="index", columns=["low", "high"], dtype=float)
        frame.index.name = "step"
        out[run] = frame.sort_index()
    return out


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A figure with constrained layout (room kept for the title, caption and an outside legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained")


def success_axis(ax) -> None:
    """Success is a rate: always 0 to 1, so two plots read alike and noise is not zoomed into a trend."""
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    for artist in [*ax.lines, *ax.collections]:
        artist.set_clip_on(False)  # a score of exactly 0 or 1 sits on the frame: show it whole


def has_intervals(series, intervals) -> bool:
    """Whether ``intervals`` (``held_out_intervals``) holds a bound for some point of ``series``."""
    return intervals is not None and len(intervals) > 0 and intervals["low"].reindex(series.index).notna().any()


def held_out_line(ax, series, intervals, style: dict[str, Any], label: str | None = None, shift: float = 0.0) -> None:
    """Held-out success ``series`` (indexed by step) with each point's interval as an error bar (none
    where ``intervals`` lacks the step), drawn ``shift`` steps to the side (``dodge``)."""
    x = series.index.to_numpy(dtype=float) + shift
    if not has_intervals(series, intervals):
        ax.plot(x, series.to_numpy(), label=label, **style)
        return
    bounds = intervals.reindex(series.index)
    # a custom grader may disagree with the success rule, leaving the logged point outside its
    # interval: the bar then starts at the point instead of crossing it backwards
    below = (series - bounds["low"]).clip(lower=0).fillna(0).to_numpy()
    above = (bounds["high"] - series).clip(lower=0).fillna(0).to_numpy()
    ax.errorbar(x, series.to_numpy(), yerr=[below, above], capsize=2, elinewidth=1, label=label, **style)


def dodge(runs: int, eval_steps) -> list[float]:
    """x shifts, in steps, that set the error bars of ``runs`` runs side by side at one evaluation
    step: 5% of the smallest gap between evaluation steps apart, spread over at most 40% of it
    (0 for one run)."""
    if runs < 2:
        return [0.0] * runs
    ordered = sorted(set(eval_steps))
    gap = min((b - a for a, b in zip(ordered, ordered[1:])), default=1)
    span = min(0.4, 0.05 * (runs - 1)) * gap
    return [span * (i / (runs - 1) - 0.5) for i in range(runs)]


def step_axis(ax) -> None:
    """Steps are whole numbers: no tick at step 0.5."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(fig, axes) -> None:
    """One legend for the figure, right of every panel (lines of the same label appear once)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8, frameon=False)


def _wrapped(text: str, width_inches: float, fontsize: float) -> str:
    # ~0.6 em per character of the default sans-serif font; names are never broken inside
    chars = max(20, int(width_inches * 72 / (fontsize * 0.6)))
    return textwrap.fill(text, chars, break_long_words=False, break_on_hyphens=False)


def finish(fig, title: str, caption: str = "") -> None:
    """Title (wrapped to the figure's width) on top, the caption under the panels."""
    width = fig.get_figwidth()
    fig.suptitle(_wrapped(title, width, 11), fontsize=11)
    if caption:
        # supxlabel: the one figure-level text under the panels that constrained layout makes room for
        fig.supxlabel(_wrapped(caption, width, 8), fontsize=8, color="#555555")


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG (atomically, the directory created; a path that cannot be
    written is one ``ConfigError`` line: ``harness.output_file``) and close it."""
    import matplotlib.pyplot as plt

    from harness.output_file import write_output

    try:
        return write_output(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    finally:
        plt.close(fig)
