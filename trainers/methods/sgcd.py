"""SGCD: Sibling-Guided Credit Distillation (arXiv 2606.12634, methods.md §1).

Policy gradient stays the only actor loss; distillation only reweights credit:

1. Dynamic sampling keeps *mixed* groups (at least one success and one failure; successes as the
   runner defines them, reward 1), resampling fresh tasks up to ``resample_budget`` rounds.
2. A summarizer (an external LLM through litellm, or the built-in ``diff``) turns each mixed
   group into a credit reference: state checks, reusable successful branches, failed branches
   and why, divergence points. Redacted, cached in the ``guidance`` table (``trainers.summarizer``).
   It is cut per section to ``reference_max_tokens`` (``trainers.sgcd_reference``).
3. Teacher = the same policy with the credit reference in its system message, scoring the
   student's own sampled tokens without gradient (``trainers.teacher.score_in_context``; the
   siblings of a group share one prefix pass). The student's distribution is the one it sampled
   from (recorded top-K at rollout), so no student pass.
4. Calibration: the same teacher reads a content-free control of the reference's token length
   (``control=neutral``; ``empty``: no text, only numerical noise; ``off``: no control pass).
   Per token: d = KL(p^K || q^K) with the reference and with the control, excess
   e = d_ref - (1 + margin) d_ctrl,
   salience s = clip((e - floor) / saturation, 0, 1) (optionally gated by the teacher's entropy),
   W = clip(1 + gamma s, 1, c), Â = A * sg[W] (``trainers.credit_weights``); the loss is the shared
   clipped surrogate. A teacher that knows nothing (no reference, or a placebo) gives W = 1.
5. Optionally (``normalize_weights``) W is divided by its mean over the batch's sampled tokens, so
   SGCD takes GRPO-sized steps and a comparison with GRPO isolates where the credit goes.

The reference the teacher reads (``reference``): ``summary`` (default), ``placebo`` (neutral text
of the summary's token length: the control arm, everything else unchanged), ``oracle`` (a
successful sibling's actions verbatim: an ablation that leaks answers, never the default) or
``none`` (the teacher reads nothing: teacher = student).

A group whose summarizer call falls back (malformed twice, provider down) or that has no clean
success/failure contrast (``keep=spread`` admits partial-credit groups) trains with plain GRPO
credit (W = 1), and is counted. With gamma = 0, SGCD is GRPO exactly (tests/test_sgcd.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.options import option
from harness.types import Group
from trainers import distributed
from trainers.credit_weights import (
    SALIENCE_MODES,
    SalienceSettings,
    credit_weights,
    excess_divergence,
    salience,
    topk_reverse_kl,
)
from trainers.method_settings import family_sources
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.sgcd_reference import REFERENCE_KINDS, fit_reference, neutral_text, oracle_reference, token_length
from trainers.teacher import score_in_context

__all__ = ["SGCDSettings", "SGCDMethod"]

KEEP_RULES = ("mixed", "spread")
CONTROLS = ("neutral", "empty", "off")


@dataclass(frozen=True)
class SGCDSettings(GRPOSettings):
    dynamic_sampling: str = "resample"
    gamma: float = option(1.0, minimum=0)
    """Credit gain: W = clip(1 + gamma * salience, 1, cap). 0 turns SGCD into GRPO."""
    cap: float = option(2.0, minimum=1)
    """Upper bound c of the credit weight (paper: 2)."""
    topk: int = option(20, minimum=1)
    """Size K of the student's top-K support for the teacher-student KL."""
    salience: str = "absolute"
    """How excess divergence becomes salience: absolute (default) | spike | zscore | minmax | none."""
    kl_floor: float = option(0.05, minimum=0)
    """Excess divergence (nats) below which a token gets no credit (numerical and content-free noise)."""
    kl_saturation: float = option(0.5, above=0)
    """Excess above the floor (nats) at which salience reaches 1 (``absolute``)."""
    control_margin: float = option(1.0, minimum=0)
    """Credit needs d_ref > (1 + margin) d_ctrl + floor: the reference must move the teacher this
    much further than content-free text of the same length does."""
    control: str = "neutral"
    """Calibration context: neutral (content-free text of the reference's token length) | empty (no
    text: only numerical noise) | off (no control pass; the uncalibrated reconstruction)."""
    reference: str = "summary"
    """What the teacher reads: summary | placebo (neutral text, same length: the control arm) |
    oracle (a successful sibling's actions verbatim; ablation) | none (nothing: teacher = student)."""
    normalize_weights: bool = False
    """Divide W by its mean over the batch's sampled tokens (GRPO-sized steps; W may then be < 1)."""
    salience_kappa: float = option(2.0, minimum=0)
    entropy_kappa: float = option(0.0, minimum=0)
    """Teacher-entropy gate (robust z over the group); 0 = off (default: it drops the decisive tokens)."""
    salience_span: int = option(0, minimum=0)
    salience_scope: str = "group"
    reference_max_tokens: int = option(512, minimum=1)
    """Longest credit reference in the teacher's context (tokens; longer ones are cut per section)."""
    keep: str = "mixed"
    """``mixed``: train on groups with a success and a failure (the paper); ``spread``: any reward
    spread (partial credit), guidance only where there is a success/failure contrast."""


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(values.quantile(q)) if values.numel() else 0.0


