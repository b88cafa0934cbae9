"""The built-in ``diff`` summarizer: a structural credit reference with no LLM (cost 0, deterministic).

Why: SGCD needs a credit reference per mixed group; an external LLM is the paper's choice, but a
free, reproducible baseline lets the method run offline and lets us measure what the LLM adds.
It writes the same four headed sections as the LLM (so the same parser accepts it) from the
siblings' action sequences (tool names + redacted argument values; ``apis.app.api(...)`` calls
for code agents):

- state checks: read-only calls of the successful attempts. A call is read-only when its name
  looks like a query (get/search/list/find/lookup/calculate/check/show/read/...); a name that is
  neither a query nor a known write verb counts as a check when it comes before the attempt's
  first state-changing call. Each check says how many successes made it and how many failures
  skipped it;
- reusable successful branches: the prefix all successes share and the most common successful
  sequence (ties: shorter first), with the successes' final text;
- failed branches: for each distinct failure, the closest success (edit distance over actions),
  the first step where it departs and what it did instead (or that it stopped, or that only the
  final text differs), plus why: how it ended, tool errors, state changes no success makes or
  that every success makes and it misses;
- divergence points: those departures aggregated by step, most frequent first.

Attempts are named by trial number ("trial 3"), which is stable however the siblings are shown;
positions count the agent's calls ("call 2" = its second action).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter

from harness.types import EpisodeResult
from trainers.summarizer.base import Outcome, SummaryCase
from trainers.summarizer.prompt import HEADINGS, format_reference
from trainers.summarizer.redact import Redactor
from trainers.summarizer.render import Action, clip, episode_actions, final_text, tool_errors

__all__ = ["DiffSummarizer", "diff_reference", "is_read_only", "is_write"]

ALGORITHM_VERSION = "diff-v1"
_END = r"(?=$|[_.\d]|(?-i:[A-Z]))"  # the verb is a whole word of a snake_case / dotted / camelCase name
_READ = re.compile(r"(?:^|[._])(get|search|list|find|lookup|look_up|calculate|check|show|read|fetch|query|view|"
                   r"count|verify|describe|validate|inspect)" + _END, re.I)
_WRITE = re.compile(r"(?:^|[._])(update|cancel|book|create|delete|send|transfer|modify|add|remove|pay|set|post|"
                    r"write|approve|submit|complete|reset|move|upload|like|follow|mark|order|refund|exchange|return)"
                    + _END, re.I)
MAX_FAILURES_SHOWN = 6


def is_read_only(name: str) -> bool:
    return bool(_READ.search(name)) and not _WRITE.match(name)


def is_write(name: str) -> bool:
    return bool(_WRITE.search(name)) and not is_read_only(name)


class DiffSummarizer:
    """``name = "diff"``; ``prompt_version`` hashes the algorithm version and the headings."""

    name = "diff"
    prompt_version = "diff-" + hashlib.sha256("\n".join([ALGORITHM_VERSION, *HEADINGS]).encode()).hexdigest()[:8]

    async def summarize(self, case: SummaryCase) -> Outcome:
        started = time.perf_counter()
        text = diff_reference(case.rendered.successes, case.rendered.failures, case.redactor)
        return Outcome(text, "ok", latency_s=time.perf_counter() - started)


def _state_checks(actions: list[Action]) -> list[Action]:
    first_write = next((i for i, a in enumerate(actions) if is_write(a.name)), len(actions))
    return [a for i, a in enumerate(actions)
            if is_read_only(a.name) or (not is_write(a.name) and i < first_write)]


def _edit_distance(a: list[Action], b: list[Action]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def _prefix(a: list[Action], b: list[Action]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _seq(actions: list[Action], limit: int = 8) -> str:
    if not actions:
        return "(no tool calls)"
    shown = " -> ".join(f"`{a}`" for a in actions[:limit])
    return shown + (f" -> ... ({len(actions) - limit} more)" if len(actions) > limit else "")


def _trials(eps: list[EpisodeResult]) -> str:
    return ("trials " if len(eps) > 1 else "trial ") + ", ".join(str(e.trial) for e in eps)


def diff_reference(successes: list[EpisodeResult], failures: list[EpisodeResult], redactor: Redactor) -> str:
    """The four-section credit reference for one group (see the module docstring)."""
    act = {id(e): episode_actions(e, redactor, limit=120) for e in successes + failures}
    final = {id(e): clip(redactor.redact(final_text(e) or ""), 160) for e in successes + failures}
    n_s, n_f = len(successes), len(failures)

    # -- state checks --------------------------------------------------------------------------
    checks: dict[Action, set[int]] = {}
    for e in successes:
        for a in _state_checks(act[id(e)]):
            checks.setdefault(a, set()).add(e.trial)
    check_lines = []
    for a, trials in list(checks.items())[:8]:
        skipped = sum(1 for f in failures if a not in act[id(f)])
        check_lines.append(f"- `{a}`: made by {len(trials)}/{n_s} successful attempts; "
                           f"skipped by {skipped}/{n_f} failed attempts.")
    if not check_lines:
        check_lines = ["- None: the successful attempts make no read-only calls before acting."]

    # -- reusable successful branches --------------------------------------------------------
    seqs = [tuple(act[id(e)]) for e in successes]
    common = list(seqs[0]) if seqs else []
    for s in seqs[1:]:
        common = common[: _prefix(common, list(s))]
    counts = Counter(seqs)
    order = sorted(counts, key=lambda s: (-counts[s], len(s), seqs.index(s)))
    branch_lines = []
    if common and len(seqs) > 1:
        branch_lines.append(f"- All {n_s} successful attempts open with: {_seq(common)}.")
    best = list(order[0]) if order else []
    holders = [e for e in successes if tuple(act[id(e)]) == tuple(best)]
    branch_lines.append(f"- Most common successful sequence ({counts[tuple(best)]}/{n_s}, {_trials(holders)}): "
                        f"{_seq(best)}.")
    for other in order[1:3]:
        branch_lines.append(f"- Also successful ({counts[other]}/{n_s}): {_seq(list(other))}.")
    endings = sorted({final[id(e)] for e in successes if final[id(e)]})
    if endings:
        branch_lines.append(f"- Successful attempts end with a final reply like: \"{endings[0]}\".")

    # -- failed branches ---------------------------------------------------------------------
    groups: dict[tuple, list[EpisodeResult]] = {}
    for f in failures:
        groups.setdefault((tuple(act[id(f)]), final[id(f)], f.termination.value), []).append(f)
    success_writes = [{a for a in act[id(e)] if is_write(a.name)} for e in successes]
    always_writes = set.intersection(*success_writes) if success_writes else set()
    any_writes = set.union(*success_writes) if success_writes else set()
    fail_lines, divergences = [], Counter()
    for (fseq, ftext, ended), members in list(groups.items()):
        f = members[0]
        fa = list(fseq)
        closest = min(successes, key=lambda e: (_edit_distance(fa, act[id(e)]), e.trial))
        sa = act[id(closest)]
        d = _prefix(fa, sa)
        who = f"{_trials(members).capitalize()} (reward {f.score.reward:.2f}, ended {ended})"
        if fa == sa:
            what = (f"makes the same calls as successful trial {closest.trial}, but its final reply differs: "
                    f"\"{ftext or '(none)'}\" instead of \"{final[id(closest)] or '(none)'}\"")
            key = (d, "final", "", "")
        elif d < len(fa):
            expected = f"`{sa[d]}`" if d < len(sa) else "ending the attempt"
            what = (f"follows successful trial {closest.trial} for {d} call(s), then at call {d + 1} does "
                    f"`{fa[d]}` instead of {expected}")
            key = (d, "call", expected, f"`{fa[d]}`")
        else:
            what = (f"follows successful trial {closest.trial} for {d} call(s), then stops making calls "
                    f"where it goes on with `{sa[d]}`")
            key = (d, "stop", f"`{sa[d]}`", "")
        divergences[key] += len(members)
        why = []
        if ended not in ("agent_stop", "user_stop"):
            why.append(f"the episode was ended by `{ended}`")
        errors = tool_errors(f)
        if errors:
            why.append(f"{len(errors)} tool error(s), first: \"{clip(redactor.redact(errors[0]), 120)}\"")
        extra = [a for a in fa if is_write(a.name) and a not in any_writes]
        if extra:
            why.append(f"it makes a state change no success makes: `{extra[0]}`")
        missing = [a for a in always_writes if a not in fa]
        if missing:
            why.append(f"it misses the state change every success makes: `{sorted(missing, key=str)[0]}`")
        if fa != sa and ftext and ftext != final[id(closest)]:
            why.append(f"its final reply was \"{ftext}\"")
        fail_lines.append(f"- {who}: {what}." + (f" Why: {'; '.join(why)}." if why else ""))
    if len(fail_lines) > MAX_FAILURES_SHOWN:
        rest = len(fail_lines) - MAX_FAILURES_SHOWN
        fail_lines = fail_lines[:MAX_FAILURES_SHOWN] + [f"- ... and {rest} more distinct failed attempts."]

    # -- divergence points -------------------------------------------------------------------
    div_lines = []
    for (step, kind, expected, instead), k in sorted(divergences.items(), key=lambda kv: (-kv[1], kv[0])):
        share = f"{k}/{n_f} failed attempts"
        if kind == "final":
            div_lines.append(f"- At the final reply (after {step} matching call(s)): {share} make the same calls as "
                             f"a success but end with a different reply.")
        elif kind == "stop":
            div_lines.append(f"- At call {step + 1}: successful attempts go on with {expected}; {share} stop there.")
        else:
            div_lines.append(f"- At call {step + 1}: successful attempts do {expected}; {share} do {instead} "
                             f"instead.")
    if not div_lines:
        div_lines = ["- No failed attempts to compare."]

    return format_reference(dict(zip(HEADINGS, ["\n".join(check_lines), "\n".join(branch_lines),
                                                "\n".join(fail_lines) or "- None.", "\n".join(div_lines)])))
