"""TGC / DFPO and GSPO (methods.md §4, §6.4) on a tiny real model and real toy episodes.

(a) With fix=none the loss has exactly the base objective's gradient: GSPO written from its formula
    (and the ``gspo`` method), and the clip-higher PPO surrogate of ``trainers.losses``.
(b) At tokens every sibling shares, the loss gradient restricted to them, Σ_i Â_i c̃_i ∇log π, is
    numerically zero after the fix (min, orth; both bases) and clearly not zero before.
(c) The transforms on random inputs: orth makes Σ_i Â_i w̃_i = 0, min makes every weight the minimum.
(d) The prefix trie finds exactly the shared tokens of a hand-built example.

Episodes come from the untrained tiny toy policy; rewards are overwritten to alternate 1 / 0 in each
group (so Â = ±0.87, centered). To make siblings share sampled tokens, every sibling's first reply
starts with the first SHARED tokens of sibling 0's first reply (the rest is its own). To make their
weights differ, each sibling's old log-probs are perturbed with its own noise (as if sampled by
slightly different behaviour policies). Run: .venv/bin/python -m pytest tests/test_tgc.py
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from toy_groups import toy_rollouts

from harness.errors import ConfigError
from harness.policy.trace import TokenTrace
from harness.types import Group, Score
from trainers.losses import policy_loss, token_logprobs
from trainers.methods import make_method, method_catalog, parse_method_args
from trainers.methods.tgc import adv_orthogonal, min_replace, shared_tokens, transform_columns
from trainers.packing import pack
from trainers.update import UpdateSettings, policy_update, reference_logprobs

SHARED = 12
WIDE = {"clip_low": 0.99, "clip_high": 100.0}  # nothing clipped: every weight > 0, so min-replace is not vacuous


def _spliced(trace: TokenTrace, head: TokenTrace, cut: int, noise: torch.Tensor) -> TokenTrace:
    ids = list(head.input_ids[:cut]) + list(trace.input_ids[cut:])
    mask = list(head.mask[:cut]) + list(trace.mask[cut:])
    old = torch.tensor(list(head.logprobs[:cut]) + list(trace.logprobs[cut:])) + noise * torch.tensor(mask)
    return TokenTrace(input_ids=ids, mask=mask, logprobs=old.tolist(), turns=list(trace.turns),
                      first_prompt_len=trace.first_prompt_len)


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    toy = toy_rollouts(tiny_toy_dir, 2, rewards=None)  # rewards set below
    model, tokenizer, groups = toy.model, toy.tokenizer, toy.groups
    gen = torch.Generator().manual_seed(0)
    out, shared = [], {}
    for g in groups:
        head = g.episodes[0].trace
        start = head.turns[0][0]
        eps = []
        for k, e in enumerate(g.episodes):
            assert e.trace.input_ids[:start] == head.input_ids[:start] and e.trace.turns[0][1] - start > SHARED
            trace = _spliced(e.trace, head, start + SHARED, 0.3 * torch.randn(len(e.trace), generator=gen))
            shared[id(trace)] = range(start, start + SHARED)  # sampled in every sibling, same prefix
            eps.append(replace(e, trace=trace, score=Score(reward=float(k % 2 == 0), success=k % 2 == 0)))
        out.append(Group(task_id=g.task_id, group_id=g.group_id, episodes=eps))
    return model, tokenizer, out, shared


def _prepass(model, method, groups, tokens=256):
    """prepare + pack (small micro-batches: siblings land in different ones) + begin_minibatch."""
    prepared = method.prepare(groups, None)
    n = len(prepared.traces)
    packed = pack(prepared.traces, prepared.advantages, tokens, ids=list(range(n)))
    assert len(packed.micro_batches) > 1
    if method.needs_prepass:
        method.begin_minibatch(packed, reference_logprobs(model, packed, 1.0), None)
    return prepared, packed


def _grad(model, method, packed, keep=None):
    """Gradient of the method's loss summed over micro-batches; ``keep(mb)`` restricts the loss tokens."""
    model.zero_grad(set_to_none=True)
    norm = packed.loss_norm(constant=method.loss_constant(24))
    for mb in packed.micro_batches:
        logp = token_logprobs(model(**mb.model_inputs()).logits, mb.input_ids, 1.0)
        if keep is not None:
            mb = replace(mb, loss_mask=mb.loss_mask * keep(mb))
        loss, _ = method.loss(mb, logp, norm, None)
        loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def _close(a, b):
    """Equal up to float32 rounding (packed vs unpacked forwards, different summation orders)."""
    return float((a - b).norm()) <= 1e-5 * float(b.norm())


