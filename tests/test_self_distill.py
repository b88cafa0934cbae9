"""OPSD / SDPO (methods.md §6.6): self-distillation as the actor loss, on a tiny real model and
real toy episodes.

1. The top-K + tail pieces: the student's log-probs at the teacher's ids equal a full
   log-softmax (values and gradient), and the tail bucket makes every K + 1 row a distribution.
2. Teacher = student (same weights, no privileged note): loss and gradient are zero, for both
   divergences, through the real update (``policy_update``). With the privileged note the KL is
   positive and has a gradient.
3. The gradient flows only through the student: none reaches the teacher's tensors.
4. SDPO builds each trace's context from the first successful sibling other than itself, and a
   trace without one (a group with no success, or the only success with ``exclude_self``) gets
   no signal and does not train.
5. The teacher choice: ``initial`` stays frozen while the policy moves, ``current`` follows it,
   ``ema`` (SDPO's default) is the hand EMA of the weights, step by step and across a resume.

Rollouts come from the untrained tiny toy policy; the tests overwrite the rewards to get
successes where they need them.
Run: .venv/bin/python -m pytest tests/test_self_distill.py
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from toy_groups import BareFactory, toy_rollouts, update_capturing_grads

from harness.errors import ConfigError
from harness.policy.trace import TokenTrace
from harness.types import Group, Score
from trainers.config import TrainConfig
from trainers.loop import check_requirements
from trainers.losses import LossNorm, token_logprobs
from trainers.methods import MethodContext, Prepared, make_method
from trainers.methods.self_distill import IDS, LOGP, bucket_kl, render_attempt, support_logprobs, with_tail
from trainers.packing import pack
from trainers.teacher import per_position
from trainers.update import UpdateSettings

TOPK = 8


def _rewards(group: Group, wins: list[int]) -> Group:
    eps = [replace(e, score=Score(reward=float(k in wins), success=k in wins)) for k, e in enumerate(group.episodes)]
    return Group(task_id=group.task_id, group_id=group.group_id, episodes=eps)


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    toy = toy_rollouts(tiny_toy_dir, 2, rewards=lambda groups: [_rewards(g, [0, 2]) for g in groups])
    return toy.model, toy.tokenizer, toy.factory, toy.tasks, toy.groups


def _ctx(setup, model=None, step=1):
    base, tokenizer, factory, tasks, _ = setup
    return MethodContext(model=model if model is not None else base, tokenizer=tokenizer, temperature=1.0,
                         micro_batch_tokens=4096, factory=factory, tasks=tasks, privileged=factory.privileged_info,
                         step=step)


def _opsd(**kw):
    return make_method("opsd", topk=TOPK, **kw)


@pytest.fixture(scope="module")
def opsd_prepared(setup):
    return _opsd().prepare(setup[4], _ctx(setup))


def _update(model, prepared, method, ctx):
    """One real update on a copy of ``model``: (metrics, gradients)."""
    metrics, grads, _ = update_capturing_grads(model, method, prepared,
                                               UpdateSettings(micro_batch_tokens=512, max_new_tokens=24),
                                               pad_token_id=ctx.tokenizer.pad_token_id, lr=0.0, ctx=ctx)
    return metrics, grads


# --- 1. the top-K + tail pieces -------------------------------------------------------------------------
def test_student_support_logprobs_equal_a_full_log_softmax_with_its_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 2, 4, 6])
    ids = torch.stack([torch.randperm(40, generator=gen)[:5] for _ in rows])
    for temperature in (1.0, 0.7):
        got = support_logprobs(logits, rows, ids, temperature)
        want = torch.log_softmax(logits[rows] / temperature, -1).gather(-1, ids)
        assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
        assert torch.autograd.gradcheck(lambda x: support_logprobs(x, rows, ids, temperature), (logits,))
        w = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
        (g_got,) = torch.autograd.grad((got * w).sum(), logits)
        (g_want,) = torch.autograd.grad((want * w).sum(), logits)
        assert torch.allclose(g_got, g_want, atol=1e-12)
        assert torch.all(g_got[[0, 3, 5]] == 0)  # rows not asked for get no gradient
    # bf16 logits (CUDA autocast): float32 math inside, a bf16 gradient like the logits
    half = logits.detach().to(torch.bfloat16).requires_grad_(True)
    got = support_logprobs(half, rows, ids, 0.7)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.log_softmax(half.float()[rows] / 0.7, -1).gather(-1, ids), atol=1e-5)
    (g_half,) = torch.autograd.grad(got.sum(), half)
    assert g_half.dtype == torch.bfloat16 and g_half.abs().sum() > 0


def test_the_tail_bucket_makes_each_row_a_distribution(setup, opsd_prepared):
    model = setup[0]
    fields = opsd_prepared.token_fields
    assert opsd_prepared.traces and set(fields) == {IDS, LOGP}
    for trace, ids, logp in zip(opsd_prepared.traces, fields[IDS], fields[LOGP]):
        pos = torch.as_tensor(trace.sampled_positions)
        assert ids.shape == (len(trace), TOPK) and logp.shape == (len(trace), TOPK)
        teacher = with_tail(logp[pos])
        assert torch.allclose(teacher.exp().sum(-1), torch.ones(len(pos)), atol=1e-5)
        assert torch.all(teacher[:, -1].exp() > 0)  # an untrained 451-token model spreads beyond 8 tokens
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([trace.input_ids]), use_cache=False).logits[0]
        student = with_tail(support_logprobs(logits, pos - 1, ids[pos]))
        assert torch.allclose(student.exp().sum(-1), torch.ones(len(pos)), atol=1e-5)
    # a top-K that holds the whole vocabulary: the tail is (floored) zero and rows still sum to 1
    full = torch.log_softmax(torch.randn(3, 6), -1)
    assert torch.allclose(with_tail(full).exp().sum(-1), torch.ones(3), atol=1e-6)
    assert 0 <= opsd_prepared.metrics["sd/teacher_tail_mass"] <= 1


# --- 2. zero when teacher = student; positive with the privileged note ---------------------------------
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_loss_and_gradient_vanish_when_the_teacher_is_the_student(setup, divergence):
    model, _, _, _, groups = setup
    ctx = _ctx(setup)
    method = _opsd(divergence=divergence)
    groups = groups[:1]  # one group is enough here, and keeps the four updates cheap
    traces = [e.trace for g in groups for e in g.episodes]
    # the teacher with the student's weights reading the unchanged trace (no privileged note)
    fields, _ = method.teacher_fields(model, traces, None, ctx)
    same = Prepared(traces=traces, advantages=[0.0] * len(traces), token_fields=fields)
    metrics, grads = _update(model, same, method, ctx)
    zero_loss, zero_grad = abs(metrics["loss/policy"]), max(float(g.abs().max()) for g in grads.values())
    assert zero_loss < 1e-8 and abs(metrics["sd/kl_mean"]) < 1e-8 and zero_grad < 1e-7  # float noise only

    # the real teacher reads the answer: a positive KL with a real gradient
    prepared = method.prepare(groups, ctx)
    metrics, grads = _update(model, prepared, method, ctx)
    # (the untrained tiny model barely reacts to the note, so the KL is small: ~4e-5, 1e5 x the noise above)
    assert metrics["loss/policy"] > 1e-5 and metrics["sd/kl_mean"] > 1e-5
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-5
    assert prepared.metrics["sd/distilled_frac"] == 1.0


def test_exact_zero_on_identical_buckets_and_positive_otherwise():
    gen = torch.Generator().manual_seed(1)
    s = torch.log_softmax(torch.randn(5, 30, generator=gen), -1)[:, :6].requires_grad_(True)
    for divergence in ("forward", "reverse"):
        d = bucket_kl(with_tail(s), with_tail(s.detach()), divergence)
        assert torch.all(d.abs() < 1e-7)
        (g,) = torch.autograd.grad(d.sum(), s)
        assert g.abs().max() < 1e-6
        t = torch.log_softmax(torch.randn(5, 30, generator=gen), -1)[:, :6]
        assert torch.all(bucket_kl(with_tail(s), with_tail(t), divergence) > 0)
    with pytest.raises(ValueError):
        bucket_kl(s, s, "jsd")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_opsd_is_forward_and_sdpo_reverse_kl_by_hand(temperature):
    """A 3-token vocabulary, so the teacher's top-2 plus the tail bucket is the whole distribution:
    p_S = (0.5, 0.3, 0.2) (the student's logits are T · log p_S, read at temperature T), p_T =
    (0.1, 0.3, 0.6). Forward KL(p_T‖p_S) = 0.6 ln 3 − 0.1 ln 5 = 0.49822 (OPSD), reverse
    KL(p_S‖p_T) = 0.5 ln 5 − 0.2 ln 3 = 0.58500 (SDPO), through each method's loss."""
    p_s, p_t = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.3, 0.6])
    trace = TokenTrace()
    trace.add_prompt([1, 2])
    trace.add_response([0, 1], [-1.0, -1.0])
    top_ids = torch.tensor([[2, 1], [2, 1]])                   # the teacher's top-2, most likely first
    top_logp = p_t[top_ids].log()
    packed = pack([trace], [0.0], 64, fields={IDS: [per_position(trace, top_ids)],
                                              LOGP: [per_position(trace, top_logp)]})
    (mb,) = packed.micro_batches
    logits = (temperature * p_s.log()).expand(1, len(trace), 3).clone().requires_grad_(True)
    ctx = MethodContext(temperature=temperature)
    hand = {"opsd": 0.6 * math.log(3) - 0.1 * math.log(5), "sdpo": 0.5 * math.log(5) - 0.2 * math.log(3)}
    assert hand["opsd"] == pytest.approx(0.49822, abs=1e-5) and hand["sdpo"] == pytest.approx(0.58500, abs=1e-5)
    for name, expected in hand.items():
        method = make_method(name, token_clip=0.0)  # the KL itself (OPSD's clip: the next test)
        loss, metrics = method.loss(mb, torch.zeros_like(mb.old_logprobs), packed.loss_norm(), ctx,
                                    outputs=SimpleNamespace(logits=logits))
        assert loss.item() == pytest.approx(expected, rel=1e-5), name   # both tokens carry the same KL
        assert metrics["sd/kl_mean"].item() == pytest.approx(expected, rel=1e-5)


