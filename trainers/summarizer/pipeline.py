"""``summarize_groups``: mixed sibling groups -> SGCD credit references (methods.md §1.2b).

Per group: render the siblings (``render.py``) with every redaction literal masked
(``redact.py``), hash the result into a digest, look the digest up in the ``guidance`` table
(``harness.store.guidance``), and only on a miss ask the summarizer. Its text is checked for
literals once more (masked, counted as ``leaks``) and stored, so a resumed step never pays twice.
Infra failures are returned as fallbacks but not stored, so the next step tries again.

The train loop is synchronous: ``summarize_groups`` runs its own asyncio loop and summarizes up to
``concurrency`` groups at once; groups with the same digest in one batch share one call.

Example (what ``trainers/methods/sgcd.py`` does each step)::

    summarizer = make_summarizer("openai/gpt-4.1-mini")          # or make_summarizer("diff")
    refs = summarize_groups(summarizer, mixed_groups, tasks, factory, store=store, run="sgcd-1")
    metrics.update(summarizer_metrics(refs))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from dataclasses import dataclass
from typing import Any

from harness.errors import ConfigError
from harness.llm import CallContext, LLMConfig, call_context, check_api_key
from harness.store import Store, get_guidance, put_guidance
from harness.types import Group, Task
from trainers.summarizer.base import Outcome, Summarizer, SummaryCase
from trainers.summarizer.diff_summarizer import DiffSummarizer
from trainers.summarizer.llm_summarizer import LLMSummarizer
from trainers.summarizer.redact import Redactor, literals_for
from trainers.summarizer.render import RenderSettings, render_group

__all__ = ["CreditReference", "make_summarizer", "summarize_groups", "summarizer_metrics", "group_digest"]


@dataclass
class CreditReference:
    group_id: str
    task_id: str
    digest: str
    """sha256 hex of the (redacted) rendered group + task id + data version."""
    text: str | None
    """The credit reference; None = fallback (the group gets plain GRPO credit)."""
    status: str
    """``ok`` (made now) | ``cached`` (from the guidance table) | ``fallback``."""
    reason: str = ""
    """Why a fallback happened (``malformed: ...``, ``empty``, ``infra: ...``, ``not mixed: ...``)."""
    attempts: int = 0
    """Paid LLM calls made now (0 when cached and for the diff summarizer)."""
    cost_usd: float = 0.0
    latency_s: float = 0.0
    leaks: int = 0
    """Redaction literals found (and redacted) in the summarizer's output."""


def make_summarizer(spec: str, *, api_base: str | None = None, api_key: str | None = None,
                    timeout_s: float = 120.0, max_tokens: int = 1024) -> Summarizer:
    """``"diff"`` -> the built-in structural summarizer; anything else is a litellm model string
    (its key is checked now, before any training step)."""
    if spec == "diff":
        return DiffSummarizer()
    if not spec or not spec.strip():
        raise ConfigError("--summarizer needs 'diff' or a litellm model string (e.g. openai/gpt-4.1-mini)")
    cfg = LLMConfig(model=spec, api_base=api_base, api_key=api_key, temperature=0.0, max_tokens=max_tokens,
                    timeout=timeout_s, role="summarizer")
    check_api_key(cfg, "summarizer")
    return LLMSummarizer(cfg)


def group_digest(rendered_text: str, task: Task) -> str:
    return hashlib.sha256(f"{task.id}\n{task.version}\n{rendered_text}".encode()).hexdigest()


def _fallback(case_group: Group, digest: str, reason: str) -> CreditReference:
    return CreditReference(group_id=case_group.group_id, task_id=case_group.task_id, digest=digest, text=None,
                           status="fallback", reason=reason)


