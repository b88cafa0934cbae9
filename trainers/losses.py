"""Per-token log-probs, policy losses, KL estimators and exact loss aggregation (pure torch).

What: the numerical pieces every policy-gradient method of the trainer shares. The training loop
(written elsewhere) calls them per micro-batch:

    logp, ent = token_logprobs(logits, input_ids, temperature, with_entropy=True)
    loss, metrics = policy_loss("clip", logp, old_logp, adv, mask, agg="token-mean", norm=norm,
                                seq_index=seq_index, eps_low=0.2, eps_high=0.28)
    loss.backward()                      # summed over micro-batches == the full-batch loss

Why this shape:
- ``token_logprobs`` is one fused autograd function: per chunk of tokens it reads the logits once
  in float32, returns log p(target) = x[target] - logsumexp(x) and (optionally, no grad) the
  entropy, and keeps only the logits and a [tokens] logsumexp for backward. No [tokens, vocab]
  float32 log-softmax is kept alive, which matters for bf16 logits with a 150k vocabulary.
  Logits are divided by the sampling temperature first so the result matches sampling log-probs.
- Aggregation takes a ``LossNorm`` computed once for the *whole* batch (total loss tokens, number
  of sequences, Dr.GRPO constant), so summing micro-batch losses gives exactly the full-batch loss
  and gradient. Taking each micro-batch's own mean is a well-known gradient-accumulation bug.
- Policy losses live in a registry (``POLICY_LOSSES``) with one signature
  ``fn(logp, old_logp, advantages, mask, **options) -> (per_token_loss, metrics)`` so other
  methods (RLSD, OPD, SGCD, ...) add a function instead of copying the loop.

All per-token tensors are aligned with next-token targets: position j scores ``input_ids[:, j+1]``.
Tests: ``.venv/bin/python -m pytest tests/test_grpo_math.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AGGREGATIONS", "DEFAULT_KL_ESTIMATOR", "DUAL_CLIP", "KL_ESTIMATORS", "POLICY_LOSSES", "LossNorm", "aggregate",
    "clipped_surrogate", "entropy_from_logits", "kl_penalty", "masked_mean", "policy_loss", "register_policy_loss",
    "token_logprobs",
]

# Logits elements handled at once in float32. On CPU a chunk that stays in cache is 2-3x faster
# than one big pass (bench/train_step.py); on GPUs bigger chunks mean fewer kernel launches.
_CHUNK_ELEMENTS_CPU = 1 << 18    # 1 MiB
_CHUNK_ELEMENTS = 1 << 25        # 128 MiB


def _chunks(length: int, vocab: int, device: torch.device):
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS
    step = max(1, budget // max(vocab, 1))
    for start in range(0, length, step):
        yield start, min(start + step, length)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target] per position (shifted), plus optional no-grad entropy."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        batch, length, vocab = logits.shape
        n = length - 1
        logp = logits.new_empty((batch, n), dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for b in range(batch):
            for s, e in _chunks(n, vocab, logits.device):
                x = logits[b, s:e].float()
                if temperature != 1.0:
                    x = x / temperature
                if with_entropy:  # one exp pass for both: lse = m + log S, H = lse - sum(e x) / S
                    m = x.amax(-1, keepdim=True)
                    ex = (x - m).exp_()
                    total = ex.sum(-1)
                    chunk_lse = m.squeeze(-1) + total.log()
                    ent[b, s:e] = chunk_lse - torch.linalg.vecdot(ex, x) / total
                else:
                    chunk_lse = torch.logsumexp(x, dim=-1)
                lse[b, s:e] = chunk_lse
                logp[b, s:e] = x.gather(-1, targets[b, s:e, None]).squeeze(-1) - chunk_lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        if with_entropy:
            ctx.mark_non_differentiable(ent)
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *_):
        logits, targets, lse = ctx.saved_tensors
        temperature = ctx.temperature
        batch, length, vocab = logits.shape
        grad = torch.empty_like(logits)
        grad[:, -1].zero_()
        in_place = logits.dtype == torch.float32 and temperature == 1.0
        # d logp / d x = (onehot(target) - softmax(x / T)) / T
        g = grad_logp.float() / temperature
        for b in range(batch):
            for s, e in _chunks(length - 1, vocab, logits.device):
                x = logits[b, s:e].float()
                if temperature != 1.0:
                    x = x / temperature
                out = grad[b, s:e] if in_place else None
                chunk = torch.sub(x, lse[b, s:e, None], out=out).exp_().mul_(-g[b, s:e, None])
                chunk.scatter_add_(-1, targets[b, s:e, None], g[b, s:e, None])
                if not in_place:
                    grad[b, s:e] = chunk
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, *,
                   with_entropy: bool = False):
    """Log-prob of each next token: ``out[:, j] = log softmax(logits[:, j] / T)[input_ids[:, j+1]]``.

    logits ``[B, L, V]`` (any float dtype), input_ids ``[B, L]``; returns float32 ``[B, L-1]``.
    With ``with_entropy=True`` also returns the entropy (no grad) of the same temperature-scaled
    next-token distributions, computed in the same pass over the logits.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, L, V] "
                         f"with input_ids {tuple(input_ids.shape)} = [B, L]")

    targets = input_ids[:, 1:].contiguous()
    out = _TokenLogProb.apply(logits, targets, float(temperature), with_entropy)
    return out


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) at every position, float32 ``[..., L]``; no grad, chunked."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s, e in _chunks(flat.shape[0], flat.shape[-1], flat.device):
        x = flat[s:e].float() / temperature
        m = x.amax(-1, keepdim=True)
        ex = (x - m).exp_()
        total = ex.sum(-1)
        out[s:e] = m.squeeze(-1) + total.log() - torch.linalg.vecdot(ex, x) / total
    return out.reshape(logits.shape[:-1])


