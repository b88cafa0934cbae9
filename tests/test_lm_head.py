"""The LM head run only at the rows a loss reads, in chunks (trainers/lm_head.py, issue 20), against
log-softmax of full logits.

1. The fused head log-probs: values, entropy and the gradients to the hidden states, the weight
   and the bias equal ``full_logits_reference`` below, at a temperature, for one id or a top-K
   support per row, with 3-row chunks and a partial last chunk.
2. Every registered method, one real ``prepare`` + ``policy_update`` on real toy episodes of the
   tiny toy policy (tied embeddings): the head path (3-row chunks) against the full-logits path
   (the policy's ``[1, L, V]`` logits through ``token_logprobs``; teacher, reference and pre-pass
   reads from the model's own head): advantages and teacher fields, loss, every metric and every
   gradient within 1e-5 (float32, CPU). GRPO with a KL reference model is one more case.
   Both arms pick the teacher's scored rows with the same code; that the rows are the right ones
   is tests/test_teacher_prefix.py's check (shared-prefix reads against whole-sequence passes).
3. A model that soft-caps its logits after the head (a tiny Gemma 2) is read through its own
   logits, and its log-probs equal its full logits'.
4. A bad ``HARNESS_LM_HEAD_CHUNK_ROWS`` is a ConfigError saying what it takes.
Run: .venv/bin/python -m pytest tests/test_lm_head.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from toy_groups import toy_rollouts

from trainers import lm_head
from trainers.lm_head import HeadRows

ATOL = 1e-5


def full_logits_reference(hidden, weight, bias, ids, temperature):
    """What the chunked head must equal: log-softmax of the whole [n, V] logits, and its entropy."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("k", [1, 4])
def test_chunked_head_equals_full_logits_values_entropy_and_gradients(monkeypatch, k):
    monkeypatch.setenv(lm_head.CHUNK_ENV, "3")  # 10 rows: chunks of 3, 3, 3 and 1
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 10, 6, 29
    hidden = torch.randn(n, hidden_size, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen, requires_grad=True)
    bias = torch.randn(vocab, generator=gen, requires_grad=True)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    upstream = torch.randn(n, k, generator=gen)

    head = HeadRows(positions=torch.arange(n), hidden=hidden, weight=weight, bias=bias)
    logp, ent = head.logprobs(ids, 0.7, with_entropy=True)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight, bias))

    ref_logp, ref_ent = full_logits_reference(hidden, weight, bias, ids, 0.7)
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# --- every method through the real update -----------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tiny_toy_dir):
    from harness.policy.local_policy import load_model_and_tokenizer

    got = toy_rollouts(tiny_toy_dir, 2, record_topk=20)
    teacher, _ = load_model_and_tokenizer(str(tiny_toy_dir), "cpu", "float32")
    with torch.no_grad():  # a teacher / reference that differs from the policy
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    teacher.requires_grad_(False)
    got.teacher = teacher
    return got


def _overrides(name: str, layers: int) -> dict:
    from trainers.methods import make_method

    settings = make_method(name).settings
    out = {}
    if isinstance(settings.get("layer"), int) and settings["layer"] >= layers:
        out["layer"] = layers - 1  # OISD's published layer 6 is not in the tiny model
    if settings.get("overlong_filter"):
        out["overlong_filter"] = False  # the untrained toy runs out of tokens: keep the batch whole
    return out


