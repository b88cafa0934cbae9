"""Render a mixed sibling group as the summarizer's compact, redacted input text.

Why compact: the summarizer only needs the contrast between siblings (which calls, which
observations, how each attempt ended), not every token, and its input size is its cost. Why
deterministic: the rendered text is hashed into the cache key (``guidance.digest``), so the same
group must render byte-identically on a resume.

Layout: the task instruction, then up to ``max_per_side`` distinct successful attempts (first),
then up to ``max_per_side`` distinct failed ones. Each attempt opens with
``outcome: SUCCESS/FAILURE (reward r)`` and lists its steps: tool calls as ``name(args)``, tool
results / user replies clipped to ``observation_chars``, intermediate assistant text, and the final
assistant text clipped to ``final_chars``. Attempts with identical renderings are shown once with
their count. Infra-failed episodes are left out (they say nothing about the policy). The whole text
stays under ``max_chars``: each attempt gets an equal share and, over it, keeps its first and last
steps with a "steps omitted" marker. Every piece is redacted *before* it is clipped, so a cut
never leaves half a literal behind.

Success uses the rule of ``Group.label`` (reward 1.0), so a "mixed" group is mixed here too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from harness.types import EpisodeResult, Group, Task
from harness.types import is_success as reward_is_success
from trainers.summarizer.redact import Redactor

__all__ = ["RenderSettings", "RenderedGroup", "Action", "is_success", "split_siblings", "episode_actions",
           "final_text", "tool_errors", "render_group", "format_args", "clip"]


@dataclass(frozen=True)
class RenderSettings:
    """How much of a group the summarizer sees."""

    max_per_side: int = 4
    """Distinct successful and distinct failed attempts shown, each."""
    max_chars: int = 12_000
    """Cap on the whole rendered text."""
    observation_chars: int = 300
    """Clip for a tool result, user reply or tool-call argument list."""
    text_chars: int = 300
    """Clip for intermediate assistant text (or an AppWorld code block)."""
    final_chars: int = 400
    """Clip for the final assistant text."""
    instruction_chars: int = 1_500


@dataclass(frozen=True)
class Action:
    """One agent action: a tool name (or ``app.api`` for code agents) and its redacted arguments."""

    name: str
    args: str

    def __str__(self) -> str:
        return f"{self.name}({self.args})"


@dataclass
class RenderedGroup:
    text: str
    successes: list[EpisodeResult]
    failures: list[EpisodeResult]


def is_success(ep: EpisodeResult) -> bool:
    return reward_is_success(ep.score.reward)  # the one rule (harness.types.is_success)


def split_siblings(group: Group) -> tuple[list[EpisodeResult], list[EpisodeResult]]:
    """(successes, failures) among the scored siblings, each in trial order."""
    scored = sorted(group.scored, key=lambda e: (e.trial, e.seed))
    return [e for e in scored if is_success(e)], [e for e in scored if not is_success(e)]


def clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def format_args(arguments: Any, redactor: Redactor, limit: int) -> str:
    """``k="v", n=2`` for a JSON object, else the raw text; redacted, then clipped."""
    value: Any = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return clip(redactor.redact(arguments), limit)
    if isinstance(value, dict):
        text = ", ".join(f"{k}={json.dumps(v, sort_keys=True, ensure_ascii=False)}" for k, v in value.items())
    else:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return clip(redactor.redact(text), limit)


_CODE_CALL = re.compile(r"apis\.(\w+)\.(\w+)\(([^()]*)\)")
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def episode_actions(ep: EpisodeResult, redactor: Redactor, limit: int = 300) -> list[Action]:
    """The agent's actions in order: tool calls, or, for code agents (AppWorld), the
    ``apis.<app>.<api>(...)`` calls found in its code blocks."""
    actions: list[Action] = []
    for msg in ep.messages:
        if msg.get("role") != "assistant":
            continue
        calls = msg.get("tool_calls") or []
        for call in calls:
            fn = call.get("function") or {}
            actions.append(Action(fn.get("name") or "?", format_args(fn.get("arguments"), redactor, limit)))
        if not calls:
            for block in _FENCE.findall(msg.get("content") or ""):
                for app, api, args in _CODE_CALL.findall(block):
                    actions.append(Action(f"{app}.{api}", clip(redactor.redact(args), limit)))
    return actions


def final_text(ep: EpisodeResult) -> str | None:
    """The last assistant message's text when it ends the conversation without tool calls."""
    for msg in reversed(ep.messages):
        if msg.get("role") == "assistant":
            return None if msg.get("tool_calls") else (msg.get("content") or None)
        if msg.get("role") == "user" and msg is not ep.messages[-1]:
            return None
    return None


def tool_errors(ep: EpisodeResult) -> list[str]:
    """Tool results that report an error (``Error: ...``), in order."""
    return [str(m.get("content")) for m in ep.messages
            if m.get("role") == "tool" and str(m.get("content") or "").lstrip().lower().startswith("error")]