class SGCDMethod(GRPOMethod):
    def __init__(self, name: str, settings: SGCDSettings):
        super().__init__(name, settings)
        if settings.cap < 1:
            raise ConfigError("--sgcd-cap must be >= 1 (credit weights are never below 1)")
        if settings.gamma < 0:
            raise ConfigError("--sgcd-gamma must be >= 0 (a negative gain would shrink credit)")
        if settings.topk < 1:
            raise ConfigError("--sgcd-topk must be >= 1")
        if settings.salience not in SALIENCE_MODES:
            raise ConfigError(f"unknown --salience '{settings.salience}'. Known: {', '.join(SALIENCE_MODES)}")
        if settings.salience_scope not in ("group", "trajectory"):
            raise ConfigError("--salience-scope must be group or trajectory")
        if settings.keep not in KEEP_RULES:
            raise ConfigError(f"unknown --sgcd-keep '{settings.keep}'. Known: {', '.join(KEEP_RULES)}")
        if settings.control not in CONTROLS:
            raise ConfigError(f"unknown SGCD control '{settings.control}'. Known: {', '.join(CONTROLS)}")
        if settings.reference not in REFERENCE_KINDS:
            raise ConfigError(f"unknown SGCD reference '{settings.reference}'. Known: {', '.join(REFERENCE_KINDS)}")
        if settings.kl_floor < 0 or settings.kl_saturation <= 0 or settings.control_margin < 0:
            raise ConfigError("SGCD needs kl_floor >= 0, kl_saturation > 0 (nats) and control_margin >= 0")
        if settings.reference_max_tokens < 1:
            raise ConfigError("--reference-max-tokens must be >= 1")
        self.salience_settings = SalienceSettings(mode=settings.salience, floor=settings.kl_floor,
                                                  saturation=settings.kl_saturation, kappa=settings.salience_kappa,
                                                  entropy_kappa=settings.entropy_kappa, span=settings.salience_span,
                                                  scope=settings.salience_scope)

    @property
    def sampler_topk(self) -> int:  # type: ignore[override]
        return self.cfg.topk

    uses_summarizer = True
    description = ("Sibling-guided credit distillation: LLM-summarised sibling contrast reweights GRPO credit, "
                   "W in [1, c]")
    paper = "2606.12634"
    code = "none public (methods.md: none found)"
    sources = family_sources(SGCDSettings(), {
        "gamma, cap": "paper via secondary summaries (W = clip(1 + gamma s, 1, c), gamma = 1, c = 2; "
                      "methods.md §1.2 [S])",
        "topk": "ours (the paper writes a superscript K, read as a top-K support of unknown size; methods.md §1)",
        "control, control_margin, kl_floor, kl_saturation, salience": "ours: calibration against a content-free "
                                                                    "control (methods.md corrections; issue 13)",
        "keep, dynamic_sampling": "paper (mixed groups, resampled)",
        "reference": "paper: the summarizer's credit reference (placebo, oracle, none: our control arms)",
        "normalize_weights": "ours: off, so W stays in the paper's [1, c] (docs/methods.md)",
        "salience_kappa, entropy_kappa, salience_span, salience_scope": "ours [R]: the relative-salience "
                                                                        "reconstruction (methods.md §1.4)",
        "reference_max_tokens": "ours",
        "clip_low, clip_high, loss_agg, kl_coef": "GRPO's (the paper's clip and KL values: not found, methods.md §8)",
    })
    requires = ("summarizer",)

    def keeps(self, group: Group) -> bool:
        if self.cfg.keep == "mixed":
            return group.label == "mixed" and super().keeps(group)
        return super().keeps(group)

    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        self._weights: list[torch.Tensor] = []
        prepared = super().prepare(groups, ctx)  # Â = A · sg[W] through the shared hook (trainers.token_credit)
        prepared.extras["weights"] = self._weights  # W per trained trace, in ``prepared.traces`` order
        return prepared

    def token_multipliers(self, kept, ctx: MethodContext | None,
                          metrics: dict[str, float]) -> dict[tuple[int, int], torch.Tensor]:
        """W per sampled token of every trained trajectory (1 where a group has no guidance)."""
        weights: list[list[torch.Tensor] | None] = [None] * len(kept)
        if kept:  # gamma = 0 still runs the pipeline: it logs the divergence it would have used
            weights = self._credit(kept, ctx, metrics)
        out: dict[tuple[int, int], torch.Tensor] = {}
        for g, ((_, scored, _), w_group) in enumerate(zip(kept, weights)):
            for k, episode in enumerate(scored):
                if episode.trace.response_tokens:  # in the baseline, nothing to train (see GRPOMethod.prepare)
                    out[(g, k)] = w_group[k] if w_group is not None else torch.ones(episode.trace.response_tokens)
        w_cat = torch.cat(list(out.values())) if out else torch.zeros(0)
        metrics.update({"sgcd/w_mean": float(w_cat.mean()) if w_cat.numel() else 1.0,
                        "sgcd/w_p90": _quantile(w_cat, 0.9) if w_cat.numel() else 1.0,
                        "sgcd/w_max": float(w_cat.max()) if w_cat.numel() else 1.0,
                        "sgcd/amplified_frac": float((w_cat > 1.0 + 1e-6).float().mean()) if w_cat.numel() else 0.0})
        if self.cfg.normalize_weights:
            scale = self._normalizer(w_cat)
            metrics["sgcd/w_scale"] = scale
            out = {key: w * scale for key, w in out.items()}
        self._weights = list(out.values())  # insertion order = the order GRPOMethod.prepare trains them in
        return out

    @staticmethod
    def _normalizer(w: torch.Tensor) -> float:
        """1 / mean(W) over every sampled token of the batch (all ranks under torchrun)."""
        total, count = distributed.all_sum(float(w.sum()), float(w.numel()))
        return count / total if total > 0 else 1.0

    # -- credit ---------------------------------------------------------------------------------
    def _credit(self, kept: list[tuple[Group, list, list[float]]], ctx: MethodContext | None,
                metrics: dict[str, float]) -> list[list[torch.Tensor] | None]:
        if ctx is None or ctx.model is None or (ctx.summarizer is None and self._needs_summary):
            raise ConfigError("SGCD needs a policy model and a summarizer (harness train --summarizer ...)")
        contrast = [i for i, (g, _, _) in enumerate(kept) if g.label == "mixed"]
        notes = self._references(kept, contrast, ctx, metrics)
        metrics["sgcd/guided_groups"] = float(len(notes))
        metrics["sgcd/fallback_groups"] = float(len(kept) - len(notes))

        # every sampled token of every guided trajectory, scored by the teacher with its reference
        # and with the content-free control, in one pass each (siblings share one prefix pass)
        traces, owners, support, student = [], [], [], []
        for i in notes:
            for k, episode in enumerate(kept[i][1]):
                trace = episode.trace
                if not trace.response_tokens:
                    continue
                top = trace.student_topk()
                if top is None:
                    raise ConfigError("SGCD needs the student's top-K at every sampled token; the rollout policy "
                                      "must be built with record_topk (harness train does this)")
                if trace.context is None:
                    raise ConfigError("SGCD needs each trace's opening messages; the rollout policy did not "
                                      "record them")
                traces.append(trace)
                owners.append((i, k))
                support.append(top[0])
                student.append(top[1])
        t1 = time.perf_counter()
        score = lambda texts: score_in_context(  # noqa: E731
            ctx.model, ctx.tokenizer, traces, texts, support, temperature=ctx.temperature,
            micro_batch_tokens=ctx.micro_batch_tokens, pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        with_ref = score([notes[i][0] for i, _ in owners])
        control = score([notes[i][1] for i, _ in owners]) if self.cfg.control != "off" else None
        metrics["time/teacher"] = time.perf_counter() - t1
        metrics["sgcd/teacher_tokens"] = float(with_ref.tokens + (control.tokens if control else 0))

        by_group: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        for n, ((i, k), s_lp) in enumerate(zip(owners, student)):
            d_ref = topk_reverse_kl(s_lp, with_ref.scores[n].support_logprobs)
            d_ctrl = topk_reverse_kl(s_lp, control.scores[n].support_logprobs) if control else torch.zeros_like(d_ref)
            trace = kept[i][1][k].trace
            turn_ids = torch.cat([torch.full((e - s,), t) for t, (s, e) in enumerate(trace.turns)])
            by_group.setdefault(i, {})[k] = (d_ref, d_ctrl, with_ref.scores[n].entropy, turn_ids)
        out: list[list[torch.Tensor] | None] = [None] * len(kept)
        cols: dict[str, list[torch.Tensor]] = {"ref": [], "ctrl": [], "h": [], "s": []}
        for i, members in by_group.items():
            order = sorted(members)
            out[i] = [torch.ones(e.trace.response_tokens) for e in kept[i][1]]
            d_ref, d_ctrl, h, turns = ([members[k][j] for k in order] for j in range(4))
            excess = [excess_divergence(a, b, self.cfg.control_margin) for a, b in zip(d_ref, d_ctrl)]
            s = salience(excess, h, turns, self.salience_settings)
            for k, x, a, b in zip(order, s, d_ref, d_ctrl):
                out[i][k] = credit_weights(x, self.cfg.gamma, self.cfg.cap)
                self.credit_notes[(i, k)] = {"salience": x, "divergence": a, "control_divergence": b}
            cols["ref"] += d_ref
            cols["ctrl"] += d_ctrl
            cols["h"] += h
            cols["s"] += s
        if cols["ref"]:
            d_ref, d_ctrl, h, s = (torch.cat(cols[c]) for c in ("ref", "ctrl", "h", "s"))
            e = excess_divergence(d_ref, d_ctrl, self.cfg.control_margin)
            metrics.update({"sgcd/kl_reference": float(d_ref.mean()), "sgcd/kl_control": float(d_ctrl.mean()),
                            "sgcd/kl_excess": float(e.mean()), "sgcd/kl_excess_p90": _quantile(e, 0.9),
                            "sgcd/kl_excess_max": float(e.max()),
                            "sgcd/above_floor_frac": float((e > self.cfg.kl_floor).float().mean()),
                            "sgcd/teacher_entropy": float(h.mean()), "sgcd/salience_mean": float(s.mean()),
                            "sgcd/salient_frac": float((s > 0).float().mean())})
        return out

    @property
    def _needs_summary(self) -> bool:
        return self.cfg.reference in ("summary", "placebo")

    def _references(self, kept: list[tuple[Group, list, list[float]]], contrast: list[int], ctx: MethodContext,
                    metrics: dict[str, float]) -> dict[int, tuple[str | None, str | None]]:
        """{kept group index: (what the teacher reads, its control)} for every guided group; None
        means the student's own context (no header, no text)."""
        tok, kind = ctx.tokenizer, self.cfg.reference
        texts: dict[int, str] = {}
        if self._needs_summary:
            from trainers.summarizer import summarize_groups, summarizer_metrics

            t0 = time.perf_counter()
            refs = summarize_groups(ctx.summarizer, [kept[i][0] for i in contrast], ctx.tasks, ctx.factory,
                                    store=ctx.store, run=ctx.run)
            metrics["time/summarizer"] = time.perf_counter() - t0
            metrics.update(summarizer_metrics(refs))
            texts = {i: ref.text for i, ref in zip(contrast, refs) if ref.text}
            for i, ref in zip(contrast, refs):  # where credit recording finds the reference (guidance table)
                self.credit_notes[i] = {"digest": ref.digest, "model": ctx.summarizer.name,
                                        "prompt_version": ctx.summarizer.prompt_version, "status": ref.status}
        elif kind == "oracle":
            texts = {i: t for i in contrast if (t := oracle_reference(kept[i][0])) is not None}
        else:  # none
            texts = {i: "" for i in contrast}
        fitted = {i: fit_reference(tok, t, self.cfg.reference_max_tokens) for i, t in texts.items() if t}
        cut = [f for f in fitted.values() if f.truncated]
        metrics["sgcd/reference_truncated_frac"] = len(cut) / len(fitted) if fitted else 0.0
        metrics["sgcd/reference_cut_tokens_frac"] = (sum(f.cut_tokens for f in fitted.values())
                                                     / max(sum(f.tokens for f in fitted.values()), 1))
        notes: dict[int, tuple[str | None, str | None]] = {}
        lengths = []
        for i in texts:
            if kind == "none":
                notes[i] = (None, None)  # both passes read the student's own context
                continue
            read = fitted[i].text
            if kind == "placebo":
                read = neutral_text(tok, token_length(tok, read), "placebo")
            n = token_length(tok, read)
            lengths.append(n)
            notes[i] = (read, {"neutral": neutral_text(tok, n, "control"), "empty": None,
                               "off": None}[self.cfg.control])

        metrics["sgcd/reference_tokens"] = sum(lengths) / len(lengths) if lengths else 0.0
        return notes


register_method("sgcd")(settings_builder("sgcd", SGCDMethod, SGCDSettings()))
