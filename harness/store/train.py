"""Training tables beside ``runs`` and ``episodes``: ``train_steps`` and ``checkpoints``.

A training run is a ``runs`` row of kind ``train``. Each optimizer step logs one ``train_steps``
row (metrics as JSON, conventional names such as ``reward/mean`` and ``loss/policy``), unique on
(run, step): a resumed run that replays a step after its last checkpoint replaces that row instead
of adding a second one. ``checkpoints`` records where each checkpoint directory was written.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from harness.store.core import Store
from harness.store.schema import CheckpointRow, TrainStep, _now

__all__ = ["log_train_step", "train_steps", "add_checkpoint", "checkpoints"]


def log_train_step(store: Store, run: str | int, step: int, metrics: dict[str, Any]) -> None:
    run_id = store.get_run(run).id
    clean = {k: (None if v != v else v) for k, v in metrics.items()}  # NaN is not JSON
    with Session(store.engine) as s, s.begin():
        s.execute(delete(TrainStep).where(TrainStep.run_id == run_id, TrainStep.step == step))
        s.execute(insert(TrainStep).values(run_id=run_id, step=step, metrics=clean, created_at=_now()))


def train_steps(store: Store, run: str | int) -> pd.DataFrame:
    """One row per step, one column per metric, ordered by step."""
    run_id = store.get_run(run).id
    with Session(store.engine) as s:
        rows = s.execute(select(TrainStep.step, TrainStep.metrics).where(TrainStep.run_id == run_id)
                         .order_by(TrainStep.step)).all()
    frame = pd.DataFrame([{"step": step, **metrics} for step, metrics in rows])
    return frame if not frame.empty else pd.DataFrame(columns=["step"])


def add_checkpoint(store: Store, run: str | int, step: int, path: str) -> None:
    run_id = store.get_run(run).id
    with Session(store.engine) as s, s.begin():
        s.execute(delete(CheckpointRow).where(CheckpointRow.run_id == run_id, CheckpointRow.step == step))
        s.execute(insert(CheckpointRow).values(run_id=run_id, step=step, path=path, created_at=_now()))


def checkpoints(store: Store, run: str | int) -> list[tuple[int, str]]:
    run_id = store.get_run(run).id
    with Session(store.engine) as s:
        return [tuple(r) for r in s.execute(select(CheckpointRow.step, CheckpointRow.path)
                                             .where(CheckpointRow.run_id == run_id).order_by(CheckpointRow.step))]