# --- KL to a reference policy, per token (Schulman, "Approximating KL Divergence", 2020) --------
# With log_ratio = log pi_theta - log pi_ref on tokens sampled from pi_theta:
#   k1 = log_ratio                       unbiased for KL(pi_theta || pi_ref), high variance
#   k2 = log_ratio**2 / 2                biased, low variance
#   k3 = exp(-log_ratio) - 1 + log_ratio unbiased, >= 0 (the GRPO estimator, DeepSeekMath arXiv 2402.03300)
#   k3+ = the value of k3 with the gradient of k2 (straight-through; verl's "k3+")
# As a *loss term* what matters is the expected gradient, E_{y~pi}[k'(lr(y)) grad log pi(y)]
# (the sample is not differentiated), and it is not the gradient of what the value estimates:
#   k1: E[grad log pi] = grad sum(pi) = 0                  no regularisation at all
#   k2: sum grad(pi) (log pi - log ref) = grad KL(pi || ref)       the reverse KL GRPO means
#   k3: sum (pi - ref) grad log pi = -sum ref grad log pi = grad KL(ref || pi)   the forward KL
# So the default is k3+: the logged value is k3's unbiased, non-negative estimate of KL(pi || ref)
# and the gradient is the reverse KL's (docs/decisions.md; tests/test_grpo_math.py checks all four
# expected gradients exactly on a small vocabulary).
def _k3_value_k2_gradient(lr: torch.Tensor) -> torch.Tensor:
    k2 = 0.5 * lr.square()
    return (torch.expm1(-lr) + lr).detach() + (k2 - k2.detach())


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda lr: lr,
    "k2": lambda lr: 0.5 * lr.square(),
    "k3": lambda lr: torch.expm1(-lr) + lr,
    "k3+": _k3_value_k2_gradient,
}
DEFAULT_KL_ESTIMATOR = "k3+"


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = DEFAULT_KL_ESTIMATOR) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (see above for
    the gradient each estimator gives as a loss term)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logp - ref_logp)


# --- loss aggregation, exact under gradient accumulation -----------------------------------------
@dataclass(frozen=True)
class LossNorm:
    """Normalisers of the *whole* batch (all micro-batches of one optimizer step).

    num_tokens: loss tokens (mask sum) in the batch; num_seqs: sequences with >= 1 loss token;
    constant: Dr.GRPO's fixed per-sequence divisor (e.g. the max response length).
    """

    num_tokens: float
    num_seqs: int
    constant: float | None = None


def _masked_sum(per_token, mask):
    return (per_token * mask).sum()


def _token_mean(per_token, mask, norm, seq_index):
    # DAPO token-level loss: (1 / sum_i |o_i|) sum_i sum_t l_it  (arXiv 2503.14476)
    return _masked_sum(per_token, mask) / max(norm.num_tokens, 1)


def _seq_mean_token_mean(per_token, mask, norm, seq_index):
    # GRPO: (1/G) sum_i (1/|o_i|) sum_t l_it  (arXiv 2402.03300). Each sequence must lie whole in
    # one micro-batch (the packer guarantees it), so its token count is known locally.
    if seq_index is None:  # padded layout: one sequence per row
        counts = mask.sum(-1, keepdim=True).clamp(min=1)
        weights = mask / counts
    else:
        live = mask > 0
        idx = seq_index.clamp(min=0)
        counts = torch.zeros(int(idx.max()) + 1, dtype=per_token.dtype, device=per_token.device)
        counts.index_add_(0, idx[live], mask[live])
        weights = mask / counts.clamp(min=1)[idx]
    return (per_token * weights).sum() / max(norm.num_seqs, 1)


