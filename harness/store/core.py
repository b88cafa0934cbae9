"""The ``Store``: runs and episodes (SQLAlchemy 2.x; SQLite by default, any SQLAlchemy URL works).

Why: every score must be traceable and a killed run must lose at most the episodes in flight, so
finished episodes are committed within milliseconds, and ``(run, task, trial)`` is unique in the
schema.

Decisions:

- Group commit (``EpisodeWriter``, used by ``harness eval``): the episodes that finish within a few
  milliseconds of each other (at high concurrency with similar latencies they finish in bursts) are
  inserted in one transaction with one prepared statement. Per-episode transactions cost about
  2 ms of CPU each (SQLAlchemy building the statement, commit), a visible share of the runner's
  budget. A killed run loses only the episodes in flight plus the group not yet committed (at most
  a few ms of finished work); a group is one transaction, so it is stored entirely or not at all,
  and the unique key still rules out duplicates. ``add_episode`` (one episode, one transaction)
  stays for callers outside the runner.
- SQLite gets WAL journal mode (synchronous=NORMAL), a 30 s ``busy_timeout`` and ``foreign_keys=ON`` on every
  connection, so several processes (eval workers, a dashboard) can read while one writes
  (``harness.store.engine``, which also turns every storage failure into one-line ``StorageError``).

- Duplicate ``(run, task, trial)`` in ``add_episode(s)``: if the stored row is an ``infra`` failure it
  is replaced in place (resume retries infra errors); otherwise ``DuplicateEpisodeError`` is raised.
  There is never a second row (the unique constraint backs this up under concurrency).
- Records handed out (``RunRecord``, ``EpisodeResult``, DataFrames) are plain snapshots; no session
  or lazy-loading object leaks out of this module.
- ``code_version`` = ``harness.__version__`` (or the installed package version) plus the git short
  sha (``+dirty`` if tracked files changed) when git is available; never fails without git.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from harness.defaults import DB_URL
from harness.errors import ConfigError, HarnessError
from harness.redact import redact, redact_data
from harness.store.engine import open_engine, safe_url, use_wal
from harness.store.schema import _USAGE_FIELDS, EPISODE_COLUMNS, Episode, Run, RunOwner, _now
from harness.store.version import prepare_schema
from harness.types import EpisodeResult, ErrorClass, Group, Score, Termination, Usage, task_order_key

__all__ = ["DEFAULT_URL", "Store", "RunRecord", "DuplicateEpisodeError", "code_version", "RUN_STATUSES",
           "RUN_NAME_MAX", "check_run_name"]

DEFAULT_URL = DB_URL
RUN_KINDS = ("eval", "train")
RUN_STATUSES = ("running", "finished", "failed", "interrupted")


RUN_NAME_MAX = Run.__table__.c.name.type.length
"""Longest run name the ``runs`` table holds (PostgreSQL enforces it; SQLite would not)."""


def check_run_name(name: str, room: int = 0) -> None:
    """Refuse a run name that does not fit (``room``: characters a derived name adds to it)."""
    if not name or len(name) + room > RUN_NAME_MAX:
        what = "is empty" if not name else f"has {len(name)} characters"
        raise ConfigError(f"run name {what}; use 1 to {RUN_NAME_MAX - room} characters")


def eval_point_name(train_run: str, step: int) -> str:
    """The eval run that holds train run ``train_run``'s held-out evaluation at ``step``. The one
    spelling of it: the trainer names its evaluation points with it, and every reader finds them
    with it (results tables, the viewer, plots)."""
    return f"{train_run}/eval-step-{step:06d}"


class DuplicateEpisodeError(HarnessError):
    """An episode for this (run, task, trial) is already stored and is not an infra failure."""


# Built once: executed with rows as parameters (see Store.add_episodes).
_INSERT_EPISODE = insert(Episode)


@dataclass(frozen=True)
class RunRecord:
    """Snapshot of one ``runs`` row."""

    id: int
    name: str
    kind: str
    env: str
    data_version: str | None
    split: str | None
    agent: str | None
    agent_model: str | None
    user: str | None
    user_model: str | None
    config: dict[str, Any]
    code_version: str | None
    status: str
    status_reason: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def _from_row(cls, row: Run) -> "RunRecord":
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@functools.cache
def code_version() -> str:
    """``<harness.__version__>[+g<sha>[.dirty]]``; the git part only where a git checkout is found."""
    from harness import __version__ as version

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return version
    return f"{version}+g{sha}" + (".dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


class Store:
    """Runs and episodes in one database. ``Store()`` opens ``results/harness.db`` under the CWD."""

    def __init__(self, url: str = DEFAULT_URL, read_only: bool = False) -> None:
        """Open (or create) the database at ``url``: checked, migrated and stamped before anything
        else (``harness.store.version``); a database that cannot serve raises ``StorageError``.
        ``read_only``: never write, not even to create, migrate or switch the journal (``harness view``)."""
        self.url = safe_url(url)
        """The URL with any password hidden: for messages."""
        self.engine, self.read_only = open_engine(url, read_only=read_only)
        self._run_ids: dict[str | int, int] = {}
        try:
            prepare_schema(self.engine, self.url, self.read_only)
            if not self.read_only:
                use_wal(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def create_run(self, name: str, kind: str, env: str, data_version: str | None, split: str | None,
                   agent: str | None, agent_model: str | None, user: str | None, user_model: str | None,
                   config: dict[str, Any]) -> RunRecord:
        """Insert a new run with status ``running``; a name already in use raises ``ConfigError``."""
        if kind not in RUN_KINDS:
            raise ConfigError(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        check_run_name(name)
        row = Run(name=name, kind=kind, env=env, data_version=data_version, split=split, agent=agent,
                  agent_model=agent_model, user=user, user_model=user_model, config=redact_data(dict(config)),
                  code_version=code_version(), status="running", created_at=_now())
        try:
            with Session(self.engine) as s, s.begin():
                s.add(row)
                s.flush()
                return RunRecord._from_row(row)
        except IntegrityError:
            raise ConfigError(f"run {name!r} already exists in {self.url}; pick another --run name") from None

    def _run_row(self, s: Session, name_or_id: str | int) -> Run:
        if isinstance(name_or_id, int):
            row = s.get(Run, name_or_id)
        else:
            row = s.scalars(select(Run).where(Run.name == name_or_id)).one_or_none()
        if row is None:
            known = s.scalars(select(Run.name).order_by(Run.id.desc()).limit(10)).all()
            hint = f"known runs (newest first): {', '.join(known)}" if known else "the store has no runs yet"
            raise ConfigError(f"unknown run {name_or_id!r} in {self.url}; {hint}")
        return row

    def get_run(self, name: str | int) -> RunRecord:
        """The run called ``name`` (or with that integer id); unknown raises ``ConfigError``."""
        with Session(self.engine) as s:
            return RunRecord._from_row(self._run_row(s, name))

    def run_names(self, prefix: str = "") -> list[str]:
        """The names of the runs whose name starts with ``prefix`` (all runs without one), oldest first;
        only names are read, so it stays cheap on a store of many runs."""
        with Session(self.engine) as s:
            query = select(Run.name).order_by(Run.id)
            if prefix:
                query = query.where(Run.name.startswith(prefix, autoescape=True))
            return list(s.scalars(query))

    def list_runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        with Session(self.engine) as s:
            return [RunRecord._from_row(r) for r in s.scalars(select(Run).order_by(Run.id))]

    def set_run_status(self, name: str | int, status: str, reason: str | None = None) -> None:
        """Set the status and its one-line ``reason`` (kept for ``failed`` and ``interrupted``;
        cleared otherwise); any status other than ``running`` stamps ``finished_at``."""
        if status not in RUN_STATUSES:
            raise ConfigError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        with Session(self.engine) as s, s.begin():
            row = self._run_row(s, name)
            row.status = status
            row.status_reason = redact(reason)
            row.finished_at = None if status == "running" else _now()

    def add_episode(self, run_name_or_id: str | int, result: EpisodeResult) -> None:
        """Store one episode in its own transaction (replaces a stored infra failure, else raises
        ``DuplicateEpisodeError`` on an existing (run, task, trial))."""
        outcome = self.add_episodes(run_name_or_id, [result])[0]
        if outcome is not None:
            raise outcome

    def add_episodes(self, run_name_or_id: str | int,
                     results: list[EpisodeResult]) -> list[DuplicateEpisodeError | None]:
        """Store episodes in one transaction (group commit); per episode, ``None`` when stored or the
        ``DuplicateEpisodeError`` it met (nothing raised for those, so one duplicate neither blocks
        nor loses the others). A stored infra failure on the same key is replaced.

        The common case is one executemany of a statement built once: the rows travel as
        parameters, so SQLAlchemy neither rebuilds nor re-keys the statement per episode."""
        if not results:
            return []
        run_id = self.run_id(run_name_or_id)
        rows = [{"run_id": run_id, **_episode_values(r)} for r in results]
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_EPISODE, rows)
            return [None] * len(rows)
        except IntegrityError:
            pass  # some key is stored already (a resumed run retrying infra failures): settle row by row
        # Still one transaction, so the group stays all-or-nothing (a writer retrying it after a
        # lock never meets its own rows). A key that another process stores between our look-up and
        # our insert fails the transaction; looking again settles it.
        races = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    return [self._insert_or_replace(conn, run_name_or_id, row) for row in rows]
            except IntegrityError:
                races += 1
                if races == 5:
                    raise

    @staticmethod
    def _insert_or_replace(conn: Connection, run_name_or_id: str | int,
                           row: dict[str, Any]) -> DuplicateEpisodeError | None:
        key = (Episode.run_id == row["run_id"], Episode.task_id == row["task_id"], Episode.trial == row["trial"])
        existing = conn.execute(select(Episode.error_class).where(*key)).scalar_one_or_none()
        if existing is None:
            conn.execute(_INSERT_EPISODE, [row])
            return None
        if existing == ErrorClass.INFRA.value:
            values = {k: v for k, v in row.items() if k != "run_id"}
            conn.execute(update(Episode).where(*key, Episode.error_class == existing).values(**values))
            return None
        return DuplicateEpisodeError(
            f"run {run_name_or_id!r} already has task {row['task_id']!r} trial {row['trial']} "
            f"(error_class {existing!r}); only infra failures are replaced")

    def run_id(self, name_or_id: str | int) -> int:
        """The integer id of a run (cached: run ids never change); unknown raises ``ConfigError``."""
        # Run ids never change, so resolving a name once per Store is safe and saves a query per episode.
        cached = self._run_ids.get(name_or_id)
        if cached is None:
            with Session(self.engine) as s:
                cached = self._run_row(s, name_or_id).id
            self._run_ids[name_or_id] = cached
        return cached

    def episodes_df(self, run_name: str | int) -> pd.DataFrame:
        """One row per episode (scalar columns of ``EPISODE_COLUMNS``), ordered by task id and trial."""
        with Session(self.engine) as s:
            run = self._run_row(s, run_name)
            cols = [getattr(Episode, c) for c in EPISODE_COLUMNS]
            rows = s.execute(select(*cols).where(Episode.run_id == run.id)).all()
        df = pd.DataFrame([tuple(r) for r in rows], columns=EPISODE_COLUMNS)
        if len(df):
            df = df.sort_values(["task_id", "trial"], key=_natural_sort_key, kind="stable").reset_index(drop=True)
        return df

    def get_episode(self, run_name: str | int, task_id: str, trial: int) -> EpisodeResult:
        """The full stored episode (with messages); unknown raises ``ConfigError``."""
        with Session(self.engine) as s:
            run = self._run_row(s, run_name)
            row = s.scalars(select(Episode).where(Episode.run_id == run.id, Episode.task_id == str(task_id),
                                                  Episode.trial == trial)).one_or_none()
            if row is None:
                raise ConfigError(f"run {run.name!r} has no episode for task {task_id!r} trial {trial}")
            return _episode_result(row)

    def episode_counts(self) -> dict[str, int]:
        """Number of stored episodes per run name (runs without episodes are absent)."""
        with Session(self.engine) as s:
            rows = s.execute(select(Run.name, func.count(Episode.id)).join(Episode).group_by(Run.name)).all()
        return {name: n for name, n in rows}

    def delete_run(self, name: str | int) -> None:
        """Remove a run and all its episodes (``harness eval --force-new``)."""
        with Session(self.engine) as s, s.begin():
            run = self._run_row(s, name)
            s.execute(delete(Episode).where(Episode.run_id == run.id))
            s.execute(delete(RunOwner).where(RunOwner.run_id == run.id))
            s.delete(run)
        self._run_ids.clear()

    def groups(self, run_name: str | int, task_id: str | None = None) -> list[Group]:
        """The run's sibling groups (episodes sharing a ``group_id``; of one task, or all), in task order."""
        with Session(self.engine) as s:
            run = self._run_row(s, run_name)
            query = select(Episode).where(Episode.run_id == run.id, Episode.group_id.is_not(None))
            if task_id is not None:  # one task's episodes only: a viewer page reads one group of a large run
                query = query.where(Episode.task_id == str(task_id))
            rows = s.scalars(query.order_by(Episode.group_id, Episode.trial)).all()
            episodes = [_episode_result(r) for r in rows]
        by_group: dict[str, list[EpisodeResult]] = {}
        for e in episodes:
            by_group.setdefault(e.group_id, []).append(e)
        out = [Group(task_id=eps[0].task_id, group_id=gid, episodes=eps) for gid, eps in by_group.items()]
        return sorted(out, key=lambda g: (task_order_key(g.task_id), g.group_id))

    def completed_keys(self, run_name: str | int) -> set[tuple[str, int]]:
        """(task_id, trial) of stored episodes that need no retry (i.e. not infra failures)."""
        with Session(self.engine) as s:
            run = self._run_row(s, run_name)
            rows = s.execute(select(Episode.task_id, Episode.trial).where(
                Episode.run_id == run.id, Episode.error_class != ErrorClass.INFRA.value)).all()
        return {(t, n) for t, n in rows}