def test_opsd_token_clip_caps_each_term_at_tau_with_no_gradient_beyond():
    """OPSD's per-token pointwise clip, D = Σ_b min(ℓ_b, τ) with ℓ_b = p_T(b) (log p_T(b) − log p_S(b)),
    on the vocabulary above: ℓ = (0.6 ln 3, 0, 0.1 ln 0.2) = (0.659, 0, −0.161) for tokens (2, 1, 0).
    With OPSD's τ = 0.05 the first term contributes τ and no gradient, the negative one is kept:
    D = 0.05 + 0.1 ln 0.2 = −0.11094. Its gradient in the logits z (T = 1) is g − p_S Σ g with
    g = dD/d log p_S = (−0.1, −0.3, 0) for tokens (0, 1, 2): (0.1, −0.18, 0.08); unclipped
    (g = −p_T) it is p_S − p_T = (0.4, 0, −0.4)."""
    p_s, p_t = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.3, 0.6])
    trace = TokenTrace()
    trace.add_prompt([1, 2])
    trace.add_response([0, 1], [-1.0, -1.0])
    top_ids = torch.tensor([[2, 1], [2, 1]])
    packed = pack([trace], [0.0], 64, fields={IDS: [per_position(trace, top_ids)],
                                              LOGP: [per_position(trace, p_t[top_ids].log())]})
    (mb,) = packed.micro_batches
    rows = mb.loss_mask[0] > 0
    assert make_method("opsd").cfg.token_clip == 0.05 and make_method("sdpo").cfg.token_clip == 0.0
    for tau, value, grad in ((0.05, 0.05 + 0.1 * math.log(0.2), [0.1, -0.18, 0.08]),
                             (0.0, 0.6 * math.log(3) + 0.1 * math.log(0.2), [0.4, 0.0, -0.4])):
        logits = p_s.log().expand(1, len(trace), 3).clone().requires_grad_(True)
        loss, metrics = make_method("opsd", token_clip=tau).loss(
            mb, torch.zeros_like(mb.old_logprobs), packed.loss_norm(), MethodContext(temperature=1.0),
            outputs=SimpleNamespace(logits=logits))
        assert loss.item() == pytest.approx(value, abs=1e-6), tau
        assert metrics["sd/kl_mean"].item() == pytest.approx(value, abs=1e-6)
        (g,) = torch.autograd.grad(loss, logits)
        # seq-mean-token-mean over the trace's two tokens: each carries half of the per-token gradient
        g = g[0, :-1]  # logits row j scores token j + 1, as the loss mask does
        assert torch.allclose(g[rows], torch.tensor(grad).expand(2, 3) / 2, atol=1e-6), tau
        assert torch.all(g[~rows] == 0)


