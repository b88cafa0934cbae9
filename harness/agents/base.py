"""The agent contract and the agent registry.

An agent is created per episode (``AgentSpec.create(task, seed)``) and asked for one turn at a time
with the full conversation it has seen so far (OpenAI chat format, starting with the system
prompt) and the tool schemas. It returns an ``AgentTurn``: text for the user, tool calls, or both
(the env enforces the protocol, as the official τ² orchestrator does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from harness.errors import ConfigError
from harness.types import AgentTurn, Task

__all__ = ["Agent", "AgentSpec", "register_agent", "make_agent_spec", "agent_names"]


class Agent(Protocol):
    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> AgentTurn: ...


@dataclass
class AgentSpec:
    """A configured agent kind; builds one agent per episode."""

    name: str
    build: Callable[[Task, int], Agent]
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def create(self, task: Task, seed: int) -> Agent:
        return self.build(task, seed)


_REGISTRY: dict[str, Callable[..., AgentSpec]] = {}


def register_agent(name: str):
    """Decorator: register a function ``(**options) -> AgentSpec`` under ``name``."""

    def wrap(fn: Callable[..., AgentSpec]) -> Callable[..., AgentSpec]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def agent_names() -> list[str]:
    return sorted(_REGISTRY)


def make_agent_spec(name: str, **options: Any) -> AgentSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown agent '{name}'. Known agents: {', '.join(agent_names())}")
    return _REGISTRY[name](**options)
