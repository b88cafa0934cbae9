"""SGCD's bounded, detached token credit: divergence -> salience s in [0, 1] -> weight W in [1, c].

From the paper (methods.md §1.2 [S]):
    d_t = KL(p^K_t || sg[q^K_t])       reverse KL, student p vs teacher q, over a top-K support
    W_t = clip(1 + gamma * s_t, 1, c)  (paper: gamma = 1, c = 2)
    Â_t = A * sg[W_t]                  the sign of A is never flipped; |Â_t| <= c |A|

The salience function is the least specified part of the paper ("divergence spikes, together with
the stability of teacher entropy, segment the trajectory into high-credit spans"). Our default,
``spike``, is the reconstruction of methods.md §1.4 [R], with every constant a setting:

    z_t  = (d_t - median(d)) / (kappa * 1.4826 * MAD(d))     robust z-score over the scope
    s_t  = clip(z_t, 0, 1) * 1[H_t <= median(H) + entropy_kappa * 1.4826 * MAD(H)]
    span: s_t <- max(s_{t-span..t}) within the same sampled turn (0 = no dilation)

``scope`` is the token population the median/MAD are taken over: ``group`` (all sampled tokens of
the sibling group, which share one credit reference; default) or ``trajectory``. Other modes:
``zscore`` (spike without the entropy gate), ``minmax`` ((d - min) / (max - min) over the scope),
``none`` (s = 0, i.e. plain GRPO credit: the "no divergence weighting" ablation).

Every function here works on detached tensors, so no gradient can reach the teacher or the
reference through W (Proposition 1), whatever the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SALIENCE_MODES", "SalienceSettings", "topk_reverse_kl", "salience", "credit_weights", "weighted_advantages"]

SALIENCE_MODES = ("spike", "zscore", "minmax", "none")
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
_EPS = 1e-8


@dataclass(frozen=True)
class SalienceSettings:
    mode: str = "spike"
    kappa: float = 2.0
    """Robust z-score at which salience saturates at 1."""
    entropy_kappa: float = 2.0
    """Gate: a token counts only where the teacher's entropy is at most this many robust standard
    deviations above its median (the teacher is stable there, not guessing)."""
    span: int = 0
    """Dilate each spike forward over this many following tokens of the same turn."""
    scope: str = "group"


def topk_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p^K || q^K) where p^K, q^K are the student and teacher distributions
    renormalised over the student's top-K support (both ``[n, K]`` log-probs)."""
    p_log = torch.log_softmax(student_logprobs.detach().float(), dim=-1)
    q_log = torch.log_softmax(teacher_logprobs.detach().float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def _robust_z(x: torch.Tensor, kappa: float) -> torch.Tensor:
    med = x.median()
    scale = _MAD_TO_STD * (x - med).abs().median()
    return (x - med) / (kappa * scale + _EPS)


def _dilate(s: torch.Tensor, turn_ids: torch.Tensor, span: int) -> torch.Tensor:
    out = s.clone()
    for k in range(1, span + 1):
        same = turn_ids[k:] == turn_ids[:-k]
        out[k:] = torch.where(same, torch.maximum(out[k:], s[:-k]), out[k:])
    return out


def salience(divergence: list[torch.Tensor], entropy: list[torch.Tensor], turn_ids: list[torch.Tensor],
             settings: SalienceSettings) -> list[torch.Tensor]:
    """Salience in [0, 1] for each sampled token of each trajectory of one group."""
    if settings.mode not in SALIENCE_MODES:
        raise ValueError(f"unknown salience mode {settings.mode!r}; known: {', '.join(SALIENCE_MODES)}")
    d_all = [d.detach().float() for d in divergence]
    h_all = [h.detach().float() for h in entropy]
    if settings.scope == "group":
        sizes = [d.numel() for d in d_all]
        pooled = _salience_one(torch.cat(d_all), torch.cat(h_all), settings) if sum(sizes) else torch.zeros(0)
        parts = list(pooled.split(sizes))
    elif settings.scope == "trajectory":
        parts = [_salience_one(d, h, settings) if d.numel() else d for d, h in zip(d_all, h_all)]
    else:
        raise ValueError(f"unknown salience scope {settings.scope!r}; known: group, trajectory")
    if settings.span > 0:
        parts = [_dilate(s, t, settings.span) if s.numel() else s for s, t in zip(parts, turn_ids)]
    return [s.clamp(0.0, 1.0) for s in parts]


def _salience_one(d: torch.Tensor, h: torch.Tensor, settings: SalienceSettings) -> torch.Tensor:
    if settings.mode == "none" or d.numel() == 0:
        return torch.zeros_like(d)
    if settings.mode == "minmax":
        span = d.max() - d.min()
        return (d - d.min()) / span if span > _EPS else torch.zeros_like(d)
    s = _robust_z(d, settings.kappa).clamp(0.0, 1.0)
    if settings.mode == "spike":
        stable = _robust_z(h, settings.entropy_kappa) <= 1.0
        s = s * stable.float()
    return s


def credit_weights(s: torch.Tensor, gamma: float, cap: float) -> torch.Tensor:
    """W = clip(1 + gamma * s, 1, cap): never below 1, never above ``cap`` (Proposition 3)."""
    return (1.0 + gamma * s.detach()).clamp(min=1.0, max=cap)


def weighted_advantages(advantage: float, w: torch.Tensor) -> torch.Tensor:
    """Â_t = A * sg[W_t]; with W >= 1 > 0 the sign of every token's advantage is A's (Proposition 2)."""
    return advantage * w.detach()