# --- (a) fix = none is the base objective exactly ------------------------------------------------------
def _gspo_from_formula(model, prepared):
    """−(1/N) Σ_i min(s_i Â_i, clip(s_i, 1−3e-4, 1+4e-4) Â_i), one unpacked forward per trace."""
    model.zero_grad(set_to_none=True)
    n = len(prepared.traces)
    for trace, adv in zip(prepared.traces, prepared.advantages):
        ids = torch.tensor([trace.input_ids])
        lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        lp = lp.gather(-1, ids[0, 1:, None])[:, 0]
        pos = torch.tensor(trace.sampled_positions)
        s = torch.exp((lp[pos - 1] - torch.tensor(trace.logprobs)[pos]).mean())
        (-torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv) / n).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def test_fix_none_is_gspo_exactly(setup):
    model, _, groups, _ = setup
    tgc = make_method("tgc", base="gspo", fix="none")
    prepared, packed = _prepass(model, tgc, groups)
    # the test is only as good as the mix: some sequences clipped (c = 0), some not
    c = [tgc.weights[i].base[torch.tensor(t.sampled_positions)] for i, t in enumerate(prepared.traces)]
    assert any(bool((x == 0).all()) for x in c) and any(bool((x > 0).all()) for x in c)
    g_tgc = _grad(model, tgc, packed)
    gspo = make_method("gspo")
    assert gspo.settings["clip_low"] == 3e-4 and gspo.settings["clip_high"] == 4e-4
    _, packed_g = _prepass(model, gspo, groups)
    g_gspo = _grad(model, gspo, packed_g)
    g_formula = _gspo_from_formula(model, prepared)
    assert g_formula.abs().max() > 0
    assert _close(g_gspo, g_formula) and _close(g_tgc, g_formula)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fix_none_is_the_clip_higher_surrogate_exactly(setup, agg):
    model, _, groups, _ = setup
    tgc = make_method("tgc", base="clip", fix="none", loss_agg=agg)
    assert (tgc.cfg.clip_low, tgc.cfg.clip_high) == (0.2, 0.28)
    _, packed = _prepass(model, tgc, groups)
    assert 0.05 < tgc._metrics["tgc/clipped_frac"] < 0.9  # the clip is active on some tokens, not all
    g_tgc = _grad(model, tgc, packed)
    model.zero_grad(set_to_none=True)
    norm = packed.loss_norm()
    for mb in packed.micro_batches:
        logp = token_logprobs(model(**mb.model_inputs()).logits, mb.input_ids, 1.0)
        loss, _ = policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg=agg, norm=norm,
                              seq_index=mb.seq_index, eps_low=0.2, eps_high=0.28)
        loss.backward()
    g_ppo = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    assert g_ppo.abs().max() > 0 and _close(g_tgc, g_ppo)


def test_fix_none_through_the_trainer_update_equals_gspo(setup):
    """The whole update path (pre-pass per mini-batch, two mini-batches, several micro-batches)."""
    model, tokenizer, groups, _ = setup
    settings = UpdateSettings(micro_batch_tokens=256, max_new_tokens=24, mini_batches=2)
    params = []
    gspo = make_method("gspo")
    gspo.whole_groups = True  # tgc keeps groups whole in a mini-batch: compare on the same mini-batches
    for method in (make_method("tgc", fix="none"), gspo):
        m = copy.deepcopy(model)
        prepared = method.prepare(groups, None)
        policy_update(m, torch.optim.SGD(m.parameters(), lr=1.0), prepared, method, settings,
                      pad_token_id=tokenizer.pad_token_id, seed=3)
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (params[0] - start).abs().max() > 1e-6  # it moved
    assert torch.allclose(params[0], params[1], atol=1e-6)


