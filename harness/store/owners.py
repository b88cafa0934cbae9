"""Live owners of runs: one process plays a run at a time.

Why: two processes playing the same run pay every call twice, and the one that ends last sets the
run's status over the other's (a complete run marked ``failed``). So ``harness eval`` and
``harness train`` claim the run before they change it, and the claim names the owner: host, pid,
and a heartbeat refreshed by a background thread while the run is played.

A claim is refused (``RunBusyError``, one line) while the owner is alive:

- on this host, while its pid is alive and its heartbeat is fresh. A dead pid (``kill -9``, a
  crash) is taken over at once, so resuming right after a crash works; a fresh heartbeat with a
  live pid is a real second process.
- on another host (a shared PostgreSQL database), while its heartbeat is fresh. Liveness cannot
  be probed there, so a claim whose heartbeat is older than ``STALE_AFTER`` seconds is taken over.

A process re-claiming its own run (same host and pid) takes it over: an earlier claim in the same
process has ended. Taking over is a compare-and-swap on the claim's random token, so of two
processes racing for a stale claim exactly one wins.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from harness.errors import ConfigError
from harness.store.core import Store
from harness.store.schema import RunOwner, _now

__all__ = ["RunBusyError", "RunLease", "claim_run", "run_owner", "HEARTBEAT_EVERY", "STALE_AFTER"]

HEARTBEAT_EVERY = 10.0
"""Seconds between heartbeats."""
STALE_AFTER = 90.0
"""A claim whose heartbeat is older than this is taken over (several missed heartbeats: a busy
database may delay one by its 30 s busy timeout)."""


class RunBusyError(ConfigError):
    """The run is being played by another live process."""


@dataclass
class _Owner:
    host: str
    pid: int
    token: str
    heartbeat_at: datetime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _age(at: datetime) -> float:
    if at.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        at = at.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - at).total_seconds()


def _alive(owner: _Owner, host: str, stale_after: float) -> bool:
    if _age(owner.heartbeat_at) > stale_after:
        return False
    if owner.host == host:
        return owner.pid != os.getpid() and _pid_alive(owner.pid)
    return True


class RunLease:
    """A claim on one run; ``release()`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, store: Store, run_id: int, token: str, every: float = HEARTBEAT_EVERY):
        self.store, self.run_id, self.token = store, run_id, token
        self.lost = False
        """Set when a heartbeat found the claim taken over by another process."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, args=(every,), daemon=True,
                                        name=f"harness-heartbeat-{run_id}")
        self._thread.start()

    def beat(self) -> bool:
        """Refresh the heartbeat; False when the claim is no longer ours."""
        with Session(self.store.engine) as s, s.begin():
            done = s.execute(update(RunOwner).where(RunOwner.run_id == self.run_id, RunOwner.token == self.token)
                             .values(heartbeat_at=_now()))
        if done.rowcount == 0:
            self.lost = True
        return not self.lost

    def _beat_until_stopped(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if not self.beat():
                    return
            except SQLAlchemyError:  # a locked or unreachable database: try again next time
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the claim (only ours: a takeover's claim stays)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_EVERY)
        try:
            with Session(self.store.engine) as s, s.begin():
                s.execute(delete(RunOwner).where(RunOwner.run_id == self.run_id, RunOwner.token == self.token))
        except SQLAlchemyError:  # the claim goes stale and is taken over later
            pass

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def claim_run(store: Store, run: str | int, stale_after: float = STALE_AFTER,
              every: float = HEARTBEAT_EVERY) -> RunLease:
    """Claim ``run`` for this process, or raise ``RunBusyError`` naming its live owner."""
    record = store.get_run(run)
    host, pid, token = socket.gethostname(), os.getpid(), secrets.token_hex(16)
    for _ in range(5):  # each pass either wins, refuses, or saw the claim change under it
        with Session(store.engine) as s:
            row = s.get(RunOwner, record.id)
            owner = None if row is None else _Owner(row.host, row.pid, row.token, row.heartbeat_at)
        if owner is None:
            try:
                with Session(store.engine) as s, s.begin():
                    s.add(RunOwner(run_id=record.id, host=host, pid=pid, token=token, started_at=_now(),
                                   heartbeat_at=_now()))
                return RunLease(store, record.id, token, every)
            except IntegrityError:  # another process claimed it first: look again
                continue
        if _alive(owner, host, stale_after):
            where = "this host" if owner.host == host else f"host {owner.host}"
            raise RunBusyError(
                f"run '{record.name}' is being played by pid {owner.pid} on {where} (heartbeat "
                f"{_age(owner.heartbeat_at):.0f} s ago); wait for it to end or stop it, or pick another --run "
                f"(a crashed owner is taken over at once on its host, after {stale_after:.0f} s elsewhere)")
        with Session(store.engine) as s, s.begin():
            took = s.execute(update(RunOwner).where(RunOwner.run_id == record.id, RunOwner.token == owner.token)
                             .values(host=host, pid=pid, token=token, started_at=_now(), heartbeat_at=_now()))
        if took.rowcount == 1:
            return RunLease(store, record.id, token, every)
    raise RunBusyError(f"run '{record.name}': another process keeps claiming it; try again")


def run_owner(store: Store, run: str | int) -> dict | None:
    """The current claim on ``run`` (host, pid, heartbeat age in seconds), or None."""
    run_id = store.get_run(run).id
    with Session(store.engine) as s:
        row = s.execute(select(RunOwner.host, RunOwner.pid, RunOwner.heartbeat_at)
                        .where(RunOwner.run_id == run_id)).one_or_none()
    if row is None:
        return None
    return {"host": row.host, "pid": row.pid, "heartbeat_age": _age(row.heartbeat_at)}
