"""The LM head run only where a loss reads it, in chunks (issue 20).

Why: a packed agent row is mostly prompt, tool and user text that carries no loss, and real
vocabularies are 150k-250k tokens. Running the head over the whole row holds ``[tokens, V]``
logits (about 10 GB of bf16 for a 32k-token row at 152k) before any float32 copy. Here the model's
backbone still runs over the whole row, but the head runs only at the rows a method needs, and a
chunk of rows at a time: memory is O(chunk x V) for the head plus O(tokens x hidden) for the
backbone, never O(tokens x V).

How (plain torch, CPU and GPU):
- ``forward_rows`` calls the model as usual with ``logits_to_keep`` = the needed rows, and a
  forward pre-hook on the output embeddings captures the (already gathered) last hidden states and
  the head's weight and bias *as the head sees them* (a snapshot's weights under
  ``functional_call``, the gathered weight under FSDP), then hands the head zero rows. Tied
  embeddings need nothing special: the weight is the embedding parameter, and its gradient lands there.
- ``HeadRows.logprobs`` is one autograd function: per chunk, logits = hidden @ W^T (+ b), divided
  by the temperature, then log-softmax at the requested ids (the sampled token, or a top-K support)
  and, optionally, the entropy. Backward recomputes each chunk's logits from the saved hidden rows
  and the [rows] logsumexp, so no chunk's logits outlive it (the Liger / "cut cross-entropy" idea).
- ``HeadRows.lazy()`` is the no-grad view the teacher passes read: ``index_select(0, rows)`` runs
  the head for just those rows (``trainers.teacher`` reads chunk by chunk).
- A model whose head cannot be taken apart (no ``get_output_embeddings``, or logits transformed
  after the head: soft-capping, scaling) keeps its own logits, still only at the needed rows.

Chunk size: ``HARNESS_LM_HEAD_CHUNK_ROWS`` rows when set, else as many rows as fit 2**26 logit
elements (256 MiB of float32; 441 rows at 151,936), read at every call.
Reference and tests: tests/test_lm_head.py compares every method against full logits.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["HeadRows", "LazyLogits", "PolicyOutputs", "chunk_rows", "forward_rows", "output_head", "scatter_rows",
           "trained_rows"]

CHUNK_ENV = "HARNESS_LM_HEAD_CHUNK_ROWS"
_CHUNK_ELEMENTS = 1 << 26
# Config fields of models that change the logits after the head (Gemma soft-capping, Cohere /
# Granite scaling): such a model keeps its own logits (only at the needed rows).
_SOFTCAPS = ("final_logit_softcapping", "logit_softcapping")
_SCALES = ("logit_scale", "logits_scaling")


def chunk_rows(vocab: int) -> int:
    """Rows of logits computed at once (``HARNESS_LM_HEAD_CHUNK_ROWS``, else 2**26 elements' worth)."""
    raw = os.environ.get(CHUNK_ENV, "").strip()
    if raw:
        try:
            rows = int(raw)
        except ValueError:
            rows = 0
        if rows < 1:
            from harness.errors import ConfigError
            raise ConfigError(f"{CHUNK_ENV} must be a positive whole number of rows, got {raw!r}")
        return rows
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _transforms_logits(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    if any(getattr(config, name, None) for name in _SOFTCAPS):
        return True
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALES)


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns last hidden states into logits (a Linear-like module with ``weight``
    ``[V, H]`` and optional ``bias``), or None where the logits must come from the model itself."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None or _transforms_logits(model):
        return None
    try:
        head = get()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return head


class _HeadLogProb(torch.autograd.Function):
    """log softmax((h W^T + b) / T) at ``ids`` ([n, K]) per row of ``hidden`` ([n, H]), chunked,
    plus the (no-grad) entropy. Keeps hidden, W, b and the [n] logsumexp for backward only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, rows, with_entropy):
        n = hidden.shape[0]
        out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        for s in range(0, n, rows):
            x = _chunk_logits(hidden[s:s + rows], weight, bias, temperature)
            if with_entropy:  # one exp pass for both: lse = m + log S, H = lse - sum(e x) / S
                m = x.amax(-1, keepdim=True)
                ex = (x - m).exp_()
                total = ex.sum(-1)
                chunk_lse = m.squeeze(-1) + total.log()
                ent[s:s + rows] = chunk_lse - torch.linalg.vecdot(ex, x) / total
            else:
                chunk_lse = torch.logsumexp(x, dim=-1)
            lse[s:s + rows] = chunk_lse
            out[s:s + rows] = x.gather(-1, ids[s:s + rows]) - chunk_lse[:, None]
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.temperature, ctx.rows = temperature, rows
        if with_entropy:
            ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_ent):
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        g = grad_out.float()
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s:s + rows]
            x = _chunk_logits(h, weight, bias, temperature)
            gs = g[s:s + rows]
            # d/dz of sum_k g_k (z_{i_k}/T - lse(z/T)) = (sum_k g_k [j = i_k] - p_j sum_k g_k) / T
            dz = (x - lse[s:s + rows, None]).exp_().mul_(-gs.sum(-1, keepdim=True))
            dz.scatter_add_(-1, ids[s:s + rows], gs)
            if temperature != 1.0:
                dz.div_(temperature)
            dz = dz.to(weight.dtype)
            if want_h:
                grad_h[s:s + rows] = dz @ weight
            if want_w:
                grad_w.addmm_(dz.t().float(), h.float())
            if want_b:
                grad_b += dz.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    # F.linear is exactly what the model's head computes; float32 from here on, as token_logprobs
    x = F.linear(hidden, weight, bias).float()
    return x / temperature if temperature != 1.0 else x


@dataclass
class HeadRows:
    """Last hidden states at some positions of one packed row (``positions``, ascending) and the
    head that turns them into logits; or, for a model whose head cannot be taken apart, the
    model's own ``logits`` at those positions."""

    positions: torch.Tensor
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    autocast: tuple[str, torch.dtype] | None = None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0] if self.logits is None else self.logits.shape[-1])

    def logprobs(self, ids: torch.Tensor, temperature: float = 1.0, *,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([n, K] log-probs of ids[i] at row i, [n] entropy or None)`` at ``temperature``,
        differentiable w.r.t. the hidden states and the head (the entropy is not)."""
        ids = ids.to(device=self.positions.device, dtype=torch.long)
        if self.logits is not None:
            x = self.logits.float()
            x = x / temperature if temperature != 1.0 else x
            lp = torch.log_softmax(x, -1)
            ent = -(lp.exp() * lp).sum(-1).detach() if with_entropy else None
            return lp.gather(-1, ids), ent
        with self._autocast():
            return _HeadLogProb.apply(self.hidden, self.weight, self.bias, ids, float(temperature),
                                      chunk_rows(self.vocab), with_entropy)

    def logits_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Differentiable logits ``[m, V]`` at some of ``self.positions`` (no temperature)."""
        index = torch.searchsorted(self.positions, positions)
        if self.logits is not None:
            return self.logits.index_select(0, index)
        with self._autocast():
            return F.linear(self.hidden.index_select(0, index), self.weight, self.bias)

    def lazy(self) -> LazyLogits | torch.Tensor:
        """No-grad ``[n, V]`` logits of these rows that run the head only for rows asked for."""
        if self.logits is not None:
            return self.logits.detach()
        return LazyLogits(self.hidden.detach(), self.weight.detach(),
                          None if self.bias is None else self.bias.detach(), self.autocast)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast[0], dtype=self.autocast[1])


