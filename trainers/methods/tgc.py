"""Token gradient cancellation (DFPO, arXiv 2604.13088, methods.md §4) and GSPO (arXiv 2507.18071, §6.4).

Two registered methods:

- ``gspo``: Group Sequence Policy Optimization, written directly. Per sequence i,
  s_i = exp(mean over i's sampled tokens of (log π_θ − log π_old)), and the objective
  J = (1/G) Σ_i min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i), averaged over all sequences of the
  batch. Defaults as published: ε_low = 3e-4, ε_high = 4e-4 (GSPO §5.1: "the clipping ranges in
  Equation (5) to 3e-4 and 4e-4"), no KL, (r − mean)/std advantages.
- ``tgc``: the paper's fix. The objective's gradient is rewritten with explicit per-token effective
  weights, those weights are made exchangeable across siblings under stop-gradient, and the loss is
  built from the transformed weights. Settings ``base`` (gspo | clip) and ``fix`` (min | orth | none).
  Default base gspo, fix min: the paper's headline "DFPO (Min-Replace)" on GSPO.

Reconstruction (methods.md records only the two transforms, Eq. 17/18, not where they are inserted;
the paper's §4 and appendices were not read; everything below is ours, marked [R] in methods.md):

Write each base objective's gradient as

    ∇J = Σ_{i,t} c_{i,t} · Â_i · ∇log π_θ(y_{i,t} | h_{i,t}) / Z,           Z batch-constant,

where c is the *effective weight* of token t of sibling i:

- gspo:  c_{i,t} = s_i · 1[i not clipped] / |y_i| for every sampled token of i, Z = number of sequences.
  (∇ min(s Â, clip(s) Â) = Â s ∇log s when the clip is inactive, and ∇log s = (1/|y_i|) Σ_t ∇log π.)
  "Clipped" is PPO's one-sided rule: Â > 0 and s > 1 + ε_high, or Â < 0 and s < 1 − ε_low.
- clip:  c_{i,t} = r_{i,t} · 1[token not clipped] · a_i, r = π_θ/π_old per token (DAPO clip-higher,
  ε = 0.2 / 0.28); a_i and Z come from the aggregation: token-mean a = 1, Z = total tokens (default,
  DAPO); seq-mean-token-mean a = 1/|y_i|, Z = sequences; seq-mean-token-sum-norm a = 1, Z = sequences × C.

The loss is   L = −Σ_{i,t} sg(c̃_{i,t}) · Â_i · log π_θ(y_{i,t}) / Z,
which has exactly the base gradient when c̃ = c (fix = none; tests/test_tgc.py checks it) and the fixed
gradient with c̃ = transform(c). Its *value* is not the base objective's value (it is a surrogate);
only its gradient matters.

Where the transform acts:
- gspo: on the per-trajectory weight c_i, across the siblings of a group (Eq. 17/18 as written).
- clip: per *shared token*: a token whose whole token-id prefix, up to and including itself, is
  identical in several siblings (same context h*, same action a*), sampled in each of them. They are
  found with a radix prefix trie over each group's token sequences (``shared_spans``); the transform
  acts, at each shared token, across the siblings that share it. Tokens not shared are left as they are.

The two transforms (``transform_columns``), applied under stop-gradient (the paper: essential):
- ``min`` (Group-constant Min-Replace, Eq. 17): every sibling's weight becomes the minimum over the
  siblings. The gradient at a shared token becomes w_min Σ_i Â_i ∇log π, i.e. what a token-factorized
  (exchangeable) objective gives: zero when all siblings share it (Σ_i Â_i = 0).
- ``orth`` (Adv-orthogonal, Eq. 18): w̃ = w − (Âᵀw / ‖Â‖²) Â, so Σ_i Â_i w̃_i = 0 (``adv_orthogonal``).
  Choice [R]: the method applies it with the advantages *centered over the siblings concerned*,
  Â_c = Â − mean(Â). For a token shared by the whole group (and for GSPO's whole-group transform) the
  advantages are already centered (group-relative baselines sum to zero), so this is Eq. 18 exactly.
  For a token shared by only some siblings, Eq. 18 with the raw Â would zero the token's gradient
  even where every sibling through it succeeded, erasing real credit for that prefix; the centered
  form removes only the non-exchangeable part, leaving Σ_i Â_i w̃_i = mean(w) Σ_i Â_i (mean(w̃) = mean(w)).

Consequences worth knowing (not bugs):
- With ``min``, a clipped sibling has weight 0, so the minimum is 0: with base gspo its whole group
  does not move this step; with base clip the shared token does not move. The clip decided that one
  sibling must not move, and exchangeability then says none moves. On-policy (one epoch, one
  mini-batch) nothing is clipped and min-replace for gspo gives every sibling min_j 1/|y_j|.
- ``orth`` may give a sibling a negative weight.
- c depends on the current policy and on all siblings, which may sit in different micro-batches, so
  the method uses the trainer's pre-pass (``needs_prepass``): ``begin_minibatch`` gets no-grad
  log-probs of every micro-batch of the mini-batch (the policy does not change inside one), computes
  c and c̃ per trace and keeps them by trace index; ``loss`` reads c̃ for its tokens. Cost: one extra
  no-grad forward per mini-batch. With ``--mini-batches`` > 1 the update keeps each group whole in
  one mini-batch (``whole_groups``; ``trainers.update``), so the transform always sees every sibling.

Metrics (per mini-batch): ``tgc/weight_mean`` and ``tgc/weight_mean_base`` (mean c̃ and c over sampled
tokens, divided by a_i or 1/|y_i| so that 1.0 = the on-policy, unclipped base), ``tgc/shared_token_frac``
(sampled tokens shared with at least one sibling), ``tgc/residual`` and ``tgc/residual_after``: mean over
shared tokens of |Σ_{i∈S} (Â_i − Ā_S) c_{i,t}| before and after the fix, the part of the shared-token
gradient coefficient that exchangeable weights would not have (= |Σ_i Â_i c_i| at a token all siblings
share), and ``tgc/clipped_frac`` (sampled tokens whose base weight the clip zeroes).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch

from harness.errors import ConfigError
from harness.types import Group
from trainers.losses import AGGREGATIONS, LossNorm, aggregate, kl_penalty, masked_mean
from trainers.method_settings import family_sources
from trainers.methods import Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.packing import MicroBatch

__all__ = ["GSPOSettings", "GSPOMethod", "TGCSettings", "TGCMethod", "SharedSpan", "shared_spans", "shared_tokens",
           "min_replace", "adv_orthogonal", "transform_columns", "exchange_residual", "gspo_loss"]

BASES = ("gspo", "clip")
FIXES = ("min", "orth", "none")
GSPO_CLIP = (3e-4, 4e-4)      # GSPO §5.1
CLIP_HIGHER = (0.2, 0.28)     # DAPO clip-higher (methods.md §6.3)
GSPO_AGG = "seq-mean-token-mean"
_TINY = 1e-12


# --- the two weight transforms (Eq. 17, Eq. 18) --------------------------------------------------
def min_replace(w: torch.Tensor) -> torch.Tensor:
    """Group-constant Min-Replace (Eq. 17): every weight becomes the minimum."""
    return w.min().expand_as(w).clone()


def adv_orthogonal(w: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Adv-orthogonal reweighting (Eq. 18): w − (Âᵀw / ‖Â‖²) Â, so that Σ_i Â_i w̃_i = 0.
    With Â = 0 there is nothing to remove and w comes back unchanged."""
    denom = float(adv.square().sum())
    if denom <= _TINY:
        return w.clone()
    return w - (adv @ w / denom) * adv


