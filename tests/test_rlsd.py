"""RLSD (methods.md §2): what defines it, on a tiny real model and real toy episodes.

1. sign(Â_t) = sign(A) on every sampled token, and Â_t / A stays in
   [(1 − λ) + λ(1 − ε_w), (1 − λ) + λ(1 + ε_w)]; Δ_t is the privileged teacher's log-prob of the
   sampled token minus the recorded sampling log-prob.
2. λ = 0 is GRPO exactly (same advantages, loss, gradients and update); with λ > 0 the
   advantages differ, so that equality is not vacuous.
3. The teacher snapshot stays fixed between syncs, follows the policy at a sync, and survives
   ``state_dict`` / ``load_state_dict`` (what ``--resume`` uses).
4. The requirement check refuses an env without privileged information before any rollout.

Rollouts come from the untrained tiny toy policy, which almost never succeeds; the tests overwrite
the rewards (alternating 1 / 0 within each group) so every group has credit to scale.
Run: .venv/bin/python -m pytest tests/test_rlsd.py
"""

from __future__ import annotations

import copy
import io
from dataclasses import replace

import pytest
import torch
from toy_groups import BareFactory, toy_rollouts, update_capturing_grads

from harness.errors import ConfigError
from harness.types import Group, Score
from trainers.config import TrainConfig
from trainers.loop import check_requirements
from trainers.methods import MethodContext, make_method
from trainers.methods.rlsd import lambda_at
from trainers.teacher import context_sequences
from trainers.update import UpdateSettings


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    toy = toy_rollouts(tiny_toy_dir, 2)  # rewards 1, 0, 1, 0: see toy_groups.py
    return toy.model, toy.tokenizer, toy.factory, toy.tasks, toy.groups


def _ctx(setup, step=1, model=None, temperature=1.0):
    base, tokenizer, factory, tasks, _ = setup
    return MethodContext(model=model if model is not None else base, tokenizer=tokenizer, temperature=temperature,
                         micro_batch_tokens=4096, factory=factory, tasks=tasks, privileged=factory.privileged_info,
                         step=step)


def _grpo():
    return make_method("grpo", clip_high=0.28)  # RLSD's surrogate settings


def _plain(groups):
    prepared = _grpo().prepare(groups, None)
    return {id(t): a for t, a in zip(prepared.traces, prepared.advantages)}


def _sampled(trace, adv):
    return torch.as_tensor(adv)[torch.as_tensor(trace.sampled_positions)] if torch.as_tensor(adv).dim() else \
        torch.full((trace.response_tokens,), float(adv))


# --- 1. sign and bounds ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(setup):
    """RLSD's credit at step 1 for λ = 0.5 (the printed schedule's start) and λ = 1 (pure Step 3)."""
    return {lam: make_method("rlsd", lam_start=lam, lam_end=lam).prepare(setup[4], _ctx(setup)) for lam in (0.5, 1.0)}


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_sign_follows_the_reward_and_the_scale_stays_in_the_clip(setup, prepared, lam):
    groups = setup[4]
    out = prepared[lam]
    assert out.metrics["rlsd/lambda"] == lam
    plain = _plain(groups)
    eps = 0.2
    lo, hi = (1 - lam) + lam * (1 - eps), (1 - lam) + lam * (1 + eps)
    scaled = 0
    for trace, adv in zip(out.traces, out.advantages):
        a = plain[id(trace)]
        assert a != 0
        sampled = _sampled(trace, adv)
        assert torch.all(torch.sign(sampled) == torch.sign(torch.tensor(a)))
        ratio = sampled / a
        assert torch.all(ratio >= lo - 1e-6) and torch.all(ratio <= hi + 1e-6)
        scaled += int(((ratio - 1).abs() > 1e-6).sum())
        unsampled = torch.ones(len(trace), dtype=torch.bool)
        unsampled[torch.as_tensor(trace.sampled_positions)] = False
        assert torch.all(torch.as_tensor(adv)[unsampled] == 0)
    assert scaled > 0  # the teacher did move credit
    assert 0 <= out.metrics["rlsd/w_clip_frac"] <= 1 and out.metrics["rlsd/w_mean"] > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_delta_is_privileged_teacher_minus_recorded_sampling_logprob(setup, prepared, temperature):
    """Recompute Â for one trajectory by hand (λ = 1): a plain forward of the model on the trace
    with the answer in its first prompt, read at the sampling temperature (softmax(logits / T)),
    against the log-probs the sampler recorded."""
    model, tokenizer, factory, tasks, groups = setup
    eps = 0.2
    out = prepared[1.0] if temperature == 1.0 else \
        make_method("rlsd", lam_start=1.0, lam_end=1.0).prepare(groups, _ctx(setup, temperature=temperature))
    group = groups[1]
    trace = group.episodes[1].trace  # a failure: A < 0, so w = P_S / P_T
    adv = out.advantages[[id(t) for t in out.traces].index(id(trace))]
    note = factory.privileged_info(tasks[group.task_id])
    (ids,), (offset,) = context_sequences(tokenizer, [trace], [note])
    assert note in tokenizer.decode(ids[: trace.first_prompt_len + offset])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    rows = torch.tensor([p + offset - 1 for p in trace.sampled_positions])
    sampled_ids = torch.tensor([[trace.input_ids[p]] for p in trace.sampled_positions])
    teacher = torch.log_softmax(logits[rows] / temperature, -1).gather(-1, sampled_ids)[:, 0]
    student = torch.tensor([trace.logprobs[p] for p in trace.sampled_positions])
    a = _plain(groups)[id(trace)]
    assert a < 0
    expected = a * torch.exp(-(teacher - student)).clamp(1 - eps, 1 + eps)
    assert torch.allclose(_sampled(trace, adv), expected, atol=1e-4)


