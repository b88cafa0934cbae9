"""Group commit of finished episodes, for the episode runner's event loop (``EpisodeWriter``)."""

from __future__ import annotations

import asyncio

from harness.store.core import Store
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
    cancellation goes on; only a killed process loses the group being collected."""

    def __init__(self, store: Store, run: str | int, window: float = 0.005, max_group: int = 512):
        self.store, self.run, self.window, self.max_group = store, run, window, max_group
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
                    outcomes = await asyncio.to_thread(self.store.add_episodes, self.run, [r for r, _ in group])
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
                    self.store.add_episodes(self.run, [r for r, _ in rest])
                finally:
                    for _, future in rest:
                        future.cancel()
            raise
