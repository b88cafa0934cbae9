"""Distillation from a separate teacher model: ``opd`` (on-policy distillation) and ``grpo_kl``
(GRPO + KL to the teacher, KDRL-style), plus the teacher scoring they share with ``rlad``.

The teacher (``--teacher PATH``, loaded by the loop with ``trainers.model_setup.load_teacher``,
which refuses a different tokenizer) only *scores* the student's own rollouts: one no-grad forward
over each trace, unchanged (``notes=None``: the teacher reads exactly the student's inputs), giving
log π_T(y_t | s_t) at every sampled token (``teacher_logprobs``). Those values travel to the loss
as the per-position field ``teacher_logp``.

``opd``: on-policy distillation with the sampled-token reverse KL as a dense per-token reward.
Reference formulation: Thinking Machines' "On-Policy Distillation" recipe (K. Lu & TML, Oct 2025;
tinker-cookbook ``distillation/train_on_policy.py``); paper id: GKD (Agarwal et al., arXiv
2306.13649, on-policy λ = 1 with reverse KL), the published method the recipe instantiates.

    A_t = env_coef · A_group − kl_penalty_coef · Σ_{k ≥ t} γ^(k−t) (log π_old(y_k) − log π_T(y_k))
    loss = importance-weighted policy gradient −(π_θ/π_old)·A_t   ("pg"; or the clipped surrogate)

Defaults as in the recipe: kl_penalty_coef 1.0, discount γ = 0 (each token's own term), loss
"importance_sampling" (``pg``), no env reward (env_coef 0: the recipe adds the env advantage
with weight 1, but its distillation datasets carry no reward; here a user opts in). Choices:
- The coefficient is ``kl_penalty_coef`` (the recipe's name), not ``kl_coef``: GRPOSettings'
  ``kl_coef`` already is the KL-to-*reference* weight (it loads a reference model), and one
  name with two meanings across methods would mislead ``--kl-coef`` and run comparisons.
- The discount runs over the trajectory's *sampled* tokens: tool results and user turns between
  two replies are not the agent's actions, so they are not time steps (the recipe discounts over
  every position of its datum, which for a single reply is the same thing).
- log π_old is the sampler's recorded log-prob, as in the recipe (the advantage is a constant).
- Aggregation ``token-mean``: the recipe sums per-token losses over the batch; the token mean is
  that sum over a batch-size-independent scale, every token weighted alike.
- With env_coef 0 every group trains (the recipe keeps constant-reward groups): dynamic
  sampling stays off.

``grpo_kl``: KDRL (Xu et al., arXiv 2506.02208): GRPO with β·KL(π_θ || π_T) per token inside the
sum, i.e. GRPO's KL-to-reference slot with the reference replaced by the teacher (as RLAD's paper
describes its KDRL baseline, methods.md §5.1).

    J = (1/G) Σ_i (1/|o_i|) Σ_t [ min(r A, clip(r, 1−ε_l, 1+ε_h) A) − β · k(log π_θ − log π_T) ]

- Estimator ``k2`` = ½ (log π_θ − log π_T)²: KDRL compares KL approximations (k2 vs GRPO's k3)
  and adopts k2, whose gradient (log π_θ − log π_T) ∇log π_θ is the unbiased on-policy gradient
  of the reverse KL (k3's is not). Any of ``trainers.losses.KL_ESTIMATORS`` may be chosen.
- β = 5e-3: the value the KDRL write-ups give as the start of their annealed schedule
  (5e-3 → 1e-3). Source quality: the abstract (which names the KL-approximation and coefficient
  study) plus a secondary summary for k2 and the values; the full text was not reachable. Annealing
  and KDRL's reward-guided masking (no KD on correct responses) are not implemented: this is
  the plain unified objective, as RLAD compares against.
- Everything else is GRPO's (clip 0.2/0.2, seq-mean-token-mean, (r − mean)/std advantages); the
  KL-to-reference knobs still work alongside.

Tests: tests/test_teacher_distill.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import ConfigError
from harness.options import option
from harness.policy.trace import TokenTrace
from harness.types import Group
from trainers.losses import (
    DUAL_CLIP,
    KL_ESTIMATORS,
    LossNorm,
    clipped_surrogate,
    kl_penalty,
    masked_mean,
    policy_loss,
    register_policy_loss,
)
from trainers.method_settings import family_sources
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.packing import MicroBatch
from trainers.teacher import per_position, sampled_token_logprobs

__all__ = ["OPDSettings", "OPDMethod", "GRPOKLSettings", "GRPOKLMethod", "teacher_logprobs", "add_teacher_field",
           "discounted_future_sum", "masked_teacher_logp", "sampled_old_logprobs",
           "TEACHER_FIELD"]

TEACHER_FIELD = "teacher_logp"
OPD_LOSSES = {"importance_sampling": "pg", "ppo": "clip"}


# --- the separate teacher: scoring and the per-position field -------------------------------------
def teacher_logprobs(ctx: MethodContext | None, traces: list[TokenTrace], method: str,
                     metrics: dict[str, float]) -> list[torch.Tensor]:
    """log π_T of every trace's sampled tokens (``[response_tokens]`` each), reading the traces
    as the student did. Records ``time/teacher``, ``teacher/tokens`` and ``teacher/reverse_kl``
    (mean of log π_old − log π_T over sampled tokens: the sampled reverse-KL estimate)."""
    if ctx is None or ctx.teacher is None:
        raise ConfigError(f"method {method} needs a teacher model: harness train --teacher PATH "
                          "(same tokenizer as the policy)")
    t0 = time.perf_counter()
    pad = getattr(ctx.tokenizer, "pad_token_id", None) or 0
    scores = sampled_token_logprobs(ctx.teacher, traces, notes=None, temperature=ctx.temperature,
                                    micro_batch_tokens=ctx.micro_batch_tokens, tokenizer=ctx.tokenizer,
                                    pad_token_id=pad)
    metrics["time/teacher"] = time.perf_counter() - t0
    gaps = [sampled_old_logprobs(t) - s for t, s in zip(traces, scores)]
    cat = torch.cat(gaps) if gaps else torch.zeros(0)
    metrics["teacher/tokens"] = float(cat.numel())
    metrics["teacher/reverse_kl"] = float(cat.mean()) if cat.numel() else 0.0
    return scores


def sampled_old_logprobs(trace: TokenTrace) -> torch.Tensor:
    """The sampler's log π_old at each sampled token, in sampled-position order."""
    return torch.tensor([trace.logprobs[p] for p in trace.sampled_positions], dtype=torch.float32)


