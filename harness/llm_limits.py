"""Per-model adaptive concurrency for LLM calls (AIMD, like TCP congestion control).

Each (model, endpoint) gets its own limit, starting at the run's ``--concurrency``. A 429 halves
it (at most once per ``cooldown`` seconds, so one burst of rejections counts once); every
``limit`` successful calls in a row raise it by one, back up to the maximum. Requests wait on an
``asyncio.Condition``: no threads, one event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

__all__ = ["AdaptiveLimiter", "LimiterRegistry"]


class AdaptiveLimiter:
    def __init__(self, max_limit: int, cooldown: float = 1.0):
        self.max_limit = max(1, max_limit)
        self.limit = self.max_limit
        self.cooldown = cooldown
        self.in_flight = 0
        self.rate_limited = 0
        self._streak = 0
        self._last_cut = float("-inf")
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def release(self) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify()

    def on_rate_limited(self) -> None:
        self.rate_limited += 1
        self._streak = 0
        now = time.monotonic()
        if now - self._last_cut >= self.cooldown:
            self._last_cut = now
            self.limit = max(1, self.limit // 2)

    async def on_success(self) -> None:
        self._streak += 1
        if self.limit < self.max_limit and self._streak >= self.limit:
            self._streak = 0
            async with self._cond:
                self.limit += 1
                self._cond.notify()


@dataclass
class LimiterRegistry:
    """One limiter per (model, api_base), created on first use inside the run's event loop."""

    max_limit: int
    limiters: dict[tuple[str, str | None], AdaptiveLimiter] = field(default_factory=dict)

    def get(self, model: str, api_base: str | None) -> AdaptiveLimiter:
        key = (model, api_base)
        if key not in self.limiters:
            self.limiters[key] = AdaptiveLimiter(self.max_limit)
        return self.limiters[key]

    def stats(self) -> dict[str, dict[str, int]]:
        return {m: {"limit": lim.limit, "rate_limited": lim.rate_limited} for (m, _), lim in self.limiters.items()}
