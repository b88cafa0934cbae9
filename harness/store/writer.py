"""Group commit of finished episodes, for the episode runner's event loop (``EpisodeWriter``)."""

from __future__ import annotations

import asyncio
import time

from harness.store.core import DuplicateEpisodeError, Store
from harness.store.engine import StorageError, is_locked
from harness.types import EpisodeResult

__all__ = ["EpisodeWriter"]


class EpisodeWriter:
    """Group commit of finished episodes, for the runner's event loop.

    ``await writer.add(result)`` returns once the episode is committed (or raises its
    ``DuplicateEpisodeError``). Episodes added while a group is collecting (``window`` seconds
    after the first one) or being written join the next group; each group is one
    ``Store.add_episodes`` transaction in a worker thread, so the event loop keeps serving the
    other episodes. At most one group is written at a time: SQLite has one writer anyway, and a
    slow commit makes the next group larger instead of queueing threads.

    On cancellation (Ctrl-C) the episodes already handed over are still written before the
    cancellation goes on; only a killed process loses the group being collected.

    A group that meets a lock held past the database's busy timeout (another process writing a
    long transaction, a backup holding the file) is written again after a pause, doubling from
    0.1 s to 5 s, never dropped; after ``lock_wait`` seconds of trying it fails with one line
    (``StorageError``) that each of its episodes raises. A group is one transaction, so a retry
    never finds its own rows."""

    def __init__(self, store: Store, run: str | int, window: float = 0.005, max_group: int = 512,
                 lock_wait: float = 600.0):
        self.store, self.run, self.window, self.max_group = store, run, window, max_group
        self.lock_wait = lock_wait
        self._pending: list[tuple[EpisodeResult, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.groups = 0
        """Transactions written so far (for tests and the benchmark)."""

    async def add(self, result: EpisodeResult) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((result, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        await future

    async def aclose(self) -> None:
        """Wait until everything added so far is committed."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self.window > 0:
                    await asyncio.sleep(self.window)  # let the rest of a burst join this group
                group, self._pending = self._pending[:self.max_group], self._pending[self.max_group:]
                try:
                    outcomes = await asyncio.to_thread(self._write, [r for r, _ in group])
                except asyncio.CancelledError:
                    # The thread goes on and commits this group; the others are written below.
                    raise
                except Exception as exc:  # noqa: BLE001 (each waiting episode sees the failure)
                    outcomes = [exc] * len(group)
                self.groups += 1
                for (_, future), outcome in zip(group, outcomes):
                    if future.done():
                        continue
                    if outcome is None:
                        future.set_result(None)
                    else:
                        future.set_exception(outcome)
        except asyncio.CancelledError:
            rest, self._pending = self._pending, []
            if rest:
                try:
                    self._write([r for r, _ in rest])
                finally:
                    for _, future in rest:
                        future.cancel()
            raise

    def _write(self, results: list[EpisodeResult]) -> list[DuplicateEpisodeError | None]:
        """``Store.add_episodes``, retried while the database stays locked (see the class doc)."""
        started, pause = time.monotonic(), 0.1
        while True:
            try:
                return self.store.add_episodes(self.run, results)
            except StorageError as exc:
                waited = time.monotonic() - started
                if not is_locked(exc):
                    raise
                if waited >= self.lock_wait:
                    raise StorageError(f"{exc}: still locked after retrying for {waited:.0f} s; "
                                       f"{len(results)} finished episode(s) were not stored; stop the process "
                                       "holding the lock and resume the run", locked=True) from exc
                time.sleep(min(pause, max(self.lock_wait - waited, 0.0)))
                pause = min(pause * 2, 5.0)
