"""Privileged-context teacher: the policy itself, re-prompted with extra context, scoring the
student's own sampled tokens in one no-grad forward pass.

Used by SGCD (methods.md §1.2c): q = sg[π_θ(· | x, c_x, y_<t)] where c_x is the credit reference.
The teacher sequence is the student's trace with only its *first prompt* re-rendered (the credit
reference appended to the system message); every later token (sampled replies, tool results,
user turns) is copied id for id, so sampled position p of the student is position
``p + offset`` of the teacher, with ``offset = len(teacher first prompt) - len(student first prompt)``.
Nothing is decoded and re-tokenized after the first prompt.

What comes back per trace, at each sampled token: the teacher's log-probs of the student's top-K
tokens (for a KL over the student's top-K support) and the teacher's full-vocabulary entropy.
Everything runs under ``torch.no_grad``: there is no gradient path through the teacher.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch

from harness.policy.chat_tokens import ChatTokenizer
from harness.policy.trace import TokenTrace
from trainers.lm_head import LazyLogits, forward_rows
from trainers.packing import pack

__all__ = ["TeacherScores", "teacher_first_prompt", "teacher_sequence", "score_with_teacher", "REFERENCE_HEADER",
           "PRIVILEGED_HEADER", "context_sequences", "sampled_token_logprobs", "per_position"]

REFERENCE_HEADER = "\n\n# Credit reference (training-only notes from sibling attempts at this task)\n"
PRIVILEGED_HEADER = "\n\n# Privileged information (the solution of this task; training only)\n"

# Logit elements turned into float32 at once when scoring (bounds memory for big vocabularies).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TeacherScores:
    support_logprobs: torch.Tensor
    """``[n, K]`` teacher log-probs (full-vocabulary normalised) of the student's top-K ids."""
    entropy: torch.Tensor
    """``[n]`` teacher entropy at each sampled token (nats, same temperature as sampling)."""


def _truncate(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]) + " ..."


def teacher_first_prompt(tokenizer: Any, context: dict[str, Any], reference: str, max_reference_tokens: int | None,
                         header: str = REFERENCE_HEADER) -> list[int]:
    """The teacher's first prompt: the student's opening messages (``TokenTrace.context``) with
    ``header`` + the reference (credit reference, privileged answer ...) appended to the system
    message (or a system message holding it). ``max_reference_tokens=None``: the caller already
    fitted the reference (SGCD cuts it per section, ``trainers.sgcd_reference``)."""
    chat = ChatTokenizer(tokenizer, context.get("tools"))
    messages = [dict(m) for m in context["messages"]]
    note = header + (reference if max_reference_tokens is None
                     else _truncate(tokenizer, reference, max_reference_tokens))
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = (messages[0].get("content") or "") + note
    else:
        messages.insert(0, {"role": "system", "content": note.lstrip()})
    return chat.first_prompt(messages)


def teacher_sequence(tokenizer: Any, trace: TokenTrace, reference: str, max_reference_tokens: int,
                     first: list[int] | None = None, header: str = REFERENCE_HEADER) -> tuple[list[int], int]:
    """``(teacher input ids, offset)`` for one trace. ``first``: its teacher first prompt when the
    caller already has it (siblings of a group usually share their opening messages)."""
    if trace.context is None or not trace.first_prompt_len:
        raise ValueError("this trace has no recorded first prompt; it did not come from a LocalPolicy agent")
    if first is None:
        first = teacher_first_prompt(tokenizer, trace.context, reference, max_reference_tokens, header)
    return first + list(trace.input_ids[trace.first_prompt_len:]), len(first) - trace.first_prompt_len


def context_sequences(tokenizer: Any, traces: list[TokenTrace], notes: list[str | None] | None, *,
                      max_note_tokens: int = 512, header: str = PRIVILEGED_HEADER) -> tuple[list[list[int]], list[int]]:
    """``(teacher input ids, offset)`` per trace: the trace with ``notes[i]`` put into its first
    prompt (privileged context), or the trace itself where the note is None / ``notes`` is None
    (a separate teacher model reading the same inputs). First prompts are rendered once per
    distinct (opening, note)."""
    seqs, offsets, firsts = [], [], {}
    for i, trace in enumerate(traces):
        note = None if notes is None else notes[i]
        if note is None:
            seqs.append(list(trace.input_ids))
            offsets.append(0)
            continue
        if trace.context is None or not trace.first_prompt_len:
            raise ValueError("this trace has no recorded first prompt; it did not come from a LocalPolicy agent")
        key = (json.dumps(trace.context, sort_keys=True, default=str), note)
        if key not in firsts:
            firsts[key] = teacher_first_prompt(tokenizer, trace.context, note, max_note_tokens, header)
        ids, offset = teacher_sequence(tokenizer, trace, note, max_note_tokens, first=firsts[key], header=header)
        seqs.append(ids)
        offsets.append(offset)
    return seqs, offsets


