"""One policy update: PPO epochs x mini-batches over packed micro-batches, with exact gradient
accumulation, gradient clipping and a clear message when a micro-batch runs out of memory.

For each mini-batch (one optimizer step) the sequences are packed under the token budget
(``--micro-batch-tokens``); each micro-batch runs forward, the method's loss (its share of the
mini-batch loss, normalised by mini-batch totals) and backward; then the gradient is clipped and
the optimizer steps. With one epoch and one mini-batch the update is exactly on-policy (ratio 1).
Mini-batches are a shuffle of the traces, or of whole sibling groups for a method that sets
``whole_groups`` (its per-token transform reads siblings: TGC, RLCSD).

With ``tis_cap`` > 0 (``--tis-cap``, ``trainers.tis``), before the first optimizer step π_old is
recomputed over the first epoch's micro-batches and replaces the traces' sampling log-probs μ as
``old_logprobs``, and each sampled token's advantage is weighted by min(π_old/μ, C).

Under torchrun (``trainers.distributed``) each rank updates on its own traces: the loss
normalisers are the union batch's, each backward is scaled so FSDP's gradient average becomes the
sum of the ranks' shares, ranks with fewer mini-batches / micro-batches run empty ones / zero-loss
passes so that all join the same collectives, and the returned metrics are global. The result is
the single-process update on the union of the ranks' traces (tests/test_distributed.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import HarnessError
from trainers import distributed
from trainers.lm_head import PolicyOutputs, forward_rows, scatter_rows, trained_rows
from trainers.losses import token_logprobs
from trainers.methods import Method, Prepared
from trainers.packing import PackedBatch, pack
from trainers.tis import corrected

__all__ = ["UpdateSettings", "policy_forward", "policy_update", "recompute_old_logprobs", "reference_logprobs"]


@dataclass
class UpdateSettings:
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 4096
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    tis_cap: float = 0.0
    """Truncated importance sampling cap C (``trainers.tis``); 0 = off: the traces' sampling
    log-probs are ``old_logprobs`` and no token is reweighted."""


class MicroBatchOOM(HarnessError):
    pass


def _oom(index: int, total: int, tokens: int, settings: UpdateSettings) -> MicroBatchOOM:
    return MicroBatchOOM(
        f"out of memory in micro-batch {index + 1}/{total} ({tokens} tokens): lower --micro-batch-tokens "
        f"(now {settings.micro_batch_tokens}), or add --gradient-checkpointing, or use --lora-rank")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, packed: PackedBatch, temperature: float) -> list[torch.Tensor]:
    """Per micro-batch ``[1, L-1]`` log-probs of ``ref_model`` (no grad; eval mode for the pass)."""
    device = next(ref_model.parameters()).device
    was_training = ref_model.training
    ref_model.eval()
    try:
        return _logprobs(ref_model, packed, temperature, device)
    finally:
        ref_model.train(was_training)


def _logprobs(ref_model, packed, temperature, device):
    out = []
    for mb in packed.micro_batches:
        mb = mb.to(device)
        out.append(policy_forward(ref_model, mb, temperature, with_entropy=False)[0])
    return out


def policy_forward(model: torch.nn.Module, mb, temperature: float, *, with_entropy: bool, options=None,
                   full_logits: bool = False):
    """``(logp [1, L-1], entropy [1, L-1] or None, outputs)`` of one micro-batch.

    The LM head runs only at the rows that carry loss (``trainers.lm_head``): log-probs and entropy
    are exact there and 0 elsewhere, where no loss or metric reads them (every one is masked by
    ``loss_mask``). ``outputs`` is a ``PolicyOutputs`` (the head at those rows, hidden states and
    attentions when ``options`` ask). ``full_logits``: a method that reads the whole row's logits
    (``Method.full_logits``) gets the model's own outputs and every position scored."""
    options = options or {}
    if full_logits:
        outputs = model(**mb.model_inputs(), **options)
        got = token_logprobs(outputs.logits, mb.input_ids, temperature, with_entropy=with_entropy)
        logp, entropy = got if with_entropy else (got, None)
        return logp, entropy, outputs
    rows = trained_rows(mb.loss_mask)
    raw, (head,) = forward_rows(model, mb.model_inputs(), rows, **options)
    lp, ent = head.logprobs(mb.input_ids[0, rows + 1, None], temperature, with_entropy=with_entropy)
    length = mb.loss_mask.shape[1]
    logp = scatter_rows(lp[:, 0], rows, length)
    entropy = scatter_rows(ent, rows, length) if with_entropy else None
    outputs = PolicyOutputs(head=head, hidden_states=getattr(raw, "hidden_states", None),
                            attentions=getattr(raw, "attentions", None))
    return logp, entropy, outputs