# --- (b) cancellation at the tokens every sibling shares ----------------------------------------------
def _shared_indicator(packed, prepared, shared):
    """keep(mb): 1 on the loss tokens the fixture made shared by all siblings, 0 elsewhere."""
    per_trace = {}
    for i, trace in enumerate(prepared.traces):
        x = torch.zeros(len(trace))
        x[list(shared[id(trace)])] = 1.0
        per_trace[i] = x

    def keep(mb):
        out = torch.zeros_like(mb.loss_mask)
        for seq, start, n in mb.spans:
            out[0, start:start + n - 1] = per_trace[seq][1:n]
        return out

    return keep


@pytest.mark.parametrize("base", ["gspo", "clip"])
def test_shared_token_gradient_cancels_after_the_fix(setup, base):
    model, _, groups, shared = setup
    norms = {}
    for fix in ("none", "min", "orth"):
        method = make_method("tgc", base=base, fix=fix, **WIDE)
        prepared, packed = _prepass(model, method, groups)
        norms[fix] = _grad(model, method, packed, _shared_indicator(packed, prepared, shared)).norm()
        assert method._metrics["tgc/residual"] > 0
        if fix == "none":
            continue
        if not (base == "gspo" and fix == "orth"):  # gspo+orth: tokens shared by a subset keep a residual
            assert method._metrics["tgc/residual_after"] < 1e-6 * method._metrics["tgc/residual"]
        if fix == "min":  # non-vacuous: nothing clipped, so the minimum is a real weight ...
            w = [method.weights[i].fixed[list(shared[id(t)])] for i, t in enumerate(prepared.traces)]
            assert all(bool((x > 0).all()) for x in w)
            # ... and the tokens that are not shared still train
            assert _grad(model, method, packed).norm() > 1e-2 * norms["none"]
    assert norms["none"] > 1e-3
    for fix in ("min", "orth"):
        assert norms[fix] < 1e-5 * norms["none"], (fix, float(norms["none"]), float(norms[fix]))


def test_orth_cancels_clipping_asymmetry_at_published_clip_ranges(setup):
    """Mechanism 2: at the DAPO ranges some siblings' shared tokens are clipped and others not."""
    model, _, groups, shared = setup
    norms = {}
    for fix in ("none", "orth", "min"):
        method = make_method("tgc", base="clip", fix=fix)
        prepared, packed = _prepass(model, method, groups)
        norms[fix] = _grad(model, method, packed, _shared_indicator(packed, prepared, shared)).norm()
        if fix == "none":
            assert method._metrics["tgc/clipped_frac"] > 0
            assert method._metrics["tgc/shared_token_frac"] > 0.2
        else:
            assert method._metrics["tgc/residual_after"] < 1e-6
    assert norms["none"] > 1e-3 and norms["orth"] < 1e-5 * norms["none"] and norms["min"] < 1e-5 * norms["none"]


def test_tgc_metrics_through_the_update(setup):
    model, tokenizer, groups, _ = setup
    method = make_method("tgc", base="clip", fix="min")
    prepared = method.prepare(groups, None)
    m = copy.deepcopy(model)
    settings = UpdateSettings(micro_batch_tokens=256, max_new_tokens=24)
    metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.1), prepared, method, settings,
                            pad_token_id=tokenizer.pad_token_id, seed=0)
    assert metrics["tgc/residual"] > 0 and metrics["tgc/residual_after"] < 1e-6
    assert 0 < metrics["tgc/shared_token_frac"] < 1
    assert metrics["tgc/weight_mean"] <= metrics["tgc/weight_mean_base"] + 1e-6  # min never raises a weight


@pytest.mark.parametrize("name,overrides", [("tgc", {}), ("tgc", {"base": "clip"}), ("gspo", {})])
def test_kl_penalty_is_added_when_asked(setup, name, overrides):
    model, _, groups, _ = setup
    plain, with_kl = make_method(name, **overrides), make_method(name, kl_coef=0.1, **overrides)
    assert with_kl.needs_reference and not plain.needs_reference
    values = []
    for method in (plain, with_kl):
        _, packed = _prepass(model, method, groups)
        mb = packed.micro_batches[0]
        with torch.no_grad():
            logp = token_logprobs(model(**mb.model_inputs()).logits, mb.input_ids, 1.0)
        loss, metrics = method.loss(mb, logp, packed.loss_norm(), None, ref_logp=logp - 0.5)
        values.append(float(loss))
    assert metrics["kl/ref"] > 0 and values[1] > values[0]


