"""The one per-token advantage hook of the GRPO family: Â_t = A · sg[m_t].

A credit method that only decides *how much* of a sequence's GRPO advantage each token gets
(RLSD's evidence ratio, SGCD's calibrated weight, RLCSD's contrastive ratio) returns a
multiplier m_t >= 0 per sampled token from ``GRPOMethod.token_multipliers``; this module turns
it into the per-position advantage that any GRPO-family loss then reads, unchanged. That is how
the public ports implement RLSD (ms-swift's ``advantage_reweight``, fw-ai's cookbook: a detached
per-token weight on the advantage that composes with any loss), and it is what keeps the
methods composable with every preset: the multiplier never touches the loss, its aggregation,
clip or KL, so ``--method rlsd --loss-agg seq-mean-token-sum-norm --no-std-normalize`` is
Dr.GRPO's loss with RLSD's credit.

Two properties hold whatever a method passes in:
- detached: m is cut from any graph (``detach``), so no gradient flows into the teacher, the
  reference or whatever produced m; the policy gradient is A · m_t · ∇ log π(y_t) per token;
- sign-preserving: a negative multiplier is refused (it would flip the reward's direction), so
  sign(Â_t) = sign(A) on every token.
A trajectory without a multiplier keeps GRPO's scalar credit.
"""

from __future__ import annotations

import torch

from harness.policy.trace import TokenTrace

__all__ = ["modulated_advantage"]


def modulated_advantage(trace: TokenTrace, advantage: float, multiplier: torch.Tensor | None) -> float | torch.Tensor:
    """GRPO's scalar ``advantage`` when ``multiplier`` is None, else the per-position advantage
    ``[len(trace)]``: A · sg[m_t] at the trace's sampled positions, 0 elsewhere (prompt and tool
    tokens never train). ``multiplier``: ``[response_tokens]``, in sampled-position order."""
    if multiplier is None:
        return advantage
    m = multiplier.detach().float().reshape(-1)
    if m.numel() != trace.response_tokens:
        raise ValueError(f"a token multiplier has {m.numel()} values for a trace with {trace.response_tokens} "
                         "sampled tokens")
    if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
        raise ValueError("token multipliers must be finite and >= 0 (a negative one would flip the reward's sign)")
    per_pos = torch.zeros(len(trace), dtype=torch.float32)
    per_pos[torch.as_tensor(trace.sampled_positions, dtype=torch.long)] = advantage * m
    return per_pos
