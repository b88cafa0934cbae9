"""Results: what the store's runs and episodes say, as tables, statistics, curves and exports.

- ``metrics``: run metrics registered by name (``@run_metric``), each declaring its display
  format; ``summarize`` computes them all. Env-specific rows come from ``EnvFactory.run_metrics``.
- ``stats``: the success rule's vectorised form, per-trial pass^1, bootstrap and paired statistics.
- ``tables``: runs / show / compare tables and ``render`` (table, csv, markdown, json).
- ``curves`` and ``train_compare``: learning curves and train-run comparisons.
- ``episode_export``: one run's episodes as csv / jsonl / parquet.
"""

from harness.results.metrics import pass_hat_k, run_metric, summarize
from harness.results.stats import SUCCESS_TOL, group_labels
from harness.results.tables import (
    FORMATS,
    check_decodings,
    compare_table,
    render,
    render_show,
    runs_table,
    show_table,
)

__all__ = ["SUCCESS_TOL", "FORMATS", "pass_hat_k", "summarize", "run_metric", "runs_table", "show_table",
           "compare_table", "check_decodings", "render", "render_show", "group_labels"]
