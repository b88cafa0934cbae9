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

Â_t is A · m_t with the multiplier m_t = (1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w), returned by
``token_multipliers`` and applied by the GRPO family's shared, detached hook
(``trainers.token_credit``), as the public ports do (ms-swift ``advantage_reweight rlsd``, the
fw-ai cookbook): RLSD's credit composes with any GRPO-family loss setting (``--loss-agg``,
``--no-std-normalize`` ...) without touching it.

- P_S is the trace's recorded sampling log-prob (same temperature as the teacher's scoring), so
  the only extra cost is one no-grad teacher forward per trajectory (``trainers.teacher``).
- P_T runs on a snapshot of the policy taken at the first step, frozen, and refreshed from the
  policy every ``sync_every`` steps (``sync_every=1`` is the live policy, no copy;
  ``trainers.methods.self_teacher``). The snapshot and its sync step are method state, so
  ``--resume`` restores the same teacher.
- Tokens with A = 0 (zero-variance groups) get Â = 0 whatever w is: they are not scored. When
  λ = 0 no teacher runs at all (Â = A): with the official schedule, every step after 60.
- ``negative_only``: only A < 0 trajectories are reweighted (and scored by the teacher); A > 0
  ones keep GRPO's credit. The official code's remedy for response-length collapse (correct
  answers' reasoning tokens under-reinforced). Off by default, as there.

Defaults, and where they come from. The official code is ``iie-ycx/RLSD`` (a veRL fork; read for
its facts, not copied). Its RLSD launcher is ``examples/visual_rl/rlsd_train.sh``, which runs
``verl.trainer.opsd_main`` with ``opsd.rlsd_lambda=0.5``, ``opsd.rlsd_lambda_warmup_steps=0``,
``opsd.rlsd_lambda_decay_steps=60``, ``opsd.rlsd_reweight_clip_range=0.2``,
``opsd.freeze_teacher_model=True``, ``opsd.rlsd_teacher_sync_interval=20``,
``worker.actor.clip_ratio_low=0.2`` / ``clip_ratio_high=0.28``, ``algorithm.disable_kl=True`` and
``worker.rollout.n=8``; the settings are documented in ``verl/trainer/opsd_config.py``
(``OPSDConfig``: ``rlsd_lambda``, ``rlsd_reweight_clip_range``, ``rlsd_teacher_sync_interval`` "sync
teacher weights from actor every N training steps ... requires freeze_teacher_model=True",
``rlsd_negative_only`` "only apply RLSD reweighting on negative-advantage (incorrect) samples",
``rlsd_lambda_decay_steps`` "linearly decays from its target value to 0").
- λ: linear from ``lam_start`` = 0.5 to ``lam_end`` = 0 over ``lam_decay_steps`` = 60 steps, no
  warmup (launcher). This settles the paper's contradiction recorded in methods.md §2.3: the
  literal reading is the implemented one, and RLSD is GRPO after the decay. Step 1 of training
  uses ``lam_start``; ``lam_decay_steps=0`` means ``lam_end`` from the first step. The other
  readings stay settings (``lam_start=0 lam_end=1``; ``lam_start=lam_end=1``, the pure Step-3 form).
- Teacher: ``sync_every`` = 20 (launcher: a frozen reference policy refreshed from the actor every
  20 steps; the config's own default 0 would never refresh it). Our snapshot is the same thing:
  the policy frozen at step 1, re-taken at steps 21, 41 ...
- ε_w = 0.2 (launcher and paper); clip_low 0.2 / clip_high 0.28 (launcher and paper); no KL
  (launcher: ``disable_kl``).
- ``negative_only`` = False (``OPSDConfig`` default).
- Not taken from the launcher: its 8 rollouts per prompt (``--group-size`` is the run's, shared
  by every method of a suite); its teacher hint template (ours: the env's privileged note in the
  first prompt under a fixed header, ``trainers.teacher.PRIVILEGED_HEADER``).
- Aggregation: neither source says more than GRPO; we keep GRPO's ``seq-mean-token-mean``
  (``--loss-agg`` changes it).
- Privileged note: at most ``note_max_tokens`` = 512 tokens (ours; the paper's "final
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
from trainers.method_settings import family_sources
from trainers.methods import MethodContext, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.methods.self_teacher import PolicySnapshot
from trainers.teacher import sampled_token_logprobs

__all__ = ["RLSDSettings", "RLSDMethod", "rlsd_advantages", "rlsd_multipliers", "lambda_at"]

_DELTA_CLAMP = 20.0


@dataclass(frozen=True)
class RLSDSettings(GRPOSettings):
    clip_high: float = 0.28
    """Clip-higher of the surrogate (paper: ε_high = 0.28, ε_low = 0.2)."""
    eps_w: float = option(0.2, minimum=0)
    """Clip of the evidence ratio: w in [1 - eps_w, 1 + eps_w] (paper and official launcher: 0.2)."""
    lam_start: float = option(0.5, minimum=0, maximum=1)
    """λ at the first step (paper and official launcher: 0.5)."""
    lam_end: float = option(0.0, minimum=0, maximum=1)
    """λ after the decay (official code: 0, so RLSD is GRPO afterwards)."""
    lam_decay_steps: int = option(60, minimum=0)
    """Steps of the linear λ schedule (official launcher: 60; the paper printed 50)."""
    sync_every: int = option(20, minimum=1)
    """Refresh the frozen teacher from the policy every this many steps (official launcher: 20;
    1 = the live policy)."""
    negative_only: bool = False
    """Reweight only A < 0 trajectories; A > 0 keep GRPO's credit (official ``rlsd_negative_only``)."""
    note_max_tokens: int = option(512, minimum=1)
    """Longest privileged note put into the teacher's first prompt (tokens)."""


def lambda_at(step: int, start: float, end: float, decay_steps: int) -> float:
    """λ at training step ``step`` (1-based): ``start`` at step 1, linear to ``end`` after ``decay_steps``."""
    if decay_steps <= 0:
        return float(end)
    progress = min(1.0, max(step - 1, 0) / decay_steps)
    return float(start + (end - start) * progress)


def rlsd_multipliers(advantage: float, delta: torch.Tensor, lam: float,
                     eps_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_t, raw w_t)`` for one trajectory: m_t = (1 − λ) + λ · clip(w_t, 1 ± ε_w), the factor the
    shared hook puts on its GRPO advantage A (Â_t = A · m_t); ``delta`` = teacher − student
    log-probs of its sampled tokens (detached)."""
    sign = float((advantage > 0) - (advantage < 0))
    w = torch.exp(sign * delta.detach().float().clamp(-_DELTA_CLAMP, _DELTA_CLAMP))
    return (1.0 - lam) + lam * w.clamp(1.0 - eps_w, 1.0 + eps_w), w


def rlsd_advantages(advantage: float, delta: torch.Tensor, lam: float,
                    eps_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â_t, raw w_t)`` for one trajectory (Algorithm 1): A · m_t at its sampled tokens."""
    scale, w = rlsd_multipliers(advantage, delta, lam, eps_w)
    return advantage * scale, w


class RLSDMethod(GRPOMethod):
    description = ("RLVR with self-distillation: the reward sets the sign, a privileged self-teacher's "
                   "evidence ratio the per-token magnitude")
    paper = "2604.03128"
    code = "iie-ycx/RLSD"
    sources = family_sources(RLSDSettings(), {
        "lam_start, lam_end, lam_decay_steps": "official launcher examples/visual_rl/rlsd_train.sh "
                                               "(rlsd_lambda=0.5, warmup 0, rlsd_lambda_decay_steps=60)",
        "sync_every": "official launcher (freeze_teacher_model=True, rlsd_teacher_sync_interval=20)",
        "eps_w": "paper and official launcher (rlsd_reweight_clip_range=0.2)",
        "clip_low, clip_high": "paper and official launcher (clip_ratio_low=0.2, clip_ratio_high=0.28)",
        "kl_coef": "official launcher (algorithm.disable_kl=True)",
        "negative_only": "official verl/trainer/opsd_config.py (rlsd_negative_only, default False)",
        "normalize_std, baseline": "paper: GRPO's A = (R - mean) / std",
        "note_max_tokens, loss_agg": "ours (the sources are silent)",
    })
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

    def token_multipliers(self, kept, ctx: MethodContext | None,
                          metrics: dict[str, float]) -> dict[tuple[int, int], torch.Tensor]:
        step = ctx.step if ctx is not None else 0
        if ctx is not None and ctx.model is not None:
            self.snapshot.refresh(ctx.model, step)  # keep the sync grid even on steps without a teacher pass
        lam = self.lam(step)
        metrics["rlsd/lambda"] = lam
        items = [((g, k), group, e.trace, a) for g, (group, scored, adv) in enumerate(kept)
                 for k, (e, a) in enumerate(zip(scored, adv)) if e.trace.response_tokens]
        deltas = self._deltas(items, ctx, step, metrics) if lam > 0 else {}
        out, ws, ds = {}, [], []
        for key, _, _, a in items:
            if key in deltas:
                out[key], w = rlsd_multipliers(a, deltas[key], lam, self.cfg.eps_w)
                ws.append(w)
                ds.append(deltas[key])
        if ws:
            w, d = torch.cat(ws), torch.cat(ds)
            eps = self.cfg.eps_w
            metrics.update({"rlsd/w_mean": float(w.mean()), "rlsd/delta_mean": float(d.mean()),
                            "rlsd/w_clip_frac": float(((w < 1 - eps) | (w > 1 + eps)).float().mean())})
        return out

    def _deltas(self, items: list, ctx: MethodContext | None, step: int,
                metrics: dict[str, float]) -> dict[tuple[int, int], torch.Tensor]:
        """Δ per sampled token for every trajectory the teacher scores: A != 0 (A < 0 only with
        ``negative_only``) and its task has privileged info."""
        scored = [i for i, (_, _, _, a) in enumerate(items) if (a < 0 if self.cfg.negative_only else a != 0)]
        if not scored:
            return {}
        if ctx is None or ctx.model is None or ctx.privileged is None:
            raise ConfigError("rlsd needs the policy model and the env's privileged information "
                              "(an env with privileged_info, e.g. toy or tau-airline)")
        notes_by_task: dict[str, str | None] = {}
        for i in scored:
            task_id = items[i][1].task_id
            if task_id not in notes_by_task:
                if task_id not in ctx.tasks:
                    raise ConfigError(f"rlsd: task '{task_id}' is not in the method context's tasks")
                notes_by_task[task_id] = ctx.privileged(ctx.tasks[task_id]) or None
        metrics["rlsd/no_info_groups"] = float(len({id(items[i][1]) for i in scored
                                                    if notes_by_task[items[i][1].task_id] is None}))
        scored = [i for i in scored if notes_by_task[items[i][1].task_id] is not None]
        if not scored:
            return {}
        t0 = time.perf_counter()
        teacher = self.snapshot.teacher(ctx.model, step)
        traces = [items[i][2] for i in scored]
        teacher_lp = sampled_token_logprobs(
            teacher, traces, temperature=ctx.temperature, micro_batch_tokens=ctx.micro_batch_tokens,
            tokenizer=ctx.tokenizer, notes=[notes_by_task[items[i][1].task_id] for i in scored],
            max_note_tokens=self.cfg.note_max_tokens, pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        metrics["time/teacher"] = time.perf_counter() - t0
        metrics["rlsd/teacher_tokens"] = float(sum(t.response_tokens for t in traces))
        metrics["rlsd/teacher_age"] = float(0 if self.snapshot.live else step - (self.snapshot.synced_at or 0))
        out = {}
        for i, trace, t_lp in zip(scored, traces, teacher_lp):
            s_lp = torch.as_tensor([trace.logprobs[p] for p in trace.sampled_positions], dtype=torch.float32)
            out[items[i][0]] = (t_lp.float() - s_lp).detach()
        return out


register_method("rlsd")(settings_builder("rlsd", RLSDMethod, RLSDSettings()))