@torch.no_grad()
def sampled_token_logprobs(model: torch.nn.Module, traces: list[TokenTrace], *, temperature: float,
                           micro_batch_tokens: int, tokenizer: Any = None, notes: list[str | None] | None = None,
                           max_note_tokens: int = 512, header: str = PRIVILEGED_HEADER,
                           pad_token_id: int = 0) -> list[torch.Tensor]:
    """Log-prob the teacher ``model`` gives each trace's sampled tokens (``[response_tokens]`` per
    trace, in sampled-position order), reading the trace with ``notes[i]`` in its first prompt
    (self-teacher with privileged context) or unchanged (``notes=None``: a separate teacher).
    Traces with the same teacher first prompt share one prefix pass (``read_in_context``)."""
    support = [torch.as_tensor([t.input_ids[p] for p in t.sampled_positions], dtype=torch.long)[:, None]
               for t in traces]
    read = _support_reader(support, temperature)
    done = read_in_context(model, tokenizer, traces, [None] * len(traces) if notes is None else notes, read,
                           max_note_tokens=max_note_tokens, header=header, micro_batch_tokens=micro_batch_tokens,
                           pad_token_id=pad_token_id)
    return [sc.support_logprobs[:, 0] for sc in done.results]


def per_position(trace: TokenTrace, values: torch.Tensor) -> torch.Tensor:
    """Sampled-token values ``[response_tokens, *rest]`` -> ``[len(trace), *rest]`` (zeros at prompt
    positions), the layout ``Prepared.token_fields`` and ``pack(fields=...)`` take."""
    out = torch.zeros((len(trace), *values.shape[1:]), dtype=values.dtype)
    if values.shape[0]:
        out[torch.as_tensor(trace.sampled_positions, dtype=torch.long)] = values
    return out


@torch.no_grad()
def score_with_teacher(model: torch.nn.Module, sequences: list[list[int]], positions: list[list[int]],
                       support_ids: list[torch.Tensor], *, temperature: float, micro_batch_tokens: int,
                       pad_token_id: int = 0) -> list[TeacherScores]:
    """Run the teacher over ``sequences`` (packed, no padding) and score, for each sequence j, the
    tokens at ``positions[j]`` (teacher coordinates): log-probs of ``support_ids[j]`` (``[n, K]``)
    and the entropy, both at ``temperature`` like the sampler's."""
    out: list[TeacherScores | None] = [None] * len(sequences)
    for seq, logits, at in _teacher_rows(model, sequences, positions, micro_batch_tokens, pad_token_id):
        out[seq] = _score_rows(logits, at, support_ids[seq].to(device=logits.device, dtype=torch.long), temperature)
    return [s for s in out if s is not None]


def _teacher_rows(model: torch.nn.Module, sequences: list[list[int]], positions: list[list[int]],
                  micro_batch_tokens: int, pad_token_id: int):
    """The teacher's forward over ``sequences`` packed into micro-batches (no grad, eval mode, bf16
    autocast on CUDA): yields ``(sequence index, logits [n, V] of the rows this micro-batch scores,
    indices into them of the rows that predict the tokens at positions[seq])``. The head runs only
    at the scored rows, and only when a reader selects them (``trainers.lm_head``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = [SimpleNamespace(input_ids=s, mask=[0] * len(s), logprobs=[0.0] * len(s)) for s in sequences]
    budget = max(micro_batch_tokens, max((len(s) for s in sequences), default=2))
    packed = pack(rows, None, budget, pad_token_id=pad_token_id)
    try:
        with torch.no_grad():
            for mb in packed.micro_batches:
                mb = mb.to(device)
                # the logits at row position i predict the token at i + 1
                wanted = {seq: torch.as_tensor(positions[seq], dtype=torch.long, device=device) + (start - 1)
                          for seq, start, _ in mb.spans}
                keep = torch.unique(torch.cat([mb.input_ids.new_zeros(0), *wanted.values()]))  # sorted
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    _, (head,) = forward_rows(model, mb.model_inputs(), keep)
                logits = head.lazy()
                for seq, _, _ in mb.spans:
                    yield seq, logits, torch.searchsorted(keep, wanted[seq])
                del logits, head
    finally:
        model.train(was_training)


def _support_reader(support_ids: list[torch.Tensor],
                    temperature: float) -> Callable[[int, torch.Tensor, torch.Tensor], TeacherScores]:
    """The ``read`` of ``read_shared_prefix`` / ``read_in_context`` that scores sequence j's support."""
    return lambda j, logits, rows: _score_rows(logits, rows, support_ids[j].to(logits.device), temperature)


