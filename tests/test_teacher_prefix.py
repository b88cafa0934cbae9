"""Teacher prefix sharing (issue 16 point 10): every teacher-scoring method reads a group's shared
first prompt (system prompt, tools, task, and the method's note) once, from a KV cache, instead of
once per sibling, and gets the numbers the whole-sequence passes gave.

1. ``read_in_context`` (support log-probs and the teacher's own top-K) equals independent
   whole-sequence passes over the same teacher sequences, notes or not, on the packed (sdpa) and
   padded (other attention kernels) continuation paths, and on the whole-sequence fallback for a
   teacher that cannot continue from a cache.
2. Each teacher-scoring method, on real toy groups (3 tasks x 4 siblings, rewards 1, 0, 1, 0),
   runs exactly one uncached prefix pass per distinct teacher first prompt (counted at the
   teacher's forward: tokens fed at position 0), and its prepared advantages / token fields equal
   those of the same method with prefix sharing turned off.

Run: .venv/bin/python -m pytest -q tests/test_teacher_prefix.py
"""

from __future__ import annotations

import pytest
import torch
from test_rlad import toy_setup
from toy_groups import toy_rollouts

import trainers.teacher as teacher_mod
from trainers.methods import MethodContext, make_method
from trainers.teacher import (
    PRIVILEGED_HEADER,
    context_sequences,
    sampled_token_logprobs,
    score_with_teacher,
    teacher_topk,
    teacher_topk_in_context,
)

TOPK = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_toy_dir):
    s = toy_setup(tmp_path_factory, "teacher-prefix", tiny_toy_dir)
    # SGCD needs the student's top-K recorded at sampling time: its own rollouts of the same tasks
    s.sgcd = toy_rollouts(s.student_dir, 3, model=s.model, tokenizer=s.tokenizer, record_topk=TOPK)
    return s


def _notes(s, traces):
    tasks = {t.id: t for t in s.factory.tasks("train", None)}
    by_trace = {id(e.trace): g.task_id for g in s.groups for e in g.episodes}
    return [s.factory.privileged_info(tasks[by_trace[id(t)]]) for t in traces]


class _NoCache(torch.nn.Module):
    """A teacher that cannot continue from a KV cache (it says so): scored as whole sequences."""

    caches_prefix = False

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kw):
        return self.inner(**kw)


# --- 1. the shared-prefix reads equal whole-sequence passes -----------------------------------------
@pytest.mark.parametrize("path", ["packed", "padded", "no-cache"])
@pytest.mark.parametrize("with_notes", [True, False])
def test_shared_prefix_reads_equal_whole_sequence_passes(setup, monkeypatch, path, with_notes):
    s = setup
    traces = [e.trace for g in s.groups for e in g.episodes]
    notes = _notes(s, traces) if with_notes else None
    model = _NoCache(s.model) if path == "no-cache" else s.model
    if path == "padded":
        monkeypatch.setattr(teacher_mod, "_MASKABLE", ())
    seqs, offsets = context_sequences(s.tokenizer, traces, notes, max_note_tokens=512, header=PRIVILEGED_HEADER)
    positions = [[p + off for p in t.sampled_positions] for t, off in zip(traces, offsets)]
    sampled = [torch.as_tensor([t.input_ids[p] for p in t.sampled_positions])[:, None] for t in traces]
    whole = score_with_teacher(s.model, seqs, positions, sampled, temperature=0.7, micro_batch_tokens=4096)
    shared = sampled_token_logprobs(model, traces, temperature=0.7, micro_batch_tokens=64, tokenizer=s.tokenizer,
                                    notes=notes)
    assert all(t.response_tokens for t in traces)
    for w, sh in zip(whole, shared):
        assert torch.allclose(w.support_logprobs[:, 0], sh, atol=1e-5)
    whole_top = teacher_topk(s.model, seqs, positions, TOPK, temperature=0.7, micro_batch_tokens=4096)
    shared_top = teacher_topk_in_context(model, s.tokenizer, traces, notes or [None] * len(traces), TOPK,
                                         temperature=0.7, micro_batch_tokens=64)
    for w, sh in zip(whole_top, shared_top):
        assert torch.allclose(w.logprobs, sh.logprobs, atol=1e-5)
        assert (w.ids == sh.ids).float().mean() > 0.99  # a near-tie may swap two neighbours, no more


