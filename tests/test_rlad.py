"""RLAD / TRRD (methods.md §5): what defines it, on a tiny real student, a larger real teacher and
real toy rollouts.

1. α = 1 is GRPO exactly (same loss, gradients and update through ``policy_update``), the
   endpoint the formula gives (the paper's §4.1 says the reverse; see trainers/methods/rlad.py).
2. The clamp holds: whatever the teacher's log-probs, the teacher log-ratio the loss sees stays in
   [−δ, δ], and the loss has no gradient w.r.t. the teacher where the clamp is active.
3. α < 1 with a teacher that differs from the student changes the update.
4. The teacher may be larger (more layers, wider) as long as it shares the tokenizer; it scores
   the student's own tokens; a different tokenizer or a missing --teacher is a clear error.

Rollouts come from the untrained toy policy (it almost never succeeds), so rewards are overwritten
to alternate 1 / 0 within each group, as in tests/test_sgcd.py: GRPO advantages are then non-zero.
Run: .venv/bin/python -m pytest -q tests/test_rlad.py
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from toy_groups import build_tiny_toy, toy_rollouts, update_capturing_grads

from envs.registry import make_env_factory
from harness.errors import ConfigError
from harness.policy.local_policy import load_model_and_tokenizer
from trainers.config import TrainConfig
from trainers.loop import check_requirements
from trainers.losses import LossNorm, policy_loss
from trainers.methods import MethodContext, make_method, parse_method_args
from trainers.methods.rlad import trrd_log_ratio
from trainers.model_setup import load_teacher
from trainers.update import UpdateSettings

SETTINGS = UpdateSettings(micro_batch_tokens=512, max_new_tokens=24)


_SETUP: dict[str, SimpleNamespace] = {}


def toy_setup(tmp_path_factory, name, student_dir):
    """Student (2 layers, 64 wide: ``student_dir``, the session's ``tiny_toy_dir``), a larger teacher
    (4 layers, 96 wide, same toy tokenizer) loaded through ``load_teacher``, and 3 groups of 4 real
    toy episodes with rewards 1, 0, 1, 0.

    Both models are random inits, so both are close to uniform and would barely disagree; the
    teacher's final norm is scaled by 8 (logits x 8), which makes it a confident model whose
    log-probs of the student's tokens differ by about +-1.5 nats: about half the tokens fall
    inside the clamp and half outside. Built once per test session (tests/test_teacher_distill.py
    shares it)."""
    if "toy" in _SETUP:
        return _SETUP["toy"]
    root = tmp_path_factory.mktemp(name)
    teacher_dir = build_tiny_toy(tmp_path_factory, "teacher", seed=1, num_layers=4, hidden_size=96)
    sharp, _ = load_model_and_tokenizer(str(teacher_dir), "cpu", "float32")
    with torch.no_grad():
        sharp.model.norm.weight.mul_(8.0)
    sharp.save_pretrained(teacher_dir)
    # the student is loaded with the torch RNG where the teacher's build left it, as it always was
    model, tokenizer = load_model_and_tokenizer(str(student_dir), "cpu", "float32")
    teacher = load_teacher(str(teacher_dir), tokenizer, root / "out", "cpu", seed=0)
    toy = toy_rollouts(student_dir, 3, model=model, tokenizer=tokenizer)  # rewards 1, 0, 1, 0: see toy_groups.py
    _SETUP["toy"] = SimpleNamespace(model=model, tokenizer=tokenizer, teacher=teacher, teacher_dir=teacher_dir,
                                    student_dir=student_dir, groups=toy.groups, factory=toy.factory, root=root)
    return _SETUP["toy"]


def context(s, teacher="teacher", temperature=1.0) -> MethodContext:
    """``teacher``: "teacher" (the larger model), "self" (the student itself) or None."""
    chosen = {"teacher": s.teacher, "self": s.model, None: None}[teacher]
    return MethodContext(model=s.model, tokenizer=s.tokenizer, temperature=temperature, micro_batch_tokens=512,
                         teacher=chosen)


def update(model, method, prepared, pad_token_id, ctx=None):
    """One ``policy_update`` on a copy of ``model``: (metrics, gradients before the step, new weights)."""
    return update_capturing_grads(model, method, prepared, SETTINGS, pad_token_id=pad_token_id, ctx=ctx)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_toy_dir):
    return toy_setup(tmp_path_factory, "rlad", tiny_toy_dir)


@pytest.fixture(scope="module")
def grpo_run(setup):
    """GRPO with RLAD's default clip (0.2 / 0.28, their logic recipe): (prepared, metrics, grads, weights)."""
    grpo = make_method("grpo", clip_high=0.28)
    prepared = grpo.prepare(setup.groups, None)
    return (prepared, *update(setup.model, grpo, prepared, setup.tokenizer.pad_token_id))


# --- 1. α = 1 is GRPO -------------------------------------------------------------------------------
def test_alpha_one_is_grpo_exactly(setup, grpo_run):
    rlad = make_method("rlad", alpha=1.0)
    p_rlad = rlad.prepare(setup.groups, context(setup))
    p_grpo, m_b, g_b, w_b = grpo_run
    assert [id(t) for t in p_rlad.traces] == [id(t) for t in p_grpo.traces]
    assert p_rlad.advantages == p_grpo.advantages
    m_a, g_a, w_a = update(setup.model, rlad, p_rlad, setup.tokenizer.pad_token_id)
    assert m_a["loss/policy"] == m_b["loss/policy"]
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert any(g.abs().sum() > 0 for g in g_a.values())
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    # the teacher was really there (and far from the student): it just had no weight in the ratio
    assert abs(m_a["rlad/teacher_logratio"]) > 0.1 and 0 < m_a["rlad/clamp_frac"] < 1


# --- 3. α < 1 moves the update --------------------------------------------------------------------------
def test_alpha_below_one_differs_from_grpo(setup, grpo_run):
    rlad = make_method("rlad")
    m_a, g_a, _ = update(setup.model, rlad, rlad.prepare(setup.groups, context(setup)), setup.tokenizer.pad_token_id)
    _, m_b, g_b, _ = grpo_run
    assert m_a["loss/policy"] != pytest.approx(m_b["loss/policy"], abs=1e-6)
    assert any(not torch.allclose(g_a[n], g_b[n], atol=1e-7) for n in g_a)
    # on-policy GRPO never clips at the first epoch; the teacher anchor moves the ratio off 1
    assert m_b["clip/frac"] == 0 and m_a["clip/frac"] > 0
    assert {"rlad/teacher_logratio", "rlad/clamp_frac", "clip/frac"} <= set(m_a)


# --- 2. the clamp ------------------------------------------------------------------------------------------
def _adversarial(n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=gen) * 6
    old = logp + 0.05 * torch.randn(n, generator=gen)
    teacher = logp + torch.randn(n, generator=gen) * 10 ** torch.randint(-2, 4, (n,), generator=gen).float()
    teacher[:5] = torch.tensor([-1e4, 1e4, -float("inf"), 0.0, -1e-9])
    adv = torch.randn(n, generator=gen)
    return logp[None], old[None], teacher[None], adv[None]


@pytest.mark.parametrize("alpha,delta", [(0.5, 1.0), (0.1, 0.3), (0.9, 2.0), (0.0, 1.0)])
def test_teacher_log_ratio_is_clamped_and_has_no_gradient_where_clamped(alpha, delta):
    logp, old, teacher, adv = _adversarial()
    logp = logp.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    log_r, term = trrd_log_ratio(logp, old, teacher, alpha=alpha, delta=delta)
    assert torch.all(term.abs() <= delta) and torch.isfinite(log_r).all()
    seen = log_r - alpha * (logp - old)  # what the loss sees of the teacher
    assert torch.all(seen.abs() <= (1 - alpha) * delta + 1e-6)
    mask = torch.ones_like(adv)
    loss, metrics = policy_loss("trrd", logp, old, adv, mask, agg="token-mean", norm=LossNorm(adv.numel(), 1),
                                teacher_logp=teacher, alpha=alpha, delta=delta, eps_low=1e9, eps_high=1e9)
    g_teacher, g_logp = torch.autograd.grad(loss, [teacher, logp])
    clamped = ((logp - teacher).abs() > delta).detach()
    assert clamped.any() and (~clamped).any()
    assert torch.all(g_teacher[clamped] == 0)
    if alpha < 1:  # (the PPO clip is disabled above, so every unclamped token passes a teacher gradient)
        assert torch.all(g_teacher[~clamped] != 0)
    assert torch.isfinite(g_logp).all()
    assert metrics["rlad/clamp_frac"] == pytest.approx(float(clamped.float().mean()))
    # the loss only sees the clamped log-ratio: a teacher moved onto the clamp boundary gives the same loss
    boundary = (logp - torch.clamp(logp - teacher, -delta, delta)).detach()
    again, _ = policy_loss("trrd", logp, old, adv, mask, agg="token-mean", norm=LossNorm(adv.numel(), 1),
                           teacher_logp=boundary, alpha=alpha, delta=delta, eps_low=1e9, eps_high=1e9)
    assert again.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_ratio_gradient_is_one_on_clamped_and_unclamped_tokens(alpha):
    """The anchor π_old^α π_T^(1−α) has no θ-dependence (methods.md §5), so d log r / d log π = 1 on
    every token, clamped or not, and the loss gradient of an unclipped token is −A·r; the literal
    reading (clamp_on=ratio) gives α where the clamp is active."""
    delta = 1.0
    # log π − log π_T: 0.3 (inside), 2.5 (clamped above), −4 (clamped below), −1.0 + 1e-3 (inside, at the edge)
    logp = torch.tensor([[-1.0, -0.5, -3.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.3, -3.0, 1.0, -1.001]])
    old = torch.tensor([[-1.1, -0.4, -3.2, -2.0]])
    clamped = torch.tensor([False, True, True, False])
    log_r, term = trrd_log_ratio(logp, old, teacher, alpha=alpha, delta=delta)
    (d_log_r,) = torch.autograd.grad(log_r.sum(), logp, retain_graph=True)
    assert torch.allclose(d_log_r, torch.ones(4))
    expected_term = torch.tensor([0.3, 1.0, -1.0, -0.999])
    assert torch.allclose(term.detach(), expected_term[None], atol=1e-6)
    assert torch.allclose(log_r.detach(), alpha * (logp.detach() - old) + (1 - alpha) * expected_term, atol=1e-6)
    # the ratio itself: d r / d log π = r
    r = torch.exp(log_r)
    (d_r,) = torch.autograd.grad(r.sum(), logp)
    assert torch.allclose(d_r, r.detach())
    # through the registered loss (PPO clip disabled): d loss_t / d log π_t = −A_t r_t / N
    adv = torch.tensor([[1.0, -1.0, 0.5, -2.0]])
    loss, _ = policy_loss("trrd", logp, old, adv, torch.ones_like(adv), agg="token-mean", norm=LossNorm(4, 1),
                          teacher_logp=teacher, alpha=alpha, delta=delta, eps_low=0.999, eps_high=1e9)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -adv * r.detach() / 4, atol=1e-6)
    # the literal reading, kept as a setting: α where the clamp is active, 1 elsewhere
    log_r, _ = trrd_log_ratio(logp, old, teacher, alpha=alpha, delta=delta, clamp_on="ratio")
    (d_log_r,) = torch.autograd.grad(log_r.sum(), logp)
    assert torch.allclose(d_log_r[0], torch.where(clamped, torch.tensor(alpha), torch.tensor(1.0)))
    with pytest.raises(ValueError, match="clamp_on"):
        trrd_log_ratio(logp, old, teacher, alpha=alpha, delta=delta, clamp_on="nope")