def add_teacher_field(prepared: Prepared, ctx: MethodContext | None, method: str) -> list[torch.Tensor]:
    """Score ``prepared.traces`` with the teacher and attach ``token_fields["teacher_logp"]``."""
    scores = teacher_logprobs(ctx, prepared.traces, method, prepared.metrics)
    prepared.token_fields[TEACHER_FIELD] = [per_position(t, s) for t, s in zip(prepared.traces, scores)]
    return scores


def masked_teacher_logp(mb: MicroBatch, logp: torch.Tensor, method: str) -> torch.Tensor:
    """The micro-batch's teacher log-probs, with log π_θ (detached) where the loss mask is 0, so a
    teacher term is exactly 0 off the sampled tokens (packing leaves 0.0 there, which is not a
    log-prob and could overflow an estimator)."""
    if TEACHER_FIELD not in mb.fields:
        raise ValueError(f"method {method}: the micro-batch has no '{TEACHER_FIELD}' field; prepare() must add it")
    teacher = mb.fields[TEACHER_FIELD].to(logp.dtype)
    return torch.where(mb.loss_mask > 0, teacher, logp.detach())


# --- opd ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OPDSettings(GRPOSettings):
    loss_agg: str = "token-mean"
    kl_penalty_coef: float = option(1.0, minimum=0)
    """Weight of the per-token reverse-KL reward (recipe: 1.0)."""
    kl_discount: float = option(0.0, minimum=0, maximum=1)
    """γ of the discounted sum of future per-token terms within a trajectory (recipe: 0 = none)."""
    env_coef: float = option(0.0, minimum=0)
    """Weight of the GRPO group advantage added to every token (0 = pure distillation)."""
    loss_fn: str = "importance_sampling"
    """``importance_sampling`` (−(π_θ/π_old) A, the recipe's default) or ``ppo`` (clipped surrogate)."""