def test_notes_change_what_the_teacher_reads(setup):
    """The privileged note reaches the shared prefix (else test 1 would pass with notes ignored)."""
    s = setup
    traces = [e.trace for e in s.groups[0].episodes]
    plain = sampled_token_logprobs(s.model, traces, temperature=1.0, micro_batch_tokens=4096, tokenizer=s.tokenizer)
    noted = sampled_token_logprobs(s.model, traces, temperature=1.0, micro_batch_tokens=4096, tokenizer=s.tokenizer,
                                   notes=_notes(s, traces))
    assert max(float((a - b).abs().max()) for a, b in zip(plain, noted)) > 1e-3


# --- 2. every teacher-scoring method reads each shared prefix once ----------------------------------
class _PrefixPasses:
    """Counts the tokens a module's forward is fed at position 0 (one per sequence started from
    scratch: a whole sequence, or a prefix pass whose cache the continuations then reuse)."""

    def __init__(self, module):
        self.starts = 0
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("position_ids")
        cache = kwargs.get("past_key_values")
        if pos is not None:
            self.starts += int((pos == 0).sum())
        elif cache is None or cache.get_seq_length() == 0:
            self.starts += ids.shape[0]


# method -> (which model is the teacher, distinct teacher first prompts per group of 4 siblings)
# rlsd / opsd: the task's privileged info, one note per task. sdpo: each sibling's first successful
# sibling other than itself (successes 0 and 2: trace 0 reads sibling 2, traces 1-3 read sibling 0).
# opd / rlad / grpo_kl: the separate teacher reads the student's own first prompt. sgcd: the credit reference
# and its content-free control. rlcsd: every hint is one sibling's rollout, so at most 4.
EXPECTED = {"rlsd": ("policy", 1), "opsd": ("policy", 1), "sdpo": ("policy", 2), "opd": ("teacher", 1),
            "rlad": ("teacher", 1), "grpo_kl": ("teacher", 1), "sgcd": ("policy", 2), "rlcsd": ("policy", 4)}


def _prepare(s, name, sharing: bool, monkeypatch):
    from trainers.summarizer import make_summarizer

    groups = s.sgcd.groups if name == "sgcd" else s.groups
    tasks = {t.id: t for t in s.factory.tasks("train", None)}
    ctx = MethodContext(model=s.model, tokenizer=s.tokenizer, temperature=1.0, micro_batch_tokens=512,
                        teacher=s.teacher, factory=s.factory, tasks=tasks, privileged=s.factory.privileged_info,
                        summarizer=make_summarizer("diff"), step=1)
    with monkeypatch.context() as m:
        if not sharing:
            m.setattr(teacher_mod, "caches_a_prefix", lambda _model: False)
        counter = _PrefixPasses(s.teacher if EXPECTED[name][0] == "teacher" else s.model)
        try:
            prepared = make_method(name).prepare(groups, ctx)
        finally:
            counter.handle.remove()
    return prepared, counter.starts, len(groups)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_method_reads_a_shared_prefix_once_and_gets_the_same_numbers(setup, monkeypatch, name):
    prepared, starts, n_groups = _prepare(setup, name, True, monkeypatch)
    whole, whole_starts, _ = _prepare(setup, name, False, monkeypatch)
    scored = len(whole.traces) if name != "rlcsd" else whole_starts
    assert whole_starts >= scored  # without sharing: one whole sequence per scored trace (and hint)
    if name == "rlcsd":
        assert n_groups <= starts <= EXPECTED[name][1] * n_groups < whole_starts
    else:
        assert starts == EXPECTED[name][1] * n_groups < whole_starts
    assert len(prepared.traces) == len(whole.traces) > 0
    for a, b in zip(prepared.advantages, whole.advantages):
        assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                              atol=1e-5)
    assert prepared.token_fields.keys() == whole.token_fields.keys()
    for key, values in prepared.token_fields.items():
        for a, b in zip(values, whole.token_fields[key]):
            if a.is_floating_point():
                assert torch.allclose(a, b, atol=1e-5), key
            else:
                assert (a == b).float().mean() > 0.99, key
