"""SGCD's summarizer: a mixed sibling group -> a redacted, cached, training-only credit reference.

Modules, one job each: ``render`` (group -> compact text), ``redact`` (private literals ->
``[REDACTED]``), ``prompt`` (the four-heading prompt, its version, the reply parser),
``llm_summarizer`` (one litellm call, one retry, fallback), ``diff_summarizer`` (structural, no
LLM), ``pipeline`` (cache in the ``guidance`` table, concurrency, leak check, metrics).
"""

from trainers.summarizer.base import Outcome, Summarizer, SummaryCase
from trainers.summarizer.diff_summarizer import DiffSummarizer
from trainers.summarizer.llm_summarizer import LLMSummarizer
from trainers.summarizer.pipeline import (
    CreditReference,
    group_digest,
    make_summarizer,
    summarize_groups,
    summarizer_metrics,
)
from trainers.summarizer.prompt import HEADINGS, PROMPT_VERSION, format_reference, parse_reference
from trainers.summarizer.redact import MASK, Redactor, literals_for
from trainers.summarizer.render import RenderSettings, render_group

__all__ = [
    "CreditReference",
    "make_summarizer",
    "summarize_groups",
    "summarizer_metrics",
    "group_digest",
    "Summarizer",
    "SummaryCase",
    "Outcome",
    "LLMSummarizer",
    "DiffSummarizer",
    "HEADINGS",
    "PROMPT_VERSION",
    "parse_reference",
    "format_reference",
    "MASK",
    "Redactor",
    "literals_for",
    "RenderSettings",
    "render_group",
]
