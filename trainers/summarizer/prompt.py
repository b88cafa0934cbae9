"""The summarizer prompt, its version, and the parser that validates a credit reference.

SGCD's credit reference has four parts (methods.md §1.2b): the state checks the successful attempts
made, the reusable successful branches, the failed branches and why they failed, and the likely
divergence points. The prompt asks for exactly these four headings; ``parse_reference`` accepts a
reply only when all four are present, each with non-empty content, and returns it normalised
(canonical headings, canonical order, nothing outside the sections). The built-in ``diff``
summarizer writes the same layout, so one parser serves both.

``PROMPT_VERSION`` is a short hash of the template text: editing the prompt changes the cache key
of the ``guidance`` table, so old references are never served for a new prompt.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["HEADINGS", "SYSTEM_PROMPT", "USER_TEMPLATE", "RETRY_NOTE", "PROMPT_VERSION", "build_messages",
           "retry_messages", "parse_reference", "format_reference"]

HEADINGS = (
    "State checks the successful attempts made",
    "Reusable successful branches",
    "Failed branches and why they failed",
    "Likely divergence points",
)

SYSTEM_PROMPT = """\
You write credit references for reinforcement-learning training of a tool-use agent.
You are shown several attempts ("siblings") by the same agent at the same task: some succeeded, \
some failed, each with its outcome. Contrast them and explain, step by step, what separates the \
successful attempts from the failed ones.

Rules:
- This reference is training-only guidance. It is never shown to the agent at test time; it is \
used to decide which of the agent's steps deserve credit.
- Do not reveal literal answers, codes, IDs, names, amounts, passwords or other values. Values \
shown as [REDACTED] are hidden on purpose: never guess or reconstruct them. Describe steps by \
what they do and where the value came from (e.g. "the code returned by the lookup"), not by the \
value itself.
- Be concrete about actions (tool names, which argument came from where, the order of calls) and \
brief. Refer to attempts by their labels (S1, F2, ...).

Reply with exactly these four sections, each a markdown heading followed by short bullet points, \
and nothing else:

{headings}"""

USER_TEMPLATE = """\
{rendered}
Write the credit reference now, with exactly the four headings."""

RETRY_NOTE = """\
Your reply could not be used ({problem}). Reply again with exactly the four headings ({headings}), \
each followed by non-empty content, and nothing else."""

_HEADING_BLOCK = "\n".join(f"## {h}\n- ..." for h in HEADINGS)

PROMPT_VERSION = hashlib.sha256(
    "\n---\n".join([SYSTEM_PROMPT, USER_TEMPLATE, RETRY_NOTE, *HEADINGS]).encode()
).hexdigest()[:12]


def build_messages(rendered: str) -> list[dict[str, str]]:
    """The chat request for one rendered (already redacted) group."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(headings=_HEADING_BLOCK)},
        {"role": "user", "content": USER_TEMPLATE.format(rendered=rendered)},
    ]


def retry_messages(rendered: str, previous: str, problem: str) -> list[dict[str, str]]:
    """The one retry after a malformed or empty reply: the same request, the (redacted, clipped)
    previous reply, and what was wrong with it."""
    messages = build_messages(rendered)
    if previous.strip():
        messages.append({"role": "assistant", "content": previous[:4000]})
    messages.append({"role": "user", "content": RETRY_NOTE.format(problem=problem, headings="; ".join(HEADINGS))})
    return messages


def _norm(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


_HEADING_KEYS = {_norm(h): h for h in HEADINGS}
_DECOR_HEAD = re.compile(r"^[#*_\s]*(?:\d+[.)]\s*)?[*_\s]*")
_DECOR_TAIL = re.compile(r"[*_:\s]*$")


def _heading_of(line: str) -> str | None:
    """The canonical heading a line holds (markdown '#', bold, numbered, trailing ':'), or None."""
    if len(line) > 120 or re.match(r"^\s*[-*+]\s", line):  # a bullet item is never a heading
        return None
    return _HEADING_KEYS.get(_norm(_DECOR_TAIL.sub("", _DECOR_HEAD.sub("", line))))


_EMPTY = re.compile(r"^[\s\-*•.:]*$")


def parse_reference(text: str | None) -> tuple[dict[str, str] | None, str]:
    """(sections by heading, "") for a valid reply, else (None, reason): ``empty``, or
    ``malformed: missing ...`` / ``malformed: empty section ...``."""
    if not text or not text.strip():
        return None, "empty"
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = _heading_of(line)
        if heading is not None:
            current = heading
            sections.setdefault(heading, [])
        elif current is not None:
            sections[current].append(line.rstrip())
    missing = [h for h in HEADINGS if h not in sections]
    if missing:
        return None, f"malformed: missing {'; '.join(missing)}"
    bodies = {h: "\n".join(sections[h]).strip("\n") for h in HEADINGS}
    empty = [h for h, body in bodies.items() if _EMPTY.match(body)]
    if empty:
        return None, f"malformed: empty section {'; '.join(empty)}"
    return bodies, ""


def format_reference(sections: dict[str, str]) -> str:
    """The canonical text of a credit reference (what is stored and given to the teacher)."""
    return "\n\n".join(f"## {h}\n{sections[h].strip()}" for h in HEADINGS) + "\n"