class LazyLogits:
    """Stands in for a ``[n, V]`` logits tensor where readers only ``index_select(0, rows)``:
    the head runs for the selected rows alone (same autocast as the forward it came from)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 autocast: tuple[str, torch.dtype] | None = None):
        self.hidden, self.weight, self.bias, self.autocast = hidden, weight, bias, autocast

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def index_select(self, dim: int, rows: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("LazyLogits selects rows only (dim 0)")
        h = self.hidden.index_select(0, rows)
        if self.autocast is None:
            return F.linear(h, self.weight, self.bias)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return F.linear(h, self.weight, self.bias)

    def __getitem__(self, rows: slice) -> LazyLogits:
        if not isinstance(rows, slice):
            raise TypeError("LazyLogits takes a slice of rows (use index_select for an index)")
        return LazyLogits(self.hidden[rows], self.weight, self.bias, self.autocast)

    @staticmethod
    def cat(parts: list[Any]) -> Any:
        """``torch.cat`` along rows for LazyLogits of one head (plain tensors are concatenated as is)."""
        if all(isinstance(p, torch.Tensor) for p in parts):
            return torch.cat(parts)
        lazy = [p for p in parts if isinstance(p, LazyLogits)]
        if len(lazy) != len(parts):
            raise TypeError("cannot concatenate lazy and materialised logits")
        first = lazy[0]
        return LazyLogits(torch.cat([p.hidden for p in lazy]), first.weight, first.bias, first.autocast)


def _autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return kind, torch.get_autocast_dtype(kind)
    return None


class _Capture:
    """Forward pre-hook on the head: keeps its input rows, weight and bias; gives it zero rows."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, module, args):
        hidden = args[0]
        self.calls.append((hidden, module.weight, getattr(module, "bias", None)))
        return (hidden[..., :0, :],) + tuple(args[1:])


