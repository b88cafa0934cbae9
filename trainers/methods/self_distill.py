"""Self-distillation as the actor loss: OPSD (arXiv 2601.18734) and SDPO (arXiv 2601.20802).

methods.md §6.6. The teacher is the policy itself reading a privileged context; on every token
the student sampled, the student's next-token distribution is pulled towards the teacher's:

    L(θ) = E_ŷ~p_S [ (1/|ŷ|) Σ_n D( p_T(· | x, c, ŷ_<n) || p_S(· | x, ŷ_<n) ) ]      gradient through p_S only

There is no reward advantage in the loss (the reward only picks SDPO's sibling context). This is
the "direct self-distillation" baseline that the SGCD paper shows collapses tool use, and one of
RLSD's baselines.

Top-K + tail approximation (so it scales to 150k vocabularies): in ``prepare`` one no-grad
teacher forward records, at every sampled position, the teacher's own top-K ids and their
log-probs (``trainers.teacher.teacher_topk_in_context``: siblings under one note share one
prefix pass), packed with the traces as ``token_fields``. In
``loss`` the student's temperature-scaled log-softmax is read at those K ids from the training
forward's logits (a chunked autograd function that never materialises a float32 [tokens, vocab]
tensor, like ``losses.token_logprobs``). Both distributions get a tail bucket log(1 − Σ_K p), so
each is a proper distribution over K + 1 buckets, and

    forward  D = Σ_b p_T(b) (log p_T(b) − log p_S(b))        (OPSD's best in its ablation)
    reverse  D = Σ_b p_S(b) (log p_S(b) − log p_T(b))        (SDPO's objective)

The bucketed KL is a lower bound of the full-vocabulary KL (merging outcomes never increases a
KL) and is zero exactly when the two agree on the K teacher tokens. For the reverse KL the
student's mass outside the teacher's top-K only counts through the tail bucket. Teacher tensors
are detached inside the loss, so no gradient reaches the teacher. Per-token values are reduced
by the shared ``aggregate`` (``loss_agg``; default GRPO's seq-mean-token-mean, which is OPSD's
(1/|ŷ|) Σ_n averaged over sequences); a ``kl_coef`` KL to the reference is added as in GRPO.

Settings: ``divergence`` forward | reverse; ``topk``; ``teacher`` initial (frozen initial
policy) | current (the live policy, no grad) | sync (snapshot re-synced every ``sync_every``
steps) | ema (θ_T ← (1 − β)θ_T + βθ each step, β = ``ema_rate``; ``trainers.methods.self_teacher``);
``context`` env (``ctx.privileged(task)``) | sibling
(the text of a successful sibling rollout of the same group, rendered compactly: its assistant
text, tool calls and tool results). With ``context=sibling`` a trace with no successful sibling
(``exclude_self``: other than itself) gets no distillation signal and does not train; groups
without any success are counted in ``sd/no_success_groups``.

Defaults and sources:
- opsd (paper arXiv 2601.18734; official code siyan-zhao/OPSD): divergence forward (best in the
  OPSD ablation), teacher initial (OPSD freezes the teacher
  at the initial policy), context env. topk = 20: OPSD distils the full vocabulary; 20 is our
  choice (the Tinker cookbook's self-distillation recipe reports K = 20 matching the full KL).
  token_clip τ = 0.05: the official code's ``jsd_token_clip`` default (siyan-zhao/OPSD,
  ``opsd_train.py``), which caps each vocabulary entry's divergence term at τ before the sum
  (methods.md §6.6: D_clip = Σ_v min(ℓ_v, τ)); here each of the K + 1 buckets is capped, so the
  tail bucket is capped as one term where the source caps its entries one by one.
- sdpo (paper arXiv 2601.20802; official code lasgroup/SDPO, a veRL fork; also TRL's
  SDPOTrainer): divergence reverse (the SDPO objective KL(p_S || sg p_T); TRL's SDPOTrainer default
  ``distillation_alpha = 1.0`` is also reverse KL), teacher ema with ema_rate 0.05 (the official
  code's ``teacher_regularization = ema``, ``teacher_update_rate = 0.05``, an EMA of the policy
  started from the initial one; the paper's formula writes the current model with a
  stop-gradient, which is ``teacher=current``), no token_clip (SDPO has none), context sibling, exclude_self = true
  (TRL ``dont_reprompt_on_self_success = True``; TRL also takes the *first* successful sibling, as
  we do), success = reward >= 1 (TRL ``success_reward_threshold = 1.0``, also the official README's
  default), topk = 100 (the official config's ``distillation_topk`` default, with a tail bucket,
  ``distillation_add_tail``, as here).
- Where the official code's defaults differ (each listed by ``harness methods list``): OPSD's
  launchers run JSD (``--beta 0.5``) over the full vocabulary; SDPO's config aggregates
  ``token-mean`` and defaults to ``alpha = 0.5`` (JSD; its rich-feedback launcher sets 1.0).
- note_max_tokens: 512 for opsd (the env's privileged note), 1024 for sdpo (a whole attempt);
  our choice. Longer notes are cut (``trainers.teacher``).
- Where the context goes (ours): appended to the system message of the student's first prompt
  under a header (``PRIVILEGED_HEADER`` / ``SIBLING_HEADER``), the convention of every
  privileged-context teacher here; every later token is the student's own, so sampled position p
  is teacher position p + offset. TRL instead rewrites the last user message with a
  "Correct solution: ..." template; in a multi-turn tool episode the first prompt is the only
  place that leaves the student's tokens untouched.
- The sibling is rendered from its messages (assistant text, tool calls with arguments, tool
  results, user replies; 300 characters each), not decoded from its tokens: the teacher needs
  the attempt's content, and tool-call markup would only spend the note budget.

Metrics: ``sd/kl_mean`` (per token, after ``token_clip``), ``sd/distilled_frac`` (traces with a teacher signal),
``sd/no_success_groups`` / ``sd/no_info_groups``, ``sd/teacher_tail_mass`` (teacher mass outside
its top-K: if large, raise ``topk``), ``sd/student_tail_mass``, ``sd/teacher_tokens``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import ConfigError
from harness.options import option
from harness.types import EpisodeResult, Group
from trainers.losses import aggregate, kl_penalty, masked_mean
from trainers.method_settings import AggregationBlock, KLBlock, SamplingBlock
from trainers.methods import MethodContext, Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod
from trainers.methods.self_teacher import TEACHER_MODES, PolicySnapshot
from trainers.packing import MicroBatch
from trainers.teacher import PRIVILEGED_HEADER, per_position, teacher_topk_in_context

__all__ = ["SelfDistillSettings", "SelfDistillMethod", "PRESETS", "support_logprobs", "with_tail", "bucket_terms",
           "bucket_kl",
           "render_attempt", "SIBLING_HEADER"]

DIVERGENCES = ("forward", "reverse")
CONTEXTS = ("env", "sibling")
SIBLING_HEADER = "\n\n# A successful attempt at this same task (training only; solve it the same way)\n"

IDS, LOGP = "sd_ids", "sd_logp"
_TAIL_FLOOR = 1e-12
"""Smallest tail mass: keeps log(tail) finite when the top-K holds (numerically) everything."""
_CHUNK_ELEMENTS_CPU = 1 << 18
_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class SelfDistillSettings(KLBlock, AggregationBlock, SamplingBlock):
    """The actor loss is a KL to the teacher, not a reward-weighted surrogate: no advantage and no
    clip settings (asking for one is an error); dynamic sampling, aggregation and the reference KL
    apply as in GRPO."""

    divergence: str = "forward"
    """``forward`` KL(p_T || p_S) or ``reverse`` KL(p_S || p_T), over the K + 1 buckets."""
    topk: int = option(20, minimum=1)
    """Teacher tokens kept per position; the rest is one tail bucket."""
    teacher: str = "initial"
    """``initial`` (frozen initial policy) | ``current`` (live policy) | ``sync`` (every ``sync_every`` steps)."""
    sync_every: int = option(10, minimum=1)
    """With ``teacher=sync``: steps between snapshots."""
    ema_rate: float = option(0.05, above=0.0, maximum=1.0)
    """With ``teacher=ema``: β in θ_T ← (1 − β)θ_T + βθ, once per step (SDPO's official code: 0.05)."""
    context: str = "env"
    """What the teacher reads: ``env`` (the env's privileged info) or ``sibling`` (a successful sibling)."""
    exclude_self: bool = True
    """With ``context=sibling``: a successful trace is never its own demonstration."""
    success_reward: float = 1.0
    """With ``context=sibling``: a sibling with at least this reward is a success."""
    token_clip: float = option(0.0, minimum=0.0)
    """OPSD's per-token pointwise clip τ: each bucket's KL term is capped at τ (0 = off)."""
    note_max_tokens: int = option(512, minimum=1)
    """Longest privileged context put into the teacher's first prompt (tokens)."""


PRESETS = {
    "opsd": SelfDistillSettings(token_clip=0.05),
    "sdpo": SelfDistillSettings(divergence="reverse", topk=100, teacher="ema", context="sibling",
                                note_max_tokens=1024),
}

PRESET_INFO = {
    "opsd": ("On-policy self-distillation: forward KL to the frozen initial policy reading the privileged answer "
             "(no reward in the loss)", "2601.18734"),
    "sdpo": ("Self-distillation policy optimization: reverse KL to an EMA of the policy reading a successful sibling "
             "(no reward in the loss)", "2601.20802"),
}

PRESET_CODE = {
    "opsd": "siyan-zhao/OPSD",
    "sdpo": "lasgroup/SDPO (a veRL fork; TRL's SDPOTrainer is a port)",
}

# Where each preset's defaults come from (``harness methods list``), read in the official code
# (siyan-zhao/OPSD: opsd_train.py, scripts/run_opsd*.sh; lasgroup/SDPO: README, the actor config
# verl/trainer/config/actor/actor.yaml, experiments/rich_feedback/run_sdpo.sh) and methods.md §6.6.
PRESET_SOURCES = {
    "opsd": {
        "divergence": "differs: paper's ablation found forward KL best (methods.md §6.6); the official launchers "
                      "run --beta 0.5 (JSD)",
        "teacher": "paper and official launchers (--fixed_teacher: the initial policy)",
        "topk": "ours: 20 + a tail bucket (official: full vocabulary, top_k_loss=0; run_opsd_topkloss.sh: 50)",
        "token_clip": "official opsd_train.py (jsd_token_clip=0.05; here per bucket of the K + 1)",
        "context": "paper: the teacher reads the reference solution (here the env's privileged note)",
        "note_max_tokens": "ours",
        "sync_every, ema_rate, exclude_self, success_reward": "unused with teacher=initial, context=env "
                                                            "(sdpo's values; sync_every 10 ours)",
        "loss_agg": "paper: (1/|y|) sum_n per rollout, averaged over rollouts (methods.md §6.6)",
        "kl_coef, kl_estimator": "ours: no reference KL (OPSD has none); k3+ if --kl-coef is set",
        "dynamic_sampling, resample_budget": "ours: off (no reward in the loss; OPSD samples one rollout a problem)",
    },
    "sdpo": {
        "divergence": "official run_sdpo.sh (alpha=1.0, reverse KL; the config default alpha=0.5 is JSD)",
        "teacher, ema_rate": "official README/config (teacher_regularization=ema, teacher_update_rate=0.05; "
                             "run_sdpo.sh passes ema_update_rate=0.01)",
        "topk": "official README/config (distillation_topk=100 with a tail bucket; run_sdpo.sh uses 20)",
        "context, exclude_self": "paper (a successful attempt) and official config "
                                 "(dont_reprompt_on_self_success=True)",
        "success_reward": "official README (success_reward_threshold=1.0)",
        "token_clip": "none in SDPO (its is_clip=2 clips an IS ratio, not implemented here)",
        "note_max_tokens": "ours: 1024, a whole attempt (official max_reprompt_len=10240 bounds the reprompt)",
        "sync_every": "unused with teacher=ema (ours: 10)",
        "loss_agg": "differs: official actor.yaml loss_agg_mode=token-mean; ours GRPO's seq-mean-token-mean",
        "kl_coef, kl_estimator": "official actor.yaml use_kl_loss=false; k3+ if --kl-coef is set (ours)",
        "dynamic_sampling, resample_budget": "ours: off (a group without a success gives no signal)",
    },
}


# --- the math: student top-K log-probs, tail bucket, bucketed KL -------------------------------------
def _chunks(n: int, vocab: int, device: torch.device):
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS
    step = max(1, budget // max(vocab, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


class _SupportLogProb(torch.autograd.Function):
    """log softmax(logits[rows] / T) at ``ids`` ([n, K]), chunked; backward recomputes the softmax
    per chunk from the saved logits and the [n] logsumexp (no [n, vocab] float32 tensor is kept)."""

    @staticmethod
    def forward(ctx, logits, rows, ids, temperature):
        vocab = logits.shape[-1]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 for bf16 logits, float64 stays
        out = torch.empty(ids.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(rows.shape[0], dtype=dtype, device=logits.device)
        for s, e in _chunks(rows.shape[0], vocab, logits.device):
            x = logits.index_select(0, rows[s:e]).to(dtype)
            if temperature != 1.0:
                x = x / temperature
            chunk_lse = torch.logsumexp(x, dim=-1)
            lse[s:e] = chunk_lse
            out[s:e] = x.gather(-1, ids[s:e]) - chunk_lse[:, None]
        ctx.save_for_backward(logits, rows, ids, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, ids, lse = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.zeros_like(logits)
        g = grad_out.to(lse.dtype)
        # d/dx_j sum_k g_k (x_{i_k}/T - lse(x/T)) = (sum_k g_k [j = i_k] - p_j sum_k g_k) / T
        for s, e in _chunks(rows.shape[0], logits.shape[-1], logits.device):
            x = logits.index_select(0, rows[s:e]).to(lse.dtype)
            if temperature != 1.0:
                x = x / temperature
            chunk = (x - lse[s:e, None]).exp_().mul_(-g[s:e].sum(-1, keepdim=True))
            chunk.scatter_add_(-1, ids[s:e], g[s:e])
            if temperature != 1.0:
                chunk.div_(temperature)
            grad.index_copy_(0, rows[s:e], chunk.to(grad.dtype))
        return grad, None, None, None


def support_logprobs(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Student log-probs ``[n, K]`` of token ``ids[i]`` under ``softmax(logits[rows[i]] / T)``,
    differentiable w.r.t. ``logits`` (``[L, V]``, any float dtype). ``rows`` must be distinct."""
    return _SupportLogProb.apply(logits, rows.long(), ids.long(), float(temperature))


def with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` log-probs of K distinct tokens -> ``[n, K + 1]`` with the tail log(1 − Σ p) last,
    so every row is a distribution (the tail is floored at 1e-12 when the K tokens hold everything)."""
    lse = torch.logsumexp(topk_logp, dim=-1, keepdim=True)
    tail = torch.log(torch.clamp(-torch.expm1(lse), min=_TAIL_FLOOR))
    return torch.cat([topk_logp, tail], dim=-1)


def bucket_terms(student: torch.Tensor, teacher: torch.Tensor, divergence: str) -> torch.Tensor:
    """The KL's pointwise terms ``[n, B]`` from ``[n, B]`` log-probs: forward p_T (log p_T − log p_S)
    or reverse p_S (log p_S − log p_T), one per bucket (each can be negative; they sum to the KL)."""
    if divergence == "forward":
        return teacher.exp() * (teacher - student)
    if divergence == "reverse":
        return student.exp() * (student - teacher)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def bucket_kl(student: torch.Tensor, teacher: torch.Tensor, divergence: str, clip: float = 0.0) -> torch.Tensor:
    """Per-row KL over buckets: the sum of ``bucket_terms``. ``clip > 0`` is OPSD's per-token
    pointwise clip: each term is capped at ``clip`` (min(ℓ_b, τ): a capped term is constant, so it
    gives no gradient; negative terms are kept)."""
    terms = bucket_terms(student, teacher, divergence)
    return (terms.clamp(max=clip) if clip > 0 else terms).sum(-1)


# --- the sibling context -----------------------------------------------------------------------------
def _clip(text: Any, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def render_attempt(episode: EpisodeResult, instruction: str | None = None, chars: int = 300) -> str:
    """A rollout as compact text for the teacher's prompt: one line per assistant text, tool call
    (``call name(args)``), tool result (``-> ...``) or user reply, each clipped to ``chars``. The
    system message and the opening instruction are left out (the teacher's prompt has them)."""
    lines = []
    for k, msg in enumerate(episode.messages):
        role, content = msg.get("role"), msg.get("content")
        if role == "system" or (k == 0 and role == "user" and instruction and content == instruction):
            continue
        if role == "assistant":
            if content and str(content).strip():
                lines.append(f"assistant: {_clip(content, chars)}")
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") or {}
                args = fn.get("arguments")
                args = args if isinstance(args, str) else json.dumps(args, sort_keys=True)
                lines.append(f"call {fn.get('name')}({_clip(args, chars)})")
        elif role == "tool":
            lines.append(f"  -> {_clip(content, chars)}")
        elif role == "user":
            lines.append(f"user: {_clip(content, chars)}")
    return "\n".join(lines)


# --- the method ----------------------------------------------------------------------------------------
class SelfDistillMethod(GRPOMethod):
    preset_settings = PRESETS
    preset_info = PRESET_INFO
    preset_code = PRESET_CODE
    preset_sources = PRESET_SOURCES

    def __init__(self, name: str, settings: SelfDistillSettings):
        super().__init__(name, settings)
        if settings.divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence '{settings.divergence}'. Known: {', '.join(DIVERGENCES)}")
        if settings.context not in CONTEXTS:
            raise ConfigError(f"unknown context '{settings.context}'. Known: {', '.join(CONTEXTS)}")
        if settings.teacher not in TEACHER_MODES:
            raise ConfigError(f"unknown teacher '{settings.teacher}'. Known: {', '.join(TEACHER_MODES)}")
        if settings.topk < 1:
            raise ConfigError("topk must be >= 1")
        if settings.note_max_tokens < 1:
            raise ConfigError("note_max_tokens must be >= 1")
        self.snapshot = PolicySnapshot(settings.teacher, settings.sync_every, settings.ema_rate)

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        # what the run must provide follows the context actually chosen, not the preset's name
        return ("privileged_info",) if self.cfg.context == "env" else ()

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.snapshot.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot.load_state_dict(state.get("teacher", {}))

    # -- prepare: who gets a teacher, and the teacher's top-K -------------------------------------------
    def prepare(self, groups: list[Group], ctx: MethodContext | None) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        if ctx is not None and ctx.model is not None:
            self.snapshot.refresh(ctx.model, ctx.step)  # "initial" = the first step's policy, signal or not
        metrics: dict[str, float] = {"groups/trained": len(kept), "groups/dropped": dropped}
        candidates = [(g, e) for g, scored, _ in kept for e in scored if e.trace.response_tokens]
        if self.cfg.context == "env":
            notes = self._env_notes(candidates, ctx, metrics)
        else:
            notes = self._sibling_notes(kept, candidates, ctx, metrics)
        chosen = [i for i, note in enumerate(notes) if note is not None]
        metrics["sd/distilled_frac"] = len(chosen) / max(len(candidates), 1)
        if not chosen:
            return Prepared(traces=[], advantages=[], metrics=metrics)
        if ctx is None or ctx.model is None or ctx.tokenizer is None:
            raise ConfigError(f"{self.name} needs the policy model and its tokenizer in the method context")
        traces = [candidates[i][1].trace for i in chosen]
        t0 = time.perf_counter()
        teacher = self.snapshot.teacher(ctx.model, ctx.step)
        token_fields, tail = self.teacher_fields(teacher, traces, [notes[i] for i in chosen], ctx)
        metrics.update({"time/teacher": time.perf_counter() - t0, "sd/teacher_tail_mass": tail,
                        "sd/teacher_tokens": float(sum(t.response_tokens for t in traces))})
        return Prepared(traces=traces, advantages=[0.0] * len(traces), metrics=metrics, token_fields=token_fields)

    def teacher_fields(self, teacher: torch.nn.Module, traces: list, notes: list[str | None] | None,
                       ctx: MethodContext) -> tuple[dict[str, list[torch.Tensor]], float]:
        """The teacher's top-K ids and log-probs at every sampled position of each trace, as
        per-position ``token_fields``, and the teacher's mean tail mass. ``notes[i]`` goes into
        trace i's first prompt; ``None`` means the teacher reads the trace unchanged."""
        header = PRIVILEGED_HEADER if self.cfg.context == "env" else SIBLING_HEADER
        tops = teacher_topk_in_context(teacher, ctx.tokenizer, traces, [None] * len(traces) if notes is None else notes,
                                       self.cfg.topk, temperature=ctx.temperature,
                                       micro_batch_tokens=ctx.micro_batch_tokens,
                                       max_note_tokens=self.cfg.note_max_tokens, header=header,
                                       pad_token_id=getattr(ctx.tokenizer, "pad_token_id", 0) or 0)
        ids = [per_position(t, top.ids) for t, top in zip(traces, tops)]
        logp = [per_position(t, top.logprobs) for t, top in zip(traces, tops)]
        kept_mass = torch.cat([top.logprobs.exp().sum(-1) for top in tops])
        return {IDS: ids, LOGP: logp}, float((1 - kept_mass).clamp(min=0).mean()) if kept_mass.numel() else 0.0

    def _env_notes(self, candidates: list, ctx: MethodContext | None, metrics: dict[str, float]) -> list[str | None]:
        if not candidates:
            return []
        if ctx is None or ctx.privileged is None:
            raise ConfigError(f"{self.name} with context=env needs the env's privileged information "
                              "(an env with privileged_info, e.g. toy or tau-airline)")
        by_task: dict[str, str | None] = {}
        for group, _ in candidates:
            if group.task_id not in by_task:
                if group.task_id not in ctx.tasks:
                    raise ConfigError(f"{self.name}: task '{group.task_id}' is not in the method context's tasks")
                by_task[group.task_id] = ctx.privileged(ctx.tasks[group.task_id]) or None
        metrics["sd/no_info_groups"] = float(len({id(g) for g, _ in candidates if by_task[g.task_id] is None}))
        return [by_task[g.task_id] for g, _ in candidates]

    def _sibling_notes(self, kept: list, candidates: list, ctx: MethodContext | None,
                       metrics: dict[str, float]) -> list[str | None]:
        """Per candidate: the rendering of the first successful sibling (in trial order; not itself
        when ``exclude_self``), or None. Each sibling is rendered once."""
        rendered: dict[int, str] = {}
        no_success = 0
        successes_by_group: dict[int, list[EpisodeResult]] = {}
        for group, scored, _ in kept:
            wins = sorted((e for e in scored if e.score.reward >= self.cfg.success_reward - 1e-6),
                          key=lambda e: (e.trial, e.seed))
            successes_by_group[id(group)] = wins
            no_success += not wins
        metrics["sd/no_success_groups"] = float(no_success)
        notes: list[str | None] = []
        for group, episode in candidates:
            demo = next((e for e in successes_by_group[id(group)] if not (self.cfg.exclude_self and e is episode)),
                        None)

            if demo is None:
                notes.append(None)
                continue
            if id(demo) not in rendered:
                task = ctx.tasks.get(group.task_id) if ctx is not None else None
                rendered[id(demo)] = render_attempt(demo, getattr(task, "instruction", None))
            notes.append(rendered[id(demo)])
        return notes

    # -- loss: bucketed KL on the student's own tokens ---------------------------------------------------
    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        head = getattr(outputs, "head", None)
        if head is None and getattr(outputs, "logits", None) is None:
            raise ValueError(f"{self.name}.loss needs the training forward's outputs (the head or logits)")
        if IDS not in mb.fields or LOGP not in mb.fields:
            raise ValueError(f"{self.name}.loss: the micro-batch carries no teacher top-K (prepare packs it)")
        mask = mb.loss_mask[0]
        rows = (mask > 0).nonzero().squeeze(-1)
        temperature = ctx.temperature if ctx is not None else 1.0
        ids = mb.fields[IDS][0, rows]
        if head is not None:  # the head at exactly these rows (trainers.lm_head): chunked, fused
            if not torch.equal(head.positions, rows):
                raise RuntimeError(f"{self.name}.loss: the forward ran the head at other rows than the loss mask's")
            student_lp = head.logprobs(ids, temperature)[0]
        else:
            student_lp = support_logprobs(outputs.logits[0], rows, ids, temperature)
        student = with_tail(student_lp)
        teacher = with_tail(mb.fields[LOGP][0, rows].detach().float())  # no gradient path into the teacher
        d = bucket_kl(student, teacher, self.cfg.divergence, self.cfg.token_clip)
        per_token = torch.zeros(mask.shape[0], dtype=d.dtype, device=d.device).index_put((rows,), d)[None]
        metrics: dict[str, Any] = {}
        if ref_logp is not None and self.cfg.kl_coef:
            kl = kl_penalty(logp, ref_logp, self.cfg.kl_estimator)
            per_token = per_token + self.cfg.kl_coef * kl
            metrics["kl/ref"] = masked_mean(kl.detach(), mb.loss_mask)
        loss = aggregate(per_token, mb.loss_mask, self.cfg.loss_agg, norm, mb.seq_index)
        with torch.no_grad():
            n = max(rows.numel(), 1)
            metrics.update({"sd/kl_mean": d.detach().sum() / n,
                            "sd/student_tail_mass": student[:, -1].detach().exp().sum() / n,
                            "tokens": mb.loss_mask.sum()})
        return loss, metrics


for _name in PRESETS:
    register_method(_name)(settings_builder(_name, SelfDistillMethod, PRESETS[_name]))
