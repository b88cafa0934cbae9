"""OISD: On-Policy Internal Self-Distillation (arXiv 2605.29089, methods.md §3).

GRPO, plus two advantage-signed Jensen-Shannon alignments of one intermediate layer ``l`` to the
model's own final layer ``L`` (a detached internal teacher; no extra model, no privileged info):

    p_t^l = softmax(LN(h_t^l) E_u^T / tau)       logit lens: the SHARED final norm LN and LM head E_u
    q_t^L = softmax(z_t / tau)                    the model's own logits z_t, detached
    L_think = E_t[ A_t * JS(p_t^l, sg(q_t^L)) ]
    L_attn  = E_t[ A_t * (1/H) sum_h JS(a_t^{l,h}, sg(a_t^{L,h})) ]   attention over causal keys
    L       = L_GRPO + think_coef * L_think + attn_coef * L_attn

A_t is the token's GRPO advantage (``mb.advantages``: the trajectory's advantage broadcast to its
sampled tokens, zero elsewhere). With A_t > 0 minimising pulls layer l towards the final layer;
with A_t < 0 it pushes it away (bounded: JS <= log 2). Only layers <= l receive this gradient: the
teacher is detached, and by default (``head_grad = frozen``) the lens reads layer l through a
detached copy of the shared norm and head, so the acting policy's read-out is moved by the GRPO
term only. ``head_grad = shared`` lets the OISD terms train the norm and head too (see below).
Inference is unchanged.
E_t is the method's loss aggregation (``trainers.losses.aggregate`` with the batch's ``LossNorm``),
the same as the GRPO term's, so micro-batching stays exact.

Choices where the paper (as methods.md could read it) is silent:

- Layer numbering: ``layer = l`` is the output of the l-th decoder block, i.e. HF's
  ``hidden_states[l]`` (``hidden_states[0]`` is the embeddings) and ``attentions[l - 1]``; valid
  1..num_layers. Default 6, the paper's for Qwen3-4B/8B. ``hidden_states[l]`` for l < L is the raw
  residual stream, so the lens applies the final norm; for l = L the real logits are used (HF's
  last hidden state is already normed), which makes both JS terms exactly zero.
- Gradient into the shared norm and head (``head_grad``): methods.md §3.2 reads "only the
  intermediate-layer representation receives this gradient", and the paper keeps the final layer
  as the one acting policy. The norm and head *are* the final layer's read-out, so with
  ``shared`` (the lens differentiable in them) a token with A_t < 0 pushes the acting policy's
  head away from the final layer's own distribution. Default ``frozen``: the lens runs on
  detached norm / head weights (``torch.func.functional_call``), gradient still flows through
  them into h^l. ``shared`` keeps the first implementation's behaviour as an ablation
  (docs/decisions.md). Source: paper only, its code is announced but not released.
- tau = 1.0: not published; 1 reads the layers' distributions as the model defines them.
- Attention keys: the paper samples a subset of causal keys, size not published. Default
  ``attn_keys = 0`` uses every causal key of the token's own sequence (a packed row is
  block-diagonal, so the other sequences of the row carry zero mass; tests check it). ``attn_keys
  = k > 0`` samples k of those keys per query (shared by both layers and all heads) and
  renormalises both distributions over the sample.
- "Clipped" advantage: methods.md calls A_t the (clipped) GRPO advantage; we use the advantage the
  GRPO term uses, without a further clip.
- Attention maps need an implementation that returns them: with attn_coef > 0 the method asks the
  loop for ``eager`` attention (``attn_implementation``); the rollout sampler shares the model, so
  it samples with eager attention too (slower than sdpa, same distribution).

Memory: the lens would materialise [tokens, vocab] for layer l. The JS is computed over loss tokens
only, in chunks of tokens (float32 per chunk, sized like ``trainers.losses``), each chunk under
activation checkpointing, so no [tokens, vocab] float32 tensor is kept for backward.

The layer is checked against the policy (``check_model``) in ``prepare``, the first point where
the method sees the model (after the step's rollout), and again in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from harness.errors import ConfigError
from trainers.losses import LossNorm, _chunks, aggregate
from trainers.method_settings import family_sources
from trainers.methods import Prepared, register_method, settings_builder
from trainers.methods.grpo import GRPOMethod, GRPOSettings
from trainers.packing import MicroBatch

__all__ = ["HEAD_GRADS", "OISDSettings", "OISDMethod", "js_from_logprobs", "lens_modules"]

_TINY = torch.finfo(torch.float32).tiny
HEAD_GRADS = ("frozen", "shared")


@dataclass(frozen=True)
class OISDSettings(GRPOSettings):
    """GRPO settings (the paper shares GRPO's pipeline and hyperparameters) plus OISD's own."""

    layer: int = 6
    """Intermediate layer l (1-based: HF ``hidden_states[l]``); paper: 6 for Qwen3-4B/8B."""
    think_coef: float = 1.0
    """lambda_think (paper: 1.0, constant)."""
    attn_coef: float = 0.1
    """lambda_attn (paper: 0.1, constant)."""
    tau: float = 1.0
    """Temperature of both lens distributions (not published; 1.0)."""
    attn_keys: int = 0
    """Causal keys sampled per query for L_attn (size not published); 0 = all keys of the sequence."""
    head_grad: str = "frozen"
    """Whether L_think trains the shared final norm and LM head: ``frozen`` (only layers <= l) | ``shared``."""


def js_from_logprobs(lp: torch.Tensor, lq: torch.Tensor, p: torch.Tensor | None = None,
                     q: torch.Tensor | None = None) -> torch.Tensor:
    """JS(p, q) over the last dim from log-probs (float32), exactly 0 where ``lp == lq``.

    With d = lp - lq and u = log(1 + (exp(-|d|) - 1) / 2) in (-log 2, 0]:
    log p - log m = min(d, 0) - u and log q - log m = -(max(d, 0) + u), m = (p + q) / 2. Nothing
    overflows, and d = 0 gives 0 bit for bit. ``p`` / ``q`` default to ``exp(lp)`` / ``exp(lq)``
    (pass them when the probabilities are the primary values, e.g. attention maps with zeros).
    """
    p = lp.exp() if p is None else p
    q = lq.exp() if q is None else q
    d = lp - lq
    u = torch.log1p(0.5 * torch.expm1(-d.abs()))
    return 0.5 * (p * (d.clamp(max=0) - u)).sum(-1) - 0.5 * (q * (d.clamp(min=0) + u)).sum(-1)


def lens_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(final norm, LM head) of a causal LM, for the logit lens; ConfigError if not found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(norm, torch.nn.Module):
        raise ConfigError(
            f"oisd's logit lens needs the model's final norm and LM head, and {type(base).__name__} has no "
            "get_output_embeddings() / model.norm (Qwen2/Qwen3/Llama-style models have both). "
            "Use such a model, or --method-arg think_coef=0 to train the attention term only")
    return norm, head


def _num_layers(model: torch.nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.num_hidden_layers)


class OISDMethod(GRPOMethod):
    description = ("On-policy internal self-distillation: GRPO + advantage-signed JS of an intermediate "
                   "layer's logit lens and attention to the model's own (detached) final layer")
    paper = "2605.29089"
    code = "none public: announced as THE-MALT-LAB/OISD ('will be released'), not found"
    sources = family_sources(OISDSettings(), {
        "layer": "paper [S]: 6 for Qwen3-4B/8B",
        "think_coef, attn_coef": "paper [S]: lambda_think 1.0, lambda_attn 0.1, constant",
        "tau": "ours: 1.0 (not published)",
        "attn_keys": "ours: 0 = every causal key (the paper samples a subset of unpublished size)",
        "head_grad": "ours: frozen, only layers <= l learn from the lens (methods.md §3.2; decisions.md)",
        "normalize_std, baseline, clip_low, clip_high, loss_agg": "paper [S]: GRPO's pipeline (its values not found)",
    })

    def __init__(self, name: str, settings: OISDSettings):
        super().__init__(name, settings)
        if settings.layer < 1:
            raise ConfigError(f"oisd: layer must be >= 1 (1 = the first decoder block's output), got {settings.layer}")
        if settings.think_coef < 0 or settings.attn_coef < 0:
            raise ConfigError("oisd: think_coef and attn_coef must be >= 0 (the advantage carries the sign)")
        if settings.tau <= 0:
            raise ConfigError(f"oisd: tau must be > 0, got {settings.tau}")
        if settings.head_grad not in HEAD_GRADS:
            raise ConfigError(f"oisd: unknown head_grad '{settings.head_grad}'. Known: {', '.join(HEAD_GRADS)} "
                              "(frozen: only layers <= l get OISD's gradient; shared: the final norm and head too)")
        if settings.attn_keys < 0:
            raise ConfigError(f"oisd: attn_keys must be >= 0 (0 = all causal keys), got {settings.attn_keys}")

    # -- hooks the loop reads ------------------------------------------------------------------
    @property
    def forward_options(self) -> dict[str, Any]:  # type: ignore[override]
        options = {}
        if self.cfg.think_coef > 0:
            options["output_hidden_states"] = True
        if self.cfg.attn_coef > 0:
            options["output_attentions"] = True
        return options

    @property
    def attn_implementation(self) -> str | None:  # type: ignore[override]
        return "eager" if self.cfg.attn_coef > 0 else None

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a policy the settings do not fit (layer out of range, no lens modules)."""
        self._check_layer(_num_layers(model))
        if self.cfg.think_coef > 0:
            lens_modules(model)

    def _check_layer(self, num_layers: int) -> None:
        if self.cfg.layer > num_layers:
            raise ConfigError(f"oisd: layer={self.cfg.layer} but the policy has {num_layers} layers; pick one in "
                              f"1..{num_layers} with --method-arg layer=N (the paper uses 6 for Qwen3-4B/8B)")

    def prepare(self, groups: list, ctx: Any) -> Prepared:
        if getattr(ctx, "model", None) is not None:  # the earliest point the method sees the policy
            self.check_model(ctx.model)
        return super().prepare(groups, ctx)

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = super().loss(mb, logp, norm, ctx, ref_logp=ref_logp, outputs=outputs)
        if self.cfg.think_coef == 0 and self.cfg.attn_coef == 0:
            return loss, metrics  # GRPO exactly
        extra, oisd_metrics = self.distill_loss(mb, norm, ctx, outputs)
        metrics.update(oisd_metrics)
        return loss + extra, metrics

    def distill_loss(self, mb: MicroBatch, norm: LossNorm, ctx: Any,
                     outputs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """``think_coef * L_think + attn_coef * L_attn``: this micro-batch's share, and its metrics."""
        if outputs is None:
            raise ConfigError("oisd needs the training forward's output (hidden states / attentions) "
                              "in loss(outputs=...)")
        js_think, js_attn = self.token_js(mb, ctx, outputs)
        mask, adv = mb.loss_mask, mb.advantages
        agg = lambda x: aggregate(x, mask, self.cfg.loss_agg, norm, mb.seq_index)  # noqa: E731
        terms, metrics = [], {}
        live = float(mask.sum())
        # update.py averages metrics over micro-batches weighted by their loss tokens; scaled by
        # batch tokens / live tokens, the average of these shares is the batch's term.
        scale = norm.num_tokens / max(live, 1.0)
        for key, coef, js in (("think", self.cfg.think_coef, js_think), ("attn", self.cfg.attn_coef, js_attn)):
            if js is None:
                continue
            term = agg(coef * adv * js)
            terms.append(term)
            metrics[f"oisd/js_{key}"] = float((js.detach() * mask).sum()) / max(live, 1.0)
            metrics[f"loss/oisd_{key}"] = float(term.detach()) * scale
        return sum(terms), metrics

    def token_js(self, mb: MicroBatch, ctx: Any, outputs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per target position ``[1, L-1]``: JS of the logit lens and head-mean JS of attention at
        layer l vs the final layer (zero off the loss mask; None for a term whose coef is 0).

        Target position j scores ``input_ids[j + 1]``, produced from hidden state / query j."""
        rows = (mb.loss_mask[0] > 0).nonzero().squeeze(-1)
        think = attn = None
        if self.cfg.think_coef > 0:
            think = self._think(rows, ctx, outputs, mb.loss_mask)
        if self.cfg.attn_coef > 0:
            attn = self._attn(rows, mb, outputs)
        return think, attn

    def _think(self, rows: torch.Tensor, ctx: Any, outputs: Any, mask: torch.Tensor) -> torch.Tensor:
        hidden = getattr(outputs, "hidden_states", None)
        if not hidden:
            raise ConfigError("oisd's think term needs the forward's hidden states (output_hidden_states=True; "
                              "the method's forward_options ask for them)")
        num_layers = len(hidden) - 1
        self._check_layer(num_layers)
        head = getattr(outputs, "head", None)
        if head is not None:  # the head runs at the trained rows only (trainers.lm_head), a chunk at a time
            final_logits, vocab = head.logits_for, head.vocab
        else:
            final_logits, vocab = (lambda idx: outputs.logits[0, idx]), outputs.logits.shape[-1]
        tau = self.cfg.tau
        if self.cfg.layer == num_layers:
            # The final layer is its own teacher: the real logits (HF's last hidden state is normed
            # already) give identical student and teacher log-probs, so JS is exactly 0.
            def chunk_js(idx):
                lp = torch.log_softmax(final_logits(idx).float() / tau, -1)
                return js_from_logprobs(lp, lp.detach())
        else:
            model = getattr(ctx, "model", None)
            if model is None:
                raise ConfigError("oisd's logit lens needs the policy being trained as ctx.model")
            norm_mod, lens_head = lens_modules(model)
            if self.cfg.head_grad == "frozen":
                norm_mod, lens_head = _detached(norm_mod), _detached(lens_head)
            h = hidden[self.cfg.layer]

            def chunk_js(idx):
                lp = torch.log_softmax(lens_head(norm_mod(h[0, idx])).float() / tau, -1)
                lq = torch.log_softmax(final_logits(idx).detach().float() / tau, -1)
                return js_from_logprobs(lp, lq)
        out = []
        for s, e in _chunks(rows.numel(), vocab, rows.device):
            out.append(_checkpointed(chunk_js, rows[s:e]))
        return self._scatter(rows, out, mask)

    def _attn(self, rows: torch.Tensor, mb: MicroBatch, outputs: Any) -> torch.Tensor:
        maps = getattr(outputs, "attentions", None)
        if not maps or any(a is None for a in maps):
            raise ConfigError(
                "oisd's attention term needs attention maps, and this model's attention implementation returned "
                "none (sdpa / flash attention do not). Use the eager implementation "
                "(model.set_attn_implementation('eager'); harness train does this for oisd), or "
                "--method-arg attn_coef=0")
        self._check_layer(len(maps))
        student, teacher = maps[self.cfg.layer - 1], maps[-1].detach()
        heads, length = student.shape[1], student.shape[-1]
        segment = _segments(mb, length, student.device) if self.cfg.attn_keys > 0 else None

        def chunk_js(idx, pick, keep):
            keys = int(idx.max()) + 1  # causal: later keys carry no mass
            a = student[0, :, idx, :keys].float()
            b = teacher[0, :, idx, :keys].float()
            if pick is not None:  # the sampled keys, both distributions renormalised over them
                a, b = (_renormalised(x.gather(-1, pick[None].expand(heads, -1, -1)) * keep) for x in (a, b))
            la, lb = a.clamp_min(_TINY).log(), b.clamp_min(_TINY).log()
            return js_from_logprobs(la, lb, a, b).mean(0)  # mean over heads

        out = []
        for s, e in _chunks(rows.numel(), heads * length, student.device):
            idx = rows[s:e]
            # drawn outside the checkpoint, so backward's recomputation sees the same keys
            pick, keep = self._sample_keys(idx, segment) if segment is not None else (None, None)
            out.append(_checkpointed(chunk_js, idx, pick, keep))
        return self._scatter(rows, out, mb.loss_mask)

    def _sample_keys(self, idx: torch.Tensor, segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``attn_keys`` random causal keys of each query's own sequence, the same for both layers
        and every head: (key index ``[queries, k]``, whether the pick is a real key ``[1, queries, k]``)."""
        keys = torch.arange(int(idx.max()) + 1, device=idx.device)
        valid = (keys[None, :] <= idx[:, None]) & (segment[keys][None, :] == segment[idx][:, None])
        score = torch.rand(valid.shape, device=idx.device).masked_fill(~valid, -1.0)
        pick = score.topk(min(self.cfg.attn_keys, keys.numel()), dim=-1).indices
        return pick, valid.gather(-1, pick)[None]  # fewer valid keys than k: the extra picks drop out

    @staticmethod
    def _scatter(rows: torch.Tensor, chunks: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        values = torch.cat(chunks) if chunks else mask.new_zeros(0)
        return mask.new_zeros(mask.shape[1]).index_put((rows,), values)[None]


def _checkpointed(fn, *args: Any) -> torch.Tensor:
    # recomputed in backward: a chunk's [tokens, vocab] (or [heads, tokens, keys]) float32
    # intermediates are not kept alive until the backward pass
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _detached(module: torch.nn.Module):
    """``module`` as a function of its input only: called with detached copies of its parameters
    (read at call time, so an optimizer step in between is seen), so gradient flows to the input
    and never into the parameters; buffers are the module's own."""
    def call(x: torch.Tensor) -> torch.Tensor:
        params = {name: p.detach() for name, p in module.named_parameters()}
        return functional_call(module, params, (x,), strict=False, tie_weights=True)
    return call


def _renormalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(_TINY)


def _segments(mb: MicroBatch, length: int, device: torch.device) -> torch.Tensor:
    """Sequence id of every position of the packed row (tail padding gets its own id)."""
    seg = torch.full((length,), len(mb.spans), dtype=torch.long)
    for k, (_, start, n) in enumerate(mb.spans):
        seg[start:start + n] = k
    return seg.to(device)


register_method("oisd")(settings_builder("oisd", OISDMethod, OISDSettings()))
