"""The supervised warm start's loss runs the LM head only at the assistant targets, in chunks
(trainers/sft.py through trainers/lm_head.py, issue 20), and equals the full-logits cross-entropy
it replaced.

1. One real ``sft_steps`` step (lr 0, so the gradients it leaves on the parameters are that step's)
   on toy demonstrations of uneven lengths, padded on the right, with 3-row head chunks: its loss
   and every parameter's gradient equal the old computation (full ``[rows, width, V]`` logits,
   ``F.cross_entropy`` with -100 off the assistant tokens, token mean over the batch) within 1e-5,
   float32, CPU, on the tiny toy policy (tied embeddings).
2. A model read through its own logits (Gemma 2's soft-capping) gives the same loss and gradients.
Run: .venv/bin/python -m pytest tests/test_sft_lm_head.py
"""

from __future__ import annotations

import random

import pytest
import torch
from toy_groups import load_tiny_toy

from harness.policy.trace import TokenTrace
from trainers import lm_head
from trainers.sft import demo_trace, sft_loss, sft_steps

ATOL = 1e-5


def full_logits_loss(model, batch: list[TokenTrace]) -> torch.Tensor:
    """The warm start's loss before issue 20: every position's logits, cross-entropy at the targets."""
    width = max(len(t) for t in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, t in enumerate(batch):
        ids[row, :len(t)] = torch.tensor(t.input_ids)
        attn[row, :len(t)] = 1
        labels[row, :len(t)] = torch.tensor([tok if m else -100 for tok, m in zip(t.input_ids, t.mask)])
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def _lazy_demo(task) -> list[dict]:
    """A one-turn demonstration (answer at once, no tool calls): shorter than the oracle's."""
    from envs.toy import CODES, SYSTEM_PROMPT
    from envs.toy.tasks import answer_text

    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.data["question"]},
            {"role": "assistant", "content": answer_text([CODES[0]] * len(task.data["items"]))}]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_one_sft_step_equals_the_full_logits_loss_and_gradients(tiny_toy_dir, monkeypatch):
    from envs.toy import ToyFactory

    monkeypatch.setenv(lm_head.CHUNK_ENV, "3")  # many chunks, a partial last one
    model, tok = load_tiny_toy(tiny_toy_dir)
    factory = ToyFactory()
    tasks = factory.tasks("train")[:3]
    traces = [demo_trace(tok, demo, factory.tool_schemas)
              for demo in [factory.demonstration(t) for t in tasks] + [_lazy_demo(t) for t in tasks]]
    seed, batch_size = 3, 4
    draw = random.Random(seed)  # the batch sft_steps draws with this seed
    batch = [traces[draw.randrange(len(traces))] for _ in range(batch_size)]
    assert len({len(t) for t in batch}) > 1, "the batch must be padded: traces of uneven lengths"
    assert lm_head.output_head(model) is not None  # the head really is taken apart

    model.train()
    reference = full_logits_loss(model, batch)
    reference.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    (loss,) = sft_steps(model, traces, steps=1, lr=0.0, batch_size=batch_size, seed=seed)
    got = _grads(model)
    assert loss == pytest.approx(float(reference), abs=ATOL)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_a_model_that_keeps_its_own_logits_gives_the_same_loss_and_gradients():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(cfg).train()
    assert lm_head.output_head(model) is None
    batch = []
    for length, sampled in ((11, (4, 5, 6, 9, 10)), (7, (3, 4))):
        t = TokenTrace()
        ids = torch.randint(0, 64, (length,)).tolist()
        for j, token in enumerate(ids):
            (t.add_response([token], [0.0]) if j in sampled else t.add_prompt([token]))
        batch.append(t)

    reference = full_logits_loss(model, batch)
    want = torch.autograd.grad(reference, list(model.parameters()))
    loss = sft_loss(model, batch, torch.device("cpu"))
    got = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference, atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
