"""The LLM summarizer: one chat completion (through ``harness.llm.complete``, i.e. real litellm)
turns a rendered sibling group into a credit reference.

Policy, so that no call is wasted and no bad text reaches the teacher:
- the reply must pass ``parse_reference`` (four headings, each non-empty); a malformed or empty
  reply gets exactly one retry, which shows the model its (redacted) reply and what was wrong;
  a second bad reply is a fallback (``reason`` = the parser's reason), stored so a resume does not
  pay for it again;
- ``InfraError`` (provider still down after the wrapper's own retries on 429/5xx/timeouts) or a
  context-window error is a fallback with ``reason="infra: ..."`` that is *not* cached;
- cost (litellm's price map) and latency are summed over the calls made.
"""

from __future__ import annotations

import time

from harness.llm import ContextWindowError, InfraError, LLMConfig, complete
from trainers.summarizer.base import Outcome, SummaryCase
from trainers.summarizer.prompt import PROMPT_VERSION, build_messages, format_reference, parse_reference, retry_messages

__all__ = ["LLMSummarizer"]

MAX_CALLS = 2
"""The first call and exactly one retry."""


class LLMSummarizer:
    """Credit references from a litellm model (``name`` = the model string)."""

    def __init__(self, config: LLMConfig):
        self.config = config
        self.name = config.model
        self.prompt_version = PROMPT_VERSION

    async def summarize(self, case: SummaryCase) -> Outcome:
        rendered = case.rendered.text
        messages = build_messages(rendered)
        attempts, cost, reason = 0, 0.0, ""
        started = time.perf_counter()
        for _ in range(MAX_CALLS):
            try:
                reply = await complete(self.config, messages)
            except (InfraError, ContextWindowError) as exc:
                return Outcome(None, "fallback", reason=f"infra: {exc}", attempts=attempts, cost_usd=cost,
                               latency_s=time.perf_counter() - started, cacheable=False)
            attempts += 1
            cost += reply.usage.cost
            sections, reason = parse_reference(reply.content)
            if sections is not None:
                return Outcome(format_reference(sections), "ok", attempts=attempts, cost_usd=cost,
                               latency_s=time.perf_counter() - started)
            messages = retry_messages(rendered, case.redactor.redact(reply.content or ""), reason)
        return Outcome(None, "fallback", reason=reason, attempts=attempts, cost_usd=cost,
                       latency_s=time.perf_counter() - started)
