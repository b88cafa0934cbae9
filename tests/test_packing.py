"""Sequence packing: packed rows give the same log-probs as unpadded per-sequence passes.

A tiny random Qwen2 model (fp32) scores each packed row (position_ids restart per sequence,
attention_mask=None, so transformers builds a block-causal mask) and each sequence alone; the
log-probs must agree within 1e-5. Also: budget, efficiency, the oversize error, the shift.
Run: .venv/bin/python -m pytest tests/test_packing.py
"""

from __future__ import annotations

import pytest
import torch

from harness.policy.trace import TokenTrace
from trainers.losses import token_logprobs
from trainers.packing import pack

VOCAB = 97


def make_traces(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    traces = []
    for n in lengths:
        tr = TokenTrace()
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        cut = max(1, n // 2)
        tr.add_prompt(ids[:cut])
        if n > cut:
            tr.add_response(ids[cut:], torch.rand(n - cut, generator=g).neg().tolist())
        traces.append(tr)
    return traces


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1)
    m = Qwen2ForCausalLM._from_config(cfg, attn_implementation=request.param, torch_dtype=torch.float32)
    return m.eval()


def test_packed_logprobs_equal_per_sequence(model):
    lengths = [23, 5, 17, 31, 2, 12, 9, 28, 14, 3]
    traces = make_traces(lengths)
    packed = pack(traces, [0.5] * len(traces), max_tokens=48, pad_to_multiple_of=8)
    assert any(len(mb.spans) > 2 for mb in packed.micro_batches)  # really packed
    assert any(mb.real_tokens < mb.num_tokens for mb in packed.micro_batches)  # padding tail exercised
    seen = {}
    with torch.no_grad():
        for mb in packed.micro_batches:
            logits = model(**mb.model_inputs()).logits
            seen.update(mb.unpack(token_logprobs(logits, mb.input_ids)))
            # sanity: the same row without position ids (one causal block) scores differently
            plain = token_logprobs(model(input_ids=mb.input_ids).logits, mb.input_ids)
            # trap: with the default use_cache=True transformers skips packed-sequence detection
            cached = model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
            if len(mb.spans) > 1:
                assert (plain - token_logprobs(logits, mb.input_ids)).abs().max() > 1e-3  # >> the 1e-5 tolerance
                assert (token_logprobs(cached, mb.input_ids) - token_logprobs(logits, mb.input_ids)).abs().max() > 1e-3
        for i, tr in enumerate(traces):
            ids = torch.tensor([tr.input_ids])
            alone = token_logprobs(model(input_ids=ids).logits, ids)[0]
            assert seen[i].shape == (len(tr),)
            assert (seen[i][1:] - alone).abs().max() < 1e-5


def test_budget_and_every_sequence_once():
    lengths = [40, 35, 30, 25, 20, 15, 10, 5, 5, 5]
    packed = pack(make_traces(lengths), None, max_tokens=50)
    assert all(mb.num_tokens <= 50 for mb in packed.micro_batches)
    placed = sorted(seq for mb in packed.micro_batches for seq, _, _ in mb.spans)
    assert placed == list(range(len(lengths)))
    # first-fit-decreasing: 40+10, 35+15, 30+20, 25+5+5+5 -> 4 rows, all tokens real
    assert len(packed.micro_batches) == 4
    assert packed.padding_efficiency == 1.0
    assert packed.fill == pytest.approx(190 / 200)


def test_padding_efficiency_computed_right():
    packed = pack(make_traces([13, 7, 20]), None, max_tokens=24, pad_to_multiple_of=8)
    # FFD: row0 = 20 (padded to 24), row1 = 13 + 7 = 20 (padded to 24)
    assert [mb.num_tokens for mb in packed.micro_batches] == [24, 24]
    assert packed.real_tokens == 40 and packed.padded_tokens == 48
    assert packed.padding_efficiency == pytest.approx(40 / 48)
    pad = packed.micro_batches[0]
    assert pad.input_ids[0, 20:].tolist() == [0] * 4 and pad.position_ids[0, 20:].tolist() == [0, 1, 2, 3]
    assert torch.all(pad.loss_mask[0, 19:] == 0) and torch.all(pad.seq_index[0, 19:] == -1)


def test_oversize_sequence_names_the_budget_option():
    with pytest.raises(ValueError, match=r"sequence 1 has 30 tokens.*--max-tokens-per-micro-batch=16.*at least 30"):
        pack(make_traces([10, 30]), None, max_tokens=16, budget_option="--max-tokens-per-micro-batch")


def test_shift_never_crosses_a_sequence_boundary():
    traces = make_traces([6, 4, 9, 3, 7])
    traces[1].mask[0] = 0  # already a prompt token; keep explicit
    adv = [1.0, -1.0, 2.0, [float(k) for k in range(3)], 0.5]
    packed = pack(traces, adv, max_tokens=16)
    for mb in packed.micro_batches:
        owner = torch.full((mb.num_tokens,), -1)
        for seq, start, n in mb.spans:
            owner[start:start + n] = seq
            assert mb.position_ids[0, start:start + n].tolist() == list(range(n))
            if start > 0:  # the target at a boundary is never a loss token
                assert mb.loss_mask[0, start - 1] == 0
        live = mb.loss_mask[0] > 0
        # target j+1 and its context j belong to the same sequence, and seq_index names it
        assert torch.equal(owner[:-1][live], owner[1:][live])
        assert torch.equal(mb.seq_index[0][live], owner[1:][live])
        for seq, start, n in mb.spans:  # carried fields land on the right tokens
            tr = traces[seq]
            m = torch.tensor(tr.mask[1:], dtype=torch.float32)
            assert torch.equal(mb.loss_mask[0, start:start + n - 1], m)
            assert torch.allclose(mb.old_logprobs[0, start:start + n - 1], torch.tensor(tr.logprobs[1:]))
            a = torch.as_tensor(adv[seq], dtype=torch.float32).expand(n)[1:]
            assert torch.allclose(mb.advantages[0, start:start + n - 1], a * m)
    norm = packed.loss_norm()
    assert norm.num_tokens == sum(t.response_tokens for t in traces)
    assert norm.num_seqs == 5


def test_rejects_trace_starting_with_sampled_token():
    tr = TokenTrace()
    tr.add_response([5, 6], [-0.1, -0.2])
    with pytest.raises(ValueError, match="starts with a sampled token"):
        pack([tr], None, max_tokens=8)