def transform_columns(weights: torch.Tensor, members: torch.Tensor, adv: torch.Tensor, fix: str) -> torch.Tensor:
    """Apply ``fix`` column by column: ``weights[m, n]`` holds the weights of m siblings at n tokens,
    ``members[m, n]`` (bool) says which siblings take part at each token, ``adv[m]`` their advantages.

    ``min``: members get the members' minimum. ``orth``: Eq. 18 with the advantages centered over
    each column's members (see the module docstring). Non-members are returned unchanged, and so is a
    column with fewer than two members (nothing to exchange)."""
    if fix == "none":
        return weights.clone()
    k = members.to(weights.dtype)
    count = k.sum(0)
    active = members & (count >= 2)[None, :]
    if fix == "min":
        col_min = torch.where(members, weights, torch.full_like(weights, float("inf"))).amin(0)
        return torch.where(active, col_min.expand_as(weights), weights)
    if fix == "orth":
        a = adv.to(weights.dtype)[:, None].expand_as(weights)
        centered = (a - (a * k).sum(0) / count.clamp(min=1)) * k
        denom = centered.square().sum(0)
        coef = torch.where(denom > _TINY, (centered * weights).sum(0) / denom.clamp(min=_TINY), torch.zeros_like(denom))
        return torch.where(active, weights - coef * centered, weights)
    raise ValueError(f"unknown fix {fix!r}; choose one of {FIXES}")


