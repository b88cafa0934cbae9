"""One episode: its conversation (system prompt collapsed; tool calls with their arguments and
results), the grader's breakdown, tokens, cost, wall time split into LLM and env time, and how it
ended. Everything shown is model or tool output, so the template escapes all of it."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from harness.errors import ConfigError
from harness.store.browse import episode_by_id
from harness.view.core import Context, Page, ViewError


def turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored messages as the page shows them: each tool call with its arguments parsed where
    they are JSON, and each tool result beside the name of the call it answers."""
    names = {}
    turns = []
    for message in messages or []:
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass  # shown as the text the model wrote
            names[call.get("id")] = function.get("name")
            calls.append({"id": call.get("id"), "name": function.get("name"), "arguments": arguments})
        content = message.get("content")
        role = message.get("role", "?")
        turns.append({"role": role, "content": content if isinstance(content, str) or content is None
                      else json.dumps(content, indent=2, ensure_ascii=False),
                      "tool_calls": calls, "tool_name": names.get(message.get("tool_call_id")) or message.get("name"),
                      "is_error": role == "tool" and _looks_like_error(content)})
    return turns


def _looks_like_error(content: Any) -> bool:
    return isinstance(content, str) and content.lstrip().lower().startswith("error")


def load(ctx: Context, request: Request) -> dict:
    episode_id = int(request.path_params["episode_id"])
    try:
        episode = episode_by_id(ctx.store, episode_id)
    except ConfigError:
        raise ViewError(404, f"no episode with id {episode_id}; open one from its run's task list") from None
    episode["turns"] = turns(episode["messages"])
    return {"episode": episode}


PAGE = Page(path="/episodes/{episode_id:int}", template="episode.html", load=load, name="episode")
