"""Read and rewrite access to stored episodes beyond ``Store``'s own methods: what re-grading,
full-record exports and env metrics need, as plain values (no model class leaves the store)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pandas as pd
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from harness.errors import HarnessError
from harness.store.core import Store
from harness.store.schema import EPISODE_COLUMNS, Episode
from harness.types import Score, task_order_key

__all__ = ["GradedRow", "graded_rows", "rewrite_scores", "episode_breakdowns", "iter_full_episodes",
           "FULL_RECORD_COLUMNS"]

FULL_RECORD_COLUMNS = (*EPISODE_COLUMNS, "messages", "score_breakdown", "llm_call_log")
"""The scalar columns of ``Store.episodes_df`` plus the JSON ones (messages, grader breakdown,
per-call log)."""


@dataclass(frozen=True)
class GradedRow:
    """What re-grading reads of one episode, and the verdict stored now."""

    id: int
    task_id: str
    trial: int
    messages: list[dict[str, Any]]
    termination: str
    reward: float
    success: bool
    score_breakdown: dict[str, Any]
    error_class: str


def graded_rows(store: Store, run: str | int) -> list[GradedRow]:
    """Every episode of ``run``, in insertion order."""
    run_id = store.run_id(run)
    cols = (Episode.id, Episode.task_id, Episode.trial, Episode.messages, Episode.termination, Episode.reward,
            Episode.success, Episode.score_breakdown, Episode.error_class)
    with Session(store.engine) as s:
        rows = s.execute(select(*cols).where(Episode.run_id == run_id).order_by(Episode.id)).all()
    return [GradedRow(*row) for row in rows]


def rewrite_scores(store: Store, run: str, writes: list[tuple[GradedRow, Score]]) -> None:
    """Store new verdicts in ONE transaction (all rows or none). Each write is conditioned on the
    row still holding the reward/success that was read; if another process changed one meanwhile,
    nothing is written and a ``HarnessError`` says so."""
    with store.engine.begin() as conn:
        for row, score in writes:
            result = conn.execute(
                update(Episode)
                .where(Episode.id == row.id, Episode.reward == row.reward, Episode.success == row.success)
                .values(reward=float(score.reward), success=bool(score.success), score_breakdown=score.breakdown or {}))
            if result.rowcount != 1:
                raise HarnessError(f"run {run!r}: task {row.task_id} trial {row.trial} changed while rescoring; "
                                   "nothing was written, run rescore again")


def episode_breakdowns(store: Store, run: str | int) -> pd.DataFrame:
    """``task_id``, ``trial``, ``reward``, ``error_class`` and the grader's ``score_breakdown`` of
    every episode (env metrics read their own fields from the breakdown)."""
    run_id = store.run_id(run)
    with Session(store.engine) as s:
        rows = s.execute(select(Episode.task_id, Episode.trial, Episode.reward, Episode.error_class,
                                Episode.score_breakdown).where(Episode.run_id == run_id)).all()
    return pd.DataFrame([tuple(r) for r in rows],
                        columns=["task_id", "trial", "reward", "error_class", "score_breakdown"])


def iter_full_episodes(store: Store, run: str | int, batch: int = 200) -> Iterator[dict[str, Any]]:
    """Every episode of ``run`` as a dict of ``FULL_RECORD_COLUMNS``, in task order (natural: 2
    before 10) then trial, read ``batch`` rows at a time so a large run never sits in memory."""
    run_id = store.run_id(run)
    cols = [getattr(Episode, c) for c in FULL_RECORD_COLUMNS]
    with Session(store.engine) as s:
        keys = s.execute(select(Episode.id, Episode.task_id, Episode.trial).where(Episode.run_id == run_id)).all()
        ids = [k.id for k in sorted(keys, key=lambda k: (task_order_key(k.task_id), k.trial))]
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            rows = {r[0]: r[1:] for r in s.execute(select(Episode.id, *cols).where(Episode.id.in_(chunk)))}
            for episode_id in chunk:
                yield dict(zip(FULL_RECORD_COLUMNS, rows[episode_id]))
