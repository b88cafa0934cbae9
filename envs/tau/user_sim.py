"""Simulated customers for τ tasks: an LLM user (litellm) and a scripted user for offline runs.

Both see only what a real customer would: the agent's text messages, never tool calls or tool
results. They end the conversation with one of the official stop tokens.

The LLM user's system prompt is written in our own words from the official simulation guidelines
(``--user-guidelines ours``, the default). ``--user-guidelines official`` instead uses the
``simulation_guidelines.md`` file pulled with the τ data, verbatim, for leaderboard-standard runs.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.llm import LLMConfig, check_api_key, complete
from harness.types import Usage

__all__ = [
    "STOP_TOKENS",
    "UserReply",
    "LLMUser",
    "ScriptedUser",
    "UserSpec",
    "render_scenario",
    "is_stop",
]

STOP = "###STOP###"
TRANSFER = "###TRANSFER###"
OUT_OF_SCOPE = "###OUT-OF-SCOPE###"
STOP_TOKENS = (STOP, TRANSFER, OUT_OF_SCOPE)

OUR_GUIDELINES = """\
# How to play the customer
You are a customer who has contacted a customer service agent. Act out the scenario below as a real
person would, so that the agent can be tested on it.

- Write one message per turn, short and natural, as a customer types in a chat.
- Follow the scenario's instructions closely. Do not invent facts: anything the scenario does not
  give you is something you do not know.
- Say things in your own words instead of repeating the scenario text.
- Reveal details only when they are needed or asked for, not all at once.
- Keep going until your goal is reached. Then reply with only ###STOP### to end the conversation.
- If the agent transfers you to a human agent, reply with ###TRANSFER###.
- If the scenario does not tell you enough to continue, reply with ###OUT-OF-SCOPE###.
- Stay in character throughout."""


def is_stop(text: str | None) -> bool:
    return bool(text) and any(token in text for token in STOP_TOKENS)


def _indent(text: str) -> str:
    return textwrap.indent(text, "\t")


def render_scenario(user_scenario: dict[str, Any]) -> str:
    """The task's user scenario as plain text (persona, then structured instructions)."""
    parts = []
    persona = user_scenario.get("persona")
    if persona:
        parts += ["Persona:", _indent(persona)]
    instr = user_scenario.get("instructions")
    if isinstance(instr, dict):
        lines = [f"Domain: {instr.get('domain', '')}"]
        for key, title in (
            ("reason_for_call", "Reason for call"),
            ("known_info", "Known info"),
            ("unknown_info", "Unknown info"),
            ("task_instructions", "Task instructions"),
        ):
            if instr.get(key) is not None:
                lines.append(f"{title}:\n{_indent(str(instr[key]))}")
        body = "\n".join(lines)
    else:
        body = str(instr or "")
    parts += ["Instructions:", _indent(body)]
    return "\n".join(parts)


@dataclass
class UserReply:
    content: str
    usage: Usage = field(default_factory=Usage)


def _flip_roles(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user LLM plays the 'assistant': agent text becomes 'user' turns and vice versa."""
    flipped = []
    for msg in conversation:
        if msg["role"] == "assistant" and msg.get("content") and not msg.get("tool_calls"):
            flipped.append({"role": "user", "content": msg["content"]})
        elif msg["role"] == "user":
            flipped.append({"role": "assistant", "content": msg["content"]})
    return flipped


class LLMUser:
    """A litellm-backed customer. ``conversation`` holds only agent and user text messages."""

    def __init__(self, cfg: LLMConfig, system_prompt: str, seed: int | None):
        self.cfg = cfg
        self.system_prompt = system_prompt
        self.seed = seed

    async def reply(self, conversation: list[dict[str, Any]]) -> UserReply:
        messages = [{"role": "system", "content": self.system_prompt}, *_flip_roles(conversation)]
        out = await complete(self.cfg, messages, seed=self.seed)
        return UserReply(content=(out.content or "").strip(), usage=out.usage)


class ScriptedUser:
    """A deterministic customer for offline runs and tests.

    It says ``lines`` in order (default: one opening line built from the scenario), then answers
    ``###STOP###`` to the next agent message.
    """

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        self.turn = 0

    async def reply(self, conversation: list[dict[str, Any]]) -> UserReply:
        self.turn += 1
        if self.turn <= len(self.lines):
            return UserReply(content=self.lines[self.turn - 1])
        return UserReply(content=STOP)


def opening_line(user_scenario: dict[str, Any]) -> str:
    instr = user_scenario.get("instructions")
    if isinstance(instr, dict):
        bits = [instr.get("reason_for_call"), instr.get("known_info")]
        return " ".join(str(b).strip() for b in bits if b)
    return str(instr or "Hello.")


@dataclass
class UserSpec:
    """A configured user-simulator kind; builds one simulator per episode."""

    name: str
    model: str | None = None
    cfg: LLMConfig | None = None
    guidelines: str = OUR_GUIDELINES
    guidelines_source: str = "ours"
    script: list[str] | None = None
    """For the scripted user: lines to say instead of the default opening line."""

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.name, "guidelines": self.guidelines_source}
        if self.cfg:
            out.update(self.cfg.describe())
        return out

    def create(self, task_data: dict[str, Any], seed: int):
        scenario = task_data.get("user_scenario") or {}
        if self.name == "scripted":
            return ScriptedUser(self.script if self.script is not None else [opening_line(scenario)])
        prompt = f"{self.guidelines}\n\n<scenario>\n{render_scenario(scenario)}\n</scenario>"
        return LLMUser(self.cfg, prompt, seed)


def make_user_spec(
    kind: str,
    model: str | None = None,
    guidelines: str = "ours",
    official_guidelines_path: Path | None = None,
    **llm_options: Any,
) -> UserSpec:
    """Build a user spec from CLI options; checks the API key up front."""
    if kind == "scripted":
        return UserSpec(name="scripted", guidelines_source="none")
    if kind != "litellm":
        raise ConfigError(f"unknown user '{kind}'. Known users: litellm, scripted")
    if not model:
        raise ConfigError("the litellm user simulator needs --user-model (or use --user scripted)")
    cfg = LLMConfig(model=model, role="user", **llm_options)
    check_api_key(cfg, "user")
    text = OUR_GUIDELINES
    if guidelines == "official":
        if official_guidelines_path is None or not official_guidelines_path.exists():
            raise ConfigError("official user guidelines not found: run `harness data pull tau-airline` first")
        text = official_guidelines_path.read_text()
    elif guidelines != "ours":
        raise ConfigError(f"--user-guidelines must be 'ours' or 'official', got '{guidelines}'")
    return UserSpec(name="litellm", model=model, cfg=cfg, guidelines=text, guidelines_source=guidelines)
