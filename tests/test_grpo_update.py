"""The GRPO presets end to end through ``prepare`` and ``policy_update``, on a bigram model.

What the math tests (tests/test_grpo_math.py) check on the pure functions, this checks on the
wiring: each preset's advantages come out of ``Method.prepare`` as its formula says, and
``policy_update`` divides by the normaliser the preset declares (token-mean: all loss tokens;
seq-mean-token-mean: sequences; Dr.GRPO: sequences × --max-new-tokens), summed exactly over
several micro-batches. The expected loss and its gradient are written out by hand from the same
model's log-probs, one sequence at a time. Also: dual-clip on negative advantages and DAPO's
overlong punishment and filtering, through the method. The model is a real torch module (an
embedding table read as next-token logits), so each test takes a fraction of a second.
Run: .venv/bin/python -m pytest -q tests/test_grpo_update.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from harness.errors import ConfigError
from harness.policy.trace import TokenTrace
from harness.types import EpisodeResult, Group, Score, Termination
from trainers.advantages import overlong_penalty
from trainers.losses import token_logprobs
from trainers.methods import MethodContext, make_method
from trainers.update import UpdateSettings, policy_update

VOCAB = 11
REWARDS = [1.0, 0.0, 0.5, 0.0]
RESPONSE_LENGTHS = [2, 5, 3, 7]  # sampled tokens per episode: the three normalisers differ
PROMPT = [1, 2]
MAX_NEW_TOKENS = 16
CTX = MethodContext(max_new_tokens=MAX_NEW_TOKENS)


class Bigram(torch.nn.Module):
    """Next-token logits = a learned row per current token (position ids and masks are ignored)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=gen))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def _response_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log π of each sampled token of a prompt + response sequence (with gradient)."""
    return token_logprobs(model(torch.tensor([ids])).logits, torch.tensor([ids]))[0, len(PROMPT) - 1:]


def _group(model, ratio_offsets) -> tuple[Group, list[torch.Tensor]]:
    """One group of 4 episodes; episode i's recorded sampling log-probs are the model's minus
    ``ratio_offsets[i]`` (so the update's ratio on those tokens is exp(offset))."""
    gen = torch.Generator().manual_seed(1)
    episodes, offsets = [], []
    for i, (reward, n) in enumerate(zip(REWARDS, RESPONSE_LENGTHS)):
        response = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        with torch.no_grad():
            logp = _response_logprobs(model, PROMPT + response)
        offset = ratio_offsets[i] if torch.is_tensor(ratio_offsets[i]) else torch.full((n,), float(ratio_offsets[i]))
        trace = TokenTrace()
        trace.add_prompt(PROMPT)
        trace.add_response(response, (logp - offset).tolist())
        episodes.append(EpisodeResult(task_id="t", trial=i, seed=i, messages=[], termination=Termination.AGENT_STOP,
                                      score=Score(reward=reward, success=reward == 1.0), group_id="g", trace=trace))
        offsets.append(offset)
    return Group(task_id="t", group_id="g", episodes=episodes), offsets


def _update(model, method, prepared, **settings):
    """One ``policy_update`` with SGD(lr=1) on ``model``: (metrics, the gradient it stepped with)."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.table.detach().clone()
    settings = UpdateSettings(**{"micro_batch_tokens": 12, "grad_clip": 1e9, "max_new_tokens": MAX_NEW_TOKENS,
                                 **settings})
    metrics = policy_update(model, opt, prepared, method, settings, pad_token_id=0, seed=0)
    return metrics, before - model.table.detach()


DEV = [r - 0.375 for r in REWARDS]                   # mean 0.375
STD = math.sqrt(sum(d * d for d in DEV) / 4)         # population std
HAND_ADVANTAGES = {
    "grpo": [d / (STD + 1e-6) for d in DEV],
    "dr_grpo": DEV,
    "dapo": [d / (STD + 1e-6) for d in DEV],
    "rloo": [(r - (sum(REWARDS) - r) / 3) for r in REWARDS],  # leave-one-out, no std
}


def _hand_loss(preset, model, group, advantages):
    """The preset's batch loss written out: per-token −r_t A_i (every ratio here is inside the clip)."""
    per_seq = []
    for episode, a in zip(group.episodes, advantages):
        trace = episode.trace
        logp = _response_logprobs(model, trace.input_ids)
        old = torch.tensor([trace.logprobs[p] for p in trace.sampled_positions])
        per_seq.append(-(torch.exp(logp - old) * a))
    n_seqs, n_tokens = len(per_seq), sum(len(s) for s in per_seq)
    if preset in ("dapo", "rloo"):      # token-mean: over every loss token of the batch
        return sum(s.sum() for s in per_seq) / n_tokens
    if preset == "grpo":                # seq-mean-token-mean: each sequence's mean, over sequences
        return sum(s.mean() for s in per_seq) / n_seqs
    assert preset == "dr_grpo"          # token sums over sequences × the generation budget
    return sum(s.sum() for s in per_seq) / (n_seqs * MAX_NEW_TOKENS)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "rloo"])