def _seq_mean_token_sum_norm(per_token, mask, norm, seq_index):
    # Dr.GRPO: (1/G) sum_i sum_t l_it / C with a constant C (arXiv 2503.20783)
    if norm.constant is None:
        raise ValueError("agg 'seq-mean-token-sum-norm' needs LossNorm.constant (e.g. the max response length)")
    return _masked_sum(per_token, mask) / (max(norm.num_seqs, 1) * norm.constant)


AGGREGATIONS: dict[str, Callable] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: LossNorm,
              seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's share of the batch loss; shares of all micro-batches sum to the batch loss."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](per_token, mask.to(per_token.dtype), norm, seq_index)


# --- policy losses: registry with one shared signature -------------------------------------------
POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str):
    """Decorator: ``fn(logp, old_logp, advantages, mask, **options) -> (per_token_loss, metrics)``."""
    def wrap(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn
    return wrap


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the tokens where ``mask`` is set (0 when none is)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


DUAL_CLIP = 3.0
"""Dual-clip bound c for negative advantages (Ye et al. 2020; verl's ``clip_ratio_c`` default)."""


@register_policy_loss("clip")
def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
                      dual_clip: float = DUAL_CLIP):
    """PPO clipped surrogate per token, with DAPO clip-higher (separate eps_low / eps_high) and dual-clip.

    loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), r_t = exp(logp - old_logp)
    (PPO, arXiv 1707.06347; GRPO arXiv 2402.03300; DAPO clip-higher arXiv 2503.14476). With A_t < 0
    that loss grows without bound in r_t (the min picks r_t A_t once r_t > 1 + eps_high), so one
    stale token can dominate an off-policy update; dual-clip PPO (Ye et al. 2020, arXiv 1912.09729;
    verl ``clip_ratio_c``) caps it at -c A_t (``dual_clip`` = c > 1, 0 = off): for r_t > c the
    token's loss is constant and sends no gradient. On-policy with one update every r_t = 1, so it
    only acts with ``--ppo-epochs`` > 1 or ``--mini-batches`` > 1. Metrics (over this micro-batch's
    masked tokens, detached): ``clip/frac`` (tokens whose gradient a clip removes), ``clip/frac_low``
    / ``clip/frac_high`` / ``clip/frac_dual``, ``ratio/mean``, ``ratio/max``, ``tokens``.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    with torch.no_grad():
        r = ratio.detach()
        high = (r > 1.0 + eps_high) & (advantages > 0)
        low = (r < 1.0 - eps_low) & (advantages < 0)
        dual = (r > dual_clip) & (advantages < 0) if dual_clip else torch.zeros_like(high)
        metrics = {
            "clip/frac": masked_mean((high | low | dual).to(mask.dtype), mask),
            "clip/frac_high": masked_mean(high.to(mask.dtype), mask),
            "clip/frac_low": masked_mean(low.to(mask.dtype), mask),
            "clip/frac_dual": masked_mean(dual.to(mask.dtype), mask),
            "ratio/mean": masked_mean(r, mask),
            "ratio/max": torch.where(mask > 0, r, torch.zeros_like(r)).max(),
            "tokens": mask.sum(),
        }
    return per_token, metrics


@register_policy_loss("pg")
def importance_weighted_pg(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor):
    """Unclipped importance-weighted policy gradient: loss_t = -r_t A_t (REINFORCE when on-policy)."""
    ratio = torch.exp(logp - old_logp)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        metrics = {"ratio/mean": masked_mean(ratio.detach(), m), "tokens": m.sum()}
    return -ratio * advantages, metrics


def policy_loss(name: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, agg: str, norm: LossNorm, seq_index: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = DEFAULT_KL_ESTIMATOR,
                **options):
    """Registered per-token loss (+ kl_coef * KL to ``ref_logp``, inside the sum as in GRPO), aggregated by ``agg``.

    Returns ``(loss, metrics)``; ``loss`` is this micro-batch's share of the batch loss.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}")
    per_token, metrics = POLICY_LOSSES[name](logp, old_logp, advantages, mask, **options)
    if ref_logp is not None and kl_coef:
        kl = kl_penalty(logp, ref_logp, kl_kind)
        per_token = per_token + kl_coef * kl
        metrics["kl/ref"] = masked_mean(kl.detach(), mask.to(kl.dtype))
    return aggregate(per_token, mask, agg, norm, seq_index), metrics
