"""Off-policy correction between the rollout engine and the trainer: truncated importance sampling.

A trace's log-probs are μ, the sampling distribution's, as the rollout engine reported them. With
``hf`` the engine is the trained model's own forward, so μ = π_old to float precision; an engine
with other kernels or precision (vLLM, bf16) samples from a slightly different μ, and a gradient
estimated on its tokens as if they came from π_old is biased. With ``--tis-cap C`` > 0 the update
(``trainers.update.policy_update``), before its first optimizer step:

1. recomputes π_old, the log-prob of every sampled token under the trainer's current weights, with
   the loss's own forward (no grad), and uses it as ``old_logprobs``: the PPO ratio is π_θ/π_old,
   exactly 1 at the first optimizer step as without TIS;
2. weights each sampled token's policy-gradient term by the constant w_t = min(π_old/μ, C)
   (``tis_weights``; Ionides' truncated importance sampling, as verl's ``tis_imp_ratio_cap``
   applies it: ``pg_losses * clamp(exp(old_log_prob - rollout_log_probs), max=C)``, after the clip
   and dual clip, before aggregation, the KL terms unweighted).

The weight is applied to the per-token advantages: Â_t = A_t · w_t. That is the same as weighting
the policy-gradient term because every such term is positively homogeneous in A: for w ≥ 0,
min(r·wA, clip(r)·wA) = w·min(r·A, clip(r)·A), the dual clip's min(ℓ, −c·wA) over wA < 0 is w times
its value at A (w > 0 keeps the sign, so the same tokens are clipped), and −r·wA = w·(−r·A)
(tests/test_tis.py checks every registered policy loss). The KL to a reference or to a teacher,
added beside it (``policy_loss``'s ``kl_coef``, ``grpo_kl``'s β term), does not read A, so it stays
unweighted.

Logged per step over the trained sampled tokens (``mismatch``): ``tis/abs_diff_mean`` and
``tis/abs_diff_max`` (|log π_old − log μ|) and ``tis/capped_frac`` (tokens with π_old/μ > C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainers import distributed

__all__ = ["Mismatch", "tis_weights", "corrected"]


def tis_weights(old_logp: torch.Tensor, sampled_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(π_old/μ, C) per token from log-probs, detached: a constant of the loss, never a path for
    the gradient (the ratio is of fixed distributions: π_old is the policy before the update)."""
    return torch.exp(old_logp.detach().float() - sampled_logp.detach().float()).clamp(max=cap)


@dataclass
class Mismatch:
    """Running totals of |log π_old − log μ| over trained sampled tokens (summed over ranks by ``metrics``)."""

    cap: float
    abs_sum: float = 0.0
    abs_max: float = 0.0
    capped: float = 0.0
    tokens: float = 0.0

    def add(self, old_logp: torch.Tensor, sampled_logp: torch.Tensor) -> None:
        diff = old_logp.float() - sampled_logp.float()
        if not diff.numel():
            return
        self.abs_sum += float(diff.abs().sum())
        self.abs_max = max(self.abs_max, float(diff.abs().max()))
        self.capped += float((diff > math.log(self.cap)).sum())  # π_old/μ > C, without overflowing exp
        self.tokens += float(diff.numel())

    def metrics(self) -> dict[str, float]:
        """``tis/abs_diff_mean``, ``tis/abs_diff_max``, ``tis/capped_frac`` of the union batch."""
        abs_sum, capped, tokens = distributed.all_sum(self.abs_sum, self.capped, self.tokens)
        abs_max = distributed.all_max(self.abs_max)
        if not tokens:
            return {}
        return {"tis/abs_diff_mean": abs_sum / tokens, "tis/abs_diff_max": float(abs_max),
                "tis/capped_frac": capped / tokens}


def corrected(prepared: Any, old_logprobs: dict[int, torch.Tensor], cap: float) -> tuple[Any, Mismatch]:
    """``prepared`` with π_old as every trace's log-probs and each sampled token's advantage times
    w_t = min(π_old/μ, C), and the mismatch totals. ``old_logprobs[i]``: π_old at every position of
    trace i (``MicroBatch.unpack`` of the recomputation). The traces themselves are not changed."""
    stats = Mismatch(cap)
    traces, advantages = [], []
    for i, (trace, advantage) in enumerate(zip(prepared.traces, prepared.advantages)):
        old = old_logprobs[i].detach().float().cpu()
        if old.shape[0] != len(trace):
            raise RuntimeError(f"TIS: trace {i} has {len(trace)} tokens but the recomputation gave {old.shape[0]}")
        sampled = torch.as_tensor(trace.mask, dtype=torch.bool)
        mu = torch.as_tensor(trace.logprobs, dtype=torch.float32)
        stats.add(old[sampled], mu[sampled])
        weight = torch.where(sampled, tis_weights(old, mu, cap), torch.ones_like(old))
        # prompt positions keep the trace's convention (log-prob 0.0): they are never trained
        traces.append(replace(trace, logprobs=torch.where(sampled, old, torch.zeros_like(old)).tolist()))
        advantages.append(torch.as_tensor(advantage, dtype=torch.float32) * weight)
    return replace(prepared, traces=traces, advantages=advantages), stats
