"""Core data contracts shared by envs, agents, the runner and the store.

Messages use the OpenAI chat format (dicts with ``role``, ``content``, ``tool_calls``,
``tool_call_id``) because every backend we talk to (litellm, vLLM, HF chat templates) speaks it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SUCCESS_TOL",
    "is_success",
    "Task",
    "ToolCall",
    "AgentTurn",
    "Observation",
    "Score",
    "Termination",
    "ErrorClass",
    "Usage",
    "EpisodeResult",
    "Group",
    "task_order_key",
]


SUCCESS_TOL = 1e-6


def is_success(reward: float) -> bool:
    """An episode succeeded when its reward is within ``SUCCESS_TOL`` of 1 (τ-bench's rule). The one
    success rule: pass^k, sibling-group labels, the summarizer and env metrics all use it (or
    ``harness.results.stats.successes``, its vectorised form)."""
    return abs(float(reward) - 1.0) <= SUCCESS_TOL


def task_order_key(task_id: str) -> str:
    """Sort key for task ids: numeric ids in numeric order ("2" before "10"), then other ids as
    text. Every table, export and report orders tasks with it."""
    return f"0{int(task_id):020d}" if str(task_id).isdigit() else f"1{task_id}"


@dataclass(frozen=True)
class Task:
    """One benchmark task, as an env adapter hands it to the runner."""

    env: str
    """Registered env name, e.g. ``tau-airline``."""
    id: str
    """Task id inside the env (``"0"`` ... ``"49"`` for tau-airline)."""
    split: str
    """Split this task was selected from (``base``, ``train``, ``test``)."""
    instruction: str
    """What the agent side is told about the task (empty for tau: the user simulator knows it)."""
    data: dict[str, Any]
    """Env-specific payload, e.g. the raw tau task (user scenario, evaluation criteria)."""
    version: str
    """Data version string, e.g. ``tau3``; recorded on every run."""


@dataclass
class ToolCall:
    """A tool call as the agent produced it. ``arguments`` is the raw JSON text from the model,
    so a malformed call can be reported back verbatim instead of being lost."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> dict[str, Any]:
        """Decode the arguments; raises ``ValueError`` with a readable message if they are not a
        JSON object."""
        if self.arguments in ("", None):
            return {}
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool arguments are not valid JSON: {exc.msg} (at char {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"tool arguments must be a JSON object, got {type(value).__name__}")
        return value

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Usage:
    """Token and cost accounting for one or more LLM calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    calls: int = 0
    llm_seconds: float = 0.0

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost += other.cost
        self.calls += other.calls
        self.llm_seconds += other.llm_seconds


@dataclass
class AgentTurn:
    """What an agent does in one turn: a text message to the user, or tool calls (or both,
    which the tau protocol forbids; the env decides what to do with it)."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stop: bool = False
    """The agent ends the episode (e.g. the oracle after replaying everything)."""
    raw: dict[str, Any] | None = None
    """Provider-specific extras kept for debugging (finish reason, model id)."""
    refused_tool_calls: list[ToolCall] = field(default_factory=list)
    """Calls the agent made past the per-message cap (``--max-tool-calls``): in the message, but
    not for the env to run; the episode runner answers each with a tool error."""

    def to_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls or self.refused_tool_calls:
            msg["tool_calls"] = [tc.to_openai() for tc in [*self.tool_calls, *self.refused_tool_calls]]
        return msg


@dataclass
class Observation:
    """What the env returns to the agent after reset or a step."""

    messages: list[dict[str, Any]]
    """New messages for the agent: tool results (role ``tool``) or a user reply (role ``user``)."""
    done: bool = False
    tools: list[dict[str, Any]] | None = None
    """OpenAI function schemas (only on reset)."""
    system_prompt: str | None = None
    """The agent's system prompt (only on reset)."""


class Termination(str, enum.Enum):
    """Why an episode ended. Names and meanings follow tau2's termination reasons."""

    USER_STOP = "user_stop"
    AGENT_STOP = "agent_stop"
    MAX_STEPS = "max_steps"
    TOO_MANY_ERRORS = "too_many_errors"
    AGENT_ERROR = "agent_error"
    USER_ERROR = "user_error"
    TIMEOUT = "timeout"
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    INFRASTRUCTURE_ERROR = "infrastructure_error"


class ErrorClass(str, enum.Enum):
    """Who is to blame when an episode did not end normally. ``infra`` episodes are excluded
    from scores (and retried by resume); ``agent`` failures count as task failures."""

    NONE = "none"
    AGENT = "agent"
    INFRA = "infra"


@dataclass
class Score:
    reward: float
    success: bool
    breakdown: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpisodeResult:
    """Everything the runner records about one played episode."""

    task_id: str
    trial: int
    seed: int
    messages: list[dict[str, Any]]
    termination: Termination
    score: Score
    error_class: ErrorClass = ErrorClass.NONE
    error: str | None = None
    agent_usage: Usage = field(default_factory=Usage)
    user_usage: Usage = field(default_factory=Usage)
    wall_seconds: float = 0.0
    env_seconds: float = 0.0
    group_id: str | None = None
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    """One record per LLM call: role (agent/user), model, tokens, cost, seconds, attempts, cached."""
    trace: Any = None
    """A local policy's token trace (``harness.policy.trace.TokenTrace``), for training; never stored."""
    fatal: bool = False
    """The infra failure will repeat on every episode (``FatalProviderError``: a bad key, an
    unknown model): the run should stop. Never stored (the episode is an infra error)."""


@dataclass
class Group:
    """The sibling episodes of one task under one policy version (same group id)."""

    task_id: str
    group_id: str
    episodes: list[EpisodeResult]

    @property
    def scored(self) -> list[EpisodeResult]:
        return [e for e in self.episodes if e.error_class is not ErrorClass.INFRA]

    @property
    def label(self) -> str:
        """``all_success`` | ``all_fail`` | ``mixed`` over scored siblings (``unscored`` if none)."""
        wins = [is_success(e.score.reward) for e in self.scored]
        if not wins:
            return "unscored"
        if all(wins):
            return "all_success"
        return "all_fail" if not any(wins) else "mixed"