def test_ratio_anchor_formula():
    logp, old, teacher, _ = _adversarial(50, seed=2)
    teacher = teacher.clamp(min=-50)
    log_r, _ = trrd_log_ratio(logp, old, teacher, alpha=0.3, delta=1e9)  # no clamp: r = π/(π_old^α π_T^(1−α))
    assert torch.allclose(log_r, logp - (0.3 * old + 0.7 * teacher), atol=1e-4)


# --- 4. the teacher -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_larger_teacher_scores_the_students_own_tokens(setup, temperature):
    """At the sampling temperature: the teacher's log-probs are those of softmax(logits / T)."""
    teacher = setup.teacher
    assert teacher.config.num_hidden_layers == 4 and teacher.config.hidden_size == 96
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    prepared = make_method("rlad").prepare(setup.groups, context(setup, temperature=temperature))
    fields = prepared.token_fields["teacher_logp"]
    assert len(fields) == len(prepared.traces) == 12
    assert prepared.metrics["teacher/tokens"] == sum(t.response_tokens for t in prepared.traces)
    for trace, values in zip(prepared.traces[:4], fields):
        assert values.shape == (len(trace),)
        pos = torch.as_tensor(trace.sampled_positions)
        off = torch.ones(len(trace), dtype=torch.bool)
        off[pos] = False
        assert torch.all(values[off] == 0)
        # independent check: a plain unpacked forward of the teacher over the trace
        with torch.no_grad():
            logits = teacher(torch.tensor([trace.input_ids])).logits[0]
        targets = torch.tensor(trace.input_ids)[pos, None]
        direct = torch.log_softmax(logits[pos - 1].float() / temperature, -1).gather(-1, targets)[:, 0]
        assert torch.allclose(values[pos], direct, atol=1e-4)
        # a different model from the student: its log-probs of the student's tokens differ
        assert not torch.allclose(values[pos], torch.tensor(trace.logprobs)[pos], atol=1e-2)