def _steps(ep: EpisodeResult, task: Task, redactor: Redactor, s: RenderSettings) -> list[str]:
    lines: list[str] = []
    final = final_text(ep)
    last_assistant = max((i for i, m in enumerate(ep.messages) if m.get("role") == "assistant"), default=-1)
    skipped_instruction = False
    for i, msg in enumerate(ep.messages):
        role, content = msg.get("role"), msg.get("content")
        if role == "system":
            continue
        if role == "user" and not skipped_instruction and task.instruction and content == task.instruction:
            skipped_instruction = True  # the toy question is the instruction, shown once above
            continue
        if role == "assistant":
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") or {}
                args = format_args(fn.get("arguments"), redactor, s.observation_chars)
                lines.append(f"call {fn.get('name')}({args})")
            if content and str(content).strip():
                if i == last_assistant and final is not None:
                    lines.append(f"final assistant text: {clip(redactor.redact(content), s.final_chars)}")
                else:
                    lines.append(f"assistant: {clip(redactor.redact(content), s.text_chars)}")
        elif role == "tool":
            lines.append(f"  -> {clip(redactor.redact(content), s.observation_chars)}")
        elif role == "user":
            lines.append(f"user: {clip(redactor.redact(content), s.observation_chars)}")
    return lines


def _fit(lines: list[str], budget: int) -> list[str]:
    """Keep the first and last steps within ``budget`` characters (the start and the ending of
    an attempt carry most of the contrast)."""
    if sum(len(x) + 1 for x in lines) <= budget:
        return lines
    head, tail, used = [], [], 0
    for line in lines:
        if used + len(line) + 1 > 0.6 * budget:
            break
        head.append(line)
        used += len(line) + 1
    for line in reversed(lines[len(head):]):
        if used + len(line) + 1 > budget - 40:
            break
        tail.insert(0, line)
        used += len(line) + 1
    omitted = len(lines) - len(head) - len(tail)
    if not head and not tail:  # one huge step: clip it
        return [clip(lines[0], max(20, budget - 40)), f"... ({len(lines) - 1} more steps omitted)"]
    return head + [f"... ({omitted} steps omitted)"] + tail


def _distinct(eps: list[EpisodeResult], task: Task, redactor: Redactor, s: RenderSettings):
    """[(first episode, count, step lines)] for distinct renderings, in trial order."""
    seen: dict[tuple, list] = {}
    for ep in eps:
        lines = _steps(ep, task, redactor, s)
        key = (tuple(lines), round(ep.score.reward, 4), ep.termination.value)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [ep, 1, lines]
    return [tuple(v) for v in seen.values()]


def render_group(group: Group, task: Task, redactor: Redactor, settings: RenderSettings | None = None) -> RenderedGroup:
    s = settings or RenderSettings()
    successes, failures = split_siblings(group)
    wins = _distinct(successes, task, redactor, s)[: s.max_per_side]
    losses = _distinct(failures, task, redactor, s)[: s.max_per_side]
    instruction = clip(redactor.redact(task.instruction), s.instruction_chars) if task.instruction else \
        "(not shown to the agent directly; the goal comes out of the conversation below)"
    header = [
        f"TASK: {instruction}",
        f"SIBLINGS: {len(successes)} successful and {len(failures)} failed attempts at this same task "
        f"(showing {len(wins)} and {len(losses)} distinct ones).",
    ]
    shown = len(wins) + len(losses)
    budget = max(200, (s.max_chars - sum(len(h) + 1 for h in header) - 200) // max(1, shown))
    blocks: list[str] = []
    for tag, rows, outcome in (("S", wins, "SUCCESS"), ("F", losses, "FAILURE")):
        for n, (ep, count, lines) in enumerate(rows, start=1):
            same = f", {count} identical attempts" if count > 1 else ""
            title = (f"=== Attempt {tag}{n}: outcome: {outcome} (reward {ep.score.reward:.2f}), "
                     f"ended: {ep.termination.value}{same}")
            body = _fit(_number(lines), budget - len(title) - 1)
            blocks.append("\n".join([title, *body]))
    text = "\n".join(header) + "\n\n" + "\n\n".join(blocks) + "\n"
    text = redactor.redact(text)  # second pass: nothing may survive across piece boundaries
    if len(text) > s.max_chars:
        text = text[: s.max_chars - 20] + "\n... (truncated)\n"
    return RenderedGroup(text=text, successes=successes, failures=failures)


def _number(lines: list[str]) -> list[str]:
    """Number the agent's steps (observations hang under the step that caused them)."""
    out, n = [], 0
    for line in lines:
        if line.startswith("  ->"):
            out.append(line)
        else:
            n += 1
            out.append(f"{n}. {line}")
    return out
