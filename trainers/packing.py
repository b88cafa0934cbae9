"""Pack variable-length token traces into micro-batches under a per-micro-batch token budget.

What: first-fit-decreasing bin packing of whole sequences into rows of at most ``max_tokens``
tokens; each row is one micro-batch of shape ``[1, L]`` holding several sequences back to back.

How the model sees a row: ``position_ids`` restart at 0 for every sequence and
``attention_mask=None``. transformers (5.x, ``masking_utils.find_packed_sequence_indices``) then
splits the row wherever consecutive position ids do not increase by exactly 1 and builds a
block-causal mask for every attention implementation (eager, sdpa, flex; flash-attention uses
varlen kernels from the same position ids), so no token attends across a sequence boundary.
Tail padding (only with ``pad_to_multiple_of > 1``) also gets positions 0, 1, ... and is its own
block. Trap: the detection runs only when ``past_key_values is None``, and Qwen2-style models
create an empty cache whenever ``use_cache`` is on (the config default, in train mode too), which
silently turns the row back into one causal sequence. ``MicroBatch.model_inputs()`` therefore
passes ``use_cache=False``; always call the model with it. tests/test_packing.py checks packed log-probs
against per-sequence forward passes.


Next-token shift: per-token fields are stored aligned with targets ``input_ids[:, 1:]`` (length
L-1), as ``losses.token_logprobs`` returns them. The first token of every sequence is never a
loss target (its "prediction" would come from the previous sequence's last token), so the shift
never crosses a boundary: its loss mask is 0 here, and a trace whose first token is sampled is
rejected (a sampled token always follows a prompt).

Carried per target token: ``loss_mask``, ``old_logprobs`` (the trace's log-probs: the sampling
ones, or π_old where the update recomputed it, ``trainers.tis``),
``advantages`` (a per-sequence scalar broadcast to its tokens, or per-token values) and
``seq_index`` (index of the trace in the input list; -1 on padding).
Tests: ``.venv/bin/python -m pytest tests/test_packing.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from harness.errors import ConfigError
from trainers.losses import LossNorm

__all__ = ["MicroBatch", "PackedBatch", "SequenceTooLongError", "pack"]


class SequenceTooLongError(ConfigError, ValueError):
    """A sequence does not fit the micro-batch token budget (the message names the option)."""


@dataclass
class MicroBatch:
    input_ids: torch.Tensor      # [1, L] long
    position_ids: torch.Tensor   # [1, L] long, restarting at 0 per sequence
    loss_mask: torch.Tensor      # [1, L-1] float, aligned with input_ids[:, 1:]
    old_logprobs: torch.Tensor   # [1, L-1] float32
    advantages: torch.Tensor     # [1, L-1] float32
    seq_index: torch.Tensor      # [1, L-1] long, -1 on padding
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    """(sequence index, start offset in the row, length) of each packed sequence."""
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-target values a method packed with the traces (``pack(fields=...)``), each
    ``[1, L-1, *rest]`` and zero on padding / first tokens, e.g. teacher log-probs."""

    @property
    def real_tokens(self) -> int:
        return sum(n for _, _, n in self.spans)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict:
        """Keyword arguments for a causal LM forward: packed format, no attention mask, no cache."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None,
                "use_cache": False}

    def to(self, device, non_blocking: bool = False) -> MicroBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.loss_mask),
                          move(self.old_logprobs), move(self.advantages), move(self.seq_index), self.spans,
                          {k: move(v) for k, v in self.fields.items()})

    def unpack(self, values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-target ``[1, L-1]`` values -> {sequence index: values aligned with the trace's
        positions} (length = trace length, position 0 = 0.0), e.g. recomputed log-probs."""
        out = {}
        for seq, start, n in self.spans:
            row = values[0, start:start + n - 1]
            out[seq] = torch.cat([row.new_zeros(1), row])
        return out


