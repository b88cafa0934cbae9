"""On-policy distillation (``opd``) and GRPO + teacher KL (``grpo_kl``), on a tiny real student, a
larger real teacher and real toy rollouts (the setup of tests/test_rlad.py, shared).

opd:
1. teacher = student (the policy itself as teacher): advantages, loss and gradient are zero (up
   to the float noise between the sampler's recorded log-probs and a packed forward, ~1e-6);
   a different teacher gives A_t = −coef·(log π_old − log π_T) exactly, a loss and a gradient.
2. The discount computes Σ_k γ^(k−t) x_k over each trajectory's sampled tokens (hand example,
   then through ``prepare`` on multi-turn traces).
grpo_kl:
3. β = 0 is GRPO exactly; the KL term is zero when teacher = student; positive otherwise, and
   k2's gradient is (log π_θ − log π_T)·∇log π_θ (the on-policy reverse-KL gradient).
Run: .venv/bin/python -m pytest -q tests/test_teacher_distill.py
"""

from __future__ import annotations

import pytest
import torch
from test_rlad import context, toy_setup, update

from envs.registry import make_env_factory
from harness.errors import ConfigError
from trainers.config import TrainConfig
from trainers.loop import check_requirements
from trainers.losses import clipped_surrogate
from trainers.methods import make_method, method_catalog
from trainers.methods.teacher_distill import clip_with_teacher_kl, discounted_future_sum, sampled_old_logprobs
from trainers.teacher import sampled_token_logprobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_toy_dir):
    return toy_setup(tmp_path_factory, "teacher-distill", tiny_toy_dir)


def _sampled(trace, per_pos: torch.Tensor) -> torch.Tensor:
    return per_pos[torch.as_tensor(trace.sampled_positions)]


def _unsampled(trace, per_pos: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(len(trace), dtype=torch.bool)
    keep[torch.as_tensor(trace.sampled_positions)] = False
    return per_pos[keep]


@pytest.fixture(scope="module")
def opd_runs(setup):
    """OPD with the policy itself as teacher and with the separate teacher: {which: (prepared, metrics, grads)}."""
    out = {}
    for which in ("self", "teacher"):
        method = make_method("opd")
        prepared = method.prepare(setup.groups, context(setup, which))
        metrics, grads, _ = update(setup.model, method, prepared, setup.tokenizer.pad_token_id)
        out[which] = (prepared, metrics, grads)
    return out


# --- 1. opd: zero when teacher = student, the reverse-KL reward otherwise -----------------------------
def test_opd_teacher_equal_to_student_gives_zero_advantage_loss_and_gradient(opd_runs):
    prepared, metrics, grads = opd_runs["self"]
    assert len(prepared.traces) == 12
    assert max(float(a.abs().max()) for a in prepared.advantages) < 1e-5
    assert abs(metrics["loss/policy"]) < 1e-6
    g_self = max(float(g.abs().max()) for g in grads.values())
    _, other_metrics, other_grads = opd_runs["teacher"]
    g_other = max(float(g.abs().max()) for g in other_grads.values())
    assert g_self < 1e-5 and g_self < 1e-3 * g_other  # zero up to float noise, next to a real gradient
    assert abs(other_metrics["loss/policy"]) > 1e-2


def test_opd_advantage_is_the_negative_sampled_reverse_kl(setup, opd_runs):
    prepared, _, _ = opd_runs["teacher"]
    teacher = sampled_token_logprobs(setup.teacher, prepared.traces, temperature=1.0, micro_batch_tokens=512)
    for trace, adv, t_lp in zip(prepared.traces, prepared.advantages, teacher):
        assert torch.allclose(_sampled(trace, adv), -(sampled_old_logprobs(trace) - t_lp), atol=1e-6)
        assert torch.all(_unsampled(trace, adv) == 0)
    assert prepared.metrics["teacher/reverse_kl"] == pytest.approx(
        float(torch.cat([sampled_old_logprobs(t) - s for t, s in zip(prepared.traces, teacher)]).mean()), abs=1e-5)
    # the loss is the importance-weighted PG (no clip) by default; ppo switches to the clipped surrogate
    assert "clip/frac" not in opd_runs["teacher"][1]
    ppo = make_method("opd", loss_fn="ppo")
    m, _, _ = update(setup.model, ppo, prepared, setup.tokenizer.pad_token_id)
    assert "clip/frac" in m and m["loss/policy"] == pytest.approx(opd_runs["teacher"][1]["loss/policy"], rel=1e-4)


def test_opd_env_coef_adds_the_grpo_advantage(setup, opd_runs):
    distill, _, _ = opd_runs["teacher"]
    mixed = make_method("opd", env_coef=0.5).prepare(setup.groups, context(setup))
    grpo = make_method("grpo").prepare(setup.groups, None)
    for trace, a_mix, a_dist, a_grpo in zip(mixed.traces, mixed.advantages, distill.advantages, grpo.advantages):
        assert a_grpo != 0
        assert torch.allclose(_sampled(trace, a_mix), _sampled(trace, a_dist) + 0.5 * a_grpo, atol=1e-6)


# --- 2. the discount ----------------------------------------------------------------------------------
def test_discounted_future_sum_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, -4.0])
    # out[t] = x_t + γ x_{t+1} + γ² x_{t+2} + ...
    assert torch.allclose(discounted_future_sum(x, 0.5),
                          torch.tensor([1 + 0.5 * 2 + 0.25 * 3 - 0.125 * 4, 2 + 0.5 * 3 - 0.25 * 4, 3 - 0.5 * 4, -4.0]))
    assert torch.equal(discounted_future_sum(x, 0.0), x)
    assert torch.allclose(discounted_future_sum(x, 1.0), torch.tensor([2.0, 1.0, -1.0, -4.0]))
    assert discounted_future_sum(torch.zeros(0), 0.9).numel() == 0


