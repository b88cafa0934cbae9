"""OISD (methods.md §3): GRPO + advantage-signed JS of an intermediate layer to the final layer.

On a real tiny 3-layer Qwen2 model and real toy episodes (rewards overwritten to alternate 1 / 0
so every group has signal, as in tests/test_sgcd.py):

- zero coefficients are GRPO exactly (loss, gradients, update); non-zero ones add exactly the
  logged OISD terms to the loss;
- layer = final layer gives exactly zero JS (think and attention);
- the OISD gradient reaches layers <= l, never a layer > l (teacher detached); the shared final
  norm and head only with ``head_grad=shared`` (default ``frozen``);
- sign: a small step against the gradient lowers the JS for positive advantages, raises it for
  negative ones;
- micro-batching is exact (the OISD share summed over micro-batches = one-row value);
- packed eager attention is block-diagonal, so a token's JS is the same packed or alone;
- clear errors: layer out of range, attention maps unavailable, bad settings.
Run: .venv/bin/python -m pytest tests/test_oisd.py
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from toy_groups import build_tiny_toy, toy_rollouts, update_capturing_grads

from harness.errors import ConfigError
from trainers.losses import LossNorm
from trainers.methods import MethodContext, Prepared, make_method, method_catalog, parse_method_args
from trainers.methods.oisd import _segments
from trainers.packing import pack
from trainers.update import UpdateSettings, policy_update

LAYERS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    toy = toy_rollouts(build_tiny_toy(tmp_path_factory, seed=0, num_layers=LAYERS), 2, max_new_tokens=16)
    eager = copy.deepcopy(toy.model)
    eager.set_attn_implementation("eager")
    return SimpleNamespace(model=toy.model, eager=eager, tokenizer=toy.tokenizer, groups=toy.groups)


def _prepared(setup, method, n=None):
    """The method's batch (first ``n`` traces only, to keep the update tests fast)."""
    prepared = method.prepare(setup.groups, MethodContext(model=setup.eager))
    if n is not None:
        prepared = Prepared(traces=prepared.traces[:n], advantages=prepared.advantages[:n], metrics=prepared.metrics)
    return prepared


def _one_row(setup, prepared, budget=1 << 14, n=None):
    """The first ``n`` traces (all by default) packed into micro-batches of ``budget`` tokens,
    with their whole-batch norm."""
    n = len(prepared.traces) if n is None else n
    packed = pack(prepared.traces[:n], prepared.advantages[:n], budget, pad_token_id=setup.tokenizer.pad_token_id)
    return packed.micro_batches, packed.loss_norm()


def _forward(model, mb, method):
    return model(**mb.model_inputs(), **method.forward_options)


def _update(model, prepared, method, budget):
    """One update of ``model`` itself (callers pass a copy), its context on that same model."""
    return update_capturing_grads(model, method, prepared, UpdateSettings(micro_batch_tokens=budget, max_new_tokens=16),
                                  pad_token_id=0, copy_model=False, ctx=MethodContext(model=model))


def _budget(prepared):
    # a little over the longest trace: several micro-batches, so accumulation is exercised
    return max(len(t) for t in prepared.traces) + 8


# --- GRPO equivalence ----------------------------------------------------------------------------------
def test_zero_coefficients_are_grpo_exactly(setup):
    oisd = make_method("oisd", layer=1, think_coef=0.0, attn_coef=0.0)
    grpo = make_method("grpo")
    assert oisd.forward_options == {} and oisd.attn_implementation is None
    p_oisd, p_grpo = _prepared(setup, oisd), grpo.prepare(setup.groups, None)
    assert [id(t) for t in p_oisd.traces] == [id(t) for t in p_grpo.traces]
    assert p_oisd.advantages == p_grpo.advantages
    p_oisd, p_grpo = (Prepared(traces=p.traces[:5], advantages=p.advantages[:5]) for p in (p_oisd, p_grpo))
    budget = _budget(p_grpo)
    (m_a, g_a, w_a), (m_b, g_b, w_b) = (_update(copy.deepcopy(setup.model), p, m, budget)
                                        for m, p in ((oisd, p_oisd), (grpo, p_grpo)))
    assert m_a["loss/policy"] == m_b["loss/policy"]
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert any(g.abs().sum() > 0 for g in g_a.values())
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


