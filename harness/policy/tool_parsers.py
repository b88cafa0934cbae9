"""Turn a local policy's sampled text into ``AgentTurn`` content and tool calls.

Each chat-template family writes tool calls its own way, so parsing is chosen per family:

- ``qwen``: Qwen2.5 / Qwen3 / Hermes style, one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  block per call; text outside the blocks is the message content.
- ``json``: generic fallback for templates without a tool-call syntax: the whole reply (or a
  fenced ```json block in it) is ``{"name": ..., "arguments": ...}`` or a list of those.

A block that is not valid JSON is not dropped: it becomes a tool call whose arguments are the raw
text, so the env answers with a tool error the model can see and recover from (as a provider's
malformed tool call does).
"""

from __future__ import annotations

import json
import re
from typing import Any

from harness.errors import ConfigError
from harness.types import ToolCall

__all__ = ["parse_reply", "TOOL_FORMATS", "detect_tool_format"]

TOOL_FORMATS = ("qwen", "json")

_QWEN_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')


def detect_tool_format(chat_template: str | None) -> str:
    """``qwen`` when the template writes ``<tool_call>`` blocks, else the generic ``json``."""
    return "qwen" if chat_template and "<tool_call>" in chat_template else "json"


def _call_from_obj(obj: Any, index: int) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    # Arguments stay JSON text (the ToolCall contract); a string is passed through as the model wrote it.
    text = args if isinstance(args, str) else json.dumps(args)
    return ToolCall(id=f"call_{index}", name=obj["name"], arguments=text)


def _malformed(raw: str, index: int) -> ToolCall:
    # Keep the name when it is readable, so the env's error names the tool the model meant.
    match = _NAME.search(raw)
    return ToolCall(id=f"call_{index}", name=match.group(1) if match else "", arguments=raw)


def _parse_qwen(text: str) -> tuple[str | None, list[ToolCall]]:
    calls: list[ToolCall] = []
    for match in _QWEN_BLOCK.finditer(text):
        raw = match.group(1)
        try:
            call = _call_from_obj(json.loads(raw), len(calls))
        except json.JSONDecodeError:
            call = None
        calls.append(call or _malformed(raw, len(calls)))
    content = _QWEN_BLOCK.sub("", text).strip() if calls else text.strip()
    return (content or None), calls


def _parse_json(text: str) -> tuple[str | None, list[ToolCall]]:
    stripped = text.strip()
    fenced = _FENCE.search(stripped)
    candidates = [stripped] + ([fenced.group(1).strip()] if fenced else [])
    for candidate in candidates:
        if not candidate.startswith(("{", "[")):
            continue
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        items = value if isinstance(value, list) else [value]
        calls = [_call_from_obj(item, i) for i, item in enumerate(items)]
        if calls and all(calls):
            rest = stripped.replace(fenced.group(0), "").strip() if fenced and candidate != stripped else ""
            return (rest or None), calls  # type: ignore[return-value]
    return (stripped or None), []


def parse_reply(text: str, tool_format: str) -> tuple[str | None, list[ToolCall]]:
    """Split a sampled reply into ``(content, tool_calls)``."""
    if tool_format == "qwen":
        return _parse_qwen(text)
    if tool_format == "json":
        return _parse_json(text)
    raise ConfigError(f"unknown tool-call format '{tool_format}'. Known: {', '.join(TOOL_FORMATS)}")