# --- (c) the transforms on random inputs ----------------------------------------------------------------
def test_transforms_on_random_inputs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        m = int(torch.randint(2, 17, (1,), generator=gen))
        w = torch.rand(m, generator=gen, dtype=torch.float64) * 3
        adv = torch.randn(m, generator=gen, dtype=torch.float64)
        assert abs(float(adv @ adv_orthogonal(w, adv))) < 1e-12 * max(1.0, float(w.abs().sum() * adv.abs().sum()))
        assert torch.equal(min_replace(w), torch.full_like(w, float(w.min())))
        # column form with partial membership (tokens shared by some siblings)
        cols = int(torch.randint(1, 9, (1,), generator=gen))
        weights = torch.rand(m, cols, generator=gen, dtype=torch.float64)
        members = torch.rand(m, cols, generator=gen) < 0.7
        out_min = transform_columns(weights, members, adv, "min")
        out_orth = transform_columns(weights, members, adv, "orth")
        assert torch.equal(transform_columns(weights, members, adv, "none"), weights)
        for j in range(cols):
            k = members[:, j]
            if int(k.sum()) < 2:  # nothing to exchange
                assert torch.equal(out_min[:, j], weights[:, j]) and torch.equal(out_orth[:, j], weights[:, j])
                continue
            assert torch.all(out_min[k, j] == weights[k, j].min())
            centered = adv[k] - adv[k].mean()
            assert abs(float(centered @ out_orth[k, j])) < 1e-12
            assert torch.allclose(out_orth[k, j], adv_orthogonal(weights[k, j], centered))
            assert torch.equal(out_min[~k, j], weights[~k, j]) and torch.equal(out_orth[~k, j], weights[~k, j])
    # centered advantages (a whole group): the centered projection is Eq. 18 itself
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    w = torch.tensor([0.3, 1.2, 0.7, 2.0], dtype=torch.float64)
    got = transform_columns(w[:, None], torch.ones(4, 1, dtype=torch.bool), adv, "orth")[:, 0]
    assert torch.allclose(got, w - (adv @ w) / (adv @ adv) * adv) and abs(float(adv @ got)) < 1e-12
    assert torch.equal(adv_orthogonal(w, torch.zeros(4, dtype=torch.float64)), w)  # no advantage: unchanged


# --- (d) the prefix trie ----------------------------------------------------------------------------
def test_trie_finds_exactly_the_shared_prefix_tokens():
    seqs = [
        [1, 2, 3, 4, 5],      # 0
        [1, 2, 3, 9, 9],      # 1
        [1, 2, 7, 4, 5],      # 2: same tokens 4, 5 as 0 later, but after a different prefix
        [1, 2, 3, 4, 6, 8],   # 3: token 2 is not sampled here (e.g. template text)
        [1, 2, 3],            # 4: a prefix of the others, ends early
        [5, 2, 3, 4, 5],      # 5: different first token: shares nothing
    ]
    masks = [
        [0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 1, 0],
        [0, 1, 1, 1, 1],
    ]
    got = shared_tokens(seqs, masks)
    assert got == [(1, (0, 1, 2, 4)),   # token 2 after [1]: sampled in 0, 1, 2, 4 (not 3)
                   (2, (0, 1, 3)),      # token 3 after [1, 2]: 4 has it as a prompt token
                   (3, (0, 3))]         # token 4 after [1, 2, 3]; then 0 and 3 diverge (5 vs 6)
    assert shared_tokens([[1, 2, 3]], [[0, 1, 1]]) == []
    assert shared_tokens([[1, 2], [1, 2]], [[0, 0], [0, 0]]) == []  # shared, but never sampled


def test_trie_on_the_fixture_finds_the_spliced_prefix(setup):
    _, _, groups, shared = setup
    for g in groups:
        traces = [e.trace for e in g.episodes]
        found = shared_tokens([t.input_ids for t in traces], [t.mask for t in traces])
        by_pos = {p: members for p, members in found}
        for p in shared[id(traces[0])]:
            assert by_pos[p] == (0, 1, 2, 3)


