"""RLCSD: RL with Contrastive on-policy Self-Distillation (arXiv 2606.11709; methods.md corrections).

The closest public relative of SGCD, with no summarizer. A self-teacher that reads a hint (a
verified solution, a sibling's rollout) moves its distribution for two reasons: what the hint
says, and that there is a hint at all (a hinted model writes shorter, more direct text: the
paper's "privilege-induced style drift"). RLCSD cancels the second by contrast: the teacher's
gap under a *correct* sibling's rollout as the hint minus its mean gap under *incorrect*
siblings' rollouts as hints, all rendered in one byte-identical template, so a shift any hint
causes, whatever it says, subtracts out. The cleaned signal modulates the GRPO advantage with a
sign-preserving clamp; the verifier's reward keeps the direction.

Per sampled token t of trajectory i with GRPO advantage A_i (σ = sign(A_i)):

    e⁺_t  = log π(y_t | x, h⁺, y_<t) − log π(y_t | x, y_<t)      h⁺: a correct sibling's rollout (≠ i)
    e⁻_t  = mean_k [ log π(y_t | x, h⁻_k, y_<t) − log π(y_t | x, y_<t) ]   h⁻_k: incorrect siblings (≠ i)
    c_t   = e⁺_t − e⁻_t = mean_k [ log π(y_t | x, h⁺, ·) − log π(y_t | x, h⁻_k, ·) ]
    m_t   = clip( exp(σ · c_t), 1 − ε, 1 + ε )
    Â_t   = A_i · sg[m_t]        (``trainers.token_credit``, the GRPO family's shared hook)

The student term cancels in c_t, so RLCSD needs only teacher passes: the teacher is the live
policy (the prime-rl port's default: "teacher defaults to the live policy"), no grad, at the
sampling temperature. m_t > 0, so sign(Â_t) = sign(A_i) on every token, and Â_t / A_i ∈ [1 − ε, 1 + ε].

What defines it, and what the tests pin (tests/test_rlcsd.py):
- a hint equally present for correct and incorrect siblings gives no credit: with identical hint
  texts c_t = 0 exactly, m_t = 1 and Â = GRPO's advantage. Each distinct (trajectory, hint text)
  is scored once, and c_t is a mean of per-hint differences, so identical texts give a difference
  of exactly 0, not a rounding residue;
- ``hints=placebo`` (the teacher is given nothing to know: every hint is the same content-free
  text of the correct hint's token length) is GRPO exactly;
- sign preservation and the clamp.

Sources. The paper (2606.11709) was read as its abstract and summaries; its equations were not.
The prime-rl pull request #2788 (open, "feat(algo): RLCSD", advantage type ``rlcsd``) describes:
std-normalized group-relative credit (the paper's Eq. 8), a correct sibling-rollout hint against
the mean under K incorrect sibling hints in a byte-identical template, the live policy as teacher,
a sign-preserving clamp, uniform groups dropped by the zero-advantage filter. Everything else is
our reconstruction [R], each a setting:
- the ratio form exp(σ c) clipped to [1 − ε, 1 + ε], ε = 0.2 (RLSD's evidence ratio, applied to
  the contrast; the PR's "modulates ... at high-signal tokens" is what the clamp leaves: m ≠ 1 only
  where |c| is large enough to matter);
- the hint for trajectory i is the first other correct sibling (trial order) and up to
  ``wrong_hints`` = 4 other incorrect siblings; a trajectory's own rollout is never its hint (the
  teacher would copy it). A trajectory without another correct and another incorrect sibling keeps
  GRPO's credit (``rlcsd/no_contrast``): with groups of 2 that is every trajectory;
- a sibling's rollout as a hint is its tool calls and final answer (``sgcd_reference.rollout_text``),
  cut to ``hint_max_tokens`` = 512, under one header that does not say whether it is right;
- correct = reward 1 (the success rule of pass^k and SGCD).

Metrics: ``rlcsd/contrast_mean`` and ``rlcsd/contrast_abs_mean`` (c over scored tokens),
``rlcsd/w_mean`` (m), ``rlcsd/w_clip_frac``, ``rlcsd/hinted`` (trajectories with a contrast),
``rlcsd/no_contrast``, ``rlcsd/teacher_tokens``, ``time/teacher``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.options import option
from harness.types import is_success
from trainers.method_settings import family_sources
from trainers.methods import MethodContext, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.sgcd_reference import neutral_text, rollout_text, token_length
from trainers.teacher import sampled_token_logprobs

__all__ = ["RLCSDSettings", "RLCSDMethod", "HINT_HEADER", "contrast_multipliers"]

HINT_HEADER = "\n\n# One attempt at this task by another run (training only; it may be right or wrong)\n"
"""The one template every hint is rendered in, correct or not (byte-identical but for the hint)."""
HINT_KINDS = ("siblings", "placebo")
_CONTRAST_CLAMP = 20.0


@dataclass(frozen=True)
class RLCSDSettings(GRPOSettings):
    eps_w: float = option(0.2, minimum=0)
    """Clamp of the multiplier: m in [1 - eps_w, 1 + eps_w] (sign-preserving; ours, RLSD's ε_w)."""
    wrong_hints: int = option(4, minimum=1)
    """K: at most this many incorrect siblings' rollouts as hints per trajectory (ours)."""
    hint_max_tokens: int = option(512, minimum=1)
    """Longest hint in the teacher's first prompt (tokens; every hint is cut by the same rule)."""
    hints: str = "siblings"
    """``siblings`` (the method) | ``placebo`` (every hint is the same content-free text: no
    credit by construction, the control arm)."""


def contrast_multipliers(advantage: float, correct_lp: torch.Tensor, wrong_lps: list[torch.Tensor],
                         eps_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_t, c_t)`` for one trajectory from the teacher's log-probs of its sampled tokens under
    the correct hint and under each incorrect hint: c_t = mean_k (correct − wrong_k),
    m_t = clip(exp(sign(A) c_t), 1 ± eps_w)."""
    if not wrong_lps:
        raise ValueError("RLCSD's contrast needs at least one incorrect sibling's hint")
    correct = correct_lp.detach().float()
    c = torch.stack([correct - w.detach().float() for w in wrong_lps]).mean(0)
    sign = float((advantage > 0) - (advantage < 0))
    m = torch.exp(sign * c.clamp(-_CONTRAST_CLAMP, _CONTRAST_CLAMP)).clamp(1.0 - eps_w, 1.0 + eps_w)
    return m, c


class RLCSDMethod(GRPOMethod):
    description = ("Contrastive self-distillation: the live policy's gap under a correct sibling's rollout as a hint "
                   "minus its mean gap under incorrect siblings' hints modulates GRPO credit, sign-preserving clamp")
    paper = "2606.11709"
    code = "PrimeIntellect-ai/prime-rl#2788 (open pull request; no official code found)"
    sources = family_sources(RLCSDSettings(), {
        "teacher (live policy), K incorrect hints, byte-identical template, sign-preserving clamp":
            "paper abstract and the prime-rl PR #2788",
        "eps_w, the exp(sign(A) c) form": "ours [R] (RLSD's evidence ratio applied to the contrast)",
        "wrong_hints, hint_max_tokens, hint rendering": "ours [R]",
        "hints": "siblings = the method; placebo is our control arm (content-free hints, GRPO's credit)",
        "normalize_std, baseline": "the PR: std-normalized group-relative credit (the paper's Eq. 8)",
        "clip_low, clip_high, loss_agg": "GRPO's (the PR and the abstract say no more)",
    })
    whole_groups = True  # the hint siblings and the hinted trajectory step together

    def __init__(self, name: str, settings: RLCSDSettings):
        super().__init__(name, settings)
        if not 0 <= settings.eps_w < 1:
            raise ConfigError("rlcsd eps_w must be in [0, 1) (the multiplier must stay > 0 to keep the reward's sign)")
        if settings.hints not in HINT_KINDS:
            raise ConfigError(f"unknown rlcsd hints '{settings.hints}'. Known: {', '.join(HINT_KINDS)}")

    def token_multipliers(self, kept, ctx: MethodContext | None,
                          metrics: dict[str, float]) -> dict[tuple[int, int], torch.Tensor]:
        plans = {}  # (g, k) -> (correct hint text, [incorrect hint texts])
        no_contrast = 0
        for g, (_, scored, adv) in enumerate(kept):
            good = [k for k, e in enumerate(scored) if is_success(e.score.reward)]
            bad = [k for k, e in enumerate(scored) if not is_success(e.score.reward)]
            for k, (episode, a) in enumerate(zip(scored, adv)):
                if not episode.trace.response_tokens or a == 0:
                    continue
                right = [j for j in good if j != k][:1]
                wrong = [j for j in bad if j != k][:self.cfg.wrong_hints]
                if not right or not wrong:
                    no_contrast += 1
                    continue
                plans[(g, k)] = (rollout_text(scored[right[0]]), [rollout_text(scored[j]) for j in wrong])
        metrics["rlcsd/no_contrast"] = float(no_contrast)
        metrics["rlcsd/hinted"] = float(len(plans))
        if not plans:
            return {}
        if ctx is None or ctx.model is None or ctx.tokenizer is None:
            raise ConfigError("rlcsd needs the policy model and its tokenizer (the live policy is the teacher)")
        if self.cfg.hints == "placebo":
            plans = {key: self._placebo(ctx.tokenizer, right) for key, (right, _) in plans.items()}
        scores = self._score(kept, plans, ctx, metrics)
        out, cs, ms = {}, [], []
        for key, (right, wrongs) in plans.items():
            m, c = contrast_multipliers(kept[key[0]][2][key[1]], scores[(key, right)],
                                        [scores[(key, w)] for w in wrongs], self.cfg.eps_w)
            out[key] = m
            cs.append(c)
            ms.append(m)
        c, m = torch.cat(cs), torch.cat(ms)
        eps = self.cfg.eps_w
        metrics.update({"rlcsd/contrast_mean": float(c.mean()), "rlcsd/contrast_abs_mean": float(c.abs().mean()),
                        "rlcsd/w_mean": float(m.mean()),
                        "rlcsd/w_clip_frac": float(((m <= 1 - eps) | (m >= 1 + eps)).float().mean())})
        return out

    def _placebo(self, tokenizer, right: str) -> tuple[str, list[str]]:
        """Every hint the same content-free text of the correct hint's token length."""
        text = neutral_text(tokenizer, min(token_length(tokenizer, right), self.cfg.hint_max_tokens), "placebo")
        return text, [text]

    def _score(self, kept, plans, ctx: MethodContext, metrics: dict[str, float]) -> dict:
        """Teacher log-probs of each trajectory's sampled tokens under each of its distinct hints:
        {((g, k), hint text): [response_tokens]}. A repeated text is scored once."""
        requests = list(dict.fromkeys((key, text) for key, (right, wrongs) in plans.items()
                                      for text in (right, *wrongs)))
        traces = [kept[g][1][k].trace for (g, k), _ in requests]
        t0 = time.perf_counter()
        lps = sampled_token_logprobs(
            ctx.model, traces, temperature=ctx.temperature, micro_batch_tokens=ctx.micro_batch_tokens,
            tokenizer=ctx.tokenizer, notes=[text for _, text in requests], max_note_tokens=self.cfg.hint_max_tokens,
            header=HINT_HEADER, pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        metrics["time/teacher"] = time.perf_counter() - t0
        metrics["rlcsd/teacher_tokens"] = float(sum(t.response_tokens for t in traces))
        return dict(zip(requests, lps))


register_method("rlcsd")(settings_builder("rlcsd", RLCSDMethod, RLCSDSettings()))