def test_lambda_schedule_and_defaults_are_the_official_codes():
    """iie-ycx/RLSD examples/visual_rl/rlsd_train.sh: λ 0.5 → 0 over 60 steps, no warmup, ε_w 0.2,
    clip 0.2 / 0.28, a frozen teacher refreshed every 20 steps, no KL; opsd_config.py:
    rlsd_negative_only off. (Fails on the pre-issue-16 defaults: decay 50, sync 10.)"""
    assert lambda_at(1, 0.5, 0.0, 60) == 0.5
    assert lambda_at(31, 0.5, 0.0, 60) == pytest.approx(0.25)
    assert lambda_at(61, 0.5, 0.0, 60) == 0.0 and lambda_at(500, 0.5, 0.0, 60) == 0.0
    assert lambda_at(1, 0.0, 1.0, 10) == 0.0 and lambda_at(11, 0.0, 1.0, 10) == 1.0
    assert lambda_at(1, 0.5, 0.3, 0) == 0.3
    defaults = make_method("rlsd").settings
    assert (defaults["lam_start"], defaults["lam_end"], defaults["lam_decay_steps"]) == (0.5, 0.0, 60)
    assert ((defaults["eps_w"], defaults["clip_low"], defaults["clip_high"], defaults["sync_every"])
            == (0.2, 0.2, 0.28, 20))
    assert defaults["kl_coef"] == 0 and defaults["negative_only"] is False
    method = make_method("rlsd")
    assert method.code == "iie-ycx/RLSD" and "rlsd_train.sh" in method.sources["lam_start, lam_end, lam_decay_steps"]


def test_negative_only_reweights_failures_and_leaves_successes_grpo(setup, prepared):
    """Official ``rlsd_negative_only``: A > 0 keeps GRPO's scalar credit (no teacher pass), A < 0 is
    reweighted exactly as without the option."""
    groups = setup[4]
    out = make_method("rlsd", lam_start=1.0, lam_end=1.0, negative_only=True).prepare(groups, _ctx(setup))
    full = dict(zip(map(id, prepared[1.0].traces), prepared[1.0].advantages))
    plain = _plain(groups)
    negatives = 0
    for trace, adv in zip(out.traces, out.advantages):
        if plain[id(trace)] > 0:
            assert adv == plain[id(trace)]  # the scalar itself: untouched
        else:
            negatives += 1
            # the same Δ up to float rounding (the teacher pass packs fewer sequences here)
            assert torch.allclose(torch.as_tensor(adv), torch.as_tensor(full[id(trace)]), atol=1e-5)
    assert negatives and out.metrics["rlsd/teacher_tokens"] == sum(
        t.response_tokens for t in out.traces if plain[id(t)] < 0)