def test_opd_discount_runs_over_each_trajectorys_sampled_tokens(setup, opd_runs):
    plain, _, _ = opd_runs["teacher"]
    discounted = make_method("opd", kl_discount=0.9, kl_penalty_coef=2.0).prepare(setup.groups, context(setup))
    multi_turn = 0
    for trace, a0, a in zip(plain.traces, plain.advantages, discounted.advantages):
        x = 2.0 * _sampled(trace, a0)
        expected = torch.tensor([sum(0.9 ** (k - t) * float(x[k]) for k in range(t, len(x))) for t in range(len(x))])
        assert torch.allclose(_sampled(trace, a), expected, atol=1e-4)
        assert torch.all(_unsampled(trace, a) == 0)
        multi_turn += len(trace.turns) > 1
    assert multi_turn > 0  # tool results between replies are not discount steps


# --- 3. grpo_kl -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_run(setup):
    grpo = make_method("grpo")
    prepared = grpo.prepare(setup.groups, None)
    return (prepared, *update(setup.model, grpo, prepared, setup.tokenizer.pad_token_id))


def test_grpo_kl_with_beta_zero_is_grpo_exactly(setup, grpo_run):
    method = make_method("grpo_kl", beta=0.0)
    prepared = method.prepare(setup.groups, context(setup))
    p_grpo, m_b, g_b, w_b = grpo_run
    assert prepared.advantages == p_grpo.advantages
    m_a, g_a, w_a = update(setup.model, method, prepared, setup.tokenizer.pad_token_id)
    assert m_a["loss/policy"] == m_b["loss/policy"]
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    assert m_a["kl/teacher"] > 0.1  # the teacher is far: β = 0 alone made the term vanish


def test_grpo_kl_term_is_zero_for_the_student_as_teacher_and_positive_otherwise(setup, grpo_run):
    _, m_grpo, _, _ = grpo_run
    method = make_method("grpo_kl", beta=0.05)
    m_self, _, _ = update(setup.model, method, method.prepare(setup.groups, context(setup, "self")),
                          setup.tokenizer.pad_token_id)
    assert m_self["kl/teacher"] < 1e-10
    assert m_self["loss/policy"] == pytest.approx(m_grpo["loss/policy"], abs=1e-8)
    far = method.prepare(setup.groups, context(setup))
    m_far, _, _ = update(setup.model, method, far, setup.tokenizer.pad_token_id)
    assert m_far["kl/teacher"] > 0.1
    assert m_far["loss/policy"] > m_grpo["loss/policy"] + 0.05 * 0.01  # β · (a positive KL) was added


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_teacher_kl_term_per_token(kind):
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(1, 30, generator=gen) * 5).requires_grad_(True)
    old = logp.detach() + 0.01 * torch.randn(1, 30, generator=gen)
    teacher = logp.detach() + torch.randn(1, 30, generator=gen)
    adv, mask = torch.randn(1, 30, generator=gen), torch.ones(1, 30)
    per_token, metrics = clip_with_teacher_kl(logp, old, adv, mask, teacher_logp=teacher, beta=0.1, kind=kind)
    base, _ = clipped_surrogate(logp, old, adv, mask)
    lr = (logp - teacher).detach()
    expected = {"k1": lr, "k2": 0.5 * lr ** 2, "k3": torch.expm1(-lr) + lr}[kind]
    assert torch.allclose(per_token - base, 0.1 * expected, atol=1e-6)
    if kind != "k1":
        assert torch.all(expected >= 0) and metrics["kl/teacher"] > 0
    if kind == "k2":  # KDRL's choice: gradient (log π_θ − log π_T)∇log π_θ, the on-policy reverse-KL gradient
        (g,) = torch.autograd.grad((per_token - base).sum(), logp)
        assert torch.allclose(g, 0.1 * lr, atol=1e-6)


# --- settings, requirements, catalog --------------------------------------------------------------------
def test_settings_requirements_and_catalog():
    for name, bad in (("opd", {"kl_discount": 1.5}), ("opd", {"loss_fn": "dpo"}), ("opd", {"kl_penalty_coef": -1.0}),
                      ("opd", {"env_coef": -1.0}), ("grpo_kl", {"beta": -0.1}),
                      ("grpo_kl", {"teacher_kl_estimator": "k9"}), ("grpo_kl", {"alpha": 0.5})):
        with pytest.raises(ConfigError):
            make_method(name, **bad)
    for name in ("opd", "grpo_kl"):
        cfg = TrainConfig(env="toy", policy="tiny-toy", method=name)
        with pytest.raises(ConfigError, match="--teacher"):
            check_requirements(cfg, make_method(name), make_env_factory("toy"))
    rows = {r["method"]: r for r in method_catalog()}
    assert rows["opd"]["paper"] == "2306.13649" and rows["grpo_kl"]["paper"] == "2506.02208"
    assert rows["opd"]["requires"] == rows["grpo_kl"]["requires"] == rows["rlad"]["requires"] == ["teacher_model"]
    assert rows["opd"]["defaults"]["kl_penalty_coef"] == 1.0 and rows["opd"]["defaults"]["kl_discount"] == 0.0
    assert rows["opd"]["defaults"]["loss_fn"] == "importance_sampling" and rows["opd"]["defaults"]["env_coef"] == 0.0
    assert rows["grpo_kl"]["defaults"]["beta"] == 0.005 and rows["grpo_kl"]["defaults"]["teacher_kl_estimator"] == "k2"
    assert not make_method("opd").needs_reference and not make_method("grpo_kl").needs_reference
