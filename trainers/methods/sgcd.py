"""SGCD: Sibling-Guided Credit Distillation (arXiv 2606.12634, methods.md §1).

Policy gradient stays the only actor loss; distillation only reweights credit:

1. Dynamic sampling keeps *mixed* groups (at least one success and one failure; successes as the
   runner defines them, reward 1), resampling fresh tasks up to ``resample_budget`` rounds.
2. A summarizer (an external LLM through litellm, or the built-in ``diff``) turns each mixed
   group into a credit reference: state checks, reusable successful branches, failed branches
   and why, divergence points. Redacted, cached in the ``guidance`` table (``trainers.summarizer``).
3. Teacher = the same policy with the credit reference in its system message, scoring the
   student's own sampled tokens in one no-grad forward (``trainers.teacher``). The student's
   distribution is the one it sampled from (recorded top-K at rollout), so no second student pass.
4. Per token: d = KL(p^K || q^K), teacher entropy H, salience s in [0, 1], W = clip(1 + gamma s, 1, c),
   Â = A * sg[W] (``trainers.credit_weights``); the loss is the shared clipped surrogate.

A group whose summarizer call falls back (malformed twice, provider down) or that has no clean
success/failure contrast (``keep=spread`` admits partial-credit groups) trains with plain GRPO
credit (W = 1), and is counted. With gamma = 0, SGCD is GRPO exactly (tests/test_sgcd.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.types import Group
from trainers.credit_weights import (SALIENCE_MODES, SalienceSettings, credit_weights, salience, topk_reverse_kl,
                                     weighted_advantages)
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.teacher import score_with_teacher, teacher_first_prompt, teacher_sequence

__all__ = ["SGCDSettings", "SGCDMethod"]

KEEP_RULES = ("mixed", "spread")


@dataclass(frozen=True)
class SGCDSettings(GRPOSettings):
    dynamic_sampling: str = "resample"
    gamma: float = 1.0
    """Credit gain: W = clip(1 + gamma * salience, 1, cap). 0 turns SGCD into GRPO."""
    cap: float = 2.0
    """Upper bound c of the credit weight (paper: 2)."""
    topk: int = 20
    """Size K of the student's top-K support for the teacher-student KL."""
    salience: str = "spike"
    salience_kappa: float = 2.0
    entropy_kappa: float = 2.0
    salience_span: int = 0
    salience_scope: str = "group"
    reference_max_tokens: int = 512
    """Longest credit reference put into the teacher's context (tokens; longer ones are cut)."""
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
        self.salience_settings = SalienceSettings(mode=settings.salience, kappa=settings.salience_kappa,
                                                  entropy_kappa=settings.entropy_kappa, span=settings.salience_span,
                                                  scope=settings.salience_scope)

    @property
    def sampler_topk(self) -> int:  # type: ignore[override]
        return self.cfg.topk

    uses_summarizer = True
    description = "Sibling-guided credit distillation: LLM-summarised sibling contrast reweights GRPO credit, W in [1, c]"
    paper = "2606.12634"
    requires = ("summarizer",)

    def keeps(self, group: Group) -> bool:
        if self.cfg.keep == "mixed":
            return group.label == "mixed" and super().keeps(group)
        return super().keeps(group)

    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        metrics: dict[str, float] = {"groups/trained": len(kept), "groups/dropped": dropped}
        weights: list[list[torch.Tensor] | None] = [None] * len(kept)
        if kept:  # gamma = 0 still runs the pipeline: it logs the divergence it would have used
            weights = self._credit(kept, ctx, metrics)
        traces, advantages, all_w = [], [], []
        for (group, scored, adv), w_group in zip(kept, weights):
            for k, (episode, a) in enumerate(zip(scored, adv)):
                trace = episode.trace
                if not trace.response_tokens:  # in the baseline, nothing to train (see GRPOMethod.prepare)
                    continue
                w = w_group[k] if w_group is not None else torch.ones(trace.response_tokens)
                traces.append(trace)
                all_w.append(w)
                per_pos = torch.zeros(len(trace), dtype=torch.float32)
                per_pos[torch.as_tensor(trace.sampled_positions, dtype=torch.long)] = weighted_advantages(a, w)
                advantages.append(per_pos)
        w_cat = torch.cat(all_w) if all_w else torch.zeros(0)
        metrics.update({"sgcd/w_mean": float(w_cat.mean()) if w_cat.numel() else 1.0,
                        "sgcd/w_p90": _quantile(w_cat, 0.9) if w_cat.numel() else 1.0,
                        "sgcd/w_max": float(w_cat.max()) if w_cat.numel() else 1.0,
                        "sgcd/amplified_frac": float((w_cat > 1.0 + 1e-6).float().mean()) if w_cat.numel() else 0.0})
        return Prepared(traces=traces, advantages=advantages, metrics=metrics, extras={"weights": all_w})

    # -- credit ---------------------------------------------------------------------------------
    def _credit(self, kept: list[tuple[Group, list, list[float]]], ctx: MethodContext | None,
                metrics: dict[str, float]) -> list[list[torch.Tensor] | None]:
        if ctx is None or ctx.model is None or ctx.summarizer is None:
            raise ConfigError("SGCD needs a policy model and a summarizer (harness train --summarizer ...)")
        from trainers.summarizer import summarize_groups, summarizer_metrics

        contrast = [i for i, (g, _, _) in enumerate(kept) if g.label == "mixed"]
        t0 = time.perf_counter()
        refs = summarize_groups(ctx.summarizer, [kept[i][0] for i in contrast], ctx.tasks, ctx.factory,
                                store=ctx.store, run=ctx.run)
        metrics["time/summarizer"] = time.perf_counter() - t0
        metrics.update(summarizer_metrics(refs))
        guided = {i: ref.text for i, ref in zip(contrast, refs) if ref.text}
        metrics["sgcd/guided_groups"] = float(len(guided))
        metrics["sgcd/fallback_groups"] = float(len(kept) - len(guided))

        # one teacher pass over every guided trajectory of the step
        seqs, positions, support, student, owners = [], [], [], [], []
        for i, text in guided.items():
            firsts: dict[str, list[int]] = {}  # siblings mostly share their opening messages: render once
            for k, episode in enumerate(kept[i][1]):
                trace = episode.trace
                if not trace.response_tokens:
                    continue
                top = trace.student_topk()
                if top is None:
                    raise ConfigError("SGCD needs the student's top-K at every sampled token; the rollout policy "
                                      "must be built with record_topk (harness train does this)")
                if trace.context is None:
                    raise ConfigError("SGCD needs each trace's opening messages; the rollout policy did not record them")
                key = json.dumps(trace.context, sort_keys=True, default=str)
                if key not in firsts:
                    firsts[key] = teacher_first_prompt(ctx.tokenizer, trace.context, text, self.cfg.reference_max_tokens)
                ids, offset = teacher_sequence(ctx.tokenizer, trace, text, self.cfg.reference_max_tokens, first=firsts[key])
                seqs.append(ids)
                positions.append([p + offset for p in trace.sampled_positions])
                support.append(top[0])
                student.append(top[1])
                owners.append((i, k))
        t1 = time.perf_counter()
        scores = score_with_teacher(ctx.model, seqs, positions, support, temperature=ctx.temperature,
                                    micro_batch_tokens=ctx.micro_batch_tokens,
                                    pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        metrics["time/teacher"] = time.perf_counter() - t1
        metrics["sgcd/teacher_tokens"] = float(sum(len(s) for s in seqs))

        by_group: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for (i, k), sc, s_lp, seq_pos in zip(owners, scores, student, positions):
            d = topk_reverse_kl(s_lp, sc.support_logprobs)
            trace = kept[i][1][k].trace
            turn_ids = torch.cat([torch.full((e - s,), n) for n, (s, e) in enumerate(trace.turns)])
            by_group.setdefault(i, {})[k] = (d, sc.entropy, turn_ids)
        out: list[list[torch.Tensor] | None] = [None] * len(kept)
        ds, hs, ss = [], [], []
        for i, members in by_group.items():
            order = sorted(members)
            out[i] = [torch.ones(e.trace.response_tokens) for e in kept[i][1]]
            d = [members[k][0] for k in order]
            h = [members[k][1] for k in order]
            s = salience(d, h, [members[k][2] for k in order], self.salience_settings)
            for k, x in zip(order, s):
                out[i][k] = credit_weights(x, self.cfg.gamma, self.cfg.cap)
            ds += d
            hs += h
            ss += s
        if ds:
            d_cat, h_cat, s_cat = torch.cat(ds), torch.cat(hs), torch.cat(ss)
            metrics.update({"sgcd/kl_teacher": float(d_cat.mean()), "sgcd/kl_teacher_p90": _quantile(d_cat, 0.9),
                            "sgcd/teacher_entropy": float(h_cat.mean()), "sgcd/salience_mean": float(s_cat.mean()),
                            "sgcd/salience_p90": _quantile(s_cat, 0.9),
                            "sgcd/salient_frac": float((s_cat > 0).float().mean())})
        return out


register_method("sgcd")(settings_builder("sgcd", SGCDMethod, SGCDSettings()))
