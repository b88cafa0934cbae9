"""RLSD: RLVR with Self-Distillation (arXiv 2604.03128, methods.md §2).

Direction from the reward, magnitude from a privileged self-teacher. The teacher is the policy
itself reading the trajectory with the env's privileged information (toy: the answer;
tau-airline: the gold actions) in its first prompt. Per sampled token t of a trajectory whose
GRPO advantage is A:

    Δ_t = sg( log P_T(y_t | x, r, y_<t) − log P_S(y_t | x, y_<t) )      privileged information gain
    w_t = exp( sign(A) · Δ_t )                                             direction-aware evidence ratio
    Â_t = A · [ (1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w) ]                (Algorithm 1)

and Â_t replaces A in GRPO's clipped surrogate (``trainers.losses``); there is no extra loss
term. Since w_t > 0, sign(Â_t) = sign(A) on every token, and Â_t / A stays in
[(1 − λ) + λ(1 − ε_w), (1 − λ) + λ(1 + ε_w)]. With λ = 0 RLSD is GRPO exactly.

- P_S is the trace's recorded sampling log-prob (same temperature as the teacher's scoring), so
  the only extra cost is one no-grad teacher forward per trajectory (``trainers.teacher``).
- P_T runs on a snapshot of the policy re-synced every ``sync_every`` steps and frozen in between
  (paper: 10; ``sync_every=1`` is the live policy, no copy; ``trainers.methods.self_teacher``).
  The snapshot and its sync step are method state, so ``--resume`` restores the same teacher.
- Tokens with A = 0 (zero-variance groups) get Â = 0 whatever w is: they are not scored. When
  λ = 0 no teacher runs at all (Â = A), which with the printed schedule is every step after 50.

Defaults, and where they come from (methods.md §2.3):
- ε_w = 0.2; clip_low 0.2 / clip_high 0.28 (the paper's GRPO-family settings); no KL.
- λ: linear from ``lam_start`` = 0.5 to ``lam_end`` = 0 over ``lam_decay_steps`` = 50 steps,
  as printed. methods.md records that this contradicts the paper's own motivation (λ is said
  to avoid an "abrupt transition at the start of training", yet the schedule moves *towards*
  the uniform advantage, so read literally RLSD is GRPO after step 50). We keep the printed
  default and expose all three knobs (e.g. ``lam_start=0 lam_end=1`` for the other reading, or
  ``lam_start=lam_end=1`` for the pure Step-3 form). Step 1 of training uses ``lam_start``;
  ``lam_decay_steps=0`` means ``lam_end`` from the first step.
- Aggregation: methods.md is silent. RLSD presents Â as a drop-in for GRPO's advantage, so we
  keep GRPO's ``seq-mean-token-mean`` (``--loss-agg`` changes it).
- Privileged note: at most ``note_max_tokens`` = 512 tokens (our choice; the paper's "final
  ground-truth answer" is short). A group whose task has no privileged info trains with plain
  GRPO credit and is counted (``rlsd/no_info_groups``).
- Numerics (ours): Δ is clamped to ±20 before the exp, which changes no clipped weight (ε_w < 1)
  but keeps the reported raw-weight mean finite.

Metrics: ``rlsd/lambda``, ``rlsd/w_mean`` (raw w), ``rlsd/w_clip_frac`` (paper: settles at 3–6%),
``rlsd/delta_mean``, ``rlsd/teacher_tokens``, ``rlsd/teacher_age`` (steps since the last sync).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import ConfigError
from harness.options import option
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.methods.self_teacher import PolicySnapshot
from trainers.teacher import sampled_token_logprobs

__all__ = ["RLSDSettings", "RLSDMethod", "rlsd_advantages", "lambda_at"]

_DELTA_CLAMP = 20.0


@dataclass(frozen=True)
class RLSDSettings(GRPOSettings):
    clip_high: float = 0.28
    """Clip-higher of the surrogate (paper: ε_high = 0.28, ε_low = 0.2)."""
    eps_w: float = option(0.2, minimum=0)
    """Clip of the evidence ratio: w in [1 - eps_w, 1 + eps_w] (paper: 0.2)."""
    lam_start: float = option(0.5, minimum=0, maximum=1)
    """λ at the first step (paper: 0.5)."""
    lam_end: float = option(0.0, minimum=0, maximum=1)
    """λ after the decay (paper: 0; see the module docstring for the contradiction)."""
    lam_decay_steps: int = option(50, minimum=0)
    """Steps of the linear λ schedule (paper: 50)."""
    sync_every: int = option(10, minimum=1)
    """Re-sync the teacher snapshot to the policy every this many steps (paper: 10; 1 = live policy)."""
    note_max_tokens: int = option(512, minimum=1)
    """Longest privileged note put into the teacher's first prompt (tokens)."""


def lambda_at(step: int, start: float, end: float, decay_steps: int) -> float:
    """λ at training step ``step`` (1-based): ``start`` at step 1, linear to ``end`` after ``decay_steps``."""
    if decay_steps <= 0:
        return float(end)
    progress = min(1.0, max(step - 1, 0) / decay_steps)
    return float(start + (end - start) * progress)