# --- 3. the gradient flows only through the student ---------------------------------------------------
def test_no_gradient_reaches_the_teacher(setup, opsd_prepared):
    model = setup[0]
    method = _opsd()
    fields = opsd_prepared.token_fields
    assert not any(t.requires_grad for values in fields.values() for t in values)  # built without a graph
    mb = pack(opsd_prepared.traces, opsd_prepared.advantages, 4096, fields=fields).micro_batches[0]
    # even a teacher tensor that carries a graph cannot receive a gradient from the loss
    teacher = mb.fields[LOGP].clone().requires_grad_(True)
    mb.fields[LOGP] = teacher
    outputs = model(**mb.model_inputs())
    logp = token_logprobs(outputs.logits, mb.input_ids)
    norm = LossNorm(num_tokens=float(mb.loss_mask.sum()), num_seqs=len(mb.spans))
    loss, _ = method.loss(mb, logp, norm, _ctx(setup), outputs=outputs)
    (g_teacher,) = torch.autograd.grad(loss, [teacher], allow_unused=True, retain_graph=True)
    assert g_teacher is None
    (g_w,) = torch.autograd.grad(loss, [model.lm_head.weight])
    assert g_w.abs().sum() > 0


# --- 4. SDPO's sibling context ------------------------------------------------------------------------
def test_sdpo_distils_from_a_successful_sibling_and_skips_traces_without_one(setup):
    model, tokenizer, _, tasks, groups = setup
    ctx = _ctx(setup)
    no_win, one_win = _rewards(groups[0], []), _rewards(groups[1], [1])
    method = make_method("sdpo", topk=TOPK)
    assert method.cfg.divergence == "reverse" and method.cfg.teacher == "ema" and method.requires == ()
    prepared = method.prepare([no_win, one_win], ctx)
    assert prepared.metrics["sd/no_success_groups"] == 1.0
    # the only success is not its own demonstration; its three failed siblings learn from it
    expected = [one_win.episodes[k].trace for k in (0, 2, 3)]
    assert [id(t) for t in prepared.traces] == [id(t) for t in expected]
    assert prepared.metrics["sd/distilled_frac"] == pytest.approx(3 / 8)
    demo = one_win.episodes[1]
    text = render_attempt(demo, tasks[one_win.task_id].instruction)
    assert text and tasks[one_win.task_id].instruction not in text
    assert all(line.startswith(("assistant:", "call ", "  ->", "user:")) for line in text.splitlines())
    own, _ = method.teacher_fields(model, expected, [text] * 3, ctx)
    assert all(torch.equal(a, b) for a, b in zip(own[LOGP], prepared.token_fields[LOGP]))
    assert all(torch.equal(a, b) for a, b in zip(own[IDS], prepared.token_fields[IDS]))
    # ... and the sibling's text did change the teacher (vs. reading the trace unchanged)
    plain, _ = method.teacher_fields(model, expected, None, ctx)
    assert any(not torch.equal(a, b) for a, b in zip(plain[LOGP], prepared.token_fields[LOGP]))

    # exclude_self=false: the lone success distils from itself too; no success anywhere: nothing trains
    assert len(make_method("sdpo", topk=TOPK, exclude_self=False).prepare([no_win, one_win], ctx).traces) == 4
    nothing = method.prepare([no_win], ctx)
    assert nothing.traces == [] and nothing.metrics["sd/distilled_frac"] == 0.0