def test_oisd_adds_exactly_its_logged_terms_to_the_grpo_loss(setup):
    oisd, grpo = make_method("oisd", layer=1), make_method("grpo")
    assert oisd.forward_options == {"output_hidden_states": True, "output_attentions": True}
    assert oisd.attn_implementation == "eager"
    prepared = _prepared(setup, oisd, n=5)
    budget = _budget(prepared)
    m_o, g_o, _ = _update(copy.deepcopy(setup.eager), prepared, oisd, budget)
    m_g, g_g, _ = _update(copy.deepcopy(setup.eager), prepared, grpo, budget)
    assert m_o["oisd/js_think"] > 0 and m_o["oisd/js_attn"] > 0
    assert m_o["oisd/js_think"] <= math.log(2) and m_o["oisd/js_attn"] <= math.log(2)
    # the logged loss terms are the batch's terms (not a micro-batch average), so they add up
    total = m_g["loss/policy"] + m_o["loss/oisd_think"] + m_o["loss/oisd_attn"]
    assert m_o["loss/policy"] == pytest.approx(total, abs=1e-6)
    assert m_o["loss/oisd_think"] != 0 and m_o["loss/oisd_attn"] != 0
    assert any(not torch.allclose(g_o[n], g_g[n]) for n in g_o)


# --- the teacher is the final layer ------------------------------------------------------------------
@pytest.mark.parametrize("attn_keys", [0, 3])
def test_final_layer_js_is_exactly_zero(setup, attn_keys):
    final = make_method("oisd", layer=LAYERS, attn_keys=attn_keys)
    inner = make_method("oisd", layer=1, attn_keys=attn_keys)
    mbs, _ = _one_row(setup, _prepared(setup, final))
    mb = mbs[0]
    out = _forward(setup.eager, mb, final)
    think, attn = final.token_js(mb, MethodContext(model=setup.eager), out)
    assert torch.equal(think, torch.zeros_like(think)) and torch.equal(attn, torch.zeros_like(attn))
    # ... while an inner layer is measurably away from it (so the zero above is not vacuous)
    think, attn = inner.token_js(mb, MethodContext(model=setup.eager), out)
    live = mb.loss_mask > 0
    assert torch.all(think[live] > 0) and torch.all(attn[live] > 0)
    assert torch.all(think[~live] == 0) and torch.all(attn[~live] == 0)
    assert think.max() <= math.log(2) and attn.max() <= math.log(2)