def _natural_sort_key(col: pd.Series) -> pd.Series:
    """Sort ``"2"`` before ``"10"`` for numeric task ids; other strings sort as text after them."""
    if col.name != "task_id":
        return col
    return col.map(task_order_key)


def _episode_values(r: EpisodeResult) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        task_id=str(r.task_id), trial=int(r.trial), seed=int(r.seed), group_id=r.group_id,
        messages=r.messages, termination=Termination(r.termination).value, reward=float(r.score.reward),
        success=bool(r.score.success), score_breakdown=r.score.breakdown or {},
        error_class=ErrorClass(r.error_class).value, error=redact(r.error), wall_seconds=float(r.wall_seconds),
        env_seconds=float(r.env_seconds), created_at=_now(), llm_call_log=list(r.llm_calls or []),
        llm_seconds=float(r.agent_usage.llm_seconds + r.user_usage.llm_seconds))
    for side, usage in (("agent", r.agent_usage), ("user", r.user_usage)):
        u = asdict(usage)
        u["llm_calls"] = u.pop("calls")
        values.update({f"{side}_{k}": u[k] for k in _USAGE_FIELDS})
    return values


def _episode_result(row: Episode) -> EpisodeResult:
    def usage(side: str) -> Usage:
        return Usage(**{"calls" if f == "llm_calls" else f: getattr(row, f"{side}_{f}") for f in _USAGE_FIELDS})

    return EpisodeResult(
        task_id=row.task_id, trial=row.trial, seed=row.seed, messages=row.messages,
        termination=Termination(row.termination),
        score=Score(reward=row.reward, success=row.success, breakdown=row.score_breakdown or {}),
        error_class=ErrorClass(row.error_class), error=row.error, agent_usage=usage("agent"),
        user_usage=usage("user"), wall_seconds=row.wall_seconds, env_seconds=row.env_seconds,
        group_id=row.group_id, llm_calls=list(row.llm_call_log or []))
