"""The GRPO family's shared per-token advantage hook (``trainers.token_credit``) and the
group-preserving mini-batch split (``trainers.update``), on a tiny real model and real toy episodes.

1. The hook is detached: no gradient reaches the multiplier, and the policy gradient is the one of
   the fixed advantage A · m_t.
2. It composes with any GRPO-family loss: a credit method built on Dr.GRPO's settings with a
   constant multiplier c steps exactly c times Dr.GRPO's own gradient (same aggregation, same
   constant normaliser); RLSD, SGCD and RLCSD all go through it.
3. A method that declares ``whole_groups`` gets every sibling group inside one mini-batch when
   ``--mini-batches`` > 1; one that does not still gets the trace shuffle (which does split groups,
   so the check is not vacuous).
Run: .venv/bin/python -m pytest tests/test_token_credit.py
"""

from __future__ import annotations

import pytest
import torch
from toy_groups import toy_rollouts, update_capturing_grads

from trainers.losses import policy_loss
from trainers.methods import make_method
from trainers.methods.grpo import GRPOMethod
from trainers.methods.rlcsd import RLCSDMethod
from trainers.methods.rlsd import RLSDMethod
from trainers.methods.sgcd import SGCDMethod
from trainers.methods.tgc import TGCMethod
from trainers.packing import pack
from trainers.token_credit import modulated_advantage
from trainers.update import UpdateSettings


@pytest.fixture(scope="module")
def toy(tiny_toy_dir):
    return toy_rollouts(tiny_toy_dir, 3)  # 3 groups of 4, rewards 1, 0, 1, 0


def test_the_multiplier_is_detached_and_only_scales_the_advantage(toy):
    trace = toy.groups[0].episodes[0].trace
    m = torch.linspace(0.5, 1.5, trace.response_tokens).requires_grad_(True)
    adv = modulated_advantage(trace, -0.7, m)
    assert not adv.requires_grad  # cut from m's graph
    packed = pack([trace], [adv], 4096, pad_token_id=0)
    mb = packed.micro_batches[0]
    logp = mb.old_logprobs.clone().requires_grad_(True)  # on-policy: ratio 1
    loss, _ = policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg="token-mean",
                          norm=packed.loss_norm(), seq_index=mb.seq_index)
    loss.backward()
    assert m.grad is None
    # d loss / d logp_t = -A m_t / N at sampled tokens: the gradient of a fixed per-token advantage
    expected = torch.zeros_like(logp)
    expected[mb.loss_mask > 0] = 0.7 * m.detach() / trace.response_tokens
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert modulated_advantage(trace, 0.3, None) == 0.3  # no multiplier: GRPO's scalar credit
    with pytest.raises(ValueError):
        modulated_advantage(trace, 0.3, -torch.ones(trace.response_tokens))  # would flip the sign


class _ConstantCredit(GRPOMethod):
    """A credit method on any GRPO preset's settings: every token's multiplier is ``c``."""

    c = 1.0

    def token_multipliers(self, kept, ctx, metrics):
        return {(g, k): torch.full((e.trace.response_tokens,), self.c) for g, (_, scored, _) in enumerate(kept)
                for k, e in enumerate(scored) if e.trace.response_tokens}


def test_the_hook_composes_with_another_presets_loss(toy):
    dr_grpo = make_method("dr_grpo")
    composed = _ConstantCredit("dr_grpo_x3", dr_grpo.cfg)
    composed.c = 3.0
    settings = UpdateSettings(micro_batch_tokens=4096, max_new_tokens=24, grad_clip=1e9)  # compare unclipped
    pad = toy.tokenizer.pad_token_id
    _, base, _ = update_capturing_grads(toy.model, dr_grpo, dr_grpo.prepare(toy.groups, None), settings,
                                        pad_token_id=pad)
    _, grads, _ = update_capturing_grads(toy.model, composed, composed.prepare(toy.groups, None), settings,
                                         pad_token_id=pad)
    assert composed.loss_constant(24) == 24.0  # Dr.GRPO's constant normaliser is untouched
    assert max(float(g.abs().max()) for g in base.values()) > 0
    for name, g in base.items():
        assert torch.allclose(grads[name], 3.0 * g, atol=1e-6, rtol=1e-4), name
    # the credit methods all go through the one hook
    for cls in (RLSDMethod, SGCDMethod, RLCSDMethod):
        assert cls.token_multipliers is not GRPOMethod.token_multipliers and cls.prepare.__qualname__ in (
            "GRPOMethod.prepare", "SGCDMethod.prepare")


class _RecordingMethod(GRPOMethod):
    """GRPO that records which traces each mini-batch trains (through the pre-pass hook)."""

    needs_prepass = True

    def begin_minibatch(self, packed, logps, ctx):
        self.seen.append(sorted(seq for mb in packed.micro_batches for seq, _, _ in mb.spans))


def _minibatches(toy, whole_groups: bool) -> tuple[list[list[int]], list[int]]:
    method = _RecordingMethod("grpo", make_method("grpo").cfg)
    method.whole_groups = whole_groups
    method.seen = []
    prepared = method.prepare(toy.groups, None)
    update_capturing_grads(toy.model, method, prepared, UpdateSettings(micro_batch_tokens=4096, max_new_tokens=24,
                                                                       mini_batches=2), pad_token_id=0, seed=5)
    return method.seen, prepared.groups


def test_a_method_that_needs_whole_groups_gets_them_in_every_minibatch(toy):
    seen, groups = _minibatches(toy, whole_groups=True)
    assert len(seen) == 2 and sorted(i for chunk in seen for i in chunk) == list(range(len(groups)))
    for chunk in seen:
        for g in {groups[i] for i in chunk}:  # every group present is present whole
            assert {i for i, h in enumerate(groups) if h == g} <= set(chunk)
    # without the declaration the traces are shuffled: here some group is split (not a vacuous check)
    shuffled, _ = _minibatches(toy, whole_groups=False)
    assert any(not {i for i, h in enumerate(groups) if h == g} <= set(chunk)
               for chunk in shuffled for g in {groups[i] for i in chunk})
    assert TGCMethod.whole_groups and RLCSDMethod.whole_groups and not GRPOMethod.whole_groups
