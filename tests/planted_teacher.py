"""Test doubles for SGCD's credit tests: a teacher that knows something at known tokens, and a
summarizer that writes a fixed reference.

``PlantedTeacher`` wraps a real tiny policy. It behaves exactly like the policy, except when its
context holds ``marker`` (a token-id sequence that only the planted reference contains): then, at
every position whose *next* token is one of ``targets``, it replaces its logits by a fixed random
draw of scale ``scale`` (peaked, so its entropy stays low). So the teacher disagrees with the
student exactly at the sampled tokens whose id is in ``targets``, and nowhere else; a scoring pass
that reads logits one row off sees the disagreement on the wrong tokens.

It handles the two call patterns of ``trainers.teacher``: whole sequences (no cache; one sequence
per row, or packed rows whose ``position_ids`` restart at 0) and a cached prefix followed by
continuations (``score_shared_prefix``): the marker seen in the last uncached call decides for
the continuations that use its cache.
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.summarizer.base import Outcome
from trainers.summarizer.prompt import HEADINGS

__all__ = ["PlantedTeacher", "FixedSummarizer", "MARKER_TEXT", "planted_reference"]

MARKER_TEXT = "zq-planted-knowledge-qz"


def planted_reference(extra: str = "") -> str:
    """A valid four-section reference that contains the marker."""
    return "\n\n".join(f"## {h}\n- {MARKER_TEXT} {extra}".rstrip() for h in HEADINGS) + "\n"


def _contains(row: list[int], marker: list[int]) -> bool:
    n = len(marker)
    return any(row[i:i + n] == marker for i in range(len(row) - n + 1))


class PlantedTeacher(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, marker: list[int], targets: set[int], scale: float = 12.0,
                 seed: int = 0):
        super().__init__()
        self.model = model
        self.marker = list(marker)
        self.targets = set(targets)
        self.scale = scale
        self.seed = seed
        self.active = False
        self.perturbed = 0

    @property
    def config(self):
        return self.model.config

    def _noise(self, vocab: int, token: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + token)
        return torch.randn(vocab, generator=gen) * self.scale

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kw):
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, position_ids=position_ids,
                         logits_to_keep=logits_to_keep, **kw)
        ids = input_ids.tolist()
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            self.active = any(_contains(row, self.marker) for row in ids)
        length = input_ids.shape[1]
        if isinstance(logits_to_keep, torch.Tensor):  # the rows whose logits came back, by position
            kept = logits_to_keep.tolist()
        else:
            kept = list(range(length - logits_to_keep if logits_to_keep else 0, length))
        logits = out.logits
        cached = past_key_values is not None and past_key_values.get_seq_length() > length
        for b, row in enumerate(ids):
            seq_start = [0] * length  # where each position's sequence starts (packed rows restart positions)
            if not cached and position_ids is not None:
                pos = position_ids[b].tolist()
                for k in range(1, length):
                    seq_start[k] = k if pos[k] == 0 else seq_start[k - 1]
            for i, k in enumerate(kept):
                if k + 1 >= length or row[k + 1] not in self.targets:  # row k predicts token k + 1
                    continue
                knows = self.active if cached else _contains(row[seq_start[k]:k + 1], self.marker)
                if knows:
                    logits[b, i] = self._noise(logits.shape[-1], row[k + 1]).to(logits)
                    self.perturbed += 1
        return out


class FixedSummarizer:
    """Writes the same reference for every group (a real ``Summarizer``: the pipeline redacts,
    checks and caches its text like any other)."""

    name = "fixed"
    prompt_version = "fixed-1"

    def __init__(self, text: str):
        self.text = text

    async def summarize(self, case) -> Outcome:
        return Outcome(self.text, "ok")
