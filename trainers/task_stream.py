"""Which training tasks each step uses: a seeded, epoch-wise shuffled stream with a position.

The position (tasks consumed so far) is the whole data state: it goes into every checkpoint, and
a resumed run continues from it, so no task is skipped or seen twice more than a straight run
would (resume must restore data position as well as weights; anchors.md §D.5).
"""

from __future__ import annotations

import random

from harness.types import Task

__all__ = ["TaskStream"]


class TaskStream:
    def __init__(self, tasks: list[Task], seed: int, position: int = 0):
        if not tasks:
            raise ValueError("no training tasks")
        self.tasks = tasks
        self.seed = seed
        self.position = position
        self._epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self.tasks)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def take(self, count: int) -> list[Task]:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.tasks))
            out.append(self.tasks[self._order_for(epoch)[index]])
            self.position += 1
        return out
