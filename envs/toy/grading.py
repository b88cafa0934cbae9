"""Toy grader: partial credit from a stored trajectory alone (so stored runs can be re-graded).

For a task asking n items (n = 1 or 2) there are 2n credits:
- one per asked item that some assistant ``lookup`` call named (valid JSON, right item);
- one per position i where the i-th code named in the final answer is the i-th expected code.

``reward = credits / (2n + extra)``, where ``extra`` is how many more codes the answer names than
were asked, so listing every code word cannot earn full credit. ``success`` iff reward == 1.

The final answer is the last assistant message without tool calls. An episode that ended on a
limit (max steps, too many errors) has none, so it keeps only its lookup credits: partial credit
for the right calls, never success. This keeps siblings' rewards spread out for GRPO.
"""

from __future__ import annotations

import json
from typing import Any

from envs.toy.tasks import codes_in
from harness.types import Score

__all__ = ["grade", "final_answer"]


def final_answer(messages: list[dict[str, Any]]) -> str | None:
    """The text of the last assistant message that carries no tool calls (None if there is none)."""
    for msg in reversed(messages):
        if msg.get("role") == "assistant" and not msg.get("tool_calls"):
            return msg.get("content") or ""
    return None


def _looked_up(messages: list[dict[str, Any]]) -> set[str]:
    """Item names of every well-formed ``lookup`` call the agent made (lower-cased, stripped, as
    the env matches them)."""
    names: set[str] = set()
    for msg in messages:
        if msg.get("role") != "assistant":
            continue
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") or {}
            if fn.get("name") != "lookup":
                continue
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (TypeError, json.JSONDecodeError):
                continue
            # Only calls the env answered with a code count (exactly one string argument).
            if isinstance(args, dict) and set(args) == {"name"} and isinstance(args["name"], str):
                names.add(args["name"].strip().lower())
    return names


def grade(task_data: dict[str, Any], messages: list[dict[str, Any]], termination: str | None = None) -> Score:
    """Score one toy episode from its messages (see the module docstring for the rule)."""
    items = list(task_data["items"])
    expected = list(task_data["evaluation_criteria"]["communicate_info"])
    looked = _looked_up(messages)
    lookups = [item in looked for item in items]
    answer = final_answer(messages)
    named = codes_in(answer)
    answer_ok = [i < len(named) and named[i] == code for i, code in enumerate(expected)]
    extra = max(0, len(named) - len(expected))
    credits = sum(lookups) + sum(answer_ok)
    total = 2 * len(items) + extra
    reward = credits / total
    return Score(
        reward=reward,
        success=credits == total,
        breakdown={
            "lookups": lookups,
            "answer": answer_ok,
            "expected_codes": expected,
            "answer_codes": named,
            "extra_codes": extra,
            "answered": answer is not None,
            "termination": termination,
        },
    )