def exchange_residual(weights: torch.Tensor, members: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per column with >= 2 members: |Σ_{i∈S} (Â_i − Ā_S) w_i|, the shared-token gradient coefficient
    that exchangeable (equal) weights would not produce; |Σ_i Â_i w_i| when Σ_{i∈S} Â_i = 0."""
    k = members.to(weights.dtype)
    count = k.sum(0)
    a = adv.to(weights.dtype)[:, None].expand_as(weights)
    centered = (a - (a * k).sum(0) / count.clamp(min=1)) * k
    return (centered * weights).sum(0).abs()[count >= 2]


# --- prefix trie over a group's token sequences ----------------------------------------------------
@dataclass
class SharedSpan:
    """A radix-trie edge: ``members`` (sequence indices) agree on every token in [0, end); at each
    position p in [start, end), ``sampled[r, p - start]`` says whether member r sampled the token there."""

    members: tuple[int, ...]
    start: int
    end: int
    sampled: torch.Tensor  # [len(members), end - start] bool


def shared_spans(sequences: list[list[int]], masks: list[list[int]]) -> list[SharedSpan]:
    """Tokens shared by several sequences: same token-id prefix up to and including the token.

    A compressed (radix) prefix trie built by partitioning: the sequences through a node are split by
    their next token, and each child edge runs as far as its sequences still agree. Returns the edges
    that hold at least one token sampled in >= 2 of their sequences. Cost O(total tokens)."""
    ids = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    sampled = [torch.as_tensor(m, dtype=torch.bool) for m in masks]
    out: list[SharedSpan] = []
    stack: list[tuple[list[int], int]] = [(list(range(len(ids))), 0)]  # (sequences through a node, depth)
    while stack:
        through, depth = stack.pop()
        children: dict[int, list[int]] = defaultdict(list)
        for m in through:
            if len(ids[m]) > depth:
                children[int(ids[m][depth])].append(m)
        for kids in children.values():
            if len(kids) < 2:
                continue
            stop = min(len(ids[k]) for k in kids)
            ref = ids[kids[0]][depth:stop]
            agree = torch.stack([ids[k][depth:stop] == ref for k in kids[1:]]).all(0)
            end = depth + int(agree.long().cumprod(0).sum())
            block = torch.stack([sampled[k][depth:end] for k in kids])
            if bool((block.sum(0) >= 2).any()):
                out.append(SharedSpan(tuple(kids), depth, end, block))
            stack.append((kids, end))
    out.sort(key=lambda s: (s.start, s.members))
    return out


def shared_tokens(sequences: list[list[int]], masks: list[list[int]]) -> list[tuple[int, tuple[int, ...]]]:
    """``[(position, sequences that share the token there and sampled it)]`` for every shared token."""
    found = []
    for span in shared_spans(sequences, masks):
        for j in range(span.end - span.start):
            rows = span.sampled[:, j].nonzero().flatten().tolist()
            if len(rows) >= 2:
                found.append((span.start + j, tuple(span.members[r] for r in rows)))
    return sorted(found)


# --- GSPO written directly -------------------------------------------------------------------------
def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              seq_index: torch.Tensor, norm: LossNorm, eps_low: float, eps_high: float, dual_clip: float = 0.0):
    """This micro-batch's share of −(1/N) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i), with
    the dual clip (at most −c Â_i for Â_i < 0; ``trainers.losses.clipped_surrogate``) on s_i.

    Every sequence lies whole in one micro-batch (the packer guarantees it), so s_i is local."""
    live = mask > 0
    seq, inverse = torch.unique(seq_index[live], return_inverse=True)
    n = seq.numel()
    zeros = logp.new_zeros(n)
    count = zeros.index_add(0, inverse, torch.ones_like(logp[live]))
    log_s = zeros.index_add(0, inverse, (logp - old_logp)[live]) / count.clamp(min=1)
    adv = zeros.index_add(0, inverse, advantages[live].to(logp.dtype)).detach() / count.clamp(min=1)
    s = torch.exp(log_s)
    per_seq = -torch.minimum(s * adv, torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high) * adv)
    if dual_clip:
        per_seq = torch.where(adv < 0, torch.minimum(per_seq, -dual_clip * adv), per_seq)
    with torch.no_grad():
        sd = s.detach()
        clipped = ((adv > 0) & (sd > 1 + eps_high)) | ((adv < 0) & (sd < 1 - eps_low))
        if dual_clip:
            clipped |= (adv < 0) & (sd > dual_clip)
        metrics = {"clip/frac": clipped.float().mean() if n else zeros.sum(),
                   "ratio/mean": sd.mean() if n else zeros.sum() + 1, "tokens": mask.sum()}
    return per_seq.sum() / max(norm.num_seqs, 1), metrics


@dataclass(frozen=True)
class GSPOSettings(GRPOSettings):
    clip_low: float = GSPO_CLIP[0]
    """GSPO §5.1: left clipping range 3e-4 (sequence-level ratios are length-normalised, hence tiny)."""
    clip_high: float = GSPO_CLIP[1]
    """GSPO §5.1: right clipping range 4e-4."""
    loss_agg: str = GSPO_AGG
    """Fixed: GSPO averages a sequence-level term over sequences (1/G Σ_i)."""


class GSPOMethod(GRPOMethod):
    description = "GSPO: sequence-level (length-normalised) importance ratio, clipped per sequence"
    paper = "2507.18071"
    code = "none found from the authors (verl recipe/gspo and TRL importance_sampling_level=sequence reproduce it)"
    sources = family_sources(GSPOSettings(), {
        "clip_low, clip_high": "paper §5.1 (left and right clipping ranges 3e-4 and 4e-4)",
        "loss_agg": "paper eq. 5: (1/G) sum_i over sequences (fixed)",
        "normalize_std, baseline": "paper eq. 6: A = (r - mean) / std",
        "kl_coef": "paper eq. 5 has no KL term",
    })

    def __init__(self, name: str, settings: GSPOSettings):
        if settings.loss_agg != GSPO_AGG:
            raise ConfigError(f"GSPO's objective is sequence-level, (1/G) sum_i min(s_i A_i, clip(s_i) A_i); "
                              f"--loss-agg must be {GSPO_AGG}, got '{settings.loss_agg}'")
        super().__init__(name, settings)

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = gspo_loss(logp, mb.old_logprobs, mb.advantages, mb.loss_mask, mb.seq_index, norm,
                                  self.cfg.clip_low, self.cfg.clip_high, self.cfg.dual_clip)
        return _with_kl(self, loss, metrics, mb, logp, norm, ref_logp, GSPO_AGG)


def _with_kl(method: GRPOMethod, loss, metrics, mb, logp, norm, ref_logp, agg):
    if ref_logp is None or not method.cfg.kl_coef:
        return loss, metrics
    kl = kl_penalty(logp, ref_logp, method.cfg.kl_estimator)
    metrics["kl/ref"] = masked_mean(kl.detach(), mb.loss_mask)
    return loss + method.cfg.kl_coef * aggregate(kl, mb.loss_mask, agg, norm, mb.seq_index), metrics


# --- TGC / DFPO ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TGCSettings(GRPOSettings):
    base: str = "gspo"
    """``gspo`` (sequence-coupled weights, mechanism 1) or ``clip`` (token-level PPO with asymmetric
    clip-higher, mechanism 2)."""
    fix: str = "min"
    """``min`` (Min-Replace, Eq. 17; the paper's headline DFPO), ``orth`` (Adv-orthogonal, Eq. 18) or
    ``none`` (the base objective's gradient, unchanged)."""
    clip_low: float | None = None  # type: ignore[assignment]
    """None = the base's published value: gspo 3e-4 (GSPO §5.1), clip 0.2 (DAPO)."""
    clip_high: float | None = None  # type: ignore[assignment]
    """None = the base's published value: gspo 4e-4 (GSPO §5.1), clip 0.28 (DAPO clip-higher)."""
    loss_agg: str = "auto"
    """``auto`` = gspo: seq-mean-token-mean (GSPO's own, the only one it takes); clip: token-mean (DAPO)."""


@dataclass
class TraceWeights:
    """Effective weights of one trace, per position (0 where not sampled): ``base`` = c, ``fixed`` = c̃."""

    base: torch.Tensor
    fixed: torch.Tensor
    unit: float
    """The on-policy, unclipped weight of this trace's tokens (a_i, or 1/|y_i| for gspo)."""


class TGCMethod(GRPOMethod):
    description = ("Token gradient cancellation fix (DFPO): stop-grad Min-Replace / Adv-orthogonal transform of "
                   "sibling weights on shared tokens, on GSPO or clip-higher PPO")
    paper = "2604.13088"
    code = "none public (the paper names an anonymous GitHub link; methods.md found none)"
    sources = family_sources(TGCSettings(), {
        "base, fix": "paper's headline configuration, DFPO Min-Replace on GSPO (base=gspo, fix=min)",
        "clip_low, clip_high": "per base: gspo 3e-4, 4e-4 (GSPO paper §5.1); clip 0.2, 0.28 (DAPO clip-higher)",
        "loss_agg": "per base (auto): gspo seq-mean-token-mean (GSPO eq. 5); clip token-mean (DAPO)",
        "normalize_std, baseline": "GSPO eq. 6, (r - mean) / std; the fix needs centred advantages (sum_i A_i = 0)",
        "kl_coef": "GSPO eq. 5 has no KL term; the paper's values (its appendices) were not read",
        "where the transform acts (effective weights, shared-token trie)": "ours [R] (methods.md §4)",
    })
    needs_prepass = True
    whole_groups = True  # the transform exchanges weights across the siblings of one optimizer step

    def __init__(self, name: str, settings: TGCSettings):
        if settings.base not in BASES:
            raise ConfigError(f"unknown tgc base '{settings.base}'. Known: {', '.join(BASES)}")
        if settings.fix not in FIXES:
            raise ConfigError(f"unknown tgc fix '{settings.fix}'. Known: {', '.join(FIXES)}")
        low, high = GSPO_CLIP if settings.base == "gspo" else CLIP_HIGHER
        agg = settings.loss_agg
        if agg == "auto":
            agg = GSPO_AGG if settings.base == "gspo" else "token-mean"
        if settings.base == "gspo" and agg != GSPO_AGG:
            raise ConfigError(f"tgc base gspo is sequence-level, (1/G) sum_i; loss_agg must be {GSPO_AGG} "
                              f"(or auto), got '{settings.loss_agg}'")
        if agg not in AGGREGATIONS:
            raise ConfigError(f"unknown --loss-agg '{agg}'. Known: auto, {', '.join(AGGREGATIONS)}")
        settings = replace(settings, loss_agg=agg,
                           clip_low=low if settings.clip_low is None else settings.clip_low,
                           clip_high=high if settings.clip_high is None else settings.clip_high)
        super().__init__(name, settings)
        self.weights: dict[int, TraceWeights] = {}
        """c and c̃ of every trace of the current mini-batch, by index in ``Prepared.traces``."""
        self._traces: list = []
        self._group_of: list[int] = []
        self._adv: list[float] = []
        self._metrics: dict[str, float] = {}

    # -- prepare: remember each trace's group and advantage -----------------------------------------
    def prepare(self, groups: list[Group], ctx: Any) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        traces, advs, group_of = [], [], []
        for g, (_, scored, adv) in enumerate(kept):
            for episode, a in zip(scored, adv):
                if episode.trace.response_tokens:  # nothing sampled: in the baseline, not trained
                    traces.append(episode.trace)
                    advs.append(float(a))
                    group_of.append(g)
        self._traces, self._adv, self._group_of = traces, advs, group_of
        self.weights = {}
        return Prepared(traces=traces, advantages=list(advs), groups=list(group_of),
                        metrics={"groups/trained": len(kept), "groups/dropped": dropped})

    # -- pre-pass: c and c̃ for every trace of the mini-batch ----------------------------------------
    def begin_minibatch(self, packed: Any, logps: list[torch.Tensor], ctx: Any) -> None:
        current: dict[int, torch.Tensor] = {}
        old: dict[int, torch.Tensor] = {}  # pi_old as the update packed it (trainers.tis recomputes it)
        for mb, lp in zip(packed.micro_batches, logps):
            current.update(mb.unpack(lp.detach().float().cpu()))
            old.update(mb.unpack(mb.old_logprobs.float().cpu()))
        unknown = [i for i in current if not 0 <= i < len(self._traces)]
        if unknown:
            raise RuntimeError(f"tgc: traces {unknown[:5]} were not produced by this method's prepare()")
        self.weights = {i: self._base_weights(i, lp, old[i]) for i, lp in current.items()}
        by_group: dict[int, list[int]] = defaultdict(list)
        for i in sorted(current):
            by_group[self._group_of[i]].append(i)
        residual_before, residual_after, shared, sampled = [], [], 0, 0
        for members in by_group.values():
            adv = torch.tensor([self._adv[i] for i in members])
            if self.cfg.base == "gspo":  # per-trajectory weight, across the siblings present
                w = torch.stack([self._trajectory_weight(i) for i in members])[:, None]
                w_fixed = transform_columns(w, torch.ones_like(w, dtype=torch.bool), adv, self.cfg.fix)[:, 0]
                for i, v in zip(members, w_fixed):  # a clipped trace (c = 0) may get a weight back (orth)
                    self.weights[i].fixed = torch.where(self._sampled(i), v, torch.zeros_like(v))
            spans = shared_spans([self._traces[i].input_ids for i in members], [self._traces[i].mask for i in members])
            for span in spans:
                ids = [members[r] for r in span.members]
                a = adv[list(span.members)]
                before = torch.stack([self.weights[i].base[span.start:span.end] for i in ids])
                if self.cfg.base == "clip":
                    after = transform_columns(before, span.sampled, a, self.cfg.fix)
                    for r, i in enumerate(ids):
                        cols = span.sampled[r]
                        self.weights[i].fixed[span.start:span.end][cols] = after[r][cols]
                else:
                    after = torch.stack([self.weights[i].fixed[span.start:span.end] for i in ids])
                residual_before.append(exchange_residual(before, span.sampled, a))
                residual_after.append(exchange_residual(after, span.sampled, a))
                # a (sibling, token) pair counts once: each lies on exactly one trie edge
                shared += int((span.sampled & (span.sampled.sum(0) >= 2)[None, :]).sum())
            sampled += sum(self._traces[i].response_tokens for i in members)
        self._metrics = self._minibatch_metrics(residual_before, residual_after, shared, sampled)

    def _sampled(self, i: int) -> torch.Tensor:
        return torch.as_tensor(self._traces[i].mask, dtype=torch.bool)

    def _base_weights(self, i: int, logp: torch.Tensor, old_logp: torch.Tensor) -> TraceWeights:
        trace = self._traces[i]
        sampled = self._sampled(i)
        if logp.shape[0] != len(trace):
            raise RuntimeError(f"tgc: trace {i} has {len(trace)} tokens but the pre-pass returned {logp.shape[0]}")
        log_ratio = torch.where(sampled, logp - old_logp, torch.zeros_like(logp))
        adv, n = self._adv[i], int(sampled.sum())
        low, high = 1.0 - self.cfg.clip_low, 1.0 + self.cfg.clip_high
        dual = self.cfg.dual_clip or float("inf")  # A < 0 and ratio > c: the dual clip's constant loss
        if self.cfg.base == "gspo":
            s = torch.exp(log_ratio.sum() / n)
            kept = not ((adv > 0 and s > high) or (adv < 0 and (s < low or s > dual)))
            c = torch.where(sampled, s * float(kept) / n, torch.zeros_like(logp))
            unit = 1.0 / n
        else:
            r = torch.exp(log_ratio)
            clipped = ((r > high) & (adv > 0)) | (((r < low) | (r > dual)) & (adv < 0))
            unit = 1.0 / n if self.cfg.loss_agg == "seq-mean-token-mean" else 1.0
            c = torch.where(sampled & ~clipped, r * unit, torch.zeros_like(logp))
        return TraceWeights(base=c, fixed=c.clone(), unit=unit)

    def _trajectory_weight(self, i: int) -> torch.Tensor:
        tw = self.weights[i]
        return tw.base[self._sampled(i)][0]  # constant over the trace's sampled tokens

    def _minibatch_metrics(self, before, after, shared, sampled) -> dict[str, float]:
        base_sum = fixed_sum = zero = 0.0
        for i, tw in self.weights.items():
            mask = self._sampled(i)
            base_sum += float(tw.base[mask].sum()) / tw.unit
            fixed_sum += float(tw.fixed[mask].sum()) / tw.unit
            zero += float((tw.base[mask] == 0).sum())
        before_t = torch.cat(before) if before else torch.zeros(0)
        after_t = torch.cat(after) if after else torch.zeros(0)
        return {"tgc/weight_mean": fixed_sum / max(sampled, 1), "tgc/weight_mean_base": base_sum / max(sampled, 1),
                "tgc/shared_token_frac": shared / max(sampled, 1), "tgc/clipped_frac": zero / max(sampled, 1),
                "tgc/residual": float(before_t.mean()) if before_t.numel() else 0.0,
                "tgc/residual_after": float(after_t.mean()) if after_t.numel() else 0.0}

    # -- loss ---------------------------------------------------------------------------------------
    def _normaliser(self, norm: LossNorm) -> float:
        if self.cfg.base == "gspo" or self.cfg.loss_agg == "seq-mean-token-mean":
            return max(norm.num_seqs, 1)
        if self.cfg.loss_agg == "token-mean":
            return max(norm.num_tokens, 1)
        if norm.constant is None:
            raise ValueError("loss_agg seq-mean-token-sum-norm needs LossNorm.constant")
        return max(norm.num_seqs, 1) * norm.constant

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        weight = torch.zeros(mb.loss_mask.shape, dtype=torch.float32)
        for seq, start, n in mb.spans:
            if seq not in self.weights:
                raise RuntimeError("tgc: loss() before begin_minibatch() for this mini-batch (needs_prepass)")
            weight[0, start:start + n - 1] = self.weights[seq].fixed[1:n]
        weight = weight.to(logp.device)
        mask = mb.loss_mask.to(logp.dtype)
        loss = -(weight * mb.advantages * logp * mask).sum() / self._normaliser(norm)
        with torch.no_grad():
            metrics: dict[str, Any] = dict(self._metrics)
            metrics["tokens"] = mask.sum()
        agg = GSPO_AGG if self.cfg.base == "gspo" else self.cfg.loss_agg
        return _with_kl(self, loss, metrics, mb, logp, norm, ref_logp, agg)


# --- registration --------------------------------------------------------------------------------
register_method("gspo")(settings_builder("gspo", GSPOMethod, GSPOSettings()))
register_method("tgc")(settings_builder("tgc", TGCMethod, TGCSettings()))
