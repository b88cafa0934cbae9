"""SGCD's bounded, detached token credit: calibrated divergence -> salience s in [0, 1] -> W in [1, c].

From the paper (methods.md §1.2 [S]):
    d_t = KL(p^K_t || sg[q^K_t])       reverse KL, student p vs teacher q, over a top-K support
    W_t = clip(1 + gamma * s_t, 1, c)  (paper: gamma = 1, c = 2)
    Â_t = A * sg[W_t]                  the sign of A is never flipped; |Â_t| <= c |A|

Calibration (issue 13; methods.md corrections: "a salience without an absolute scale is not
credit"). Any text in the teacher's context moves its distribution a little, and the rounding of
two different forward passes moves it too, so a raw d_t is never zero. The credit therefore uses
the *excess* divergence over a content-free control read by the same teacher:

    e_t = d_t(reference) - (1 + margin) * d_t(control)

where the control is neutral text of the reference's token length (or no text at all, or no
control: ``trainers.methods.sgcd``). This is RLCSD's contrast of an informative with an
uninformative hint, applied to SGCD's divergence. The control's divergence is also the token's
own scale of content-free sensitivity: where any text moves the teacher by several nats (a tiny
model that never saw a long system prompt does this at ~10% of its tokens), a reference that
moves it a little more is no evidence of content. So the reference must move the teacher
``1 + margin`` times as far as content-free text does (default margin 1: twice as far). The
default salience, ``absolute``, then has an absolute scale in nats:

    s_t = clip((e_t - floor) / saturation, 0, 1) * gate_t

``floor`` is where credit starts: numerical noise and content-free context effects below it never
count; ``saturation`` is the further excess at which s = 1 (W = c with gamma = 1). ``gate_t`` is
the first reconstruction's teacher-entropy stability gate: 0 where the teacher's entropy is more
than ``entropy_kappa`` robust standard deviations above its median over the group (it is guessing
there), else 1. It is off by default (``entropy_kappa = 0``): on a trained policy most tokens are
near-deterministic, the median absolute deviation of the entropy is about 0, and the gate then
drops every token where the teacher is at all uncertain, which is where the decisive tokens are
(measured on the toy policy with the oracle reference: the gate removed all of its above-floor
tokens).

The relative rules of the first reconstruction (methods.md §1.4 [R]) stay as ablations, applied to
the excess and zeroed below the floor: ``spike`` (robust z-score of e over the ``scope``, saturating
at ``kappa``, entropy-gated when ``entropy_kappa > 0``), ``zscore`` (never gated), ``minmax``; ``none`` is s = 0
(the "no divergence weighting" ablation). ``span`` dilates each salient token forward over that
many following tokens of the same turn.

Every function here works on detached tensors, so no gradient can reach the teacher or the
reference through W (Proposition 1), whatever the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SALIENCE_MODES", "SalienceSettings", "excess_divergence", "topk_reverse_kl", "salience", "credit_weights",
           "weighted_advantages"]


SALIENCE_MODES = ("absolute", "spike", "zscore", "minmax", "none")
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
_EPS = 1e-8


@dataclass(frozen=True)
class SalienceSettings:
    mode: str = "absolute"
    floor: float = 0.05
    """Excess divergence (nats) below which a token gets no credit, whatever the mode."""
    saturation: float = 0.5
    """``absolute``: excess above the floor (nats) at which salience reaches 1."""
    kappa: float = 2.0
    """Relative modes: robust z-score at which salience saturates."""
    entropy_kappa: float = 0.0
    """Gate: a token counts only where the teacher's entropy is at most this many robust standard
    deviations above its median over the scope (the teacher is stable there, not guessing); <= 0
    (default) turns the gate off."""
    span: int = 0
    """Dilate each salient token forward over this many following tokens of the same turn."""
    scope: str = "group"
    """Token population of the medians: ``group`` (all sampled tokens of the sibling group, which
    share one reference) or ``trajectory``."""


def excess_divergence(d_reference: torch.Tensor, d_control: torch.Tensor, margin: float) -> torch.Tensor:
    """e_t = d_ref - (1 + margin) d_ctrl: the divergence the reference causes beyond ``1 + margin``
    times what a content-free context of the same length causes at that token."""
    return d_reference.detach().float() - (1.0 + margin) * d_control.detach().float()


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


def salience(excess: list[torch.Tensor], entropy: list[torch.Tensor], turn_ids: list[torch.Tensor],
             settings: SalienceSettings) -> list[torch.Tensor]:
    """Salience in [0, 1] for each sampled token of each trajectory of one group, from the excess
    divergence ``e_t`` (nats) and the teacher's entropy."""
    if settings.mode not in SALIENCE_MODES:
        raise ValueError(f"unknown salience mode {settings.mode!r}; known: {', '.join(SALIENCE_MODES)}")
    e_all = [e.detach().float() for e in excess]
    h_all = [h.detach().float() for h in entropy]
    if settings.scope == "group":
        sizes = [e.numel() for e in e_all]
        pooled = _salience_one(torch.cat(e_all), torch.cat(h_all), settings) if sum(sizes) else torch.zeros(0)
        parts = list(pooled.split(sizes))
    elif settings.scope == "trajectory":
        parts = [_salience_one(e, h, settings) if e.numel() else e for e, h in zip(e_all, h_all)]
    else:
        raise ValueError(f"unknown salience scope {settings.scope!r}; known: group, trajectory")
    if settings.span > 0:
        parts = [_dilate(s, t, settings.span) if s.numel() else s for s, t in zip(parts, turn_ids)]
    return [s.clamp(0.0, 1.0) for s in parts]


def _stable(h: torch.Tensor, kappa: float) -> torch.Tensor:
    if kappa <= 0:
        return torch.ones_like(h)
    return (_robust_z(h, kappa) <= 1.0).float()


def _salience_one(e: torch.Tensor, h: torch.Tensor, settings: SalienceSettings) -> torch.Tensor:
    if settings.mode == "none" or e.numel() == 0:
        return torch.zeros_like(e)
    above = e > settings.floor
    if settings.mode == "absolute":
        s = ((e - settings.floor) / max(settings.saturation, _EPS)).clamp(0.0, 1.0)
        return s * _stable(h, settings.entropy_kappa)
    if settings.mode == "minmax":
        span = e.max() - e.min()
        s = (e - e.min()) / span if span > _EPS else torch.zeros_like(e)
    else:
        s = _robust_z(e, settings.kappa).clamp(0.0, 1.0)
        if settings.mode == "spike":
            s = s * _stable(h, settings.entropy_kappa)
    return s * above.float()


def credit_weights(s: torch.Tensor, gamma: float, cap: float) -> torch.Tensor:
    """W = clip(1 + gamma * s, 1, cap): never below 1, never above ``cap`` (Proposition 3)."""
    return (1.0 + gamma * s.detach()).clamp(min=1.0, max=cap)


def weighted_advantages(advantage: float, w: torch.Tensor) -> torch.Tensor:
    """Â_t = A * sg[W_t]; with W >= 1 > 0 the sign of every token's advantage is A's (Proposition 2)."""
    return advantage * w.detach()
