"""Redaction of benchmark-private literals in what the summarizer sees and writes (SGCD, methods.md §1.2b).

Why: the credit reference is training-only guidance put into the teacher's context; the paper masks
"benchmark-private labels, credentials and answer literals" when building it, so the reference can
point at *which* step matters without becoming an answer key. Two checks:

- before the call, every literal is replaced by ``[REDACTED]`` in the rendered group (so neither
  the digest nor the request ever holds one);
- after the call, the reply is checked again: a literal the model produced anyway (guessed, or
  reconstructed) is redacted in the stored text and counted as a leak.

Literals come from the env factory's ``redaction_literals(task)`` (when it has one) plus the task
id. Matching is case-insensitive, longest literal first, and respects alphanumeric boundaries
(``"echo"`` does not hit ``"echoes"``; ``"emma"`` does hit ``"emma_kim_9957"``, underscores
separate words here). Literals shorter than 3 characters are dropped: a task id ``"7"`` or an
amount ``"4"`` would otherwise blank every digit of the transcript. A small env-agnostic scrub
also masks credential-shaped values (``"password": "..."``, ``access_token=...``) that show up in
tool outputs, e.g. AppWorld's ``show_account_passwords``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = ["MASK", "MIN_LITERAL_CHARS", "Redactor", "literals_for"]

MASK = "[REDACTED]"
MIN_LITERAL_CHARS = 3

# key/value pairs that look like credentials, in JSON ("password": "x") or keyword (password=x) form.
_SECRET_KEYS = r"(?:password|passwd|access_token|api_key|secret|token)"
_SECRET_PATTERNS = (
    re.compile(rf'("{_SECRET_KEYS}"\s*:\s*")([^"]+)(")', re.I),
    re.compile(rf"('{_SECRET_KEYS}'\s*:\s*')([^']+)(')", re.I),
    re.compile(rf"(\b{_SECRET_KEYS}\s*=\s*['\"])([^'\"]+)(['\"])", re.I),
)


def literals_for(factory: Any, task: Any) -> list[str]:
    """The literals to redact for ``task``: the env's ``redaction_literals(task)`` plus the task id."""
    found: list[str] = [str(x) for x in factory.redaction_literals(task) or []]
    found.append(str(task.id))
    return found


class Redactor:
    """Replaces a fixed set of literals with ``[REDACTED]`` (see the module docstring)."""

    def __init__(self, literals: Iterable[str]):
        kept: dict[str, str] = {}
        for lit in literals:
            text = str(lit).strip()
            if len(text) >= MIN_LITERAL_CHARS and text.lower() != MASK.lower():
                kept.setdefault(text.lower(), text)
        # Longest first: the regex alternation tries alternatives in order at each position.
        self.literals: list[str] = sorted(kept.values(), key=lambda s: (-len(s), s.lower()))
        self._pattern = re.compile("|".join(_bounded(s) for s in self.literals), re.I) if self.literals else None

    def redact(self, text: str | None) -> str:
        """``text`` with every literal (and credential-shaped value) masked."""
        return self.redact_count(text)[0]

    def redact_count(self, text: str | None) -> tuple[str, int]:
        """(masked text, number of literal occurrences masked). Credential-pattern hits are
        masked but not counted: the count is the leak check on literals."""
        out = text or ""
        count = 0
        if self._pattern is not None:
            out, count = self._pattern.subn(MASK, out)
        for pattern in _SECRET_PATTERNS:
            out = pattern.sub(lambda m: m.group(1) + MASK + m.group(3), out)
        return out, count

    def find(self, text: str | None) -> list[str]:
        """The literal occurrences in ``text`` (as written there)."""
        if self._pattern is None or not text:
            return []
        return [m.group(0) for m in self._pattern.finditer(text)]


def _bounded(literal: str) -> str:
    body = re.escape(literal)
    if literal[0].isalnum():
        body = r"(?<![A-Za-z0-9])" + body
    if literal[-1].isalnum():
        body = body + r"(?![A-Za-z0-9])"
    return body