def summarize_groups(summarizer: Summarizer, groups: list[Group], tasks: dict[str, Task], factory: Any, *,
                     store: Store | None = None, run: str | None = None, concurrency: int = 8,
                     settings: RenderSettings | None = None) -> list[CreditReference]:
    """One ``CreditReference`` per group, in order (see the module docstring). Only mixed groups
    are summarized; any other group is a fallback whose reason says why."""
    refs: list[CreditReference | None] = [None] * len(groups)
    cases: dict[int, tuple[SummaryCase, str]] = {}
    for i, group in enumerate(groups):
        task = tasks.get(group.task_id)
        if task is None:
            raise ConfigError(f"summarize_groups: no task '{group.task_id}' in the tasks given")
        redactor = Redactor(literals_for(factory, task))
        rendered = render_group(group, task, redactor, settings)
        digest = group_digest(rendered.text, task)
        if not rendered.successes or not rendered.failures:
            side = "no scored siblings" if not (rendered.successes or rendered.failures) else \
                "no successes" if not rendered.successes else "no failures"
            refs[i] = _fallback(group, digest, f"not mixed: {side}")
            continue
        cases[i] = (SummaryCase(task, group, rendered, redactor, settings or RenderSettings()), digest)

    key = lambda digest: (digest, summarizer.name, summarizer.prompt_version)  # noqa: E731
    stored = get_guidance(store, [key(d) for _, d in cases.values()]) if store is not None and cases else {}
    todo: dict[str, list[int]] = {}
    for i, (case, digest) in cases.items():
        row = stored.get(key(digest))
        if row is not None:
            refs[i] = CreditReference(group_id=case.group.group_id, task_id=case.task.id, digest=digest,
                                      text=row["text"], status="cached", reason=row["reason"] or "")
        else:
            todo.setdefault(digest, []).append(i)

    if todo:
        made = _run(_summarize_all(summarizer, {d: cases[ix[0]][0] for d, ix in todo.items()}, store, run,
                                   max(1, concurrency)))
        for digest, indices in todo.items():
            first, *rest = indices
            refs[first] = made[digest]
            for i in rest:  # the same group twice in one batch: one call, the copy counts as cached
                group = cases[i][0].group
                refs[i] = CreditReference(group_id=group.group_id, task_id=group.task_id, digest=digest,
                                          text=made[digest].text, status="cached", reason=made[digest].reason)
    return refs  # type: ignore[return-value]


def _run(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (a notebook, an async caller): use a helper thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _summarize_all(summarizer: Summarizer, cases: dict[str, SummaryCase], store: Store | None,
                         run: str | None, concurrency: int) -> dict[str, CreditReference]:
    # A private call context: no response cache or limiter from whoever called us.
    call_context.set(CallContext(calls=[]))
    gate = asyncio.Semaphore(concurrency)

    async def one(digest: str, case: SummaryCase) -> tuple[str, CreditReference]:
        async with gate:
            try:
                outcome = await summarizer.summarize(case)
            except Exception as exc:  # noqa: BLE001 (a bad group must not stop the training step)
                outcome = Outcome(None, "fallback", reason=f"error: {type(exc).__name__}: {exc}", cacheable=False)
        return digest, _finish(summarizer, case, digest, outcome, store, run)

    return dict(await asyncio.gather(*(one(d, c) for d, c in cases.items())))


def _finish(summarizer: Summarizer, case: SummaryCase, digest: str, outcome: Outcome, store: Store | None,
            run: str | None) -> CreditReference:
    """Leak check on the output, then store the paid result."""
    text, leaks = (case.redactor.redact_count(outcome.text) if outcome.text is not None else (None, 0))
    status = "ok" if text is not None else "fallback"
    if store is not None and outcome.cacheable:
        put_guidance(store, digest=digest, model=summarizer.name, prompt_version=summarizer.prompt_version,
                     task_id=case.task.id, run=run, status=status, text=text, reason=outcome.reason,
                     cost_usd=outcome.cost_usd, latency_s=outcome.latency_s, attempts=outcome.attempts, leaks=leaks)
    return CreditReference(group_id=case.group.group_id, task_id=case.task.id, digest=digest, text=text,
                           status=status, reason=outcome.reason, attempts=outcome.attempts,
                           cost_usd=outcome.cost_usd, latency_s=outcome.latency_s, leaks=leaks)


def summarizer_metrics(refs: list[CreditReference]) -> dict[str, float]:
    """Flat metrics for a ``train_steps`` row. ``fallbacks`` counts groups without a reference
    (made now or cached); ``latency_s`` is the mean over references produced now."""
    made = [r for r in refs if r.status != "cached" and (r.attempts > 0 or r.latency_s > 0)]
    return {
        "summarizer/groups": float(len(refs)),
        "summarizer/calls": float(sum(r.attempts for r in refs)),
        "summarizer/cached": float(sum(r.status == "cached" for r in refs)),
        "summarizer/fallbacks": float(sum(r.text is None for r in refs)),
        "summarizer/cost_usd": float(sum(r.cost_usd for r in refs)),
        "summarizer/latency_s": float(sum(r.latency_s for r in made) / len(made)) if made else 0.0,
        "summarizer/leaks": float(sum(r.leaks for r in refs)),
    }
