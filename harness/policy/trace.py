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
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def add_prompt(self, ids: list[int]) -> None:
        self.input_ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def add_response(self, ids: list[int], logprobs: list[float]) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probs")
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