def test_teacher_with_another_tokenizer_is_a_config_error(setup, tmp_path):
    """One extra token is enough to refuse: the teacher would score different strings."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(setup.teacher_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<|not-in-the-student|>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ConfigError, match="does not share the policy's tokenizer: vocabulary sizes differ"):
        load_teacher(str(other), setup.tokenizer, tmp_path / "out", "cpu", seed=0)


def test_missing_teacher_is_a_config_error(setup):
    cfg = TrainConfig(env="toy", policy="tiny-toy", method="rlad")
    assert cfg.teacher is None
    with pytest.raises(ConfigError, match="--teacher"):
        check_requirements(cfg, make_method("rlad"), make_env_factory("toy"))
    check_requirements(replace(cfg, teacher=str(setup.teacher_dir)), make_method("rlad"), make_env_factory("toy"))
    with pytest.raises(ConfigError, match="--teacher"):  # and prepare refuses a context without one
        make_method("rlad").prepare(setup.groups, context(setup, teacher=None))


def test_settings_are_checked_and_typed():
    assert make_method("rlad").settings["clamp_on"] == "anchor"
    with pytest.raises(ConfigError, match="clamp_on"):
        make_method("rlad", clamp_on="nope")
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"delta": 0.0}, {"beta": 1.0}):
        with pytest.raises(ConfigError):
            make_method("rlad", **bad)
    assert parse_method_args("rlad", ["alpha=0.7", "delta=2"]) == {"alpha": 0.7, "delta": 2.0}
    m = make_method("rlad")
    assert (m.cfg.alpha, m.cfg.delta, m.cfg.clip_low, m.cfg.clip_high, m.cfg.loss_agg) == \
        (0.5, 1.0, 0.2, 0.28, "seq-mean-token-mean")
    assert m.requires == ("teacher_model",) and m.paper == "2602.22495" and not m.needs_reference


def test_the_training_loop_loads_the_teacher_and_hands_it_to_rlad(setup, tmp_path):
    """``harness train --method rlad --teacher DIR`` in-process: the loop loads the teacher through
    ``load_teacher`` and passes it as ``ctx.teacher``; the step logs the teacher metrics."""
    from harness.store import Store, train_steps
    from trainers.loop import train

    db = f"sqlite:///{tmp_path}/h.db"
    cfg = TrainConfig(env="toy", policy=str(setup.student_dir), method="rlad", method_overrides={"alpha": 0.25},
                      teacher=str(setup.teacher_dir), db=db, out_dir=str(tmp_path / "out"), run="r", steps=1,
                      tasks_per_step=2, group_size=2, eval_every=0, max_new_tokens=8, device="cpu", quiet=True)
    train(cfg, echo=lambda line: None)
    assert Store(db).get_run("r").config["method_settings"]["alpha"] == 0.25
    row = train_steps(Store(db), "r").iloc[-1]
    assert row["teacher/tokens"] > 0 and "rlad/clamp_frac" in row and "time/teacher" in row
