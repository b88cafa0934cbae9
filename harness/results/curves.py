"""``harness results curves RUN``: learning curves of a training run, as a PNG and a table.

The table has one row per logged step and the headline metrics as columns (missing ones are left
out); the PNG has one panel per metric. matplotlib draws off-screen (Agg), so it works on a
headless cluster node.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.errors import ConfigError
from harness.store import Store
from harness.store import train_steps

__all__ = ["DEFAULT_METRICS", "curves_frame", "plot_curves", "save_figure"]

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


def plot_curves(frame: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(frame.columns)
    cols = min(3, len(columns))
    rows = -(-len(columns) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, columns):
        series = frame[name].dropna()
        ax.plot(series.index, series.values, marker="o" if len(series) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    return save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str) -> Path:
    """Title, lay out, write and close a matplotlib figure (as PNG, atomically, the directory
    created; a path that cannot be written is one ``ConfigError`` line: ``harness.output_file``)."""
    import matplotlib.pyplot as plt

    from harness.output_file import write_output

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return write_output(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    finally:
        plt.close(fig)
