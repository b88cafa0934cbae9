"""RLCSD (arXiv 2606.11709): what defines it, on a tiny real model and real toy episodes.

1. A hint that is equally present for correct and incorrect siblings gives no credit: when every
   sibling's rollout renders to the same hint text, the contrast is exactly 0, every multiplier is
   exactly 1 and the credit is GRPO's, bit for bit; the same for the placebo arm (the teacher is
   given nothing to know).
2. With real, different hints the credit moves (so 1 is not vacuous), keeps the reward's sign on
   every token and stays in the clamp [1 − ε, 1 + ε] · A.
3. The contrast is the teacher's log-prob of each sampled token under the correct sibling's hint
   minus its mean under the incorrect siblings' hints (recomputed by hand, with the hints the
   method must pick: the first other success, the other failures).
Rollouts come from the untrained tiny toy policy with rewards rewritten 1, 0, 1, 0 per group of 4
(toy_groups.py), so each trajectory has another correct and another incorrect sibling.
Run: .venv/bin/python -m pytest tests/test_rlcsd.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from toy_groups import toy_rollouts

from harness.errors import ConfigError
from harness.types import Group
from trainers.methods import MethodContext, make_method
from trainers.methods.rlcsd import HINT_HEADER, contrast_multipliers
from trainers.sgcd_reference import rollout_text
from trainers.teacher import sampled_token_logprobs


@pytest.fixture(scope="module")
def toy(tiny_toy_dir):
    return toy_rollouts(tiny_toy_dir, 2)


def _ctx(toy):
    return MethodContext(model=toy.model, tokenizer=toy.tokenizer, temperature=1.0, micro_batch_tokens=4096,
                         tasks=toy.tasks, step=1)


def _grpo(groups):
    return make_method("grpo").prepare(groups, None)


def _sampled(trace, adv):
    return torch.as_tensor(adv)[torch.as_tensor(trace.sampled_positions)]


def _same_hint_everywhere(groups):
    """The same groups (same traces, same rewards), with every sibling's recorded conversation
    replaced by the first sibling's: every hint, correct or not, renders to one text."""
    return [Group(task_id=g.task_id, group_id=g.group_id,
                  episodes=[replace(e, messages=list(g.episodes[0].messages)) for e in g.episodes]) for g in groups]


@pytest.fixture(scope="module")
def sibling_credit(toy):
    return make_method("rlcsd").prepare(toy.groups, _ctx(toy))


# --- 1. no information, no credit -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["identical_hints", "placebo"])
def test_a_hint_equally_present_for_correct_and_incorrect_siblings_gives_grpo_exactly(toy, how):
    groups = _same_hint_everywhere(toy.groups) if how == "identical_hints" else toy.groups
    method = make_method("rlcsd", hints="placebo" if how == "placebo" else "siblings")
    out = method.prepare(groups, _ctx(toy))
    grpo = _grpo(groups)
    assert out.metrics["rlcsd/hinted"] == len(out.traces) > 0  # every trajectory went through the teacher
    assert out.metrics["rlcsd/contrast_abs_mean"] == 0.0 and out.metrics["rlcsd/w_mean"] == 1.0
    for trace, adv, a in zip(out.traces, out.advantages, grpo.advantages):
        assert torch.equal(_sampled(trace, adv), torch.full((trace.response_tokens,), float(a)))


def test_contrast_of_identical_logprobs_is_exactly_one():
    lp = torch.randn(7) * 3
    for a in (1.3, -0.4):
        m, c = contrast_multipliers(a, lp, [lp.clone(), lp.clone(), lp.clone()], 0.2)
        assert torch.equal(c, torch.zeros(7)) and torch.equal(m, torch.ones(7))


# --- 2. real hints: credit moves, the sign holds, the clamp holds -----------------------------------
def test_sibling_hints_move_credit_inside_the_clamp_and_keep_the_sign(toy, sibling_credit):
    out, grpo = sibling_credit, _grpo(toy.groups)
    moved = 0
    for trace, adv, a in zip(out.traces, out.advantages, grpo.advantages):
        assert a != 0
        ratio = _sampled(trace, adv) / a
        assert torch.all(ratio >= 0.8 - 1e-6) and torch.all(ratio <= 1.2 + 1e-6)  # > 0: sign(Â) = sign(A)
        assert torch.all(torch.sign(_sampled(trace, adv)) == torch.sign(torch.tensor(a)))
        moved += int(((ratio - 1).abs() > 1e-6).sum())
    assert moved > 0 and out.metrics["rlcsd/contrast_abs_mean"] > 0


def test_multiplier_sign_follows_the_advantage_and_is_clamped():
    c = torch.tensor([-5.0, -0.1, 0.0, 0.1, 5.0])
    correct, wrong = c, [torch.zeros(5)]
    up, _ = contrast_multipliers(1.0, correct, wrong, 0.2)
    down, _ = contrast_multipliers(-1.0, correct, wrong, 0.2)
    e = torch.exp(torch.tensor(0.1)).item()
    assert torch.allclose(up, torch.tensor([0.8, 1 / e, 1.0, e, 1.2]))  # A > 0: exp(c), clamped
    assert torch.allclose(down, torch.tensor([1.2, e, 1.0, 1 / e, 0.8]))  # A < 0: exp(-c), clamped


# --- 3. the contrast by hand ------------------------------------------------------------------------
def test_contrast_is_correct_hint_minus_mean_incorrect_hints(toy, sibling_credit):
    group = toy.groups[1]
    scored = group.episodes
    k = 0  # a success (rewards 1, 0, 1, 0): its correct hint is sibling 2 (never itself), its incorrect ones 1, 3
    trace = scored[k].trace
    a = _grpo([group]).advantages[k]
    hints = [rollout_text(scored[j]) for j in (2, 1, 3)]
    assert hints[0] != rollout_text(scored[k])  # so a method that hinted with the own rollout would differ
    lps = sampled_token_logprobs(toy.model, [trace] * 3, temperature=1.0, micro_batch_tokens=4096,
                                 tokenizer=toy.tokenizer, notes=hints, header=HINT_HEADER)
    c = ((lps[0] - lps[1]) + (lps[0] - lps[2])) / 2
    expected = a * torch.exp(torch.sign(torch.tensor(a)) * c).clamp(0.8, 1.2)
    adv = sibling_credit.advantages[[id(t) for t in sibling_credit.traces].index(id(trace))]
    assert torch.allclose(_sampled(trace, adv), expected, atol=1e-5)


def test_bad_settings_are_config_errors():
    for bad in ({"eps_w": 1.0}, {"hints": "oracle"}, {"wrong_hints": 0}):
        with pytest.raises(ConfigError):
            make_method("rlcsd", **bad)
