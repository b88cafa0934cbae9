"""Token traces: the exact tokens a local policy saw and sampled in one multi-turn episode.

The trainer must train on the tokens the policy sampled, not on a re-rendering of the finished
conversation (re-applying a chat template to the final messages changes token ids and makes
PPO-style ratios meaningless; see DESIGN.md §3). So the trace is built incrementally while the
episode runs:

- ``add_prompt(ids)``: tokens the policy was conditioned on but did not produce (system prompt,
  user and tool messages, template glue). Mask 0.
- ``add_response(ids, logprobs)``: tokens the policy sampled, with their sampling log-probs.
  Mask 1.

``input_ids[i]`` is the token at position ``i``; ``logprobs[i]`` is log π_old(input_ids[i] |
input_ids[:i]) where ``mask[i] == 1`` and 0.0 elsewhere.

For privileged-context teachers (SGCD, self-distillation) the trace also keeps the episode's
opening messages and tool schemas (``context``) and the length of the first prompt, so a teacher
prompt can be rendered with extra context while every later token stays identical; and, when the
sampler was asked to, the student's top-K distribution at each sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TokenTrace"]


@dataclass
class TokenTrace:
    input_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    """1 on tokens the policy sampled, 0 on everything else."""
    logprobs: list[float] = field(default_factory=list)
    """Sampling log-probs on masked-in tokens (0.0 elsewhere)."""
    turns: list[tuple[int, int]] = field(default_factory=list)
    """``(start, end)`` of each sampled span, in token positions."""
    truncated: bool = False
    """Some turn hit the per-turn token limit before its end-of-turn token."""
    first_prompt_len: int = 0
    """Tokens of the first prompt (system, tools, first user message, generation prompt)."""
    context: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """``{"messages": [...], "tools": [...]}`` the first prompt was rendered from."""
    topk_ids: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)
    """Per sampled span: ``[span length, K]`` top-K token ids of the sampling distribution."""
    topk_logprobs: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    def add_prompt(self, ids: list[int]) -> None:
        self.input_ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def add_response(self, ids: list[int], logprobs: list[float], topk_ids: torch.Tensor | None = None,
                     topk_logprobs: torch.Tensor | None = None) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probs")
        if topk_ids is not None:
            if topk_logprobs is None or topk_ids.shape[0] != len(ids) or topk_logprobs.shape != topk_ids.shape:
                raise ValueError("top-K ids and log-probs must have one row per sampled token")
            self.topk_ids.append(topk_ids)
            self.topk_logprobs.append(topk_logprobs)
        start = len(self.input_ids)
        self.input_ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.turns.append((start, start + len(ids)))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        return sum(self.mask)

    @property
    def sampled_positions(self) -> list[int]:
        """Positions of the sampled tokens, in order (the ones ``mask`` marks)."""
        return [p for start, end in self.turns for p in range(start, end)]

    def student_topk(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``([n, K] ids, [n, K] log-probs)`` over all sampled tokens, or None if not recorded."""
        if not self.turns or len(self.topk_ids) != len(self.turns):
            return None
        return torch.cat(self.topk_ids), torch.cat(self.topk_logprobs)
