"""GRPO-family math: advantages, token log-probs, clipped surrogate, KL estimators, aggregation.

Values are checked against hand computations and closed forms; the aggregation test checks the
gradient-accumulation identity (sum of micro-batch losses == full-batch loss, same gradient).
Run: .venv/bin/python -m pytest tests/test_grpo_math.py
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from trainers import losses
from trainers.advantages import group_advantages, group_std, zero_variance_groups
from trainers.losses import (
    LossNorm,
    aggregate,
    clipped_surrogate,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    token_logprobs,
)
from trainers.method_settings import GRPOSettings


# --- advantages -----------------------------------------------------------------------------------
def test_grpo_advantages_by_hand():
    r = [1.0, 0.0, 0.0, 1.0]  # mean 0.5, population std 0.5
    assert torch.allclose(group_advantages(r, eps=0.0), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # sample-std convention (divide by G-1): std = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert torch.allclose(group_advantages(r, eps=0.0, unbiased=True), torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    r = [1.0, 0.0, 0.0]  # mean 1/3, population std sqrt(2)/3
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (math.sqrt(2) / 3)
    assert torch.allclose(group_advantages(r, eps=0.0), expected)


def test_dr_grpo_and_rloo_by_hand():
    r = [0.0, 0.5, 1.0, 0.5]  # mean 0.5
    assert torch.allclose(group_advantages(r, normalize_std=False), torch.tensor([-0.5, 0.0, 0.5, 0.0]))
    # RLOO: r_i - mean of the other three
    loo = torch.tensor([0.0 - 2 / 3, 0.5 - 0.5, 1.0 - 1 / 3, 0.5 - 0.5])
    assert torch.allclose(group_advantages(r, normalize_std=False, baseline="loo"), loo)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages([1.0], baseline="loo")
    with pytest.raises(ValueError, match="unknown baseline"):
        group_advantages(r, baseline="median")


def test_zero_variance_groups_and_batched():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]])
    assert zero_variance_groups(rewards).tolist() == [True, True, True, False]
    adv = group_advantages(rewards)
    assert torch.all(adv[:3] == 0)  # zero-variance: no signal, no NaN
    assert torch.allclose(adv[3], group_advantages(rewards[3]))
    assert torch.allclose(group_std(rewards[3]), torch.tensor(math.sqrt(1 / 18)))  # deviations -1/3, 1/6, 1/6


# --- token log-probs and entropy ------------------------------------------------------------------
def test_token_logprobs_match_log_softmax_and_grad(monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS_CPU", 3 * 11)  # force several chunks per row
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 7))
    for t in (1.0, 0.7):
        logp, ent = token_logprobs(logits, ids, t, with_entropy=True)
        ref = torch.log_softmax(logits[:, :-1] / t, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert torch.allclose(logp.double(), ref, atol=1e-6)
        p = torch.softmax(logits[:, :-1] / t, -1)
        assert torch.allclose(ent.double(), -(p * p.log()).sum(-1), atol=1e-6)
        assert torch.allclose(entropy_from_logits(logits, t)[:, :-1].double(), ent.double(), atol=1e-6)
        w = torch.randn(2, 6, dtype=torch.float64)
        (g,) = torch.autograd.grad((logp * w).sum(), logits)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
        assert torch.allclose(g, g_ref, atol=1e-5)
    # float32 at T=1 writes the gradient in place; bf16 logits are read in float32
    x32 = logits.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(token_logprobs(x32, ids).sum(), x32)
    ref32 = torch.log_softmax(x32[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum()
    (g32_ref,) = torch.autograd.grad(ref32, x32)
    assert torch.allclose(g32, g32_ref, atol=1e-6) and torch.all(g32[:, -1] == 0)
    xb = logits.detach().bfloat16().requires_grad_()
    lb = token_logprobs(xb, ids)
    assert lb.dtype == torch.float32
    ref_b = torch.log_softmax(xb.float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lb, ref_b, atol=1e-6)
    (gb,) = torch.autograd.grad(lb.sum(), xb)
    assert gb.dtype == torch.bfloat16


# --- clipped surrogate ----------------------------------------------------------------------------
def test_clipped_surrogate_values_and_clip_frac():
    eps_low, eps_high = 0.2, 0.28
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.2, 1.5, 0.5, 0.9, 1.2, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    logp = ratios.log().requires_grad_()
    per_token, m = clipped_surrogate(logp, torch.zeros(9), adv, torch.ones(9), eps_low=eps_low, eps_high=eps_high)
    # A>0: -min(r, clip(r)) ; A<0: -min(-r, -clip(r)) = max(r, clip(r))
    expected = torch.tensor([-0.5, -0.9, -1.0, -1.2, -1.28, 0.8, 0.9, 1.2, 1.5])
    assert torch.allclose(per_token, expected)
    # clipped (no gradient): A>0 & r>1.28 (index 4); A<0 & r<0.8 (index 5)
    (g,) = torch.autograd.grad(per_token.sum(), logp)
    assert torch.allclose(g[[4, 5]], torch.zeros(2))
    assert torch.all(g[[0, 1, 2, 3, 6, 7, 8]] != 0)
    assert m["clip/frac"].item() == pytest.approx(2 / 9)
    assert m["clip/frac_high"].item() == pytest.approx(1 / 9)
    assert m["clip/frac_low"].item() == pytest.approx(1 / 9)
    assert m["ratio/mean"].item() == pytest.approx(ratios.mean().item())
    assert m["ratio/max"].item() == pytest.approx(1.5)
    # masked tokens do not count in the metrics
    mask = torch.tensor([1.0, 1, 1, 1, 0, 1, 1, 1, 0])
    _, m = clipped_surrogate(logp, torch.zeros(9), adv, mask, eps_low=eps_low, eps_high=eps_high)
    assert m["clip/frac"].item() == pytest.approx(1 / 7)
    assert m["ratio/max"].item() == pytest.approx(1.2)


def test_dual_clip_bounds_negative_advantages_only():
    """Dual-clip PPO (Ye et al. 2020; verl clip_ratio_c = 3): for A < 0 and r > c the loss is −c·A
    and its gradient w.r.t. the ratio is 0; below c, and for every A > 0, nothing changes."""
    eps_low, eps_high, c = 0.2, 0.28, 3.0
    ratios = torch.tensor([0.5, 1.0, 2.0, 2.9, 3.5, 10.0, 0.5, 1.0, 2.0, 3.5, 10.0])
    adv = torch.tensor([-1.0] * 6 + [2.0] * 5)
    ratio = ratios.clone().requires_grad_()
    log_r = ratio.log()
    per_token, m = clipped_surrogate(log_r, torch.zeros(11), adv, torch.ones(11), eps_low=eps_low,
                                     eps_high=eps_high, dual_clip=c)
    # A < 0: max(r, clip(r)) * |A| up to c, then c * |A|; A > 0: -min(r, clip(r)) * A, as without dual-clip
    expected = torch.tensor([0.8, 1.0, 2.0, 2.9, 3.0, 3.0, -1.0, -2.0, -2.56, -2.56, -2.56])
    assert torch.allclose(per_token, expected)
    (g,) = torch.autograd.grad(per_token.sum(), ratio)
    assert torch.all(g[[4, 5]] == 0)                                     # bounded: no gradient
    assert torch.allclose(g[[1, 2, 3]], torch.ones(3))                   # d(-rA)/dr = -A = 1
    plain, _ = clipped_surrogate(log_r, torch.zeros(11), adv, torch.ones(11), eps_low=eps_low, eps_high=eps_high,
                                 dual_clip=0)
    assert torch.equal(per_token[6:], plain[6:])                         # A > 0 unchanged
    assert plain[5].item() == pytest.approx(10.0)                        # without it: unbounded
    assert m["clip/frac_dual"].item() == pytest.approx(2 / 11)
    assert m["clip/frac"].item() == pytest.approx(6 / 11)                # 0.5 low; 3.5, 10 dual; 2, 3.5, 10 high


# --- KL estimators --------------------------------------------------------------------------------
def test_kl_estimators_closed_forms():
    logp, ref = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -1.0, -0.1])
    lr = logp - ref
    assert torch.allclose(kl_penalty(logp, ref, "k1"), lr)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * lr ** 2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    # expectations under q = pi_theta: E[k1] = E[k3] = KL(q||p) exactly, E[k2] = E[log^2(q/p)]/2
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = (q * (q / p).log()).sum()
    assert torch.allclose((q * kl_penalty(q.log(), p.log(), "k1")).sum(), kl)
    assert torch.allclose((q * kl_penalty(q.log(), p.log(), "k3")).sum(), kl)
    assert torch.allclose((q * kl_penalty(q.log(), p.log(), "k2")).sum(), 0.5 * (q * (q / p).log() ** 2).sum())
    assert torch.all(kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0)


def _expected_kl_loss_gradient(kind, logits, ref_logp):
    """E_{y~π}[∇_θ k(log π_θ(y) − log π_ref(y))] exactly: the sum over the vocabulary weighted by π
    (detached: the sample is not differentiated), as the loss term's gradient is in expectation."""
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    (g,) = torch.autograd.grad((logp.exp().detach() * kl_penalty(logp, ref_logp, kind)).sum(), logits)
    return g


