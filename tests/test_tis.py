"""Truncated importance sampling (``--tis-cap``, ``trainers/tis.py``): weights, metrics, gradient,
the recomputed π_old, TIS off unchanged, the setting, and a real toy training run.

The unit tests use the bigram model of tests/test_grpo_update.py (a real torch module) with traces
whose sampling log-probs μ are the model's own minus known offsets d_t, so π_old/μ = exp(d_t) per
token and every expected number is written out by hand.
Run: .venv/bin/python -m pytest -q tests/test_tis.py
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_cli import harness
from test_grpo_update import CTX, RESPONSE_LENGTHS, Bigram, _group, _response_logprobs

from harness.errors import ConfigError
from harness.store import Store, train_steps
from trainers.config import TrainConfig
from trainers.losses import POLICY_LOSSES
from trainers.methods import make_method
from trainers.packing import pack
from trainers.tis import Mismatch, corrected, tis_weights
from trainers.update import UpdateSettings, policy_forward, policy_update

CAP = 2.0
SETTINGS = {"micro_batch_tokens": 12, "grad_clip": 1e9, "max_new_tokens": 16}


def _offsets() -> list[torch.Tensor]:
    """d_t = log π_old − log μ per sampled token: both signs, some past log C (0.69), some exact 0."""
    gen = torch.Generator().manual_seed(7)
    out = [torch.randn(n, generator=gen) * 0.8 for n in RESPONSE_LENGTHS]
    out[0][0] = 0.0
    out[1][2] = 1.5   # exp(1.5) = 4.48 > C: capped
    out[3][4] = -2.0  # exp(-2) = 0.14: weighted down, never capped from below
    return out


def _setup(seed: int = 0):
    """A bigram model, one group whose μ is π_old − d, its GRPO prepared batch and the offsets."""
    model = Bigram(seed)
    group, offsets = _group(model, _offsets())
    method = make_method("grpo")
    return model, group, method, method.prepare([group], CTX), offsets


def _step(model, method, prepared, **settings):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.table.detach().clone()
    metrics = policy_update(model, opt, prepared, method, UpdateSettings(**{**SETTINGS, **settings}),
                            pad_token_id=0, seed=0)
    return metrics, before - model.table.detach()


def test_weights_are_the_capped_ratio_per_token_and_carry_no_gradient():
    old = torch.tensor([0.0, -1.0, -3.0, -0.2], requires_grad=True)
    mu = torch.tensor([0.0, -1.5, -1.0, -1.2])
    w = tis_weights(old, mu, CAP)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(0.5), math.exp(-2.0), CAP]))
    assert not w.requires_grad  # a constant of the loss: no gradient flows through w


def test_corrected_batch_weights_advantages_and_reports_the_mismatch_by_hand():
    model, group, _, prepared, offsets = _setup()
    old = {}
    for i, episode in enumerate(group.episodes):  # π_old = the model's own log-probs, at every position
        trace = episode.trace
        with torch.no_grad():
            lp = _response_logprobs(model, trace.input_ids)
        old[i] = torch.zeros(len(trace))
        old[i][trace.sampled_positions] = lp
    out, stats = corrected(prepared, old, CAP)
    for i, trace in enumerate(out.traces):
        pos = trace.sampled_positions
        assert torch.equal(torch.tensor(trace.logprobs)[pos], old[i][pos])  # π_old replaces μ
        expected = prepared.advantages[i] * torch.clamp(torch.exp(offsets[i]), max=CAP)
        assert torch.allclose(out.advantages[i][pos], expected, rtol=1e-5, atol=1e-7)
        assert group.episodes[i].trace.logprobs != trace.logprobs  # the episode's own trace is untouched
    d = torch.cat(offsets)
    got = stats.metrics()
    assert got["tis/abs_diff_mean"] == pytest.approx(float(d.abs().mean()), rel=1e-5)
    assert got["tis/abs_diff_max"] == pytest.approx(float(d.abs().max()), rel=1e-5)
    assert got["tis/capped_frac"] == pytest.approx(float((d > math.log(CAP)).float().mean()))
    assert 0 < got["tis/capped_frac"] < 1


def test_capped_fraction_counts_only_ratios_past_the_cap():
    stats = Mismatch(cap=3.0)
    d = torch.tensor([math.log(3.0) + 1e-3, math.log(3.0) - 1e-3, 5.0, -5.0, 0.0])
    stats.add(d, torch.zeros(5))
    m = stats.metrics()
    assert m["tis/capped_frac"] == pytest.approx(2 / 5)
    assert m["tis/abs_diff_max"] == pytest.approx(5.0)
    assert m["tis/abs_diff_mean"] == pytest.approx(float(d.abs().mean()))
    assert Mismatch(cap=2.0).metrics() == {}  # no token: nothing logged


def test_update_gradient_is_the_hand_weighted_policy_gradient_and_the_first_ratio_is_one():
    model, group, method, prepared, offsets = _setup()
    advantages = prepared.advantages
    per_seq = []
    for episode, a, d in zip(group.episodes, advantages, offsets):
        logp = _response_logprobs(model, episode.trace.input_ids)
        pi_old = logp.detach()
        w = torch.clamp(torch.exp(d), max=CAP)  # min(π_old/μ, C), by construction of μ
        per_seq.append(-(torch.exp(logp - pi_old) * a * w))  # ratio π/π_old, weighted clipped (unclipped) pg
    expected = sum(s.mean() for s in per_seq) / len(per_seq)  # grpo: seq-mean-token-mean
    (expected_grad,) = torch.autograd.grad(expected, model.table)

    metrics, grad = _step(model, method, prepared, tis_cap=CAP)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert metrics["ratio/mean"] == 1.0 and metrics["ratio/max"] == 1.0  # exactly: π_old is the loss's forward
    assert metrics["clip/frac"] == 0.0
    assert metrics["tis/capped_frac"] > 0 and metrics["tis/abs_diff_max"] == pytest.approx(2.0, rel=1e-5)


def test_tis_off_keeps_the_sampling_logprobs_and_today_s_update_bit_for_bit():
    model, group, method, prepared, offsets = _setup()
    # today's update, written out: the traces packed as they are (μ is old_logprobs), loss, one step
    reference = Bigram(0)
    packed = pack(prepared.traces, prepared.advantages, SETTINGS["micro_batch_tokens"])
    norm = packed.loss_norm()
    for mb in packed.micro_batches:
        logp, _, outputs = policy_forward(reference, mb, 1.0, with_entropy=True)
        loss, _ = method.loss(mb, logp, norm, CTX, outputs=outputs)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), SETTINGS["grad_clip"])
    torch.optim.SGD(reference.parameters(), lr=1.0).step()

    metrics, _ = _step(model, method, prepared, tis_cap=0.0)
    assert torch.equal(model.table, reference.table)
    assert not any(k.startswith("tis/") for k in metrics)
    ratios = torch.exp(torch.cat(offsets))  # old = μ: the ratio is π/μ = exp(d)
    assert metrics["ratio/mean"] == pytest.approx(float(ratios.mean()), rel=1e-5)


def test_tgc_weights_read_the_recomputed_pi_old():
    """TGC computes its ratio in its pre-pass, outside the policy losses: from the packed old_logprobs."""
    metrics = {}
    for cap in (0.0, CAP):
        model = Bigram(0)
        group, _ = _group(model, _offsets())
        method = make_method("tgc")
        metrics[cap], _ = _step(model, method, method.prepare([group], CTX), tis_cap=cap)
    # on-policy against pi_old: every sequence ratio is 1 and none is clipped
    assert metrics[CAP]["tgc/weight_mean_base"] == pytest.approx(1.0, abs=1e-6)
    assert metrics[CAP]["tgc/clipped_frac"] == 0.0
    assert metrics[0.0]["tgc/clipped_frac"] > 0  # against mu some leave GSPO's tiny clip range


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_policy_loss_is_positively_homogeneous_in_the_advantage(name):
    """Weighting Â_t by w_t >= 0 equals weighting the pg term (clip, dual clip and all) by w_t."""
    gen = torch.Generator().manual_seed(1)
    n = 256
    logp = torch.randn(n, generator=gen) * 0.5 - 1.0
    old = logp + torch.randn(n, generator=gen)  # ratios far from 1: both clips and the dual clip act
    adv = torch.randn(n, generator=gen)
    w = torch.rand(n, generator=gen) * 3.0
    mask = torch.ones(n)
    options = {"teacher_logp": logp + 0.3, "beta": 0.0} if name in ("trrd", "clip_teacher_kl") else {}
    if name == "trrd":
        options.pop("beta")
    base, _ = POLICY_LOSSES[name](logp[None], old[None], adv[None], mask[None], **options)
    weighted, _ = POLICY_LOSSES[name](logp[None], old[None], (adv * w)[None], mask[None], **options)
    assert torch.allclose(weighted, w * base, atol=1e-6)
    if name.startswith("clip"):
        r = torch.exp(logp - old)
        assert bool(((r > 1.2) & (adv > 0)).any() and ((r > 3.0) & (adv < 0)).any())  # clip and dual clip acted


# --- the setting ---------------------------------------------------------------------------------
def test_default_cap_follows_the_engine_and_an_explicit_value_wins():
    assert TrainConfig(env="toy", policy="p").effective_tis_cap == 0.0
    assert TrainConfig(env="toy", policy="p", rollout_engine="vllm").effective_tis_cap == 2.0
    assert TrainConfig(env="toy", policy="p", rollout_engine="vllm", tis_cap=0).effective_tis_cap == 0.0
    assert TrainConfig(env="toy", policy="p", tis_cap=3).effective_tis_cap == 3.0
    assert TrainConfig(env="toy", policy="p").identity()["tis_cap"] is None  # stored as given
    for bad in (0.5, 1.0, -2.0):
        with pytest.raises(ConfigError, match="--tis-cap must be 0"):
            TrainConfig(env="toy", policy="p", tis_cap=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--tis-cap must be a finite number"):
            TrainConfig(env="toy", policy="p", tis_cap=bad)


def test_cli_refuses_a_cap_at_or_below_one_in_one_line(tmp_path):
    for command in (["train", "--env", "toy", "--policy", "tiny-toy"], ["train-suite", "--env", "toy"]):
        proc = harness(*command, "--tis-cap", "1", "--db", f"sqlite:///{tmp_path}/h.db")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--tis-cap must be 0 (off) or a number greater than 1" in lines[0]
        assert not (tmp_path / "h.db").exists()


# --- end to end ----------------------------------------------------------------------------------
def _toy(tmp_path, run, **kw) -> TrainConfig:
    base = TrainConfig(env="toy", policy="tiny-toy", run=run, db=f"sqlite:///{tmp_path}/h.db",
                       out_dir=str(tmp_path / run), steps=2, tasks_per_step=2, group_size=3, eval_every=0,
                       lr=3e-3, max_new_tokens=12, micro_batch_tokens=512, seed=5, quiet=True)
    return replace(base, **kw)


def test_toy_run_with_tis_forced_on_hf_logs_a_tiny_mismatch_and_ratio_one(tmp_path):
    from trainers.loop import train

    lines: list[str] = []
    train(_toy(tmp_path, "tis", tis_cap=2.0), echo=lines.append)
    assert any("truncated importance sampling with cap 2" in line for line in lines)
    store = Store(f"sqlite:///{tmp_path}/h.db")
    steps = train_steps(store, "tis").set_index("step")
    for step in (1, 2):
        row = steps.loc[step]
        assert row["tis/abs_diff_max"] < 1e-4  # hf: the sampler's μ is π_old to float precision
        assert 0 <= row["tis/abs_diff_mean"] <= row["tis/abs_diff_max"]
        assert row["tis/capped_frac"] == 0.0
        assert row["ratio/mean"] == 1.0 and row["ratio/max"] == 1.0  # exactly: π_old is the loss's own forward
    assert store.get_run("tis").config["train"]["tis_cap"] == 2.0

    with pytest.raises(ConfigError, match="tis_cap"):  # an explicit cap is part of what the run trains
        train(_toy(tmp_path, "tis", tis_cap=3.0, resume=True, steps=3), echo=lambda _: None)

    train(_toy(tmp_path, "plain"), echo=lambda _: None)  # hf default: off, nothing logged
    assert not [c for c in train_steps(store, "plain").columns if c.startswith("tis/")]
    assert store.get_run("plain").config["train"]["tis_cap"] is None


def test_every_mini_batch_is_recomputed_on_its_own_packing(tmp_path):
    """With lr 0 the policy never moves, so every ratio of every mini-batch is exactly 1 only if
    π_old was computed over the same micro-batches as each mini-batch's loss (a real transformer's
    log-probs change in the last bits with the row they are packed in)."""
    from trainers.loop import train

    train(_toy(tmp_path, "mb", tis_cap=2.0, lr=0.0, mini_batches=2, steps=1, micro_batch_tokens=256),
          echo=lambda _: None)
    row = train_steps(Store(f"sqlite:///{tmp_path}/h.db"), "mb").set_index("step").loc[1]
    assert row["update/optimizer_steps"] == 2
    assert row["ratio/mean"] == 1.0 and row["ratio/max"] == 1.0
