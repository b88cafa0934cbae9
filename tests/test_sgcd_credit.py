"""SGCD's credit comes from what the teacher knows (issue 13), tested through ``SGCDMethod``.

- Null teacher: no reference (teacher = student) gives W = 1 on every token.
- Placebo: neutral text of the reference's length gives W = 1 on >= 99% of tokens, on a policy
  that *is* moved by any long system prompt (so the calibration, not the floor, does the work).
- Planted signal: a teacher made to disagree at known sampled tokens puts W > 1 on exactly those
  tokens (successes and failures alike, sign kept); the same teacher with the placebo gives none.
  A scoring pass one position off puts the credit on the wrong tokens and fails this test.
- The top-K reverse KL with renormalisation equals a hand computation, at temperature 1 and 0.5,
  and the teacher scores at the sampling temperature.
- Coverage: non-mixed groups are not trained under the default keep rule; W normalised to mean 1.
- The reference is cut per section (no section dropped) and the cut is counted.

Rollouts come from the tiny toy policy; rewards are overwritten to alternate 1 / 0
(``toy_groups.py``), as in tests/test_sgcd.py.
Run: .venv/bin/python -m pytest tests/test_sgcd_credit.py
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from planted_teacher import MARKER_TEXT, FixedSummarizer, PlantedTeacher, planted_reference
from toy_groups import load_tiny_toy, toy_rollouts

from envs.registry import make_env_factory
from harness.types import Group, Score
from trainers.credit_weights import topk_reverse_kl
from trainers.methods import MethodContext, make_method
from trainers.sgcd_reference import fit_reference, neutral_text, oracle_reference, token_length
from trainers.summarizer import make_summarizer
from trainers.summarizer.prompt import HEADINGS
from trainers.teacher import _score_rows

TOPK = 8


@pytest.fixture(scope="module")
def tiny(tiny_toy_dir):
    """The untrained tiny toy policy and its mixed groups."""
    toy = toy_rollouts(tiny_toy_dir, 3, record_topk=TOPK)
    return toy.model, toy.tokenizer, toy.factory, toy.tasks, toy.groups


def _ctx(setup, model=None, summarizer=None, temperature=1.0):
    base, tokenizer, factory, tasks, _ = setup
    return MethodContext(model=model or base, tokenizer=tokenizer, temperature=temperature, micro_batch_tokens=4096,
                         factory=factory, tasks=tasks, summarizer=summarizer or make_summarizer("diff"))


def _sampled_ids(trace) -> torch.Tensor:
    return torch.as_tensor([trace.input_ids[p] for p in trace.sampled_positions])


# --- null teacher ------------------------------------------------------------------------------
@pytest.mark.parametrize("control", ["neutral", "empty", "off"])
def test_a_teacher_that_reads_nothing_gives_w_one_on_every_token(tiny, control):
    prepared = make_method("sgcd", topk=TOPK, reference="none", control=control).prepare(tiny[4], _ctx(tiny))
    assert prepared.metrics["sgcd/guided_groups"] == 3
    weights = torch.cat(prepared.extras["weights"])
    assert weights.numel() > 100 and torch.all(weights == 1.0)
    assert prepared.metrics["sgcd/amplified_frac"] == 0.0
    # aligned scoring: the teacher reproduces the sampler's own distribution (float noise only)
    assert prepared.metrics["sgcd/kl_reference"] <= 1e-5


def test_the_uncalibrated_reconstruction_amplified_noise(tiny):
    """Why the calibration exists: the old relative salience (robust z-score of the raw divergence,
    no control, no floor) amplifies a large share of tokens for a teacher that knows nothing."""
    old = make_method("sgcd", topk=TOPK, reference="none", control="off", kl_floor=0.0, salience="zscore")
    prepared = old.prepare(tiny[4], _ctx(tiny))
    assert prepared.metrics["sgcd/amplified_frac"] > 0.2


def test_salience_has_an_absolute_scale():
    """The same excess pattern, a thousand times smaller, is noise: no salience (the relative
    z-score of the first reconstruction gave it the same salience at any scale)."""
    from trainers.credit_weights import SalienceSettings, salience

    e = torch.tensor([0.0, 0.01, 0.02, 0.6, 0.3, 0.0])
    h, turns = torch.zeros(6), torch.zeros(6)
    s = salience([e], [h], [turns], SalienceSettings())[0]
    assert s.tolist() == pytest.approx([0, 0, 0, 1.0, 0.5, 0])  # (e - 0.05) / 0.5, clipped
    assert salience([e * 1e-3], [h], [turns], SalienceSettings())[0].sum() == 0.0
    relative = SalienceSettings(mode="zscore", floor=0.0)
    assert torch.allclose(salience([e * 1e-3], [h], [turns], relative)[0], salience([e], [h], [turns], relative)[0],
                          atol=1e-3)


# --- hand-computed KL ----------------------------------------------------------------------------
def test_topk_reverse_kl_renormalises_over_the_support_and_matches_a_hand_value():
    student = torch.log(torch.tensor([[0.40, 0.24, 0.16]]))  # renormalised: 0.5, 0.3, 0.2
    teacher = torch.log(torch.tensor([[0.10, 0.30, 0.10]]))  # renormalised: 0.2, 0.6, 0.2
    hand = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6) + 0.2 * math.log(0.2 / 0.2)
    assert topk_reverse_kl(student, teacher).item() == pytest.approx(hand, abs=1e-6)  # 0.25020
    # not the forward direction (0.23263), not the unnormalised sum (0.5760)
    assert abs(hand - (0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.3))) > 0.01


@pytest.mark.parametrize("temperature, hand", [(1.0, (0.731059 - 0.268941) * 1.0), (0.5, (0.880797 - 0.119203) * 2.0)])
def test_teacher_scores_and_kl_at_the_sampling_temperature(temperature, hand):
    """Student logits [2, 1, 0, -1], teacher logits [0.5, 1.5, 0, 2], top-2 support {0, 1}: at
    temperature T, p^K = softmax([2, 1] / T), q^K = softmax([0.5, 1.5] / T), and
    KL(p^K || q^K) = (p0 - q0) * ln(p0 / q0) here (p and q are mirror images): 0.462117 at T = 1,
    1.523188 at T = 0.5."""
    student_logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    student_lp = torch.log_softmax(student_logits / temperature, -1)[None, :2]  # what the sampler records
    teacher_logits = torch.tensor([[0.5, 1.5, 0.0, 2.0]])
    scores = _score_rows(teacher_logits, torch.tensor([0]), torch.tensor([[0, 1]]), temperature)
    q_full = torch.softmax(teacher_logits[0] / temperature, -1)
    assert torch.allclose(scores.support_logprobs[0], q_full[:2].log(), atol=1e-6)  # full-vocabulary normalised
    assert scores.entropy.item() == pytest.approx(float(-(q_full * q_full.log()).sum()), abs=1e-6)
    assert topk_reverse_kl(student_lp, scores.support_logprobs).item() == pytest.approx(hand, abs=1e-5)


def test_the_teacher_reads_the_sampling_temperature_through_the_method(tiny):
    """Sampled at T = 0.7, the student scored as its own teacher at T = 0.7 has zero divergence;
    the same teacher at T = 1 (temperature ignored) does not."""
    model, tokenizer = tiny[0], tiny[1]
    toy = toy_rollouts(tiny[0].name_or_path, 3, model=model, tokenizer=tokenizer, temperature=0.7, record_topk=TOPK,
                       seed=1)
    factory, tasks, groups = toy.factory, toy.tasks, toy.groups
    setup = (model, tokenizer, factory, tasks, groups)
    method = make_method("sgcd", topk=TOPK, reference="none", control="off")
    right = method.prepare(groups, _ctx(setup, temperature=0.7))
    wrong = method.prepare(groups, _ctx(setup, temperature=1.0))
    assert right.metrics["sgcd/kl_reference"] <= 1e-5
    assert wrong.metrics["sgcd/kl_reference"] > 1e-3


# --- planted signal, alignment, coverage --------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tiny):
    """A teacher that knows something exactly at the sampled tokens of three frequent token ids."""
    model, tokenizer, _, _, groups = tiny
    traces = [e.trace for g in groups for e in g.episodes if e.trace.response_tokens]
    firsts = {t.input_ids[t.sampled_positions[0]] for t in traces}
    counts = Counter(int(x) for t in traces for x in _sampled_ids(t)[1:])
    targets = {tok for tok, _ in counts.most_common() if tok not in firsts and tok != tokenizer.eos_token_id}
    targets = set(sorted(targets, key=lambda t: -counts[t])[:3])
    marker = tokenizer(MARKER_TEXT, add_special_tokens=False)["input_ids"]
    teacher = PlantedTeacher(model, marker, targets)
    return teacher, targets, FixedSummarizer(planted_reference())


def _target_mask(trace, targets) -> torch.Tensor:
    ids = _sampled_ids(trace)
    return torch.tensor([int(x) in targets for x in ids])


def test_a_planted_teacher_gets_credit_exactly_where_it_knows_something(tiny, planted):
    teacher, targets, summarizer = planted
    groups = tiny[4]
    prepared = make_method("sgcd", topk=TOPK).prepare(groups, _ctx(tiny, model=teacher, summarizer=summarizer))
    grpo = make_method("grpo", dynamic_sampling="resample").prepare(groups, None)
    plain = {id(t): a for t, a in zip(grpo.traces, grpo.advantages)}
    hit = miss = on_target = 0
    amplified_by_outcome = {True: 0, False: 0}
    for trace, adv, w in zip(prepared.traces, prepared.advantages, prepared.extras["weights"]):
        target = _target_mask(trace, targets)
        assert torch.all(w[target] > 1.0), "every planted token must get extra credit"
        hit += int((w[target] > 1).sum())
        miss += int((w[~target] > 1).sum())
        on_target += int(target.sum())
        a = plain[id(trace)]
        sampled = adv[torch.as_tensor(trace.sampled_positions)]
        assert torch.allclose(sampled, a * w) and torch.all(torch.sign(sampled) == math.copysign(1, a))
        amplified_by_outcome[a > 0] += int((w > 1).sum())
    others = sum(t.response_tokens for t in prepared.traces) - on_target
    assert on_target >= 10 and hit == on_target
    assert miss <= 0.01 * others, f"{miss} of {others} unplanted tokens amplified (allowed: 1%)"
    assert amplified_by_outcome[True] > 0 and amplified_by_outcome[False] > 0  # successes and failures alike
    m = prepared.metrics
    assert m["sgcd/kl_excess_max"] > 1.0 and m["sgcd/above_floor_frac"] > 0


def test_the_planted_teacher_given_a_placebo_gives_no_credit(tiny, planted):
    teacher, _, summarizer = planted
    prepared = make_method("sgcd", topk=TOPK, reference="placebo").prepare(tiny[4], _ctx(tiny, model=teacher,
                                                                                         summarizer=summarizer))
    assert prepared.metrics["sgcd/guided_groups"] == 3
    assert torch.all(torch.cat(prepared.extras["weights"]) == 1.0)


def test_normalised_weights_have_mean_one_and_keep_the_sign(tiny, planted):
    teacher, _, summarizer = planted
    method = make_method("sgcd", topk=TOPK, normalize_weights=True)
    prepared = method.prepare(tiny[4], _ctx(tiny, model=teacher, summarizer=summarizer))
    w = torch.cat(prepared.extras["weights"])
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5) and w.max() > w.min()
    assert prepared.metrics["sgcd/w_scale"] < 1.0 and prepared.metrics["sgcd/w_mean"] > 1.0  # raw mean logged
    for trace, adv, wt in zip(prepared.traces, prepared.advantages, prepared.extras["weights"]):
        sampled = adv[torch.as_tensor(trace.sampled_positions)]
        assert torch.all((sampled == 0) | (torch.sign(sampled) == torch.sign(sampled[0])))
        assert torch.all(wt > 0)


def test_non_mixed_groups_are_not_trained_under_the_default_keep_rule(tiny, planted):
    teacher, _, summarizer = planted
    groups = tiny[4]

    def rescore(g, rewards):
        return Group(task_id=g.task_id, group_id=g.group_id,
                     episodes=[replace(e, score=Score(reward=r, success=r == 1.0))
                               for e, r in zip(g.episodes, rewards)])

    # all successes; partial credit with a reward spread but no success (GRPO would train it); mixed
    changed = [rescore(groups[0], [1.0] * 4), rescore(groups[1], [0.5, 0.0, 0.5, 0.0]), groups[2]]
    ctx = _ctx(tiny, model=teacher, summarizer=summarizer)
    prepared = make_method("sgcd", topk=TOPK).prepare(changed, ctx)
    assert prepared.metrics["groups/trained"] == 1 and prepared.metrics["groups/dropped"] == 2
    kept = {id(e.trace) for e in groups[2].episodes}
    assert prepared.traces and all(id(t) in kept for t in prepared.traces)
    # keep=spread trains the partial-credit group too, with plain GRPO credit (no contrast to guide it)
    spread = make_method("sgcd", topk=TOPK, keep="spread").prepare(changed, ctx)
    assert spread.metrics["groups/trained"] == 2 and spread.metrics["sgcd/guided_groups"] == 1


# --- placebo on a policy that any long system prompt moves --------------------------------------
@pytest.fixture(scope="module")
def warm(tiny_toy_dir):
    """A briefly warm-started toy policy: trained only on short system prompts, it is thrown off by
    any long one (raw divergence of several nats at ~10% of its tokens, reference or not)."""
    from trainers.sft import demonstration_traces, warm_start

    model, tokenizer = load_tiny_toy(tiny_toy_dir)  # its own copy: the warm start changes it
    factory = make_env_factory("toy")
    warm_start(model, demonstration_traces(factory, tokenizer, factory.tasks("train", None), "warm"),
               steps=300, lr=1e-3, batch_size=16, seed=0)
    toy = toy_rollouts(tiny_toy_dir, 4, model=model, tokenizer=tokenizer, group_size=6, record_topk=TOPK)
    return model, tokenizer, toy.factory, toy.tasks, toy.groups


def test_a_placebo_reference_gives_w_one_on_99_percent_of_tokens(warm):
    placebo = make_method("sgcd", topk=TOPK, reference="placebo").prepare(warm[4], _ctx(warm))
    m = placebo.metrics
    assert m["sgcd/guided_groups"] == 4 and m["sgcd/reference_tokens"] > 400
    assert m["sgcd/kl_reference"] > 0.1  # the placebo does move this teacher ...
    assert m["sgcd/amplified_frac"] <= 0.01  # ... but no more than content-free text does
    raw = make_method("sgcd", topk=TOPK, reference="placebo", control="off").prepare(warm[4], _ctx(warm))
    assert raw.metrics["sgcd/amplified_frac"] >= 0.03  # without the control, the placebo "earns" credit


# --- the reference the teacher reads -------------------------------------------------------------
def test_long_references_are_cut_per_section_and_counted(tiny):
    tokenizer = tiny[1]
    sections = {h: " ".join(f"{h.split()[0].lower()}-{i} detail" for i in range(60)) for h in HEADINGS}
    text = "\n\n".join(f"## {h}\n{sections[h]}" for h in HEADINGS) + "\n"
    fitted = fit_reference(tokenizer, text, 600)
    assert fitted.truncated and 560 <= token_length(tokenizer, fitted.text) <= 600  # the budget is used, not exceeded
    for h in HEADINGS:  # every section keeps its heading and its first words
        assert f"## {h}" in fitted.text and f"{h.split()[0].lower()}-0 detail" in fitted.text
    assert fitted.text.count(" ...") == 4
    assert fit_reference(tokenizer, "short", 160) == type(fitted)("short", token_length(tokenizer, "short"), 0)
    # through the method: the diff references of the fixture exceed 512 tokens
    ctx = _ctx(tiny)
    cut = make_method("sgcd", topk=TOPK).prepare(tiny[4], ctx).metrics
    whole = make_method("sgcd", topk=TOPK, reference_max_tokens=4096).prepare(tiny[4], ctx).metrics
    assert cut["sgcd/reference_truncated_frac"] == 1.0 and 0 < cut["sgcd/reference_cut_tokens_frac"] < 1
    assert whole["sgcd/reference_truncated_frac"] == 0.0 and whole["sgcd/reference_cut_tokens_frac"] == 0.0


def test_neutral_texts_have_the_requested_length_and_no_task_words(tiny):
    tokenizer = tiny[1]
    for n in (1, 7, 64, 301):
        for variant in ("control", "placebo"):
            text = neutral_text(tokenizer, n, variant)
            assert n - 2 <= token_length(tokenizer, text) <= n
    assert neutral_text(tokenizer, 64, "control") != neutral_text(tokenizer, 64, "placebo")
    from envs.toy.tasks import CODES, ITEMS

    words = (set(neutral_text(tokenizer, 300, "control").lower().split())
             | set(neutral_text(tokenizer, 300, "placebo").lower().split()))
    assert not words & (set(ITEMS) | set(CODES) | {"lookup", "code", "answer"})


def test_the_oracle_reference_names_the_successful_siblings_actions(tiny):
    group = tiny[4][0]
    success = next(e for e in group.episodes if e.score.reward == 1.0)
    text = oracle_reference(group)
    for msg in success.messages:
        for call in msg.get("tool_calls") or []:
            assert call["function"]["arguments"] in text
    no_success = Group(task_id=group.task_id, group_id=group.group_id,
                       episodes=[replace(e, score=Score(reward=0.0, success=False)) for e in group.episodes])
    assert oracle_reference(no_success) is None
