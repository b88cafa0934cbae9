"""Every table of the results database, in one place (SQLAlchemy 2.x declarative models).

``runs`` (one row per eval or train run), ``run_owners`` (the live process playing a run),
``episodes`` (one per task x trial, unique on (run, task, trial)), ``train_steps`` (one per
optimizer step, unique on (run, step)), ``checkpoints``, ``guidance`` (SGCD credit
references, unique on (digest, summarizer, prompt version)) and ``token_credit`` (the per-token
credit ``harness train --log-credit-every`` records, one row per sibling, unique on (run, step,
group, trial)). ``harness_meta`` holds one row: the
schema version the file was written with (``harness.store.version``). ``Store()`` creates them
all. No model class is used outside ``harness.store``: other modules go through its accessors and
get plain records back.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "HarnessMeta", "Run", "RunOwner", "Episode", "TrainStep", "CheckpointRow", "GuidanceRow",
           "TokenCreditRow", "EPISODE_COLUMNS"]

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "cost", "llm_calls", "llm_seconds")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """A UTC time stamp, read back the same from every database: without an offset. (SQLite
    drops the offset on its own; PostgreSQL's ``timestamptz`` would hand back an aware value, and
    exports and tables would differ between the two.)"""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value


class Base(DeclarativeBase):
    pass


class HarnessMeta(Base):
    """One row (id 1): which schema version the database holds, and which harness wrote it last."""

    __tablename__ = "harness_meta"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    schema_version: Mapped[int]
    written_by: Mapped[str | None] = mapped_column(String(100))


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    env: Mapped[str] = mapped_column(String(100))
    data_version: Mapped[str | None] = mapped_column(String(50))
    split: Mapped[str | None] = mapped_column(String(50))
    agent: Mapped[str | None] = mapped_column(String(200))
    agent_model: Mapped[str | None] = mapped_column(String(200))
    user: Mapped[str | None] = mapped_column(String(200))
    user_model: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    code_version: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="running")
    status_reason: Mapped[str | None] = mapped_column(Text)
    """Why a run is ``failed`` or ``interrupted`` (one line), else empty."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class RunOwner(Base):
    """The process playing a run right now (at most one per run; see ``harness.store.owners``)."""

    __tablename__ = "run_owners"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    token: Mapped[str] = mapped_column(String(64))
    """Random per claim: a heartbeat only refreshes the claim it made."""
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class Episode(Base):
    __tablename__ = "episodes"
    __table_args__ = (UniqueConstraint("run_id", "task_id", "trial", name="uq_episode_run_task_trial"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[str] = mapped_column(String(200))
    trial: Mapped[int]
    seed: Mapped[int]
    group_id: Mapped[str | None] = mapped_column(String(200))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    termination: Mapped[str] = mapped_column(String(50))
    reward: Mapped[float]
    success: Mapped[bool]
    score_breakdown: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_class: Mapped[str] = mapped_column(String(16), default="none")
    error: Mapped[str | None] = mapped_column(Text)
    agent_prompt_tokens: Mapped[int] = mapped_column(default=0)
    agent_completion_tokens: Mapped[int] = mapped_column(default=0)
    agent_cost: Mapped[float] = mapped_column(default=0.0)
    agent_llm_calls: Mapped[int] = mapped_column(default=0)
    agent_llm_seconds: Mapped[float] = mapped_column(default=0.0)
    user_prompt_tokens: Mapped[int] = mapped_column(default=0)
    user_completion_tokens: Mapped[int] = mapped_column(default=0)
    user_cost: Mapped[float] = mapped_column(default=0.0)
    user_llm_calls: Mapped[int] = mapped_column(default=0)
    user_llm_seconds: Mapped[float] = mapped_column(default=0.0)
    wall_seconds: Mapped[float] = mapped_column(default=0.0)
    llm_seconds: Mapped[float] = mapped_column(default=0.0)
    """Agent + user LLM time."""
    env_seconds: Mapped[float] = mapped_column(default=0.0)
    llm_call_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=list)
    """One record per LLM call (role, model, tokens, cost, seconds, attempts, cached)."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class TrainStep(Base):
    __tablename__ = "train_steps"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_train_step_run_step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_checkpoint_run_step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int]
    path: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class GuidanceRow(Base):
    __tablename__ = "guidance"
    __table_args__ = (UniqueConstraint("digest", "model", "prompt_version", name="uq_guidance_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(200))
    prompt_version: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(200))
    run: Mapped[str | None] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16))
    """``ok`` or ``fallback``."""
    text: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, default="")
    cost_usd: Mapped[float] = mapped_column(default=0.0)
    latency_s: Mapped[float] = mapped_column(default=0.0)
    attempts: Mapped[int] = mapped_column(default=0)
    leaks: Mapped[int] = mapped_column(default=0)
    """Redaction literals found (and redacted) in the summarizer's reply."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


class TokenCreditRow(Base):
    """One sibling of a recorded training group: its episode and, per sampled token, the credit
    the update used. Per-token values are parallel JSON lists (one entry per sampled token), so a
    row is one read for the heatmap and no per-token rows bloat the file."""

    __tablename__ = "token_credit"
    __table_args__ = (UniqueConstraint("run_id", "step", "group_id", "trial", name="uq_token_credit_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int]
    group_id: Mapped[str] = mapped_column(String(200))
    task_id: Mapped[str] = mapped_column(String(200))
    trial: Mapped[int]
    reward: Mapped[float]
    success: Mapped[bool]
    trained: Mapped[bool]
    """The trajectory went into the loss (False: in its group's baseline only, e.g. nothing sampled)."""
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    tokens: Mapped[list[str]] = mapped_column(JSON)
    """Each sampled id decoded alone by the policy's tokenizer (no retokenization)."""
    turns: Mapped[list[int]] = mapped_column(JSON)
    """Per sampled token: the index of the agent turn it belongs to."""
    advantages: Mapped[list[float]] = mapped_column(JSON)
    """Per sampled token: the final advantage the update used (empty when not trained)."""
    values: Mapped[dict[str, list[float]]] = mapped_column(JSON, default=dict)
    """The method's own per-token values by name (``multiplier``; SGCD's ``salience`` ...)."""
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The group's credit-reference key in ``guidance`` (SGCD), or None."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=_now)


# Columns of episodes_df, in order: scalars only (no messages / breakdown JSON).
EPISODE_COLUMNS = [
    "task_id", "trial", "seed", "group_id", "termination", "reward", "success", "error_class", "error",
    *(f"{side}_{f}" for side in ("agent", "user") for f in _USAGE_FIELDS),
    "wall_seconds", "llm_seconds", "env_seconds", "created_at",
]