def discounted_future_sum(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """``out[t] = Σ_{k ≥ t} γ^(k−t) values[k]`` over one trajectory's sampled tokens (γ = 0: values)."""
    if gamma == 0.0:
        return values.clone()
    out, acc = [0.0] * values.numel(), 0.0
    for k, v in zip(range(values.numel() - 1, -1, -1), reversed(values.tolist())):
        acc = v + gamma * acc  # Python floats (double) so long trajectories do not drift
        out[k] = acc
    return torch.tensor(out, dtype=values.dtype)


class OPDMethod(GRPOMethod):
    description = "On-policy distillation (Thinking Machines recipe): A_t = -coef*(log pi_old - log pi_T), IS PG"
    paper = "2306.13649"
    code = "thinking-machines-lab/tinker-cookbook (distillation/train_on_policy.py, the recipe's code)"
    sources = family_sources(OPDSettings(), {
        "kl_penalty_coef, kl_discount, loss_fn": "official train_on_policy.py Config (kl_penalty_coef=1.0, "
                                                 "kl_discount_factor=0.0, loss_fn=importance_sampling)",
        "env_coef": "differs: the recipe adds the env advantage at weight 1 (its distillation sets carry no "
                    "reward); ours 0, opt in",
        "dynamic_sampling": "recipe keeps constant-reward groups (do_remove_constant_reward_groups=False)",
        "normalize_std, baseline": "read only with env_coef > 0; differs: the recipe centres rewards, no std",
        "clip_low, clip_high": "read only with loss_fn=ppo: Tinker's ppo loss fixes both at 0.2",
        "loss_agg": "ours: token-mean, every sampled token weighted alike",
        "kl_coef": "ours 0: the recipe has no reference KL (the teacher term is the KL)",
    })
    requires = ("teacher_model",)

    def __init__(self, name: str, settings: OPDSettings):
        super().__init__(name, settings)
        if settings.kl_penalty_coef < 0:
            raise ConfigError("opd: kl_penalty_coef must be >= 0")
        if not 0.0 <= settings.kl_discount <= 1.0:
            raise ConfigError("opd: kl_discount must be in [0, 1]")
        if settings.env_coef < 0:
            raise ConfigError("opd: env_coef must be >= 0")
        if settings.loss_fn not in OPD_LOSSES:
            raise ConfigError(f"opd: unknown loss_fn '{settings.loss_fn}'. Known: {', '.join(OPD_LOSSES)}")

    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        pairs = [(e.trace, a) for _, scored, adv in kept for e, a in zip(scored, adv) if e.trace.response_tokens]
        traces = [t for t, _ in pairs]
        metrics: dict[str, float] = {"groups/trained": len(kept), "groups/dropped": dropped}
        scores = teacher_logprobs(ctx, traces, self.name, metrics)
        advantages, per_token = [], []
        for (trace, a_env), teacher in zip(pairs, scores):
            a = -self.cfg.kl_penalty_coef * (sampled_old_logprobs(trace) - teacher)
            a = discounted_future_sum(a, self.cfg.kl_discount)
            if self.cfg.env_coef:
                a = a + self.cfg.env_coef * a_env
            per_token.append(a)
            advantages.append(per_position(trace, a))
        cat = torch.cat(per_token) if per_token else torch.zeros(0)
        metrics["opd/adv_mean"] = float(cat.mean()) if cat.numel() else 0.0
        metrics["opd/adv_abs_mean"] = float(cat.abs().mean()) if cat.numel() else 0.0
        return Prepared(traces=traces, advantages=advantages, metrics=metrics)

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        kind = OPD_LOSSES[self.cfg.loss_fn]
        options = ({"eps_low": self.cfg.clip_low, "eps_high": self.cfg.clip_high, "dual_clip": self.cfg.dual_clip}
                   if kind == "clip" else {})
        return policy_loss(kind, logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg=self.cfg.loss_agg,
                           norm=norm, seq_index=mb.seq_index, ref_logp=ref_logp, kl_coef=self.cfg.kl_coef,
                           kl_kind=self.cfg.kl_estimator, **options)


# --- grpo_kl --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GRPOKLSettings(GRPOSettings):
    beta: float = option(5e-3, minimum=0)
    """Weight of KL(π_θ || π_T) per token (KDRL's initial coefficient; see the module docstring)."""
    teacher_kl_estimator: str = "k2"
    """k1 | k2 | k3 estimator of the teacher KL (KDRL: k2)."""


@register_policy_loss("clip_teacher_kl")
def clip_with_teacher_kl(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         *, teacher_logp: torch.Tensor, beta: float, kind: str = "k2", eps_low: float = 0.2,
                         eps_high: float = 0.2, dual_clip: float = DUAL_CLIP):
    """Clipped surrogate + β · k(log π_θ − log π_T) per token (KDRL); metric ``kl/teacher``.
    ``teacher_logp`` must equal ``logp`` (detached) off the loss mask (``masked_teacher_logp``)."""
    per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                                           dual_clip=dual_clip)
    kl = kl_penalty(logp, teacher_logp, kind)
    metrics["kl/teacher"] = masked_mean(kl.detach(), mask)
    if beta:  # as policy_loss does for the reference KL: an unused term must not bring inf * 0
        per_token = per_token + beta * kl
    return per_token, metrics


