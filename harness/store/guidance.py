"""The ``guidance`` table: SGCD credit references, cached by (group digest, summarizer, prompt version).

Why a table: a summarizer call costs money and time, and a resumed or repeated training step sees
the same sibling groups again. Keyed by ``digest`` (sha256 of the redacted rendered group, task id
and data version), ``model`` (the summarizer's name: a litellm model string or ``diff``) and
``prompt_version``, a stored row is served instead of a new call, so no group is ever paid for
twice. Paid fallbacks (the reply was malformed twice) are stored too, with ``status="fallback"``
and no text; infra failures (provider down) are not, so a later step tries again.

``run`` is the name of the run that made the row (nullable: the cache is shared across runs; a
hit in another run does not add a row). Rows are written once; a concurrent writer of the same key
loses quietly (the unique constraint keeps one row).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from harness.store.core import Store
from harness.store.schema import GuidanceRow, _now

__all__ = ["GUIDANCE_COLUMNS", "get_guidance", "put_guidance", "guidance_df"]

GUIDANCE_COLUMNS = ["id", "digest", "model", "prompt_version", "task_id", "run", "status", "text", "reason",
                    "cost_usd", "latency_s", "attempts", "created_at"]


def _as_dict(row: GuidanceRow) -> dict[str, Any]:
    return {c: getattr(row, c) for c in [*GUIDANCE_COLUMNS, "leaks"]}


def get_guidance(store: Store, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Stored rows for (digest, model, prompt_version) keys, as plain dicts by key."""
    if not keys:
        return {}
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    unique = sorted(set(keys))
    with Session(store.engine) as s:
        for start in range(0, len(unique), 300):  # stay under SQLite's bound-parameter limit
            chunk = unique[start:start + 300]
            rows = s.scalars(select(GuidanceRow).where(
                tuple_(GuidanceRow.digest, GuidanceRow.model, GuidanceRow.prompt_version).in_(chunk)))
            for row in rows:
                found[(row.digest, row.model, row.prompt_version)] = _as_dict(row)
    return found


def put_guidance(store: Store, *, digest: str, model: str, prompt_version: str, task_id: str, run: str | None,
                 status: str, text: str | None, reason: str = "", cost_usd: float = 0.0, latency_s: float = 0.0,
                 attempts: int = 0, leaks: int = 0) -> bool:
    """Insert one row; False when the key is already stored (the first row wins)."""
    if status not in ("ok", "fallback"):
        raise ValueError(f"guidance status must be ok or fallback, got {status!r}")
    try:
        with Session(store.engine) as s, s.begin():
            s.execute(insert(GuidanceRow).values(
                digest=digest, model=model, prompt_version=prompt_version, task_id=task_id, run=run,
                status=status, text=text, reason=reason, cost_usd=cost_usd, latency_s=latency_s,
                attempts=attempts, leaks=leaks, created_at=_now()))
        return True
    except IntegrityError:
        return False


def guidance_df(store: Store, run: str | None = None) -> pd.DataFrame:
    """Guidance rows (of one run, or all), oldest first, for inspection."""
    query = select(GuidanceRow).order_by(GuidanceRow.id)
    if run is not None:
        query = query.where(GuidanceRow.run == run)
    with Session(store.engine) as s:
        rows = [_as_dict(r) for r in s.scalars(query)]
    return pd.DataFrame(rows, columns=[*GUIDANCE_COLUMNS, "leaks"])
