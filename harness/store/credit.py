"""The ``token_credit`` table: per-token credit of a few training groups (``harness train
--log-credit-every``), one row per sibling, for the viewer's heatmap and sibling pages.

Rows are written once per (run, step): a resumed run that replays a step replaces that step's
rows, as ``train_steps`` does. A read-only database made before the table existed has none
(``harness.store.version.ADDED_TABLES``): the readers then return nothing instead of failing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, inspect, select
from sqlalchemy.orm import Session

from harness.store.core import Store
from harness.store.schema import TokenCreditRow, _now

__all__ = ["CREDIT_FIELDS", "put_token_credit", "token_credit_rows", "credit_steps"]

CREDIT_FIELDS = ("group_id", "task_id", "trial", "reward", "success", "trained", "messages", "token_ids", "tokens",
                 "turns", "advantages", "values", "reference")
"""What a caller gives per sibling (and gets back, with ``step``)."""


def _has_table(store: Store) -> bool:
    return inspect(store.engine).has_table(TokenCreditRow.__tablename__)


def put_token_credit(store: Store, run: str | int, step: int, rows: list[dict[str, Any]]) -> None:
    """Store one step's recorded siblings (replacing any rows of that step), in one transaction."""
    run_id = store.run_id(run)
    values = [{"run_id": run_id, "step": step, "created_at": _now(), **{k: row[k] for k in CREDIT_FIELDS}}
              for row in rows]
    with Session(store.engine) as s, s.begin():
        s.execute(delete(TokenCreditRow).where(TokenCreditRow.run_id == run_id, TokenCreditRow.step == step))
        if values:
            s.execute(insert(TokenCreditRow), values)


def token_credit_rows(store: Store, run: str | int, step: int, group_id: str | None = None) -> list[dict[str, Any]]:
    """The recorded siblings of ``run`` at ``step`` (of one group, or all), by group then trial."""
    run_id = store.run_id(run)
    if not _has_table(store):
        return []
    query = select(TokenCreditRow).where(TokenCreditRow.run_id == run_id, TokenCreditRow.step == step)
    if group_id is not None:
        query = query.where(TokenCreditRow.group_id == group_id)
    with Session(store.engine) as s:
        found = s.scalars(query.order_by(TokenCreditRow.id)).all()
        return [{"step": r.step, **{k: getattr(r, k) for k in CREDIT_FIELDS}} for r in found]


def credit_steps(store: Store, run: str | int) -> list[int]:
    """The steps of ``run`` with recorded credit, in order."""
    run_id = store.run_id(run)
    if not _has_table(store):
        return []
    with Session(store.engine) as s:
        return list(s.scalars(select(TokenCreditRow.step).where(TokenCreditRow.run_id == run_id).distinct()
                              .order_by(TokenCreditRow.step)))