class GRPOKLMethod(GRPOMethod):
    description = "KDRL-style GRPO + beta*KL(pi_theta || pi_teacher) per token (teacher in the reference slot, k2)"
    paper = "2506.02208"
    code = "none found"
    sources = family_sources(GRPOKLSettings(), {
        "beta": "KDRL write-ups [S]: 5e-3, the start of its annealed 5e-3 -> 1e-3 schedule (annealing not done)",
        "teacher_kl_estimator": "KDRL [S]: k2 (the unbiased on-policy reverse-KL gradient)",
        "loss_agg": "GRPO's; not checked against KDRL (a secondary review writes its GRPO term 1/sum_i |o_i|)",
        "kl_coef": "ours 0: the teacher takes the reference KL's place (RLAD's KDRL baseline, methods.md §5.1)",
    })
    requires = ("teacher_model",)

    def __init__(self, name: str, settings: GRPOKLSettings):
        super().__init__(name, settings)
        if settings.beta < 0:
            raise ConfigError("grpo_kl: beta must be >= 0")
        if settings.teacher_kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"grpo_kl: unknown teacher_kl_estimator '{settings.teacher_kl_estimator}'. "
                              f"Known: {', '.join(KL_ESTIMATORS)}")

    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        prepared = super().prepare(groups, ctx)
        add_teacher_field(prepared, ctx, self.name)
        return prepared

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return policy_loss("clip_teacher_kl", logp, mb.old_logprobs, mb.advantages, mb.loss_mask,
                           agg=self.cfg.loss_agg, norm=norm, seq_index=mb.seq_index, ref_logp=ref_logp,
                           kl_coef=self.cfg.kl_coef, kl_kind=self.cfg.kl_estimator,
                           teacher_logp=masked_teacher_logp(mb, logp, self.name), beta=self.cfg.beta,
                           kind=self.cfg.teacher_kl_estimator, eps_low=self.cfg.clip_low, eps_high=self.cfg.clip_high,
                           dual_clip=self.cfg.dual_clip)


register_method("opd")(settings_builder("opd", OPDMethod, OPDSettings()))
register_method("grpo_kl")(settings_builder("grpo_kl", GRPOKLMethod, GRPOKLSettings()))
