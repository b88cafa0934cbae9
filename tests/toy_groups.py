"""Sibling groups of real toy episodes with a reward spread, for credit-assignment tests.

An untrained tiny toy policy almost never succeeds, so its groups carry no learning signal. The
method tests (SGCD, RLSD, RLAD, OISD, TGC ...) are about credit math that sees rewards only
through the group advantages, so they overwrite each group's rewards to alternate 1 / 0
(success / failure): every group is mixed and every method does its full work.
"""

from __future__ import annotations

from dataclasses import replace

from harness.env_spec import EnvFactory
from harness.types import Group, Score


def alternate_rewards(groups: list[Group]) -> list[Group]:
    """The same groups with episode k scored reward 1 (success) when k is even, else 0."""
    return [Group(task_id=g.task_id, group_id=g.group_id,
                  episodes=[replace(e, score=Score(reward=float(k % 2 == 0), success=k % 2 == 0))
                            for k, e in enumerate(g.episodes)])
            for g in groups]


class BareFactory(EnvFactory):
    """An env with the toy's tasks and none of the optional hooks (no privileged information)."""

    def __init__(self):
        from envs.toy.env import ToyFactory

        self._toy = ToyFactory()

    def tasks(self, split, task_ids=None):
        return self._toy.tasks(split, task_ids)
