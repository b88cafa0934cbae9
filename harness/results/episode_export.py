"""Export one run's episodes as CSV, JSONL or Parquet, for analysis outside the harness.

    harness results export RUN --format csv|jsonl|parquet --out PATH

Decisions:

- Every stored episode is exported, infra failures included: ``error_class`` says which ones the
  scores exclude, so the file can be filtered the same way ``results show`` does.
- ``csv`` and ``parquet``: one row per episode with exactly the ``Store.episodes_df`` columns
  (scalars). ``created_at`` is the store's UTC time (the store hands it back without an offset).
- ``jsonl``: one JSON object per episode and line, the same columns plus ``messages`` (OpenAI
  format, as stored), ``score_breakdown`` and, where the store keeps it, ``llm_call_log`` (per-call
  model, tokens, cost, seconds). Rows are read in batches of ``_BATCH`` episodes, so a
  large run never sits in memory at once.
- Order is the store's: task id (natural: 2 before 10), then trial. JSONL reads ids first, then
  the full rows in batches.
- Only what the store has is written: no run config, so nothing like an API key can leak.
- Parquet needs pyarrow or fastparquet, which are not dependencies; without either a ``ConfigError``
  says what to install. The file is written by ``harness.output_file.write_output``: atomically onto
  a new path or a regular file, through a FIFO or device, ``-`` to standard output, never over a
  directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.output_file import write_output
from harness.store import Store
from harness.store.records import iter_full_episodes

__all__ = ["EPISODE_FORMATS", "export_episodes"]

EPISODE_FORMATS = ("csv", "jsonl", "parquet")
_BATCH = 200


def _parquet_engine_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_jsonl(store: Store, run: str, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in iter_full_episodes(store, run, batch=_BATCH):
            fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}, ensure_ascii=False, default=str) + "\n")


def export_episodes(store: Store, run: str, out_path: str | Path, fmt: str) -> Path:
    """Write run ``run``'s episodes to ``out_path`` as ``fmt`` (csv | jsonl | parquet); returns the
    path. Unknown run or format, or parquet without pyarrow/fastparquet, raise ``ConfigError``."""
    if fmt not in EPISODE_FORMATS:
        raise ConfigError(f"unknown episode export format {fmt!r}; supported: {', '.join(EPISODE_FORMATS)}")
    if fmt == "parquet" and not _parquet_engine_available():
        raise ConfigError("parquet export needs pyarrow: pip install pyarrow")
    record = store.get_run(run)
    df = store.episodes_df(record.name)

    def write(path: Path) -> None:
        if fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "parquet":
            df.to_parquet(path, index=False)
        else:
            _write_jsonl(store, record.name, path)

    return write_output(out_path, write)
