"""What every page of the viewer shares: the read-only store and env hooks it reads through, the
checked query parameters, and the one error type that becomes a 400 or 404.

A page is one module in ``harness.view.pages`` exposing a ``PAGE`` (``Page``): its URL path, its
template and ``load(ctx, request) -> dict``. The app serves each page twice from that one loader:
as HTML at ``path`` and as JSON at ``/api`` + ``path``, so the two never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request

from harness.errors import ConfigError

__all__ = ["ViewError", "Context", "Page", "Params", "plain"]


class ViewError(Exception):
    """A request the viewer cannot serve: ``status`` (400 bad parameter, 404 unknown thing) and one
    line saying what and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Context:
    store: Any
    """A ``harness.store.Store`` opened read-only."""
    env_metrics: Callable[[Any, Any], dict[str, Any]] | None = None
    """``(store, run record) -> rows``: the env's own summary rows (``envs.registry.run_metrics``)."""
    task_metrics: Callable[[Any, Any], Any] | None = None
    """``(store, run record) -> per-task frame or None`` (``envs.registry.task_metrics``)."""

    def run(self, run_id: int):
        """The run record with this id, or a 404."""
        try:
            return self.store.get_run(int(run_id))
        except ConfigError:
            raise ViewError(404, f"no run with id {run_id}; the runs page lists the stored runs") from None


@dataclass(frozen=True)
class Page:
    path: str
    """Starlette route path, e.g. ``/runs/{run_id:int}``; the JSON twin is ``/api`` + path."""
    template: str
    load: Callable[[Context, Request], dict[str, Any]]
    name: str


class Params:
    """Query parameters, checked: a bad value raises ``ViewError(400)`` naming the parameter."""

    def __init__(self, request: Request):
        self.query = request.query_params

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.query.get(name)
        return value if value not in (None, "") else default

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw in (None, ""):
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ViewError(400, f"query parameter {name}={raw!r} is not an integer; give {low} to {high}") from None
        if not low <= value <= high:
            raise ViewError(400, f"query parameter {name}={value} is out of range; give {low} to {high}")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.query.get(name) or default
        if value not in options:
            raise ViewError(400, f"query parameter {name}={value!r} is not one of {', '.join(options)}")
        return value

    def ids(self, name: str) -> list[int]:
        """Every value of a repeated integer parameter (``?run=1&run=2``)."""
        out = []
        for raw in self.query.getlist(name):
            try:
                out.append(int(raw))
            except ValueError:
                raise ViewError(400, f"query parameter {name}={raw!r} is not a run id (an integer)") from None
        return out


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN and infinities become None, numpy scalars Python ones,
    times ISO text; containers recursively."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