@pytest.mark.parametrize("bad", [{"eps_w": 1.0}, {"eps_w": -0.1}, {"lam_start": 1.5}, {"lam_end": -1.0},
                                 {"lam_decay_steps": -1}, {"sync_every": 0}, {"gamma": 1.0}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        make_method("rlsd", **bad)


# --- 2. λ = 0 is GRPO -------------------------------------------------------------------------------
def _update(model, prepared, method, tokenizer):
    return update_capturing_grads(model, method, prepared, UpdateSettings(micro_batch_tokens=512, max_new_tokens=24),
                                  pad_token_id=tokenizer.pad_token_id)


def test_lambda_zero_is_grpo_exactly(setup):
    model, tokenizer, _, _, groups = setup
    rlsd, grpo = make_method("rlsd", lam_start=0.0), _grpo()
    p_rlsd, p_grpo = rlsd.prepare(groups, _ctx(setup)), grpo.prepare(groups, None)
    assert p_rlsd.metrics["rlsd/lambda"] == 0.0
    assert [id(t) for t in p_rlsd.traces] == [id(t) for t in p_grpo.traces]
    assert p_rlsd.advantages == p_grpo.advantages
    (m_a, g_a, w_a), (m_b, g_b, w_b) = _update(model, p_rlsd, rlsd, tokenizer), _update(model, p_grpo, grpo, tokenizer)
    assert m_a["loss/policy"] == m_b["loss/policy"]
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert any(g.abs().sum() > 0 for g in g_a.values())
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


def test_lambda_positive_changes_the_advantages_and_the_update(setup):
    model, tokenizer, _, _, groups = setup
    rlsd = make_method("rlsd")  # λ = 0.5 at step 1
    p_rlsd, p_grpo = rlsd.prepare(groups, _ctx(setup)), _grpo().prepare(groups, None)
    assert any(not torch.equal(_sampled(t, a), _sampled(t, b))
               for t, a, b in zip(p_rlsd.traces, p_rlsd.advantages, p_grpo.advantages))
    (_, g_a, _), (_, g_b, _) = _update(model, p_rlsd, rlsd, tokenizer), _update(model, p_grpo, _grpo(), tokenizer)
    assert any(not torch.equal(g_a[n], g_b[n]) for n in g_a)


# --- 3. the teacher snapshot ------------------------------------------------------------------------
def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_teacher_is_fixed_between_syncs_and_follows_the_policy_at_a_sync(setup):
    model, _, _, _, groups = setup
    live = copy.deepcopy(model)
    method = make_method("rlsd", lam_start=0.5, lam_end=0.5, lam_decay_steps=0, sync_every=3)
    first = method.prepare(groups, _ctx(setup, step=1, model=live))
    assert method.snapshot.synced_at == 1
    _perturb(live, 1)  # an update happened: the live policy moved
    # step 3 is the last one before the sync is due: the frozen teacher gives the very same credit
    again = method.prepare(groups, _ctx(setup, step=3, model=live))
    assert method.snapshot.synced_at == 1 and again.metrics["rlsd/teacher_age"] == 2
    assert all(torch.equal(a, b) for a, b in zip(first.advantages, again.advantages))
    # the teacher still runs on the step-1 weights, not on the live ones
    snap = method.snapshot.params
    assert all(torch.equal(snap[n], p) for n, p in model.named_parameters())
    assert any(not torch.equal(snap[n], p) for n, p in live.named_parameters())
    synced = method.prepare(groups, _ctx(setup, step=4, model=live))
    assert method.snapshot.synced_at == 4
    assert all(torch.equal(method.snapshot.params[n], p) for n, p in live.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(first.advantages, synced.advantages))
    # ... and it is exactly the live policy's credit (a sync_every=1 teacher on the same weights)
    current = make_method("rlsd", lam_start=0.5, lam_end=0.5, lam_decay_steps=0, sync_every=1)
    assert current.snapshot.live
    reference = current.prepare(groups, _ctx(setup, step=4, model=live))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(synced.advantages, reference.advantages))
    # the snapshot never touched the live weights
    assert all(p.requires_grad for p in live.parameters())


def test_syncs_keep_their_grid_on_steps_without_a_teacher_pass(setup):
    """All-fail groups have A = 0 (nothing to scale, no teacher pass), yet the step-1 snapshot is
    taken, so the next sync still falls on step 1 + sync_every."""
    model, _, _, _, groups = setup
    all_fail = [Group(task_id=g.task_id, group_id=g.group_id,
                      episodes=[replace(e, score=Score(reward=0.0, success=False)) for e in g.episodes])
              for g in groups]
    method = make_method("rlsd", sync_every=3)
    out = method.prepare(all_fail, _ctx(setup, step=1))
    assert "rlsd/teacher_tokens" not in out.metrics and all(a == 0 for a in out.advantages)
    assert method.snapshot.synced_at == 1


def test_state_dict_round_trip_restores_the_same_teacher(setup):
    model, _, _, _, groups = setup
    live = copy.deepcopy(model)
    kw = dict(lam_start=0.5, lam_end=0.5, lam_decay_steps=0, sync_every=10)
    method = make_method("rlsd", **kw)
    method.prepare(groups, _ctx(setup, step=1, model=live))
    _perturb(live, 2)
    before = method.prepare(groups, _ctx(setup, step=5, model=live))
    buf = io.BytesIO()
    torch.save({"method_state": method.state_dict()}, buf)  # as checkpoints store it
    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=False)["method_state"]
    resumed = make_method("rlsd", **kw)
    resumed.load_state_dict(state)
    assert resumed.snapshot.synced_at == 1
    after = resumed.prepare(groups, _ctx(setup, step=5, model=live))
    assert all(torch.equal(a, b) for a, b in zip(before.advantages, after.advantages))
    # without the state, a fresh method would sync to the live (moved) policy: a different teacher
    fresh = make_method("rlsd", **kw).prepare(groups, _ctx(setup, step=5, model=live))
    assert any(not torch.equal(a, b) for a, b in zip(before.advantages, fresh.advantages))
    with pytest.raises(ConfigError):
        make_method("rlsd", **{**kw, "sync_every": 4}).load_state_dict(state)


# --- 4. requirements ------------------------------------------------------------------------------
def test_an_env_without_privileged_info_is_refused_before_any_rollout(setup):
    factory = setup[2]
    cfg = TrainConfig(env="no-answers", policy="tiny-toy", method="rlsd")
    method = make_method("rlsd")
    with pytest.raises(ConfigError, match="privileged"):
        check_requirements(cfg, method, BareFactory())  # an env factory with no privileged_info
    check_requirements(TrainConfig(env="toy", policy="tiny-toy", method="rlsd"), method, factory)  # toy has it
    with pytest.raises(ConfigError, match="privileged"):
        method.prepare(setup[4], MethodContext(model=setup[0], tokenizer=setup[1], tasks=setup[3], step=1))