def rlsd_advantages(advantage: float, delta: torch.Tensor, lam: float,
                    eps_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â_t, raw w_t)`` for one trajectory: ``delta`` = teacher − student log-probs of its sampled
    tokens (already detached), ``advantage`` = its GRPO advantage A."""
    sign = float((advantage > 0) - (advantage < 0))
    w = torch.exp(sign * delta.detach().float().clamp(-_DELTA_CLAMP, _DELTA_CLAMP))
    scale = (1.0 - lam) + lam * w.clamp(1.0 - eps_w, 1.0 + eps_w)
    return advantage * scale, w


class RLSDMethod(GRPOMethod):
    description = ("RLVR with self-distillation: the reward sets the sign, a privileged self-teacher's "
                   "evidence ratio the per-token magnitude")
    paper = "2604.03128"
    requires = ("privileged_info",)

    def __init__(self, name: str, settings: RLSDSettings):
        super().__init__(name, settings)
        if not 0 <= settings.eps_w < 1:
            raise ConfigError("rlsd eps_w must be in [0, 1) (w is clipped to [1 - eps_w, 1 + eps_w] and must stay > 0)")
        for key in ("lam_start", "lam_end"):
            if not 0 <= getattr(settings, key) <= 1:
                raise ConfigError(f"rlsd {key} must be in [0, 1]")
        if settings.lam_decay_steps < 0:
            raise ConfigError("rlsd lam_decay_steps must be >= 0")
        if settings.note_max_tokens < 1:
            raise ConfigError("rlsd note_max_tokens must be >= 1")
        self.snapshot = PolicySnapshot("sync", settings.sync_every)  # validates sync_every

    def lam(self, step: int) -> float:
        return lambda_at(step, self.cfg.lam_start, self.cfg.lam_end, self.cfg.lam_decay_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.snapshot.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot.load_state_dict(state.get("teacher", {}))

    def prepare(self, groups, ctx: MethodContext | None) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        step = ctx.step if ctx is not None else 0
        if ctx is not None and ctx.model is not None:
            self.snapshot.refresh(ctx.model, step)  # keep the sync grid even on steps without a teacher pass
        lam = self.lam(step)
        metrics: dict[str, float] = {"groups/trained": len(kept), "groups/dropped": dropped, "rlsd/lambda": lam}
        items = [(g, e.trace, a) for g, scored, adv in kept for e, a in zip(scored, adv) if e.trace.response_tokens]
        deltas = self._deltas(items, ctx, step, metrics) if lam > 0 else {}
        traces, advantages, ws, ds = [], [], [], []
        for i, (_, trace, a) in enumerate(items):
            traces.append(trace)
            if i not in deltas:
                advantages.append(a)  # exactly GRPO's scalar credit
                continue
            adv, w = rlsd_advantages(a, deltas[i], lam, self.cfg.eps_w)
            per_pos = torch.zeros(len(trace), dtype=torch.float32)
            per_pos[torch.as_tensor(trace.sampled_positions, dtype=torch.long)] = adv
            advantages.append(per_pos)
            ws.append(w)
            ds.append(deltas[i])
        if ws:
            w, d = torch.cat(ws), torch.cat(ds)
            eps = self.cfg.eps_w
            metrics.update({"rlsd/w_mean": float(w.mean()), "rlsd/delta_mean": float(d.mean()),
                            "rlsd/w_clip_frac": float(((w < 1 - eps) | (w > 1 + eps)).float().mean())})
        return Prepared(traces=traces, advantages=advantages, metrics=metrics)

    def _deltas(self, items: list, ctx: MethodContext | None, step: int,
                metrics: dict[str, float]) -> dict[int, torch.Tensor]:

        """Δ per sampled token for every trajectory with A != 0 whose task has privileged info."""
        scored = [i for i, (_, _, a) in enumerate(items) if a != 0]
        if not scored:
            return {}
        if ctx is None or ctx.model is None or ctx.privileged is None:
            raise ConfigError("rlsd needs the policy model and the env's privileged information "
                              "(an env with privileged_info, e.g. toy or tau-airline)")
        notes_by_task: dict[str, str | None] = {}
        for i in scored:
            task_id = items[i][0].task_id
            if task_id not in notes_by_task:
                if task_id not in ctx.tasks:
                    raise ConfigError(f"rlsd: task '{task_id}' is not in the method context's tasks")
                notes_by_task[task_id] = ctx.privileged(ctx.tasks[task_id]) or None
        metrics["rlsd/no_info_groups"] = float(len({id(items[i][0]) for i in scored
                                                    if notes_by_task[items[i][0].task_id] is None}))
        scored = [i for i in scored if notes_by_task[items[i][0].task_id] is not None]
        if not scored:
            return {}
        t0 = time.perf_counter()
        teacher = self.snapshot.teacher(ctx.model, step)
        traces = [items[i][1] for i in scored]
        teacher_lp = sampled_token_logprobs(
            teacher, traces, temperature=ctx.temperature, micro_batch_tokens=ctx.micro_batch_tokens,
            tokenizer=ctx.tokenizer, notes=[notes_by_task[items[i][0].task_id] for i in scored],
            max_note_tokens=self.cfg.note_max_tokens, pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        metrics["time/teacher"] = time.perf_counter() - t0
        metrics["rlsd/teacher_tokens"] = float(sum(t.response_tokens for t in traces))
        metrics["rlsd/teacher_age"] = float(0 if self.snapshot.live else step - (self.snapshot.synced_at or 0))
        out = {}
        for i, trace, t_lp in zip(scored, traces, teacher_lp):
            s_lp = torch.as_tensor([trace.logprobs[p] for p in trace.sampled_positions], dtype=torch.float32)
            out[i] = (t_lp.float() - s_lp).detach()
        return out


register_method("rlsd")(settings_builder("rlsd", RLSDMethod, RLSDSettings()))
