"""RLAD with Trust Region Ratio Distillation (TRRD) (Zhang et al., arXiv 2602.22495; methods.md §5).

A separate, possibly larger teacher (same tokenizer; ``--teacher PATH``) scores the student's own
rollouts, and enters only the *anchor* of the importance ratio inside GRPO's clipped surrogate:

    r_t = π_θ(y_t) / ( π_old(y_t)^α · π_T(y_t)^(1−α) )
    log r_t = α (log π_θ − log π_old) + (1 − α) · clamp(log π_θ − log π_T, −δ, δ)
    loss_t = −min(r_t A, clip(r_t, 1 − ε_low, 1 + ε_high) A),   A = (R − mean) / std (GRPO)

aggregated seq-mean-token-mean as in the paper's J_RLAD. The anchor has no θ-dependence, so the
teacher only moves where the clip saturates: with A > 0 a token the teacher likes may rise further
before the clip, one it dislikes saturates early (and the reverse for A < 0); the update's
direction stays the reward's.

Defaults and sources:
- α = 0.5 (all main runs), δ = 1 (Appendix B clamps the teacher log-ratio to [−1, 1]).
- clip 0.2 / 0.28 (their K&K logic recipe), GRPO advantages with the population std, no KL to
  a reference (β of J_RLAD is not given; GRPOSettings' ``kl_coef`` still adds one if set).
- Endpoint: by the formula (Eq. 3, Appendix C), **α = 1 is GRPO** and α → 0 anchors fully on the
  teacher. §4.1 of the paper says the reverse ("α = 0 recovers GRPO"); methods.md records the
  contradiction and we follow the formula (tests/test_rlad.py checks α = 1 against GRPO).
- The clamp applies to log π_θ − log π_T before the (1 − α) weight. Where it is active it must
  not change the gradient: written literally, clamp(log π_θ − log π_T) is constant in θ there, so
  d log r / d log π_θ drops from 1 to α on those tokens (about half of them when teacher and
  student are far apart), which scales their policy gradient by α and reaches the clip later.
  That contradicts "the anchor has no θ-dependence". So the default (``clamp_on="anchor"``) clamps
  on a detached log π_θ: the teacher's log-prob is moved to within δ of sg(log π_θ), and
  log r = log π_θ − α log π_old − (1 − α) clamp(log π_T, sg(log π_θ) ± δ), which has the same
  value and d log r / d log π_θ = 1 on every token. ``clamp_on="ratio"`` keeps the literal
  reading (the behaviour before issue 16), for comparison. Either way no gradient reaches the
  teacher where the clamp is active.

Metrics: ``rlad/teacher_logratio`` (mean log π_θ − log π_T, unclamped), ``rlad/clamp_frac``
(tokens whose teacher log-ratio the clamp cut), ``clip/frac`` (and the other clip metrics of the
shared surrogate, computed on the TRRD ratio), plus ``teacher/reverse_kl`` at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import ConfigError
from harness.options import option
from harness.types import Group
from trainers.losses import DUAL_CLIP, LossNorm, clipped_surrogate, masked_mean, policy_loss, register_policy_loss
from trainers.method_settings import family_sources
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.methods.teacher_distill import add_teacher_field, masked_teacher_logp
from trainers.packing import MicroBatch

__all__ = ["RLADSettings", "RLADMethod", "trrd_log_ratio", "trrd_surrogate"]


@dataclass(frozen=True)
class RLADSettings(GRPOSettings):
    clip_high: float = 0.28
    alpha: float = option(0.5, minimum=0, maximum=1)
    """Weight of the old-policy trust region in the anchor; 1 = GRPO, 0 = teacher-only anchor."""
    delta: float = option(1.0, above=0)
    """Clamp of the teacher log-ratio log π_θ − log π_T to [−δ, δ] (Appendix B)."""
    clamp_on: str = "anchor"
    """``anchor``: clamp on a detached log π_θ, so d log r / d log π_θ = 1 on every token (the anchor has
    no θ-dependence); ``ratio``: clamp the live log-ratio, so clamped tokens get α (the literal reading)."""


CLAMP_ON = ("anchor", "ratio")


def trrd_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, *, alpha: float,
                   delta: float, clamp_on: str = "anchor") -> tuple[torch.Tensor, torch.Tensor]:
    """``(log r, clamped teacher log-ratio)``: log r = α(logp − old) + (1−α)·clamp(logp − T, ±δ).

    ``clamp_on="anchor"``: the clamp acts on the anchor only (T moved to within δ of the detached
    logp), so the value is the same and d log r / d logp = 1 everywhere; ``"ratio"``: the clamp acts
    on the live log-ratio, so d log r / d logp = α where it is active."""
    if clamp_on == "ratio":
        teacher_term = torch.clamp(logp - teacher_logp, -delta, delta)
    elif clamp_on == "anchor":
        # logp - anchor with anchor = sg(logp) - clamp(sg(logp) - T, ±δ): the clamped value exactly,
        # plus (logp - sg(logp)) = 0, which carries d/d logp = 1 on every token
        current = logp.detach()
        teacher_term = torch.clamp(current - teacher_logp, -delta, delta) + (logp - current)
    else:
        raise ValueError(f"unknown clamp_on {clamp_on!r}; choose one of {CLAMP_ON}")
    return alpha * (logp - old_logp) + (1.0 - alpha) * teacher_term, teacher_term


@register_policy_loss("trrd")
def trrd_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   teacher_logp: torch.Tensor, alpha: float = 0.5, delta: float = 1.0, clamp_on: str = "anchor",
                   eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float = DUAL_CLIP):
    """The shared clipped surrogate on the TRRD ratio (its metrics, then ``rlad/*``)."""
    log_r, _ = trrd_log_ratio(logp, old_logp, teacher_logp, alpha=alpha, delta=delta, clamp_on=clamp_on)
    # ratio = exp(log r - 0): the surrogate (and its clip metrics) exactly as GRPO's, on the new ratio
    per_token, metrics = clipped_surrogate(log_r, torch.zeros_like(log_r), advantages, mask,
                                           eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    with torch.no_grad():
        gap = (logp - teacher_logp).detach()
        metrics["rlad/teacher_logratio"] = masked_mean(gap, mask)
        metrics["rlad/clamp_frac"] = masked_mean((gap.abs() > delta).to(gap.dtype), mask)
    return per_token, metrics


class RLADMethod(GRPOMethod):
    description = "RLAD/TRRD: GRPO clipped surrogate with ratio pi/(pi_old^a * pi_T^(1-a)), teacher log-ratio clamped"
    paper = "2602.22495"
    code = "none found (methods.md; no repository in the search store)"
    sources = family_sources(RLADSettings(), {
        "alpha": "paper: 0.5 in all main runs",
        "delta": "paper Appendix B: teacher log-ratio clamped to [-1, 1]",
        "clamp_on": "ours: anchor, d log r / d log pi = 1 on every token (ratio: the literal reading; decisions.md)",
        "clip_low, clip_high": "paper, K&K logic recipe (0.20 lower, 0.28 upper)",
        "normalize_std, baseline": "paper: A = (r - mean) / std, std over 1/G",
        "loss_agg": "paper's J_RLAD: (1/G) sum_i (1/|y_i|) sum_t",
        "kl_coef": "ours 0: the paper's beta is not given",
    })
    requires = ("teacher_model",)

    def __init__(self, name: str, settings: RLADSettings):
        super().__init__(name, settings)
        if not 0.0 <= settings.alpha <= 1.0:
            raise ConfigError(f"rlad: alpha must be in [0, 1] (1 = GRPO), got {settings.alpha}")
        if not settings.delta > 0:
            raise ConfigError(f"rlad: delta (the teacher log-ratio clamp) must be > 0, got {settings.delta}")
        if settings.clamp_on not in CLAMP_ON:
            raise ConfigError(f"rlad: unknown clamp_on '{settings.clamp_on}'. Known: {', '.join(CLAMP_ON)}")

    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        prepared = super().prepare(groups, ctx)
        add_teacher_field(prepared, ctx, self.name)
        return prepared

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return policy_loss("trrd", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg=self.cfg.loss_agg,
                           norm=norm, seq_index=mb.seq_index, ref_logp=ref_logp, kl_coef=self.cfg.kl_coef,
                           kl_kind=self.cfg.kl_estimator, teacher_logp=masked_teacher_logp(mb, logp, self.name),
                           alpha=self.cfg.alpha, delta=self.cfg.delta, clamp_on=self.cfg.clamp_on,
                           eps_low=self.cfg.clip_low, eps_high=self.cfg.clip_high, dual_clip=self.cfg.dual_clip)


register_method("rlad")(settings_builder("rlad", RLADMethod, RLADSettings()))