def test_attention_key_samples(setup):
    full, sampled = make_method("oisd", layer=1), make_method("oisd", layer=1, attn_keys=1 << 10)
    mb = _one_row(setup, _prepared(setup, full), n=4)[0][0]
    out = _forward(setup.eager, mb, full)
    ctx = MethodContext(model=setup.eager)
    with torch.no_grad():  # a sample bigger than any sequence is every causal key of the token's own sequence
        every = full.token_js(mb, ctx, out)[1]
        assert torch.allclose(every, sampled.token_js(mb, ctx, out)[1], atol=1e-6)
    # a small sample: only causal keys of the query's own sequence, and a different but bounded JS
    few = make_method("oisd", layer=1, think_coef=0.0, attn_keys=3)
    rows = (mb.loss_mask[0] > 0).nonzero().squeeze(-1)
    pick, keep = few._sample_keys(rows, _segments(mb, mb.num_tokens, rows.device))
    start = {p: s for _, s, n in mb.spans for p in range(s, s + n)}
    for q, keys, ok in zip(rows.tolist(), pick.tolist(), keep[0].tolist()):
        assert sum(ok) == min(3, q - start[q] + 1)
        assert all(start[q] <= k <= q for k, o in zip(keys, ok) if o)
    loss, metrics = few.distill_loss(mb, LossNorm(num_tokens=float(mb.loss_mask.sum()), num_seqs=4), ctx,
                                     _forward(setup.eager, mb, few))
    every_key = float(every.sum() / mb.loss_mask.sum())
    assert 0 < metrics["oisd/js_attn"] <= math.log(2) and metrics["oisd/js_attn"] != pytest.approx(every_key, rel=1e-3)
    loss.backward()  # backward recomputes each chunk with the same sampled keys
    grads = [p.grad for p in setup.eager.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    setup.eager.zero_grad(set_to_none=True)


# --- gradient paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("term", ["think", "attn"])
def test_oisd_gradient_reaches_layers_up_to_l_and_never_beyond(setup, layer, term):
    model = setup.eager
    coefs = {"think_coef": 1.0, "attn_coef": 0.0} if term == "think" else {"think_coef": 0.0, "attn_coef": 1.0}
    method = make_method("oisd", layer=layer, **coefs)
    mbs, norm = _one_row(setup, _prepared(setup, method), n=4)
    loss, _ = method.distill_loss(mbs[0], norm, MethodContext(model=model), _forward(model, mbs[0], method))
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    moved = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    blocks = model.model.layers
    for k in range(layer, LAYERS):  # layers above l: no gradient at all (the teacher is detached)
        assert not any(n.startswith(f"model.layers.{k}.") for n in moved), f"layer {k + 1} > l={layer} got gradient"
    # layers <= l do get it: the query / key projections of every block up to l shape layer l's
    # attention and its residual stream
    for k in range(layer):
        assert {f"model.layers.{k}.self_attn.q_proj.weight", f"model.layers.{k}.self_attn.k_proj.weight"} <= moved
    assert "model.embed_tokens.weight" in moved
    # by default neither term trains the final norm (the acting policy's read-out; see the next test)
    assert "model.norm.weight" not in moved
    if term == "think":  # the lens reads every part of block l
        assert {n for n, _ in blocks[layer - 1].named_parameters(prefix=f"model.layers.{layer - 1}")} <= moved
    else:  # attention weights of block l do not depend on its value / output projections or MLP
        assert f"model.layers.{layer - 1}.mlp.up_proj.weight" not in moved


@pytest.mark.parametrize("head_grad", ["frozen", "shared"])
def test_head_grad_decides_whether_the_lens_trains_the_final_norm_and_head(setup, head_grad):
    """``frozen`` (default): L_think's gradient reaches layers <= l only; ``shared``: also the
    final norm and the LM head. The toy's head is tied to the input embeddings, so the head's share
    shows in the embedding rows of tokens the batch never feeds in: only the head (a softmax over
    the whole vocabulary) can give those rows a gradient."""
    model = setup.eager
    method = make_method("oisd", layer=1, attn_coef=0.0, head_grad=head_grad)
    assert make_method("oisd").settings["head_grad"] == "frozen"
    mbs, norm = _one_row(setup, _prepared(setup, method), n=4)
    mb = mbs[0]
    loss, _ = method.distill_loss(mb, norm, MethodContext(model=model), _forward(model, mb, method))
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    nonzero = lambda g: g is not None and bool(g.abs().sum() > 0)  # noqa: E731
    embed = grads["model.embed_tokens.weight"]
    fed = torch.zeros(embed.shape[0], dtype=torch.bool)
    fed[mb.input_ids.flatten().unique()] = True
    assert not fed.all()
    assert nonzero(embed[fed])  # the input path into layers <= l, either way
    assert nonzero(grads["model.layers.0.mlp.up_proj.weight"])
    assert nonzero(grads["model.norm.weight"]) == (head_grad == "shared")
    assert nonzero(embed[~fed]) == (head_grad == "shared")


# --- the sign of the advantage ----------------------------------------------------------------------
@pytest.mark.parametrize("term", ["think", "attn"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_step_against_the_gradient_moves_js_by_the_advantage_sign(setup, term, sign):
    model = copy.deepcopy(setup.eager)
    coefs = {"think_coef": 1.0, "attn_coef": 0.0} if term == "think" else {"think_coef": 0.0, "attn_coef": 1.0}
    method = make_method("oisd", layer=1, **coefs)
    mbs, norm = _one_row(setup, _prepared(setup, method), n=4)
    mb = mbs[0]
    mb.advantages = sign * mb.loss_mask  # every token gets advantage +1 or -1
    ctx = MethodContext(model=model)
    before = _forward(model, mb, method)
    loss, metrics = method.distill_loss(mb, norm, ctx, before)
    js0 = metrics[f"oisd/js_{term}"]
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    scale = 1e-3 / torch.sqrt(sum((g.square().sum() for g in grads if g is not None), torch.tensor(0.0)))
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= scale * g
        after = _forward(model, mb, method)
    # JS to the teacher the gradient was taken against (sg: the teacher is a fixed target)
    attentions = after.attentions and (*after.attentions[:-1], before.attentions[-1].detach())
    fixed = SimpleNamespace(logits=before.logits.detach(), hidden_states=after.hidden_states, attentions=attentions)
    with torch.no_grad():
        _, moved = method.distill_loss(mb, norm, ctx, fixed)
    assert (moved[f"oisd/js_{term}"] - js0) * sign < 0, (js0, moved[f"oisd/js_{term}"])


# --- micro-batching and packing ---------------------------------------------------------------------
def test_micro_batched_oisd_terms_sum_to_the_one_row_value(setup):
    for agg in ("seq-mean-token-mean", "token-mean"):
        method = make_method("oisd", layer=1, loss_agg=agg)
        prepared = _prepared(setup, method, n=5)
        ctx = MethodContext(model=setup.eager)
        with torch.no_grad():
            shares = []
            for budget in (1 << 14, _budget(prepared)):
                mbs, norm = _one_row(setup, prepared, budget)
                shares.append(sum(float(method.distill_loss(mb, norm, ctx, _forward(setup.eager, mb, method))[0])
                                  for mb in mbs))
        assert len(_one_row(setup, prepared, _budget(prepared))[0]) > 2
        assert shares[0] == pytest.approx(shares[1], abs=1e-6) and shares[0] != 0


def test_packed_eager_attention_is_block_diagonal(setup):
    method = make_method("oisd", layer=1)
    prepared = _prepared(setup, method)
    traces = prepared.traces[:4]
    mb = pack(traces, prepared.advantages[:4], 1 << 14).micro_batches[0]
    assert len(mb.spans) == 4
    out = _forward(setup.eager, mb, method)
    length = mb.num_tokens
    for maps in out.attentions:  # [1, H, L, L] per layer
        assert maps.shape[-2:] == (length, length)
        for _, start, n in mb.spans:
            block = maps[0, :, start:start + n]
            inside = block[..., start:start + n]
            assert torch.equal(block[..., :start], torch.zeros_like(block[..., :start]))
            assert torch.equal(block[..., start + n:], torch.zeros_like(block[..., start + n:]))
            assert torch.allclose(inside.sum(-1), torch.ones(inside.shape[:-1]), atol=1e-5)
            assert torch.equal(inside.triu(1), torch.zeros_like(inside))  # causal inside the block
    # hence a token's OISD terms are the same packed with other sequences or alone
    ctx = MethodContext(model=setup.eager)
    think, attn = method.token_js(mb, ctx, out)
    for k, (seq, start, n) in enumerate(mb.spans):
        alone = pack([traces[seq]], [prepared.advantages[seq]], 1 << 14).micro_batches[0]
        t1, a1 = method.token_js(alone, ctx, _forward(setup.eager, alone, method))
        assert torch.allclose(think[0, start:start + n - 1], t1[0], atol=1e-5)
        assert torch.allclose(attn[0, start:start + n - 1], a1[0], atol=1e-5)


def test_no_tokens_by_vocab_float32_tensor_is_kept_for_backward(setup):
    """The lens is chunked and checkpointed: what the OISD terms save for backward is O(tokens),
    not the [tokens, vocab] float32 distributions of layer l (the model's own logits excepted)."""
    method = make_method("oisd", layer=1)
    mb = _one_row(setup, _prepared(setup, method))[0][0]
    out = _forward(setup.eager, mb, method)
    saved = []

    def keep(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, _ = method.distill_loss(mb, LossNorm(num_tokens=1.0, num_seqs=1), MethodContext(model=setup.eager), out)
    live = int(mb.loss_mask.sum())
    assert live > 100 and max(saved, default=0) < live * setup.eager.config.vocab_size // 8
    loss.backward()  # ... and backward recomputes what it needs
    assert setup.eager.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    setup.eager.zero_grad(set_to_none=True)


# --- errors -------------------------------------------------------------------------------------------
def test_a_layer_beyond_the_model_is_a_clear_error(setup):
    method = make_method("oisd")  # the paper's layer 6, on a 3-layer model
    with pytest.raises(ConfigError, match=r"layer=6 but the policy has 3 layers.*--method-arg layer=N"):
        method.prepare(setup.groups, MethodContext(model=setup.eager))
    # the loss checks too (e.g. a caller that skipped prepare's check)
    prepared = make_method("grpo").prepare(setup.groups, None)
    with pytest.raises(ConfigError, match="has 3 layers"):
        policy_update(copy.deepcopy(setup.eager), torch.optim.SGD(setup.eager.parameters(), lr=0.0), prepared, method,
                      UpdateSettings(micro_batch_tokens=1 << 14), pad_token_id=0, seed=0,
                      ctx=MethodContext(model=setup.eager))


@pytest.mark.parametrize("bad, message", [({"layer": 0}, "layer must be >= 1"), ({"tau": 0.0}, "tau must be > 0"),
                                          ({"attn_coef": -0.1}, "must be >= 0"), ({"attn_keys": -1}, "attn_keys"),
                                          ({"lam": 1.0}, "does not take lam")])
def test_bad_settings_are_refused_at_construction(bad, message):
    with pytest.raises(ConfigError, match=message):
        make_method("oisd", **bad)


def test_attention_maps_unavailable_is_a_clear_error(setup):
    assert setup.model.config._attn_implementation == "sdpa"  # the hook (eager) not applied
    method = make_method("oisd", layer=1, think_coef=0.0)
    prepared = _prepared(setup, method, n=4)
    model = copy.deepcopy(setup.model)
    with pytest.raises(ConfigError, match="attention maps.*eager"):
        policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), prepared, method,
                      UpdateSettings(micro_batch_tokens=1 << 14), pad_token_id=0, seed=0,
                      ctx=MethodContext(model=model))
    # the think term alone needs no attention maps, and runs on sdpa
    think = make_method("oisd", layer=1, attn_coef=0.0)
    assert think.attn_implementation is None and "output_attentions" not in think.forward_options
    metrics = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), prepared, think,
                            UpdateSettings(micro_batch_tokens=1 << 14), pad_token_id=0, seed=0,
                            ctx=MethodContext(model=model))
    assert metrics["oisd/js_think"] > 0 and "oisd/js_attn" not in metrics


def test_an_architecture_without_a_findable_norm_is_a_clear_error(setup):
    model = copy.deepcopy(setup.model)
    del model.model.norm
    with pytest.raises(ConfigError, match="final norm and LM head"):
        make_method("oisd", layer=1).check_model(model)
    make_method("oisd", layer=1, think_coef=0.0).check_model(model)  # the attention term does not need it


def test_registered_with_paper_and_typed_settings():
    row = next(r for r in method_catalog() if r["method"] == "oisd")
    assert row["paper"] == "2605.29089" and row["description"]
    assert row["defaults"]["layer"] == 6 and row["defaults"]["think_coef"] == 1.0
    assert row["defaults"]["attn_coef"] == 0.1 and row["defaults"]["tau"] == 1.0
    args = parse_method_args("oisd", ["layer=3", "attn_coef=0", "attn-keys=16"])
    assert args == {"layer": 3, "attn_coef": 0.0, "attn_keys": 16}
    assert isinstance(args["layer"], int) and isinstance(args["attn_coef"], float)