def test_requirements_follow_the_context(setup):
    bare = BareFactory()  # an env factory with no privileged_info
    cfg = lambda m: TrainConfig(env="no-answers", policy="tiny-toy", method=m)  # noqa: E731
    with pytest.raises(ConfigError, match="privileged"):
        check_requirements(cfg("opsd"), make_method("opsd"), bare)
    check_requirements(cfg("sdpo"), make_method("sdpo"), bare)  # siblings come from the rollout
    with pytest.raises(ConfigError, match="privileged"):
        check_requirements(cfg("sdpo"), make_method("sdpo", context="env"), bare)


@pytest.mark.parametrize("bad", [{"divergence": "jsd"}, {"context": "oracle"}, {"teacher": "mean"}, {"topk": 0},
                                 {"sync_every": 0}, {"ema_rate": 0.0}, {"note_max_tokens": 0}, {"lam_start": 0.5}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        make_method("opsd", **bad)


# --- 5. which weights the teacher runs on ----------------------------------------------------------------
def test_initial_teacher_stays_frozen_while_current_follows_the_policy(setup, opsd_prepared):
    model, _, _, _, groups = setup
    live = copy.deepcopy(model)
    initial = _opsd()
    first = initial.prepare(groups, _ctx(setup, model=live, step=1))
    assert all(torch.equal(a, b) for a, b in zip(first.token_fields[LOGP], opsd_prepared.token_fields[LOGP]))
    with torch.no_grad():
        live.lm_head.weight.add_(0.5 * torch.randn_like(live.lm_head.weight))
    later = initial.prepare(groups, _ctx(setup, model=live, step=100))
    assert all(torch.equal(a, b) for a, b in zip(first.token_fields[LOGP], later.token_fields[LOGP]))
    current = _opsd(teacher="current").prepare(groups, _ctx(setup, model=live, step=100))
    assert any(not torch.equal(a, b) for a, b in zip(first.token_fields[LOGP], current.token_fields[LOGP]))


def test_ema_teacher_is_the_hand_ema_of_the_weights_and_a_resume_continues_it(setup, tmp_path):
    model, _, _, _, groups = setup
    beta = 0.05
    live = copy.deepcopy(model)
    sdpo = make_method("sdpo", topk=TOPK)
    assert sdpo.cfg.teacher == "ema" and sdpo.cfg.ema_rate == beta  # SDPO's official default

    def weights():
        return {n: p.detach().clone() for n, p in live.named_parameters()}

    def a_step():  # stands in for an update: every weight moves
        with torch.no_grad():
            for p in live.parameters():
                p.add_(0.1 * torch.randn_like(p))

    sdpo.prepare(groups, _ctx(setup, model=live, step=1))
    theta1 = weights()
    a_step()
    theta2 = weights()
    sdpo.prepare(groups, _ctx(setup, model=live, step=2))
    sdpo.prepare(groups, _ctx(setup, model=live, step=2))  # once per step, however often prepare runs
    hand = {n: (1 - beta) * theta1[n] + beta * theta2[n] for n in theta1}
    assert all(torch.allclose(sdpo.snapshot.params[n], hand[n], rtol=0, atol=1e-6) for n in hand)
    # the teacher scores with exactly those weights
    ema_model = copy.deepcopy(model)
    x = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        for n, p in ema_model.named_parameters():
            p.copy_(hand[n])
        assert torch.allclose(sdpo.snapshot.teacher(live, 2)(input_ids=x).logits, ema_model(input_ids=x).logits,
                              atol=1e-5)
    # a checkpoint (the method's state, through a file as the loop saves it) continues the same average
    torch.save(sdpo.state_dict(), tmp_path / "method_state.pt")
    resumed = make_method("sdpo", topk=TOPK)
    resumed.load_state_dict(torch.load(tmp_path / "method_state.pt", map_location="cpu", weights_only=False))
    a_step()
    theta3 = weights()
    for method in (sdpo, resumed):
        method.prepare(groups, _ctx(setup, model=live, step=3))
        assert all(torch.allclose(method.snapshot.params[n], (1 - beta) * hand[n] + beta * theta3[n], rtol=0,
                                  atol=1e-6) for n in hand)
    with pytest.raises(ConfigError, match="rate"):
        make_method("sdpo", ema_rate=0.1).load_state_dict(torch.load(tmp_path / "method_state.pt",
                                                                     weights_only=False))