def _analytic_kl_gradients(logits, ref_logp):
    """∇_θ KL(π_θ‖π_ref) and ∇_θ KL(π_ref‖π_θ) by autograd of the exact sums."""
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta)
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (forward,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta)
    return reverse, forward


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expected_gradients_as_loss_terms(seed):
    """k1 gives no gradient in expectation, k2 and k3+ the reverse KL's, k3 the forward KL's; the
    default regularises towards the reverse KL(π‖π_ref) GRPO means (docs/decisions.md)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, dtype=torch.float64, generator=gen) * 1.5
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64, generator=gen) * 1.5, -1)
    reverse, forward = _analytic_kl_gradients(logits, ref_logp)
    assert not torch.allclose(reverse, forward, atol=1e-3)  # the example tells the two apart
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.allclose(_expected_kl_loss_gradient("k1", logits, ref_logp), zero, atol=1e-12)
    assert torch.allclose(_expected_kl_loss_gradient("k2", logits, ref_logp), reverse, atol=1e-12)
    assert torch.allclose(_expected_kl_loss_gradient("k3", logits, ref_logp), forward, atol=1e-12)
    assert torch.allclose(_expected_kl_loss_gradient("k3+", logits, ref_logp), reverse, atol=1e-12)
    default = inspect.signature(kl_penalty).parameters["kind"].default
    assert default == losses.DEFAULT_KL_ESTIMATOR
    assert torch.allclose(_expected_kl_loss_gradient(default, logits, ref_logp), reverse, atol=1e-12)
    # the method settings' default and policy_loss's are the same regularising one
    assert GRPOSettings().kl_estimator == default
    assert inspect.signature(policy_loss).parameters["kl_kind"].default == default


def test_k3_plus_logs_k3s_value():
    logp, ref = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -1.0, -0.1])
    assert torch.equal(kl_penalty(logp, ref, "k3+"), kl_penalty(logp, ref, "k3"))


# --- aggregation identity under gradient accumulation ---------------------------------------------
@pytest.mark.parametrize("mode", sorted(losses.AGGREGATIONS))
def test_micro_batch_sum_equals_full_batch(mode):
    torch.manual_seed(1)
    vocab, lengths = 13, [5, 9, 3, 12, 7, 4]
    w = torch.randn(vocab, vocab, dtype=torch.float64, requires_grad=True)
    ids = [torch.randint(0, vocab, (n,)) for n in lengths]
    masks = [torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]) for n in lengths]
    adv = torch.randn(len(lengths), dtype=torch.float64)
    noise = [0.1 * torch.randn(n, dtype=torch.float64) for n in lengths]  # old = current + noise

    def row_loss(seqs, norm):
        """Pack the given sequences into one row (seq_index marks them), return its loss share."""
        x = torch.cat([ids[i] for i in seqs])[None]
        logp = token_logprobs(torch.nn.functional.one_hot(x, vocab).double() @ w, x)
        mask = torch.cat([torch.cat([torch.zeros(1), masks[i][1:]]) for i in seqs])[None, 1:]
        seq = torch.cat([torch.full((lengths[i],), i) for i in seqs])[None, 1:]
        a = torch.cat([adv[i].expand(lengths[i]) for i in seqs])[None, 1:]
        old = logp.detach() + torch.cat([noise[i] for i in seqs])[None, 1:]
        loss, _ = policy_loss("clip", logp, old, a, mask, agg=mode, norm=norm, seq_index=seq,
                              eps_low=0.2, eps_high=0.28)
        return loss

    n_tokens = float(sum(m[1:].sum() for m in masks))
    norm = LossNorm(num_tokens=n_tokens, num_seqs=len(lengths), constant=16.0)
    full = row_loss(range(6), norm)
    (g_full,) = torch.autograd.grad(full, w)
    micro = [row_loss(range(0, 2), norm), row_loss(range(2, 5), norm), row_loss(range(5, 6), norm)]
    total = sum(micro)
    (g_micro,) = torch.autograd.grad(total, w)
    assert torch.allclose(total, full, atol=1e-12)
    assert torch.allclose(g_micro, g_full, atol=1e-12)
    if mode != "seq-mean-token-sum-norm":  # the bug this guards against: each micro-batch's own mean
        own = [LossNorm(float(sum(masks[i][1:].sum() for i in r)), len(r), 16.0)
               for r in (range(0, 2), range(2, 5), range(5, 6))]
        naive = sum(row_loss(r, nm) for r, nm in zip((range(0, 2), range(2, 5), range(5, 6)), own)) / 3
        assert not torch.allclose(naive, full, atol=1e-6)


def test_seq_mean_token_mean_by_hand_and_padded_layout():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    seq = torch.tensor([[0, 0, 1, 1]])
    norm = LossNorm(num_tokens=3, num_seqs=2, constant=4.0)
    # seq 0: mean(1, 2) = 1.5; seq 1: mean(4) = 4; over 2 sequences: 2.75
    assert aggregate(per_token, mask, "seq-mean-token-mean", norm, seq).item() == pytest.approx(2.75)
    assert aggregate(per_token, mask, "token-mean", norm, seq).item() == pytest.approx(7 / 3)
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", norm, seq).item() == pytest.approx(7 / 8)
    padded = aggregate(per_token.view(2, 2), mask.view(2, 2), "seq-mean-token-mean", norm)
    assert padded.item() == pytest.approx(2.75)
    with pytest.raises(ValueError, match="constant"):
        aggregate(per_token, mask, "seq-mean-token-sum-norm", LossNorm(3, 2), seq)


def test_policy_loss_registry_and_kl_term():
    logp, old = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.1, -1.9, -0.5]])
    ref, adv, mask = (torch.tensor([[-1.2, -1.5, -0.7]]), torch.tensor([[1.0, -1.0, 0.5]]),
                      torch.tensor([[1.0, 1.0, 0.0]]))
    norm = LossNorm(num_tokens=2, num_seqs=1)
    loss, m = policy_loss("clip", logp, old, adv, mask, agg="token-mean", norm=norm, ref_logp=ref, kl_coef=0.1)
    per_token, _ = clipped_surrogate(logp, old, adv, mask)
    expected = ((per_token + 0.1 * kl_penalty(logp, ref, "k3")) * mask).sum() / 2
    assert loss.item() == pytest.approx(expected.item())
    assert m["kl/ref"].item() == pytest.approx((kl_penalty(logp, ref)[0, :2]).mean().item())
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss("nope", logp, old, adv, mask, agg="token-mean", norm=norm)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_policy_loss("clip")(lambda *a, **k: None)