@dataclass
class PackedBatch:
    micro_batches: list[MicroBatch]
    max_tokens: int
    num_sequences: int

    @property
    def real_tokens(self) -> int:
        return sum(mb.real_tokens for mb in self.micro_batches)

    @property
    def padded_tokens(self) -> int:
        return sum(mb.num_tokens for mb in self.micro_batches)

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / tokens in the (padded) tensors the model runs on."""
        return self.real_tokens / max(self.padded_tokens, 1)

    @property
    def fill(self) -> float:
        """Real tokens / (micro-batches x max_tokens): how full FFD packed the rows."""
        return self.real_tokens / max(len(self.micro_batches) * self.max_tokens, 1)

    def loss_norm(self, constant: float | None = None) -> LossNorm:
        """Whole-batch normalisers for ``losses.aggregate`` (loss tokens, sequences with any)."""
        tokens, seqs = 0.0, set()
        for mb in self.micro_batches:
            live = mb.loss_mask > 0
            tokens += float(mb.loss_mask.sum())
            seqs.update(mb.seq_index[live].tolist())
        return LossNorm(num_tokens=tokens, num_seqs=len(seqs), constant=constant)


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack(traces: Sequence, advantages: Sequence[float | Sequence[float]] | None, max_tokens: int, *,
         pad_token_id: int = 0, pad_to_multiple_of: int = 1, budget_option: str = "max_tokens",
         ids: Sequence[int] | None = None, fields: dict[str, Sequence] | None = None) -> PackedBatch:
    """Pack traces (anything with ``input_ids``, ``mask``, ``logprobs`` lists, e.g. ``TokenTrace``)
    into micro-batches of at most ``max_tokens`` tokens each.

    ``advantages[i]`` is a float (broadcast to trace i's tokens) or a per-position list as long as
    the trace; ``None`` means zeros. ``budget_option`` is the user-facing name of ``max_tokens``,
    quoted in the error for a trace longer than the budget.

    ``ids[i]`` is what ``seq_index`` and ``spans`` record for trace i (default i): the trainer
    passes each trace's index in the whole step so a method can find its per-trace data.
    ``fields[name][i]`` is a per-position tensor (``[len(trace i), *rest]``) packed like the
    advantages into ``MicroBatch.fields[name]`` (target-aligned, zero at each sequence's first
    token and on padding).
    """
    if max_tokens < 2:
        raise ValueError(f"{budget_option} must be at least 2, got {max_tokens}")
    if advantages is not None and len(advantages) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(advantages)} advantages")
    tags = list(range(len(traces))) if ids is None else [int(x) for x in ids]
    if len(tags) != len(traces):
        raise ValueError(f"{len(traces)} traces but {len(tags)} ids")
    fields = fields or {}
    for name, values in fields.items():
        if len(values) != len(traces):
            raise ValueError(f"field {name!r}: {len(values)} values for {len(traces)} traces")
    lengths = []
    for i, tr in enumerate(traces):
        n = len(tr.input_ids)
        if n > max_tokens:
            raise SequenceTooLongError(f"sequence {i} has {n} tokens, more than the micro-batch token budget "
                             f"{budget_option}={max_tokens}; raise {budget_option} to at least {n}")
        if len(tr.mask) != n or len(tr.logprobs) != n:
            raise ValueError(f"trace {i}: input_ids, mask and logprobs lengths differ "
                             f"({n}, {len(tr.mask)}, {len(tr.logprobs)})")
        if n and tr.mask[0]:
            raise ValueError(f"trace {i} starts with a sampled token; it has no context to score it against")
        lengths.append(n)

    micro_batches = []
    for row in _first_fit_decreasing(lengths, max_tokens):
        used = sum(lengths[i] for i in row)
        total = min(-(-used // pad_to_multiple_of) * pad_to_multiple_of, max(max_tokens, used))
        ids = torch.full((total,), pad_token_id, dtype=torch.long)
        pos = torch.empty(total, dtype=torch.long)
        # per-position fields (aligned with input_ids); shifted to targets at the end
        mask = torch.zeros(total)
        old = torch.zeros(total, dtype=torch.float32)
        adv = torch.zeros(total, dtype=torch.float32)
        seq = torch.full((total,), -1, dtype=torch.long)
        extra = {}
        for name, values in fields.items():
            first = torch.as_tensor(values[row[0]])
            extra[name] = torch.zeros((total, *first.shape[1:]), dtype=first.dtype)
        spans, off = [], 0
        for i in row:
            tr, n = traces[i], lengths[i]
            sl = slice(off, off + n)
            ids[sl] = torch.as_tensor(tr.input_ids, dtype=torch.long)
            pos[sl] = torch.arange(n)
            mask[sl] = torch.as_tensor(tr.mask, dtype=torch.float32)
            mask[off] = 0.0  # first token of a sequence: never a target (no cross-boundary shift)
            old[sl] = torch.as_tensor(tr.logprobs, dtype=torch.float32)
            if advantages is not None:
                a = torch.as_tensor(advantages[i], dtype=torch.float32)
                if a.dim() > 0 and a.shape != (n,):
                    raise ValueError(f"trace {i}: {a.numel()} per-token advantages for {n} tokens")
                adv[sl] = a  # a scalar broadcasts to the sequence
            tag = tags[i]
            seq[sl] = tag
            for name, values in fields.items():
                v = torch.as_tensor(values[i])
                if v.shape[0] != n:
                    raise ValueError(f"trace {i}: field {name!r} has {v.shape[0]} positions for {n} tokens")
                extra[name][sl] = v
                extra[name][off] = 0
            spans.append((tag, off, n))
            off += n
        pos[off:] = torch.arange(total - off)  # padding: its own block of positions
        micro_batches.append(MicroBatch(
            input_ids=ids[None], position_ids=pos[None], loss_mask=mask[None, 1:],
            old_logprobs=old[None, 1:], advantages=(adv * mask)[None, 1:], seq_index=seq[None, 1:],
            spans=spans, fields={k: v[None, 1:] for k, v in extra.items()}))
    return PackedBatch(micro_batches=micro_batches, max_tokens=max_tokens, num_sequences=len(traces))
