"""What every summarizer gets and returns (the LLM one and the built-in ``diff``).

A summarizer has a ``name`` (stored as the ``guidance.model`` key), a ``prompt_version`` (the other
half of the cache key) and ``async summarize(case) -> Outcome``. It sees the group already
rendered and redacted (``case.rendered.text``) plus the redactor for anything it extracts itself;
the caller (``trainers.summarizer.pipeline``) owns caching, the output leak check and accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from harness.types import Group, Task
from trainers.summarizer.redact import Redactor
from trainers.summarizer.render import RenderedGroup, RenderSettings

__all__ = ["SummaryCase", "Outcome", "Summarizer"]


@dataclass
class SummaryCase:
    task: Task
    group: Group
    rendered: RenderedGroup
    redactor: Redactor
    settings: RenderSettings


@dataclass
class Outcome:
    text: str | None
    """The normalised credit reference (before the output leak check), or None on fallback."""
    status: str
    """``ok`` or ``fallback``."""
    reason: str = ""
    attempts: int = 0
    """Paid calls made (replies received)."""
    cost_usd: float = 0.0
    latency_s: float = 0.0
    cacheable: bool = True
    """False for infra failures: nothing was paid and a later step should try again."""


class Summarizer(Protocol):
    name: str
    prompt_version: str

    async def summarize(self, case: SummaryCase) -> Outcome: ...
