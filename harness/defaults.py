"""Defaults that several commands and modules share, each written once."""

from __future__ import annotations

__all__ = ["DB_URL", "LLM_CACHE_PATH", "MAX_TOOL_CALLS", "RESULTS_DIR"]

RESULTS_DIR = "results"
"""Where databases, runs, plots and caches go unless told otherwise (relative to the working directory)."""
DB_URL = f"sqlite:///{RESULTS_DIR}/harness.db"
"""The results database every command reads and writes by default (``--db`` changes it)."""
LLM_CACHE_PATH = f"{RESULTS_DIR}/llm_cache.db"
"""The SQLite response cache of ``harness eval --cache``."""
MAX_TOOL_CALLS = 64
"""Tool calls run per assistant message (``harness eval --max-tool-calls``; training uses it too).
Real agents make a handful at once; a model that loops emitting thousands must not stall the run."""
