"""SGCD (methods.md §1): the paper's four propositions, on a tiny real model and real toy episodes.

1. No gradient path through the teacher or the credit reference (checked by autograd).
2. sign(Â_t) = sign(A) for every token.
3. 1 <= W_t <= c.
4. With gamma = 0, SGCD is GRPO exactly: same advantages, same loss, same gradients, same update.

Plus the teacher's token alignment: scoring the student's own sequence as "teacher" reproduces
the sampling distribution (so KL = 0), and the re-prompted teacher sees exactly the student's
tokens after its first prompt.

Rollouts come from the untrained tiny toy policy, which almost never succeeds; to get mixed
groups the tests overwrite the rewards (alternating 1 / 0 within each group). The propositions
are about the credit math, which depends on the rewards only through A.
Run: .venv/bin/python -m pytest tests/test_sgcd.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from toy_groups import toy_rollouts, update_capturing_grads

from harness.types import Group
from trainers.credit_weights import SalienceSettings, credit_weights, salience, topk_reverse_kl, weighted_advantages
from trainers.losses import LossNorm, policy_loss
from trainers.methods import MethodContext, make_method
from trainers.packing import pack
from trainers.teacher import score_with_teacher, teacher_sequence
from trainers.update import UpdateSettings

TOPK = 8


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    toy = toy_rollouts(tiny_toy_dir, 3, record_topk=TOPK)  # rewards 1, 0, 1, 0: see toy_groups.py
    return toy.model, toy.tokenizer, toy.factory, toy.tasks, toy.groups


def _ctx(setup, **kw):
    from trainers.summarizer import make_summarizer

    model, tokenizer, factory, tasks, _ = setup
    return MethodContext(model=model, tokenizer=tokenizer, temperature=1.0, micro_batch_tokens=4096,
                         factory=factory, tasks=tasks, summarizer=make_summarizer("diff"), **kw)


# --- teacher alignment ----------------------------------------------------------------------------
def test_the_student_as_its_own_teacher_has_zero_divergence(setup):
    model, tokenizer, _, _, groups = setup
    traces = [e.trace for g in groups for e in g.episodes]
    support = [t.student_topk()[0] for t in traces]
    scores = score_with_teacher(model, [list(t.input_ids) for t in traces], [t.sampled_positions for t in traces],
                                support, temperature=1.0, micro_batch_tokens=512)
    for trace, sc in zip(traces, scores):
        ids, lp = trace.student_topk()
        assert ids.shape == (trace.response_tokens, TOPK)
        assert (sc.support_logprobs - lp).abs().max() <= 1e-4
        # the sampled token's own log-prob is in the support whenever it was a top-K token
        d = topk_reverse_kl(lp, sc.support_logprobs)
        assert d.max() <= 1e-4
        assert torch.all(sc.entropy >= 0)


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_the_shared_prefix_pass_scores_like_whole_sequences(setup, monkeypatch, path):
    """Siblings share the teacher's first prompt: it runs once and its KV cache serves every
    continuation (packed with a 4D mask under sdpa/eager, else right-padded). Both give the
    scores of independent whole-sequence passes, at a temperature other than 1 too."""
    import trainers.teacher as teacher_mod
    from trainers.teacher import score_shared_prefix

    model, tokenizer, _, _, groups = setup
    if path == "padded":
        monkeypatch.setattr(teacher_mod, "_MASKABLE", ())
    group = groups[0]
    first = teacher_sequence(tokenizer, group.episodes[0].trace, "Divergence: the second call.", 512)[0]
    cut = len(first) - (len(group.episodes[0].trace) - group.episodes[0].trace.first_prompt_len)
    prefix = first[:cut]
    traces = [e.trace for e in group.episodes]
    suffixes = [list(t.input_ids[t.first_prompt_len:]) for t in traces]
    positions = [[p + cut - t.first_prompt_len for p in t.sampled_positions] for t in traces]
    support = [t.student_topk()[0] for t in traces]
    whole = score_with_teacher(model, [prefix + x for x in suffixes], positions, support, temperature=0.7,
                               micro_batch_tokens=4096)
    shared = score_shared_prefix(model, prefix, suffixes, positions, support, temperature=0.7, micro_batch_tokens=40)
    for a, b in zip(whole, shared):
        assert torch.allclose(a.support_logprobs, b.support_logprobs, atol=1e-4)
        assert torch.allclose(a.entropy, b.entropy, atol=1e-4)


def test_teacher_sequence_changes_only_the_first_prompt(setup):
    _, tokenizer, _, _, groups = setup
    trace = groups[0].episodes[0].trace
    ids, offset = teacher_sequence(tokenizer, trace, "State checks: look the item up first.", 512)
    assert offset > 0
    assert ids[trace.first_prompt_len + offset:] == trace.input_ids[trace.first_prompt_len:]
    text = tokenizer.decode(ids[: trace.first_prompt_len + offset])
    assert "look the item up first" in text and "Credit reference" in text
    # sampled tokens sit at position + offset in the teacher sequence
    for p in trace.sampled_positions:
        assert ids[p + offset] == trace.input_ids[p]


# --- proposition 3 (and the salience contract), on adversarial inputs --------------------------------
@pytest.mark.parametrize("mode", ["absolute", "spike", "zscore", "minmax", "none"])
def test_weights_are_bounded_and_salience_in_unit_interval(mode):
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = [int(x) for x in torch.randint(1, 40, (3,), generator=gen)]
        d = [torch.rand(k, generator=gen) ** 4 * 10 ** float(torch.randint(-6, 6, (1,), generator=gen)) for k in n]
        if trial % 5 == 0:
            d = [torch.zeros(k) for k in n]  # no divergence anywhere
        h = [torch.rand(k, generator=gen) * 5 for k in n]
        turns = [torch.arange(k) // 5 for k in n]
        for scope in ("group", "trajectory"):
            s = salience(d, h, turns, SalienceSettings(mode=mode, span=trial % 3, scope=scope))
            for x, k in zip(s, n):
                assert x.shape == (k,) and torch.all((x >= 0) & (x <= 1)) and not torch.isnan(x).any()
                for gamma, cap in ((1.0, 2.0), (5.0, 1.5), (0.0, 2.0), (100.0, 1.0)):
                    w = credit_weights(x, gamma, cap)
                    assert torch.all(w >= 1.0) and torch.all(w <= cap)


def test_spike_salience_marks_the_outlier_and_respects_the_entropy_gate():
    d = torch.full((20,), 0.01)
    d[7] = 5.0
    h = torch.full((20,), 1.0)
    gated = SalienceSettings(entropy_kappa=2.0)
    s = salience([d], [h], [torch.zeros(20)], gated)[0]
    assert s[7] == 1.0 and s.sum() == 1.0  # 0.01 nats is under the floor
    h[7] = 9.0  # the teacher is unsure exactly there: no credit from this spike ...
    assert salience([d], [h], [torch.zeros(20)], gated)[0].sum() == 0.0
    assert salience([d], [h], [torch.zeros(20)], SalienceSettings())[0].sum() == 1.0  # ... unless the gate is off
    s = salience([d], [h], [torch.zeros(20)], SalienceSettings(mode="zscore", span=2))[0]
    assert s[7:10].tolist() == [1.0, 1.0, 1.0] and s.sum() == 3.0


# --- propositions 1-4 through the method ------------------------------------------------------------
def _advantage_by_trace(prepared_grpo):
    return {id(t): a for t, a in zip(prepared_grpo.traces, prepared_grpo.advantages)}


# The untrained tiny policy cannot read a reference, so calibrated SGCD gives it W = 1 everywhere
# (tests/test_sgcd_credit.py). The propositions must hold for any salience, so these tests use the
# uncalibrated relative rule, which amplifies many tokens: no control pass, no floor.
UNCALIBRATED = dict(control="off", kl_floor=0.0, salience="zscore")


def test_sign_preserved_and_weights_bounded_through_prepare(setup):
    groups = setup[4]
    sgcd = make_method("sgcd", gamma=1.0, cap=2.0, topk=TOPK, **UNCALIBRATED)
    grpo = make_method("grpo", dynamic_sampling="resample")
    prepared = sgcd.prepare(groups, _ctx(setup))
    plain = _advantage_by_trace(grpo.prepare(groups, None))
    assert prepared.metrics["groups/trained"] == 3 and prepared.metrics["sgcd/guided_groups"] == 3
    amplified = 0
    for trace, adv, w in zip(prepared.traces, prepared.advantages, prepared.extras["weights"]):
        a = plain[id(trace)]
        assert torch.all((w >= 1.0) & (w <= 2.0))
        sampled = adv[torch.as_tensor(trace.sampled_positions)]
        assert torch.all(torch.sign(sampled) == torch.sign(torch.tensor(a)))  # proposition 2
        assert torch.allclose(sampled, a * w)
        unsampled = torch.ones(len(trace), dtype=torch.bool)
        unsampled[torch.as_tensor(trace.sampled_positions)] = False
        assert torch.all(adv[unsampled] == 0)
        amplified += int((w > 1).sum())
    assert amplified > 0  # the teacher did move some credit (else this test would prove little)
    assert 0 < prepared.metrics["sgcd/amplified_frac"] < 1


def test_no_gradient_path_through_the_teacher_or_the_reference(setup):
    model, tokenizer, _, _, groups = setup
    trace = groups[0].episodes[0].trace
    ids, offset = teacher_sequence(tokenizer, trace, "Reusable branch: call lookup, then answer.", 512)
    # the method's teacher pass builds no graph at all
    sc = score_with_teacher(model, [ids], [[p + offset for p in trace.sampled_positions]],
                            [trace.student_topk()[0]], temperature=1.0, micro_batch_tokens=4096)[0]
    assert not sc.support_logprobs.requires_grad and not sc.entropy.requires_grad
    # even a teacher computed WITH a graph (and a differentiable reference embedding) cannot leak:
    emb = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits[0]
    rows = torch.tensor([p + offset - 1 for p in trace.sampled_positions])
    support = trace.student_topk()[0].long()
    teacher_lp = torch.log_softmax(logits[rows], -1).gather(-1, support)
    d = topk_reverse_kl(trace.student_topk()[1], teacher_lp)
    s = salience([d], [torch.ones_like(d)], [torch.zeros_like(d)], SalienceSettings(mode="minmax"))[0]
    w = credit_weights(s, 1.0, 2.0)
    adv = weighted_advantages(-0.7, w)
    assert not w.requires_grad and not adv.requires_grad
    per_pos = torch.zeros(len(trace))
    per_pos[torch.as_tensor(trace.sampled_positions)] = adv
    mb = pack([trace], [per_pos], 4096).micro_batches[0]
    student_logits = model(**mb.model_inputs()).logits
    logp = torch.log_softmax(student_logits[0, :-1].float(), -1).gather(-1, mb.input_ids[0, 1:, None]).T
    loss, _ = policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg="token-mean",
                          norm=LossNorm(num_tokens=float(mb.loss_mask.sum()), num_seqs=1))
    grads = torch.autograd.grad(loss, [emb, teacher_lp, logits], allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)  # the loss reaches neither the teacher nor its context
    # ... while it does reach the policy's weights through the student forward
    (g_w,) = torch.autograd.grad(loss, [model.lm_head.weight])
    assert g_w.abs().sum() > 0


def test_gamma_zero_is_grpo_exactly(setup):
    model, tokenizer, _, _, groups = setup
    sgcd = make_method("sgcd", gamma=0.0, topk=TOPK)
    grpo = make_method("grpo", dynamic_sampling="resample")
    p_sgcd, p_grpo = sgcd.prepare(groups, _ctx(setup)), grpo.prepare(groups, None)
    assert [id(t) for t in p_sgcd.traces] == [id(t) for t in p_grpo.traces]
    settings = UpdateSettings(micro_batch_tokens=512, max_new_tokens=24)
    (m_a, g_a, w_a), (m_b, g_b, w_b) = (update_capturing_grads(model, method, prepared, settings,
                                                               pad_token_id=tokenizer.pad_token_id)
                                        for method, prepared in ((sgcd, p_sgcd), (grpo, p_grpo)))
    assert m_a["loss/policy"] == m_b["loss/policy"]
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
    assert any(g.abs().sum() > 0 for g in g_a.values())
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


def test_sgcd_with_gain_changes_the_update(setup):
    """Not a proposition: a check that the γ=0 equality above is not vacuous."""
    model, tokenizer, _, _, groups = setup
    p1 = make_method("sgcd", gamma=1.0, topk=TOPK, **UNCALIBRATED).prepare(groups, _ctx(setup))
    p0 = make_method("sgcd", gamma=0.0, topk=TOPK, **UNCALIBRATED).prepare(groups, _ctx(setup))
    assert any(not torch.equal(a, b) for a, b in zip(p1.advantages, p0.advantages))


# --- the LLM summarizer through the method (real litellm, fake server), and the CLI ----------------
def test_llm_reference_reaches_the_teacher_and_is_paid_once(setup, tmp_path):
    from fakes.openai_server import FakeOpenAIServer

    from harness.store import Store
    from trainers.summarizer import HEADINGS, make_summarizer

    reply = "\n".join(f"## {h}\n- call lookup with the item the user names before answering" for h in HEADINGS)
    def responder(request):
        return {"content": reply, "usage": {"prompt_tokens": 900, "completion_tokens": 80}}
    store = Store(f"sqlite:///{tmp_path}/g.db")
    groups = setup[4]
    with FakeOpenAIServer(responder) as server:
        summarizer = make_summarizer("openai/gpt-4o-mini", api_base=server.base_url, api_key="k")
        ctx = _ctx(setup, store=store, run="sgcd-llm")
        ctx.summarizer = summarizer
        method = make_method("sgcd", topk=TOPK)
        first = method.prepare(groups, ctx)
        assert len(server.requests) == 3  # one call per mixed group
        again = method.prepare(groups, ctx)
        assert len(server.requests) == 3  # the guidance table answered: nothing paid twice
    assert first.metrics["summarizer/calls"] == 3 and first.metrics["summarizer/cost_usd"] > 0
    assert again.metrics["summarizer/cached"] == 3 and again.metrics["summarizer/cost_usd"] == 0
    assert first.metrics["sgcd/guided_groups"] == 3 and first.metrics["sgcd/fallback_groups"] == 0
    # the same reference gives the same teacher, hence the same divergence and credit
    assert all(torch.equal(a, b) for a, b in zip(first.advantages, again.advantages))
    assert first.metrics["sgcd/kl_reference"] == again.metrics["sgcd/kl_reference"]
    # ... and it is a different teacher from the diff summarizer's: a different divergence
    diff = method.prepare(groups, _ctx(setup))
    assert diff.metrics["sgcd/kl_reference"] != first.metrics["sgcd/kl_reference"]


def test_sgcd_from_the_command_line(tmp_path):
    import json

    from test_cli import harness

    from harness.store import Store, train_steps

    db = f"sqlite:///{tmp_path}/h.db"
    args = ("train", "--env", "toy", "--policy", "tiny-toy", "--db", db, "--steps", "1", "--tasks-per-step", "2",
            "--group-size", "3", "--eval-every", "0", "--max-new-tokens", "12", "--warm-start", "2",
            "--out-dir", str(tmp_path / "out"))
    harness(*args, "--method", "sgcd", "--summarizer", "diff", "--sgcd-gamma", "0.5", "--salience", "zscore",
            "--run", "s", check=True)
    run = Store(db).get_run("s")
    assert run.config["method_settings"]["gamma"] == 0.5 and run.config["method_settings"]["salience"] == "zscore"
    row = train_steps(Store(db), "s").iloc[-1]
    assert "sgcd/w_mean" in row and "groups/resampled" in row
    bad = harness(*args, "--method", "grpo", "--sgcd-gamma", "1", "--run", "g")
    assert bad.returncode == 2 and "does not take gamma" in bad.stderr
    bad = harness(*args, "--method", "sgcd", "--summarizer", "openai/gpt-4o-mini", "--run", "k",
                  env={"OPENAI_API_KEY": ""})
    assert bad.returncode == 2 and "summarizer" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads(json.dumps(run.config))  # the stored config stays plain JSON


def test_an_episode_with_nothing_sampled_counts_in_the_baseline_but_is_not_trained(setup):
    """E.g. a first prompt over the context window: the episode scores 0 for its group, but it has
    no tokens to train (packing such a trace would only waste a row)."""
    from harness.policy.trace import TokenTrace

    groups = setup[4]
    g = groups[0]
    empty = TokenTrace()
    empty.add_prompt(list(g.episodes[1].trace.input_ids[:10]))
    eps = [g.episodes[0], replace(g.episodes[1], trace=empty), *g.episodes[2:]]
    changed = [Group(task_id=g.task_id, group_id=g.group_id, episodes=eps), *groups[1:]]
    for method, ctx in ((make_method("grpo", dynamic_sampling="resample"), None),
                        (make_method("sgcd", topk=TOPK), _ctx(setup))):
        prepared = method.prepare(changed, ctx)
        assert all(t.response_tokens for t in prepared.traces) and empty not in prepared.traces
        assert len(prepared.traces) == sum(len(x.episodes) for x in groups) - 1
    # the baseline still saw 4 rewards (1, 0, 1, 0): episode 0's advantage is +1, not that of a 3-group
    plain = make_method("grpo", dynamic_sampling="resample").prepare(changed, None)
    assert plain.advantages[0] == pytest.approx(1.0, abs=1e-5)