def forward_rows(model: torch.nn.Module, inputs: dict[str, Any], positions: torch.Tensor | None,
                 **options: Any) -> tuple[Any, list[HeadRows]]:
    """The model's forward over ``inputs`` with the head run at ``positions`` only (all rows when
    None). Returns ``(outputs, one HeadRows per batch row)``; ``outputs.logits`` is empty where the
    head was taken apart. ``options`` are further forward keyword arguments."""
    ids = inputs["input_ids"]
    device = ids.device
    keep = positions if positions is not None else torch.arange(ids.shape[1], device=device)
    keep = keep.to(device=device, dtype=torch.long)
    head = output_head(model)
    if head is None:
        outputs = model(**inputs, logits_to_keep=keep, **options)
        logits = outputs.logits
        if logits.shape[1] != keep.numel():  # a module that ignores logits_to_keep: every row came back
            logits = logits.index_select(1, keep)
        return outputs, [HeadRows(positions=keep, logits=logits[b]) for b in range(ids.shape[0])]
    capture = _Capture()
    handle = head.register_forward_pre_hook(capture)
    try:
        outputs = model(**inputs, logits_to_keep=keep, **options)
    finally:
        handle.remove()
    if len(capture.calls) != 1:
        raise RuntimeError(f"the model ran its output head {len(capture.calls)} times in one forward; "
                           "expected exactly once")
    hidden, weight, bias = capture.calls[0]
    state = _autocast_state(device)
    return outputs, [HeadRows(positions=keep, hidden=hidden[b], weight=weight, bias=bias, autocast=state)
                     for b in range(hidden.shape[0])]


def trained_rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """Row positions j (predicting token j + 1) that carry loss in a ``[1, L-1]`` loss mask."""
    return (loss_mask[0] > 0).nonzero().squeeze(-1)


def scatter_rows(values: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """``[n]`` values at ``positions`` -> ``[1, length]`` with zeros elsewhere (differentiable)."""
    out = values.new_zeros(length)
    return out.index_put((positions,), values)[None]


@dataclass
class PolicyOutputs:
    """What the training forward hands a method's loss: the head at the trained rows (``head``),
    plus the model's ``hidden_states`` / ``attentions`` where the method's forward options asked."""

    head: HeadRows
    hidden_states: Any = None
    attentions: Any = None