def test_presets_advantages_and_normaliser_through_prepare_and_update(preset):
    model = Bigram()
    gen = torch.Generator().manual_seed(2)
    # ratios in [0.9, 1.1]: off 1 so that seq-mean losses do not cancel, inside every clip
    group, _ = _group(model, [(torch.rand(n, generator=gen) - 0.5) / 5 for n in RESPONSE_LENGTHS])
    method = make_method(preset)
    prepared = method.prepare([group], CTX)  # (no turn is near the limit: DAPO's length reward is 0)
    assert prepared.advantages == pytest.approx(HAND_ADVANTAGES[preset], rel=1e-6)

    expected = _hand_loss(preset, model, group, HAND_ADVANTAGES[preset])
    (expected_grad,) = torch.autograd.grad(expected, model.table)
    metrics, grad = _update(model, method, prepared)
    assert metrics["loss/policy"] == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert metrics["tokens/trained"] > 12  # several micro-batches: their shares summed to the batch's


def test_grad_clip_zero_means_no_clipping_and_a_positive_one_clips_the_norm():
    gen = torch.Generator().manual_seed(3)
    offsets = [(torch.rand(n, generator=gen) - 0.5) / 5 for n in RESPONSE_LENGTHS]
    method = make_method("grpo")

    def step(grad_clip: float):
        model = Bigram()  # the same start each time
        group, _ = _group(model, offsets)
        return _update(model, method, method.prepare([group], CTX), grad_clip=grad_clip)

    metrics, free = step(1e9)
    assert metrics["grad/norm"] == pytest.approx(float(free.norm()), rel=1e-4) and free.norm() > 0.05
    _, off = step(0)
    assert torch.allclose(off, free, atol=1e-7)  # 0 turns clipping off; it does not clip to zero
    _, clipped = step(float(free.norm()) / 4)
    assert float(clipped.norm()) == pytest.approx(float(free.norm()) / 4, rel=1e-4)


@pytest.mark.parametrize("preset", ["grpo", "dapo"])
def test_dual_clip_stops_negative_advantages_with_a_stale_ratio(preset):
    """Every ratio 5 (a stale batch): A > 0 tokens are clipped at 1 + ε_high as always; A < 0 tokens
    would lose −5·A and push further, the dual clip caps them at −3·A with no gradient."""
    model = Bigram()
    group, _ = _group(model, [math.log(5.0)] * 4)
    method = make_method(preset)
    assert method.settings["dual_clip"] == 3.0
    prepared = method.prepare([group], CTX)
    adv = prepared.advantages
    metrics, grad = _update(model, method, prepared)
    assert torch.count_nonzero(grad) == 0
    high = 1 + method.settings["clip_high"]
    per_seq = [torch.full((n,), -(high if a > 0 else 3.0) * a) for a, n in zip(adv, RESPONSE_LENGTHS)]
    expected = (sum(s.sum() for s in per_seq) / sum(RESPONSE_LENGTHS) if preset == "dapo"
                else sum(s.mean() for s in per_seq) / 4)
    assert metrics["loss/policy"] == pytest.approx(float(expected), rel=1e-5)
    negative_tokens = sum(n for a, n in zip(adv, RESPONSE_LENGTHS) if a < 0) / sum(RESPONSE_LENGTHS)
    assert metrics["clip/frac_dual"] == pytest.approx(negative_tokens)
    # without it the negative-advantage tokens keep pushing
    off = make_method(preset, dual_clip=0.0)
    _, grad = _update(Bigram(), off, off.prepare([group], CTX))
    assert torch.count_nonzero(grad) > 0