def _score_rows(logits: torch.Tensor, rows: torch.Tensor, support: torch.Tensor, temperature: float) -> TeacherScores:
    n, vocab = rows.numel(), logits.shape[-1]
    logp = torch.empty(support.shape, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for s in range(0, n, step):
        x = logits.index_select(0, rows[s:s + step]).float()
        if temperature > 0 and temperature != 1.0:
            x = x / temperature
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        lp = x - lse
        ent[s:s + step] = -(lp.exp() * lp).sum(-1)
        logp[s:s + step] = lp.gather(-1, support[s:s + step])
    return TeacherScores(support_logprobs=logp.cpu(), entropy=ent.cpu())


# Attention implementations that take a custom 4D mask as-is (flash-attention kernels do not).
_MASKABLE = ("sdpa", "eager")
# Largest packed continuation mask (query x key elements) built at once: 32M (128 MB as float32).
_MASK_ELEMENTS = 1 << 25


@torch.no_grad()
def score_shared_prefix(model: torch.nn.Module, prefix: list[int], suffixes: list[list[int]],
                        positions: list[list[int]], support_ids: list[torch.Tensor], *, temperature: float,
                        micro_batch_tokens: int, pad_token_id: int = 0) -> list[TeacherScores]:
    """``score_with_teacher`` for sequences ``prefix + suffixes[j]`` that share one prefix (the G
    siblings of a group share the teacher's first prompt, credit reference included): the prefix
    runs once and its KV cache serves every suffix, so a long reference costs once per group, not
    once per sibling. ``positions[j]`` are positions in the whole sequence, all ``>= len(prefix)``."""
    read = _support_reader(support_ids, temperature)
    return read_shared_prefix(model, prefix, suffixes, positions, read, micro_batch_tokens=micro_batch_tokens,
                              pad_token_id=pad_token_id)


@torch.no_grad()
def read_shared_prefix(model: torch.nn.Module, prefix: list[int], suffixes: list[list[int]],
                       positions: list[list[int]], read: Callable[[int, torch.Tensor, torch.Tensor], Any], *,
                       micro_batch_tokens: int, pad_token_id: int = 0) -> list[Any]:
    """The teacher over ``prefix + suffixes[j]`` for every j, the prefix run once: returns
    ``read(j, logits, rows)`` per suffix, where ``logits.index_select(0, rows)`` are the logits
    that predict the tokens at ``positions[j]`` (whole-sequence positions, all ``>= len(prefix)``).

    With sdpa / eager attention the suffixes run packed into one row after the cached prefix, with
    a custom 4D mask (each suffix sees the prefix and itself, causally): no padding, and the LM head
    runs only at the scored positions. Other attention kernels (flash-attention) get the suffixes
    right-padded in a batch over a replicated cache (a right pad is never attended by a real token
    under causal attention, so no mask is needed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    try:
        with autocast:
            inputs = {"input_ids": torch.tensor([prefix], device=device), "use_cache": True}
            first, (head,) = forward_rows(model, inputs, torch.tensor([len(prefix) - 1], device=device))
        cache, last = first.past_key_values, head.lazy()  # ``last`` predicts suffix token 0
        del first, head
        with autocast:
            if attn in _MASKABLE:
                return _packed_continuations(model, cache, last, len(prefix), suffixes, positions, read,
                                             micro_batch_tokens, device, additive_mask=attn == "eager")
            return _padded_continuations(model, cache, last, len(prefix), suffixes, positions, read,
                                         micro_batch_tokens, pad_token_id, device)
    finally:
        model.train(was_training)


def _chunks(lengths: list[int], budget: int, width_of) -> list[list[int]]:
    """Consecutive runs of indices whose ``width_of(run)`` stays within ``budget`` (at least one each)."""
    out, current = [], []
    for j in range(len(lengths)):
        if current and width_of(current + [j]) > budget:
            out.append(current)
            current = []
        current.append(j)
    return out + ([current] if current else [])


def _packed_continuations(model, cache, last, n_prefix, suffixes, positions, read, budget, device,
                          additive_mask: bool) -> list[Any]:
    out: list[Any] = [None] * len(suffixes)
    lengths = [len(s) for s in suffixes]
    fits = lambda run: (sum(lengths[j] for j in run) <= budget  # noqa: E731
                        and sum(lengths[j] for j in run) * (n_prefix + sum(lengths[j] for j in run)) <= _MASK_ELEMENTS)
    for run in _chunks(lengths, budget, fits):
        total = sum(lengths[j] for j in run)
        ids = torch.tensor([[t for j in run for t in suffixes[j]]], device=device)
        pos = torch.cat([torch.arange(n_prefix, n_prefix + lengths[j]) for j in run]).to(device)[None]
        mask = torch.zeros((1, 1, total, n_prefix + total), dtype=torch.bool, device=device)
        mask[..., :n_prefix] = True
        keep, rows_of, start = [], {}, 0
        for j in run:  # each suffix attends to itself causally; and the rows its scored tokens need
            n = lengths[j]
            mask[0, 0, start:start + n, n_prefix + start:n_prefix + start + n] = torch.ones(n, n, dtype=torch.bool,
                                                                                           device=device).tril()
            wanted = [p - 1 - n_prefix + start for p in positions[j]]  # -1 - ... : the row before the token
            rows_of[j] = wanted
            keep += [r for r in wanted if r >= start]
            start += n
        keep_idx = sorted(set(keep))
        where = {r: i + 1 for i, r in enumerate(keep_idx)}  # row 0 of ``table`` is the prefix's last row
        parts = [last]
        if keep_idx:  # else every scored token is the first of its suffix: the prefix's last row has them all
            _, (head,) = forward_rows(model, {"input_ids": ids, "position_ids": pos,
                                              "attention_mask": _as_additive(mask) if additive_mask else mask,
                                              "past_key_values": cache, "use_cache": True},
                                      torch.tensor(keep_idx, dtype=torch.long, device=device))
            parts.append(head.lazy())
            cache.crop(-total)  # drop this run again: the next one reuses the prefix alone
        table = LazyLogits.cat(parts)
        start = 0
        for j in run:
            at = torch.tensor([where.get(r, 0) if r >= start else 0 for r in rows_of[j]], dtype=torch.long,
                              device=device)
            out[j] = read(j, table, at)
            start += lengths[j]
        del parts, table, mask
    return out


def _as_additive(mask: torch.Tensor) -> torch.Tensor:
    """Eager attention adds its mask to the scores: 0 where a key is seen, the float minimum elsewhere
    (sdpa takes the boolean mask itself)."""
    return torch.zeros(mask.shape, dtype=torch.float32,
                       device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def _padded_continuations(model, cache, last, n_prefix, suffixes, positions, read, budget, pad_id,
                          device) -> list[Any]:
    out: list[Any] = [None] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda j: -len(suffixes[j]))  # a batch is as wide as its first
    lengths = [len(suffixes[j]) for j in order]
    for run in _chunks(lengths, budget, lambda r: len(r) * lengths[r[0]]):
        batch = [order[i] for i in run]
        width = len(suffixes[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, j in enumerate(batch):
            ids[row, :len(suffixes[j])] = torch.tensor(suffixes[j], dtype=torch.long)
        rows_cache = copy.deepcopy(cache)
        rows_cache.batch_repeat_interleave(len(batch))
        pos = torch.arange(n_prefix, n_prefix + width, device=device).expand(len(batch), -1)
        _, heads = forward_rows(model, {"input_ids": ids.to(device), "position_ids": pos,
                                        "past_key_values": rows_cache, "use_cache": True}, None)
        del rows_cache
        for row, j in enumerate(batch):
            # row k of [last; suffix logits] predicts the token at whole-sequence position n_prefix + k
            seq_logits = LazyLogits.cat([last, heads[row].lazy()[:len(suffixes[j]) - 1]])
            at = torch.as_tensor(positions[j], dtype=torch.long, device=device) - n_prefix
            out[j] = read(j, seq_logits, at)
        del heads
    return out


def caches_a_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` can run a prefix once and continue from its KV cache: its forward takes
    ``past_key_values`` (by name, as transformers' causal LMs do, or through ``**kwargs``, as PEFT
    wrappers pass it on), or it says so itself (``caches_prefix``, as the self-teacher's snapshot
    view does). Other modules are scored by whole-sequence passes."""
    declared = getattr(model, "caches_prefix", None)
    if declared is not None:
        return bool(declared)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "past_key_values" in params or (
        any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and hasattr(model, "config"))


@dataclass
class ContextReads:
    results: list[Any]
    """``read``'s result per trace, in the order given."""
    tokens: int
    """Tokens the teacher ran: each distinct prefix once, plus every suffix (whole sequences where
    the prefix could not be shared)."""


@torch.no_grad()
def read_in_context(model: torch.nn.Module, tokenizer: Any, traces: list[TokenTrace], notes: list[str | None],
                    read: Callable[[int, torch.Tensor, torch.Tensor], Any], *, max_note_tokens: int | None,
                    header: str, micro_batch_tokens: int, pad_token_id: int = 0) -> ContextReads:
    """The teacher reading each trace with ``notes[i]`` (``header`` + the note appended to the system
    message of its first prompt, cut to ``max_note_tokens``; ``None``: already fitted) or, where
    ``notes[i]`` is None, the trace as the student saw it. Returns ``read(i, logits, rows)`` per
    trace i, where ``logits.index_select(0, rows)`` predict trace i's sampled tokens in order.

    Every teacher-scoring method goes through here (issue 16 point 10): traces whose teacher first
    prompts are identical (the siblings of a group under one note) share one prefix pass and its KV
    cache (``read_shared_prefix``), so a long system prompt or note is read once per group, not
    once per sibling. Traces with no recorded first prompt and no note, and teachers that cannot
    continue from a cache (``caches_a_prefix``), are read as whole sequences, packed."""
    groups: dict[tuple[int, ...], list[int]] = {}
    whole: list[int] = []
    rendered: dict[tuple[str, str], list[int]] = {}
    sharing = caches_a_prefix(model)
    out: list[Any] = [None] * len(traces)
    for i, (trace, note) in enumerate(zip(traces, notes)):
        if not trace.sampled_positions:  # nothing to score: no pass at all
            vocab = getattr(getattr(model, "config", None), "vocab_size", 1)
            out[i] = read(i, torch.zeros((0, vocab)), torch.zeros(0, dtype=torch.long))
            continue
        if note is not None and (trace.context is None or not trace.first_prompt_len):
            raise ValueError("this trace has no recorded first prompt; it did not come from a LocalPolicy agent")
        if note is None:
            prefix = list(trace.input_ids[:trace.first_prompt_len])
        else:
            key = (json.dumps(trace.context, sort_keys=True, default=str), note)
            if key not in rendered:
                rendered[key] = teacher_first_prompt(tokenizer, trace.context, note, max_note_tokens, header)
            prefix = rendered[key]
        if sharing and prefix:
            groups.setdefault(tuple(prefix), []).append(i)
        else:
            whole.append(i)
    tokens = 0
    for prefix, members in groups.items():
        suffixes = [list(traces[i].input_ids[traces[i].first_prompt_len:]) for i in members]
        positions = [[p + len(prefix) - traces[i].first_prompt_len for p in traces[i].sampled_positions]
                     for i in members]
        got = read_shared_prefix(model, list(prefix), suffixes, positions, lambda j, lg, at: read(members[j], lg, at),
                                 micro_batch_tokens=micro_batch_tokens, pad_token_id=pad_token_id)
        tokens += len(prefix) + sum(len(x) for x in suffixes)
        for i, r in zip(members, got):
            out[i] = r
    if whole:
        seqs, offsets = context_sequences(tokenizer, [traces[i] for i in whole], [notes[i] for i in whole],
                                          max_note_tokens=max_note_tokens or 1 << 30, header=header)
        positions = [[p + off for p in traces[i].sampled_positions] for i, off in zip(whole, offsets)]
        for seq, logits, at in _teacher_rows(model, seqs, positions, micro_batch_tokens, pad_token_id):
            out[whole[seq]] = read(whole[seq], logits, at)
        tokens += sum(len(s) for s in seqs)
    return ContextReads(results=out, tokens=tokens)


@dataclass
class ContextScores:
    scores: list[TeacherScores]
    """One per trace, in the order given."""
    tokens: int
    """Tokens the teacher ran: each distinct prefix once, plus every suffix."""


@torch.no_grad()
def score_in_context(model: torch.nn.Module, tokenizer: Any, traces: list[TokenTrace], notes: list[str | None],
                     support_ids: list[torch.Tensor], *, temperature: float, micro_batch_tokens: int,
                     header: str = REFERENCE_HEADER, pad_token_id: int = 0) -> ContextScores:
    """The teacher reading each trace with ``notes[i]`` (already fitted) or the trace itself
    (``None``), scoring the support ``support_ids[i]`` (``[response_tokens, K]``) at every sampled
    token (``read_in_context``)."""
    read = _support_reader(support_ids, temperature)
    done = read_in_context(model, tokenizer, traces, notes, read, max_note_tokens=None, header=header,
                           micro_batch_tokens=micro_batch_tokens, pad_token_id=pad_token_id)
    return ContextScores(scores=done.results, tokens=done.tokens)


@dataclass
class TeacherTopK:
    ids: torch.Tensor
    """``[n, K]`` the teacher's K most likely next tokens at each scored position (long)."""
    logprobs: torch.Tensor
    """``[n, K]`` their log-probs (full-vocabulary normalised, at the sampling temperature)."""


@torch.no_grad()
def teacher_topk(model: torch.nn.Module, sequences: list[list[int]], positions: list[list[int]], k: int, *,
                 temperature: float, micro_batch_tokens: int, pad_token_id: int = 0) -> list[TeacherTopK]:
    """Run the teacher over ``sequences`` (packed, no padding) and return, for each sequence j and
    each position in ``positions[j]`` (teacher coordinates), the teacher's own top-``k`` next-token
    ids and log-probs at ``temperature``: the support of a top-K + tail distillation loss
    (self-distillation, ``trainers.methods.self_distill``). Same packing and alignment as
    ``score_with_teacher``; nothing here builds a graph."""
    out: list[TeacherTopK | None] = [None] * len(sequences)
    for seq, logits, at in _teacher_rows(model, sequences, positions, micro_batch_tokens, pad_token_id):
        out[seq] = _topk_rows(logits, at, k, temperature)
    return [s if s is not None else TeacherTopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
            for s in out]


@torch.no_grad()
def teacher_topk_in_context(model: torch.nn.Module, tokenizer: Any, traces: list[TokenTrace],
                            notes: list[str | None], k: int, *, temperature: float, micro_batch_tokens: int,
                            max_note_tokens: int = 512, header: str = PRIVILEGED_HEADER,
                            pad_token_id: int = 0) -> list[TeacherTopK]:
    """``teacher_topk`` at every sampled token of each trace, the teacher reading it with
    ``notes[i]`` in its first prompt (or unchanged where None); siblings under one note share one
    prefix pass (``read_in_context``)."""
    read = lambda i, logits, rows: _topk_rows(logits, rows, k, temperature)  # noqa: E731
    return read_in_context(model, tokenizer, traces, notes, read, max_note_tokens=max_note_tokens, header=header,
                           micro_batch_tokens=micro_batch_tokens, pad_token_id=pad_token_id).results


def _topk_rows(logits: torch.Tensor, rows: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    n, vocab = rows.numel(), logits.shape[-1]
    k = min(k, vocab)
    ids = torch.empty((n, k), dtype=torch.long, device=logits.device)
    logp = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for s in range(0, n, step):
        x = logits.index_select(0, rows[s:s + step]).float()
        if temperature > 0 and temperature != 1.0:
            x = x / temperature
        top, idx = x.topk(k, dim=-1)
        logp[s:s + step] = top - torch.logsumexp(x, dim=-1, keepdim=True)
        ids[s:s + step] = idx
    return TeacherTopK(ids=ids.cpu(), logprobs=logp.cpu())


__all__ += ["TeacherTopK", "teacher_topk", "teacher_topk_in_context", "score_shared_prefix", "read_shared_prefix",
            "ContextScores", "score_in_context", "ContextReads", "read_in_context", "caches_a_prefix"]