def _step(toy, name: str, monkeypatch, *, head: bool, kl_ref: bool = False):
    """One prepare + policy_update on a fresh copy of the policy: (prepared, metrics, grads)."""
    from trainers.methods import MethodContext, make_method
    from trainers.summarizer import make_summarizer
    from trainers.update import UpdateSettings, policy_update

    with monkeypatch.context() as patch:
        if head:
            patch.setenv(lm_head.CHUNK_ENV, "3")
        else:  # the reference: every pass reads the model's own logits (the policy the whole row's)
            patch.setattr(lm_head, "output_head", lambda model: None)
        model = copy.deepcopy(toy.model)
        model.requires_grad_(True)
        layers = model.config.num_hidden_layers
        method = make_method(name, **_overrides(name, layers), **({"kl_coef": 0.1} if kl_ref else {}))
        method.full_logits = not head
        if method.attn_implementation:
            model.set_attn_implementation(method.attn_implementation)
        ctx = MethodContext(model=model, tokenizer=toy.tokenizer, temperature=0.9, micro_batch_tokens=4096,
                            max_new_tokens=24, factory=toy.factory, tasks=toy.tasks,
                            summarizer=make_summarizer("diff"), teacher=toy.teacher,
                            privileged=toy.factory.privileged_info, step=1)
        torch.manual_seed(0)
        prepared = method.prepare(toy.groups, ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        grads = {}
        real_step = opt.step

        def capture(*a, **k):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            return real_step(*a, **k)

        opt.step = capture
        settings = UpdateSettings(micro_batch_tokens=4096, temperature=0.9, max_new_tokens=24)
        metrics = policy_update(model, opt, prepared, method, settings, pad_token_id=toy.tokenizer.pad_token_id,
                                seed=0, ctx=ctx, ref_model=toy.teacher if kl_ref else None)
    return prepared, metrics, grads


def _close(a, b, what):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.float(), torch.as_tensor(b).float(), atol=ATOL, rtol=0, msg=what)
    else:
        assert abs(float(a) - float(b)) <= ATOL + 1e-6 * abs(float(b)), f"{what}: {a} != {b}"


def _method_cases():
    from trainers.methods import method_names

    return [(name, False) for name in method_names()] + [("grpo", True)]


@pytest.mark.parametrize("name,kl_ref", _method_cases())
def test_every_method_equals_the_full_logits_path(toy, monkeypatch, name, kl_ref):
    ref_prepared, ref_metrics, ref_grads = _step(toy, name, monkeypatch, head=False, kl_ref=kl_ref)
    prepared, metrics, grads = _step(toy, name, monkeypatch, head=True, kl_ref=kl_ref)

    assert prepared.traces, f"{name}: nothing trained on the fixture"
    for i, (a, b) in enumerate(zip(prepared.advantages, ref_prepared.advantages)):
        _close(torch.as_tensor(a), b, f"{name}: advantages of trace {i}")
    assert prepared.token_fields.keys() == ref_prepared.token_fields.keys()
    for field, values in prepared.token_fields.items():
        for i, (a, b) in enumerate(zip(values, ref_prepared.token_fields[field])):
            _close(a, b, f"{name}: field {field} of trace {i}")
    assert metrics.keys() == ref_metrics.keys(), name
    for key, value in metrics.items():
        _close(value, ref_metrics[key], f"{name}: metric {key}")
    assert grads.keys() == ref_grads.keys() and grads, name
    for param, grad in grads.items():
        _close(grad, ref_grads[param], f"{name}: gradient of {param}")
    if kl_ref:
        assert metrics["kl/ref"] > 0  # the reference pass really differs from the policy


def test_a_model_that_soft_caps_its_logits_keeps_its_own_logits():
    """Gemma 2 soft-caps the logits after its head (``final_logit_softcapping``): taking the head
    apart would skip the cap, so such a model's own logits are read, still only at the rows asked for."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 9))
    rows = torch.tensor([2, 5, 7])
    with torch.no_grad():
        _, (head,) = lm_head.forward_rows(model, {"input_ids": ids}, rows)
        logp, _ = head.logprobs(ids[0, rows + 1, None])
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    torch.testing.assert_close(logp[:, 0], full[rows].gather(-1, ids[0, rows + 1, None])[:, 0], atol=ATOL, rtol=0)


def test_a_bad_chunk_setting_is_refused_with_what_to_do(monkeypatch):
    from harness.errors import ConfigError

    monkeypatch.setenv(lm_head.CHUNK_ENV, "0")
    with pytest.raises(ConfigError, match="positive whole number of rows"):
        lm_head.chunk_rows(151_936)