# --- DAPO's overlong handling ---------------------------------------------------------------------
def test_soft_overlong_punishment_by_hand():
    """DAPO eq. 13 with L_max = 20, L_cache = 4: 0 up to 16 tokens, then −1/4 per token, −1 at and beyond 20."""
    values = {0: 0.0, 10: 0.0, 16: 0.0, 17: -0.25, 18: -0.5, 19: -0.75, 20: -1.0, 25: -1.0}
    assert {n: overlong_penalty(n, 20, 4) for n in values} == values
    with pytest.raises(ValueError, match="L_cache"):
        overlong_penalty(5, 20, 0)


def _turns_episode(trial: int, reward: float, turn_lengths: list[int], truncated: bool) -> EpisodeResult:
    trace = TokenTrace()
    trace.add_prompt(PROMPT)
    for n in turn_lengths:
        trace.add_response([3] * n, [-1.0] * n)
        trace.add_prompt([4, 5])  # the tool result between turns
    trace.truncated = truncated
    return EpisodeResult(task_id="t", trial=trial, seed=trial, messages=[], termination=Termination.AGENT_STOP,
                         score=Score(reward=reward, success=reward == 1.0), group_id="g", trace=trace)


def test_dapo_shapes_rewards_by_the_longest_turn_and_filters_truncated_episodes():
    """--max-new-tokens 10, so L_max = 10 per turn and L_cache = 0.2 · 10 = 2: a turn of 9 tokens
    costs −0.5, a truncated one (10) −1 and does not train, but still counts in the baseline."""
    episodes = [_turns_episode(0, 1.0, [3, 9], False),   # longest turn 9: −0.5
                _turns_episode(1, 0.0, [4, 10], True),   # truncated: −1, filtered
                _turns_episode(2, 0.5, [2], False),      # 0
                _turns_episode(3, 0.0, [8, 1], False)]   # 8 = L_max − L_cache: 0
    group = Group(task_id="t", group_id="g", episodes=episodes)
    shaped = torch.tensor([0.5, -1.0, 0.5, 0.0])
    hand = (shaped - shaped.mean()) / (shaped.std(correction=0) + 1e-6)
    dapo = make_method("dapo")
    assert dapo.settings["overlong_buffer"] == 0.2 and dapo.settings["overlong_filter"] is True
    prepared = dapo.prepare([group], MethodContext(max_new_tokens=10))
    assert [id(t) for t in prepared.traces] == [id(episodes[i].trace) for i in (0, 2, 3)]
    assert prepared.advantages == pytest.approx(hand[[0, 2, 3]].tolist(), rel=1e-5)
    assert prepared.metrics["overlong/filtered"] == 1
    assert prepared.metrics["overlong/punished_frac"] == pytest.approx(0.5)
    assert prepared.metrics["overlong/penalty_mean"] == pytest.approx(-1.5 / 4)
    # GRPO leaves both off: unshaped rewards, the truncated episode trains
    grpo = make_method("grpo").prepare([group], MethodContext(max_new_tokens=10))
    raw = torch.tensor([1.0, 0.0, 0.5, 0.0])
    assert grpo.advantages == pytest.approx(((raw - raw.mean()) / (raw.std(correction=0) + 1e-6)).tolist(), rel=1e-5)
    assert len(grpo.traces) == 4 and not any(k.startswith("overlong/") for k in grpo.metrics)
    # each is its own setting
    only_filter = make_method("dapo", overlong_buffer=0.0).prepare([group], None)
    assert len(only_filter.traces) == 3
    with pytest.raises(ConfigError, match="max-new-tokens"):
        dapo.prepare([group], None)
