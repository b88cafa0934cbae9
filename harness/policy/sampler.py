"""Batched sampling with a KV cache, returning the exact sampled ids and their log-probs.

We run our own decode loop instead of ``model.generate`` for three reasons: each row gets its own
``torch.Generator`` (so an episode's samples depend on its seed, not on which other episodes
shared the batch), the log-prob of every sampled token is taken from the same tempered
distribution it was drawn from (what the trainer's ratio needs), and nothing warps the
distribution behind our back (top-p/top-k truncation biases the importance ratio; see
anchors.md §D.3).

Prompts are left-padded; position ids count only real tokens, so a row's logits do not depend on
its padding. Rows that finish keep being fed a pad token until the whole batch is done; their
outputs are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sample", "sample_batch"]


@dataclass
class Sample:
    ids: list[int]
    logprobs: list[float]
    ended: bool
    """True if the reply ended with an end-of-turn token (False: cut by ``max_new_tokens``)."""
    topk_ids: torch.Tensor | None = None
    """``[len(ids), K]`` ids of the K most likely tokens at each sampled position (``topk > 0``)."""
    topk_logprobs: torch.Tensor | None = None
    """``[len(ids), K]`` their log-probs under the same (tempered) sampling distribution."""


def sample_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    generators: list[torch.Generator | None],
    *,
    max_new_tokens: int,
    temperature: float,
    stop_ids: set[int],
    pad_id: int,
    topk: int = 0,
) -> list[Sample]:
    """Sample one reply per prompt. ``temperature == 0`` is greedy (log-probs then come from the
    untempered distribution). On CUDA the forward passes run under bf16 autocast, as training's
    do (float32 master weights). ``topk > 0`` also records the K most likely tokens and their
    log-probs at every sampled position: the student's own distribution, which SGCD compares with
    a teacher's without a second student forward pass."""
    device = next(model.parameters()).device
    # Runs on a worker thread: autocast and no_grad are thread-local, so they are set here.
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return _sample(model, device, prompts, generators, max_new_tokens, temperature, stop_ids, pad_id, topk)


def _sample(model, device, prompts, generators, max_new_tokens, temperature, stop_ids, pad_id, topk=0) -> list[Sample]:
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1

    samples = [Sample([], [], False) for _ in prompts]
    done = [False] * batch
    top_ids: list[list[torch.Tensor]] = [[] for _ in prompts]
    top_lp: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
        if temperature > 0:
            probs = logp.exp()
            chosen = [
                int(torch.multinomial(probs[row], 1, generator=generators[row]).item()) if not done[row] else pad_id
                for row in range(batch)
            ]
        else:
            chosen = logp.argmax(-1).tolist()
        picked = logp[torch.arange(batch, device=logp.device), torch.tensor(chosen, device=logp.device)].tolist()
        if topk:
            values, indices = logp.topk(min(topk, logp.shape[-1]), dim=-1)
            values, indices = values.cpu(), indices.to(torch.int32).cpu()
        for row in range(batch):
            if done[row]:
                continue
            samples[row].ids.append(chosen[row])
            samples[row].logprobs.append(picked[row])
            if topk:
                top_ids[row].append(indices[row])
                top_lp[row].append(values[row])
            if chosen[row] in stop_ids:
                samples[row].ended = True
                done[row] = True
        if all(done):
            break
        feed = torch.tensor(chosen, device=device).unsqueeze(1)  # finished rows are fed pad (or their stop token)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=feed, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1, :], next_pos + 1
    if topk:
        for row, sample in enumerate(samples):
            if top_ids[row]:
                sample.topk_ids, sample.topk_logprobs = torch.stack(top_ids[row]), torch.stack(top_lp[row])
    return samples