# --- settings ----------------------------------------------------------------------------------------
def test_settings_and_errors():
    rows = {r["method"]: r for r in method_catalog()}
    assert rows["tgc"]["paper"] == "2604.13088" and rows["gspo"]["paper"] == "2507.18071"
    assert rows["tgc"]["defaults"]["fix"] == "min" and rows["tgc"]["defaults"]["base"] == "gspo"
    assert make_method("tgc").needs_prepass and not make_method("gspo").needs_prepass
    assert parse_method_args("tgc", ["fix=orth", "base=clip", "clip_high=0.3"]) == {"fix": "orth", "base": "clip",
                                                                                    "clip_high": 0.3}
    for bad in ({"fix": "max"}, {"base": "grpo"}, {"base": "gspo", "loss_agg": "token-mean"},
                {"loss_agg": "mean"}, {"clip_low": 1.5}, {"gamma": 1.0}):
        with pytest.raises(ConfigError):
            make_method("tgc", **bad)
    with pytest.raises(ConfigError):
        make_method("gspo", loss_agg="token-mean")
    with pytest.raises(ConfigError):
        parse_method_args("tgc", ["nope=1"])


def test_gspo_dual_clip_bounds_a_negative_sequence_with_a_stale_ratio():
    """GSPO's sequence ratio s_i under the dual clip: A < 0 and s > c loses −c·A with no gradient;
    below c, and for A > 0, the plain GSPO loss."""
    from trainers.losses import LossNorm
    from trainers.methods.tgc import gspo_loss

    # three sequences of 2 tokens: s = 5 with A = −1, s = 2 with A = −1, s = 5 with A = +1
    log_s = torch.tensor([5.0, 5.0, 2.0, 2.0, 5.0, 5.0]).log()
    logp = log_s.clone()[None].requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 1.0, 1.0]])
    seq = torch.tensor([[0, 0, 1, 1, 2, 2]])
    args = (logp, torch.zeros_like(logp), adv, torch.ones_like(adv), seq, LossNorm(6, 3))
    loss, metrics = gspo_loss(*args, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.all(g[0, :2] == 0) and torch.all(g[0, 2:4] != 0) and torch.all(g[0, 4:] == 0)
    assert metrics["clip/frac"].item() == pytest.approx(2 / 3)
    plain, _ = gspo_loss(*args, eps_low=0.2, eps_high=0.2)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)


def test_fix_none_with_stale_ratios_is_the_dual_clipped_surrogate(setup):
    """With old log-probs far from the policy (ratios up to e^4), TGC's clip base must drop the
    tokens the dual clip stops (A < 0, r > 3): its gradient is clipped_surrogate's with dual_clip=3."""
    model, _, groups, _ = setup
    gen = torch.Generator().manual_seed(5)
    stale = [Group(task_id=g.task_id, group_id=g.group_id, episodes=[
        replace(e, trace=replace(e.trace, logprobs=(torch.tensor(e.trace.logprobs) - 1.5 * torch.randn(
            len(e.trace), generator=gen) * torch.tensor(e.trace.mask)).tolist())) for e in g.episodes])
        for g in groups]
    tgc = make_method("tgc", base="clip", fix="none", loss_agg="token-mean")
    assert tgc.settings["dual_clip"] == 3.0
    _, packed = _prepass(model, tgc, stale)
    g_tgc = _grad(model, tgc, packed)
    norm = packed.loss_norm()

    def surrogate_grad(dual_clip):
        model.zero_grad(set_to_none=True)
        stopped = 0.0
        for mb in packed.micro_batches:
            logp = token_logprobs(model(**mb.model_inputs()).logits, mb.input_ids, 1.0)
            loss, m = policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg="token-mean",
                                  norm=norm, seq_index=mb.seq_index, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
            loss.backward()
            stopped += float(m["clip/frac_dual"]) * float(m["tokens"])
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return grad, stopped

    g_dual, stopped = surrogate_grad(3.0)
    g_plain, _ = surrogate_grad(0.0)
    assert stopped > 0 and not _close(g_plain, g_dual)  # the dual clip is active on this batch
    assert _close(g_tgc, g_dual)
