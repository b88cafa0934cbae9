"""Env registry: ``@register_env("tau-airline")`` on a factory function, ``make_env_factory`` to
build one by name. A factory knows its tasks and creates one env per episode."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from harness.errors import ConfigError
from harness.types import AgentTurn, Observation, Score, Task, Termination, Usage

__all__ = ["Env", "EnvFactory", "register_env", "make_env_factory", "env_names"]


class Env(Protocol):
    """One episode of one task."""

    messages: list[dict[str, Any]]
    """The whole trajectory so far (what gets stored), without the system prompt."""
    termination: Termination | None
    user_usage: Usage
    env_seconds: float

    async def reset(self) -> Observation: ...

    async def step(self, turn: AgentTurn) -> Observation: ...

    def finish(self, termination: Termination) -> None:
        """End the episode from outside (agent crashed, provider failed)."""

    def score(self) -> Score: ...


class EnvFactory(Protocol):
    name: str
    data_version: str

    def tasks(self, split: str, task_ids: list[str] | None = None) -> list[Task]: ...

    def create(self, task: Task, seed: int) -> Env: ...

    def describe(self) -> dict[str, Any]:
        """Settings recorded on the run."""


_REGISTRY: dict[str, Callable[..., EnvFactory]] = {}


def register_env(name: str):
    def wrap(fn: Callable[..., EnvFactory]) -> Callable[..., EnvFactory]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def env_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_env_factory(name: str, **options: Any) -> EnvFactory:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown env '{name}'. Known envs: {', '.join(env_names())}")
    return _REGISTRY[name](**options)


def _load_builtin() -> None:
    # Imported lazily so `import envs` stays cheap and optional envs can fail to import alone.
    import envs.tau.env  # noqa: F401
    import envs.appworld.env  # noqa: F401
    import envs.toy.env  # noqa: F401
