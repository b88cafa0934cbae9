"""What SGCD's teacher reads: the credit reference fitted to a token budget, the content-free
texts that calibrate it, and the ablation references (issue 13).

- ``fit_reference``: a four-section credit reference (``trainers.summarizer.prompt``) longer than
  the budget is cut *per section*, never by dropping its tail: each section keeps its heading and
  gets at most its own length; the token budget is shared by water-filling (sections shorter than
  an equal share keep all of theirs, the rest is split evenly among the longer ones), so the last
  section ("likely divergence points", the one closest to credit) survives. A cut section ends in
  `` ...``. Text that is not four sections is cut at its end. Returns what was cut, for the
  ``sgcd/reference_truncated_frac`` and ``sgcd/reference_cut_tokens_frac`` metrics.
- ``neutral_text``: content-free text of a given token length, built from plain sentences that say
  nothing about any task or tool. Two fillers: ``control`` is what the calibration pass reads,
  ``placebo`` what the placebo arm reads (``--method-arg reference=placebo``). They differ on
  purpose: the placebo arm must show that calibration removes the effect of *any* text of that
  length, not only of the exact string it subtracts.
- ``oracle_reference``: the ablation that names a successful sibling's decisive actions verbatim
  (tool names with their full, unredacted arguments, and its final answer), in the four headings.
  It leaks answers by design: an upper bound of what a reference can carry, never the default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from harness.types import Group
from trainers.summarizer.prompt import HEADINGS, parse_reference

__all__ = ["FittedReference", "fit_reference", "neutral_text", "oracle_reference", "rollout_text", "token_length",
           "REFERENCE_KINDS", "CUT_MARK"]

REFERENCE_KINDS = ("summary", "placebo", "oracle", "none")
"""``summary``: the summarizer's reference (default); ``placebo``: neutral text of the same token
length; ``oracle``: a successful sibling's actions verbatim (ablation); ``none``: the teacher reads
nothing (teacher = student; a null check)."""

CUT_MARK = " ..."

_FILLERS = {
    "control": ("These notes were written before any attempt was made. They describe no step, no "
                "tool and no outcome. Read them as blank paper. "),
    "placebo": ("The weather was mild and the room was quiet all afternoon. Nothing here concerns "
                "the work at hand. "),
}


def token_length(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class FittedReference:
    text: str
    tokens: int
    """Tokens of the original text (before any cut)."""
    cut_tokens: int
    """Tokens removed to fit the budget (0: untouched)."""

    @property
    def truncated(self) -> bool:
        return self.cut_tokens > 0


def _cut(tokenizer: Any, ids: list[int], keep: int) -> str:
    return tokenizer.decode(ids[:keep]).rstrip() + CUT_MARK


def _shares(lengths: list[int], budget: int) -> list[int]:
    """Water-filling: every length gets min(length, level); ``level`` is the largest with
    sum <= budget (ties split the remainder from the first section on)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, left = [0] * len(lengths), budget
    for n, i in enumerate(order):
        fair = left // (len(order) - n)
        out[i] = min(lengths[i], fair)
        left -= out[i]
    for i in sorted(range(len(lengths))):  # integer remainder, to sections still cut
        if left <= 0:
            break
        if out[i] < lengths[i]:
            extra = min(left, lengths[i] - out[i])
            out[i] += extra
            left -= extra
    return out


def fit_reference(tokenizer: Any, text: str, max_tokens: int) -> FittedReference:
    """``text`` cut to at most ``max_tokens`` tokens (see the module docstring)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return FittedReference(text, len(ids), 0)
    sections, _ = parse_reference(text)
    if sections is None:
        kept = _cut(tokenizer, ids, max(0, max_tokens - token_length(tokenizer, CUT_MARK)))
        return FittedReference(kept, len(ids), len(ids) - token_length(tokenizer, kept))
    heads = [f"## {h}\n" for h in HEADINGS]
    bodies = [tokenizer(sections[h].strip(), add_special_tokens=False)["input_ids"] for h in HEADINGS]
    fixed = sum(token_length(tokenizer, h) for h in heads) + 2 * len(HEADINGS)  # headings, blank lines
    mark = token_length(tokenizer, CUT_MARK)
    budget = max(0, max_tokens - fixed - mark * len(HEADINGS))
    shares = _shares([len(b) for b in bodies], budget)
    parts = [head + (tokenizer.decode(b) if keep >= len(b) else _cut(tokenizer, b, keep))
             for head, b, keep in zip(heads, bodies, shares)]
    kept = "\n\n".join(parts) + "\n"
    return FittedReference(kept, len(ids), max(0, len(ids) - token_length(tokenizer, kept)))


def neutral_text(tokenizer: Any, n_tokens: int, variant: str = "control") -> str:
    """Content-free text of ``n_tokens`` tokens (re-encoding may merge across the cut; the
    nearest length at or below ``n_tokens`` is returned then)."""
    if n_tokens <= 0:
        return ""
    filler = _FILLERS[variant]
    unit = tokenizer(filler, add_special_tokens=False)["input_ids"]
    ids = (unit * (n_tokens // max(len(unit), 1) + 1))[:n_tokens]
    for keep in range(n_tokens, 0, -1):
        text = tokenizer.decode(ids[:keep])
        if token_length(tokenizer, text) <= n_tokens:
            return text
    return ""


def oracle_reference(group: Group) -> str | None:
    """The four-section reference naming a successful sibling's exact actions and answer (and
    where each failure departed from them); None when the group has no success."""
    from trainers.summarizer.render import split_siblings

    successes, failures = split_siblings(group)
    if not successes:
        return None
    best = successes[0]
    calls = _calls(best)
    answer = _final(best)
    steps = "\n".join(f"- call {n}: {name} {args}" for n, (name, args) in enumerate(calls, 1)) or "- no tool call"
    fails = []
    for ep in failures:
        theirs = _calls(ep)
        at = next((i for i, (a, b) in enumerate(zip(calls, theirs)) if a != b), min(len(calls), len(theirs)))
        did = f"{theirs[at][0]} {theirs[at][1]}" if at < len(theirs) else "answered instead"
        fails.append(f"- trial {ep.trial}: at call {at + 1} did {did}; final answer: {_final(ep) or 'none'}")
    body = {
        HEADINGS[0]: steps,
        HEADINGS[1]: f"{steps}\n- final answer: {answer or 'none'}",
        HEADINGS[2]: "\n".join(fails) or "- none",
        HEADINGS[3]: "\n".join(f"- call {n}: {name} {args}" for n, (name, args) in enumerate(calls, 1))
                     + f"\n- final answer: {answer or 'none'}",
    }
    return "\n\n".join(f"## {h}\n{body[h]}" for h in HEADINGS) + "\n"


def rollout_text(ep: Any) -> str:
    """One sibling's rollout as plain text, in a fixed form whatever its outcome: its tool calls
    with their full arguments, in order, then its final answer (RLCSD's hints; the form carries no
    sign of whether the rollout succeeded)."""
    calls = "\n".join(f"- call {n}: {name} {args}" for n, (name, args) in enumerate(_calls(ep), 1)) or "- no tool call"
    return f"{calls}\n- final answer: {_final(ep) or 'none'}\n"


def _calls(ep: Any) -> list[tuple[str, str]]:
    out = []
    for msg in ep.messages:
        for call in (msg.get("tool_calls") or []) if msg.get("role") == "assistant" else []:
            fn = call.get("function") or {}
            args = fn.get("arguments")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            out.append((fn.get("name") or "?", args))
    return out


def _final(ep: Any) -> str | None:
    from trainers.summarizer.render import final_text

    return final_text(ep)