def _split(n: int, parts: int, rng: random.Random, groups: list[int] | None = None) -> list[list[int]]:
    """Trace indices of each mini-batch: a shuffle dealt into ``parts``. With ``groups`` (the sibling
    group of each trace) whole groups are dealt instead, each to the mini-batch with the fewest
    traces so far, so no group is split across optimizer steps."""
    if groups is None:
        order = list(range(n))
        rng.shuffle(order)
        return [sorted(order[i::parts]) for i in range(parts) if order[i::parts]]
    if len(groups) != n:
        raise RuntimeError(f"Prepared.groups names {len(groups)} traces for {n}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    rng.shuffle(keys)
    chunks: list[list[int]] = [[] for _ in range(parts)]
    for g in keys:
        min(chunks, key=len).extend(members[g])
    return [sorted(c) for c in chunks if c]


def _pack_chunk(prepared: Prepared, chunk: list[int], settings: UpdateSettings, pad_token_id: int) -> PackedBatch:
    """The micro-batches of one mini-batch (``chunk``: trace indices in ``prepared``)."""
    # seq_index / spans carry each trace's index in ``prepared`` (methods keep per-trace data)
    fields = {name: [values[i] for i in chunk] for name, values in prepared.token_fields.items()}
    return pack([prepared.traces[i] for i in chunk], [prepared.advantages[i] for i in chunk],
                settings.micro_batch_tokens, pad_token_id=pad_token_id, budget_option="--micro-batch-tokens",
                ids=chunk, fields=fields)


@torch.no_grad()
def recompute_old_logprobs(model: torch.nn.Module, prepared: Prepared, chunks: list[list[int]], method: Method,
                           settings: UpdateSettings, pad_token_id: int) -> dict[int, torch.Tensor]:
    """π_old of every trace of ``chunks`` (trace index -> log-probs at each position, CPU), by the
    loss's own forward (train mode, the method's options, with entropy) over the same micro-batches
    the first epoch packs, so the first optimizer step's ratio is exactly 1. Under torchrun every
    rank runs as many forwards as the busiest one (zero-loss pad passes)."""
    device = next(model.parameters()).device
    micro_batches = [mb for chunk in chunks if chunk
                     for mb in _pack_chunk(prepared, chunk, settings, pad_token_id).micro_batches]
    # agreed before any forward: a rank waiting in a collective would block the others' all-gathers
    n_pad = int(distributed.all_max(len(micro_batches))) - len(micro_batches)
    out: dict[int, torch.Tensor] = {}
    for mb in micro_batches:
        logp, _, _ = policy_forward(model, mb.to(device), settings.temperature, with_entropy=True,
                                    options=method.forward_options, full_logits=method.full_logits)
        out.update(mb.unpack(logp.float().cpu()))
    for _ in range(n_pad):
        distributed.pad_pass(model, device, pad_token_id, backward=False)
    return out


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, prepared: Prepared, method: Method,
                  settings: UpdateSettings, *, pad_token_id: int, seed: int, ctx: Any = None,
                  ref_model: torch.nn.Module | None = None) -> dict[str, float]:
    """Run the update; returns summed/averaged metrics (``loss/policy``, ``clip/frac``, ``entropy``,
    ``kl/ref``, ``grad/norm``, padding efficiency, token counts; ``tis/*`` with ``tis_cap``)."""
    device = next(model.parameters()).device
    model.train()
    rng = random.Random(seed)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    loss_total, steps, tokens, padded = 0.0, 0, 0, 0

    def record(name: str, value: float, weight: float) -> None:
        sums[name] = sums.get(name, 0.0) + value * weight
        weights[name] = weights.get(name, 0.0) + weight

    constant = method.loss_constant(settings.max_new_tokens)
    scale = distributed.grad_scale()  # 1 single-process
    groups = None
    if method.whole_groups and settings.mini_batches > 1:
        if prepared.groups is None:
            raise RuntimeError(f"method {method.name} needs whole groups in a mini-batch but its prepare() did not "
                               "set Prepared.groups")
        groups = prepared.groups
    # every epoch's mini-batches, drawn before any update (the same draws as one epoch at a time)
    plan = [_split(len(prepared.traces), settings.mini_batches, rng, groups) for _ in range(settings.ppo_epochs)]
    tis_metrics: dict[str, float] = {}
    if settings.tis_cap:  # before the first optimizer step: pi_old is the policy that starts the update
        old = recompute_old_logprobs(model, prepared, plan[0], method, settings, pad_token_id)
        prepared, mismatch = corrected(prepared, old, settings.tis_cap)
        tis_metrics = mismatch.metrics()
    for chunks in plan:
        # every rank takes the same number of optimizer steps (empty mini-batches where it has fewer)
        chunks += [[] for _ in range(int(distributed.all_max(len(chunks))) - len(chunks))]
        for chunk in chunks:
            packed = _pack_chunk(prepared, chunk, settings, pad_token_id)
            norm = distributed.global_norm(packed.loss_norm(constant=constant))
            n_mb = len(packed.micro_batches)
            n_pad = int(distributed.all_max(n_mb)) - n_mb  # zero-loss passes matching other ranks' micro-batches
            refs = reference_logprobs(ref_model, packed, settings.temperature) if ref_model is not None else None
            if method.needs_prepass:  # the policy is fixed within a mini-batch, so these are its log-probs
                logps = reference_logprobs(model, packed, settings.temperature)
                for _ in range(n_pad):
                    distributed.pad_pass(model, device, pad_token_id, backward=False)
                if n_mb:
                    method.begin_minibatch(packed, logps, ctx)
            optimizer.zero_grad(set_to_none=True)
            for index, mb in enumerate(packed.micro_batches):
                try:
                    mb = mb.to(device)
                    logp, entropy, outputs = policy_forward(model, mb, settings.temperature, with_entropy=True,
                                                            options=method.forward_options,
                                                            full_logits=method.full_logits)
                    loss, metrics = method.loss(mb, logp, norm, ctx,
                                                ref_logp=None if refs is None else refs[index].to(device),
                                                outputs=outputs)

                    (loss * scale if scale != 1 else loss).backward()
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if _is_oom(exc):
                        raise _oom(index, n_mb, mb.num_tokens, settings) from None
                    raise
                live = float(mb.loss_mask.sum())
                loss_total += float(loss.detach())
                record("entropy", float((entropy * mb.loss_mask).sum()) / max(live, 1.0), live)
                for name, value in metrics.items():
                    if name != "tokens":
                        record(name, float(value), live)
                del outputs, logp, loss
            for _ in range(n_pad):
                distributed.pad_pass(model, device, pad_token_id, backward=True)
            # --grad-clip 0 turns clipping off (the norm is still measured and logged): an infinite
            # bound scales by 1, where a bound of 0 would zero every gradient.
            bound = settings.grad_clip if settings.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), bound)
            if hasattr(grad_norm, "full_tensor"):  # sharded (DTensor) gradients: the global norm
                grad_norm = grad_norm.full_tensor()
            record("grad/norm", float(grad_norm), 1.0)
            optimizer.step()
            steps += 1
            tokens += packed.real_tokens
            padded += packed.padded_tokens
    model.eval()
    if distributed.enabled():  # global metrics: the union batch's weighted means and totals
        parts = distributed.all_gather_objects((sums, weights))
        sums = {k: sum(p[0].get(k, 0.0) for p in parts) for p in parts for k in p[0]}
        weights = {k: sum(p[1].get(k, 0.0) for p in parts) for k in sums}
        loss_total, tokens, padded = distributed.all_sum(loss_total, tokens, padded)
        tokens, padded = int(tokens), int(padded)
    out = {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
    out["loss/policy"] = loss_total / max(steps, 1)
    out["update/optimizer_steps"] = steps
    out["tokens/trained"] = tokens
    out["perf/padding_efficiency"] = tokens / max(padded, 1)
    out.update(tis_metrics)
    return out
