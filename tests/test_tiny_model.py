"""The tiny local policy builder: it loads offline through the Auto classes, its tokenizer
round-trips text exactly, its chat template is prefix-preserving and Qwen2.5-shaped, and every toy
demonstration fits the token budget."""

from __future__ import annotations

import json
import re

import pytest

from envs.toy import CODES, ITEMS, TOOL_SCHEMAS, ToyFactory
from envs.toy.policy import TOY_TOKEN_BUDGET
from harness.policy.tiny_model import CHAT_TEMPLATE, build_tiny_policy, render_chat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(tiny_toy_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_toy_dir)


@pytest.fixture(scope="module")
def demos():
    factory = ToyFactory()
    return [factory.demonstration(t) for split in ("train", "test") for t in factory.tasks(split)]


def _render(tok, messages, tools=TOOL_SCHEMAS, gen=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_model_and_tokenizer_load_offline_with_auto_classes(tiny_toy_dir, tok, demos):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_toy_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    cfg = model.config
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings >= 1024 and cfg.vocab_size == len(tok)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tok.all_special_tokens)
    assert not {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"} & set(tok.all_special_tokens)
    assert tok.chat_template == CHAT_TEMPLATE
    ids = _ids(tok, _render(tok, demos[0]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_weights_are_a_function_of_the_seed(tmp_path):
    texts = ["hello world", "<|im_start|>user\nhi<|im_end|>\n"]
    a = build_tiny_policy(tmp_path / "a", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    b = build_tiny_policy(tmp_path / "b", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    c = build_tiny_policy(tmp_path / "c", texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    load = transformers.AutoModelForCausalLM.from_pretrained
    wa, wb, wc = (load(p).model.embed_tokens.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("text", [
    "",
    "plain ascii, with punctuation!? (and) [brackets] {\"json\": [1, 2.5e-3, null]}",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF\x00nul\x7f",
    "héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, عربى, עברית",
    "emoji 🎉👩‍👩‍👧‍👦🏳️‍🌈 and symbols ∑∫√≈≠ ™ © ½ ﬁ",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call><tool_response>x</tool_response><|endoftext|>",
    "the lookup said sierra; whale tiger zulu omega 0123456789",
    "<|im_start<|im_end|>|> half <tool_call and </tool_response",
])
def test_exact_round_trip(tok, text):
    ids = _ids(tok, text)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_normalizes_like_qwen(tok):
    # AutoTokenizer rebuilds every qwen2 tokenizer with Qwen2.5's NFC normalizer: a decomposed
    # character comes back composed (as with the real Qwen2.5 models).
    assert tok.decode(_ids(tok, "cafe\u0301")) == "caf\u00e9"


def test_toy_words_are_single_tokens_copied_verbatim(tok, demos):
    for word in ITEMS + CODES:
        assert len(_ids(tok, word)) == 1, word
    # A name is the same token in the question and in the tool call; a code is the same token in
    # the tool result and in the answer: the policy copies tokens.
    demo = next(d for d in demos if len(d) == 7)
    ids = _ids(tok, _render(tok, demo))
    for word in json.loads(demo[2]["tool_calls"][0]["function"]["arguments"])["name"], demo[3]["content"]:
        assert ids.count(_ids(tok, word)[0]) == 2, word


def test_every_toy_demonstration_fits_the_token_budget(tok, demos):
    lengths = [len(_ids(tok, _render(tok, d))) for d in demos]
    assert max(lengths) <= TOY_TOKEN_BUDGET, (min(lengths), max(lengths))
    assert min(lengths) > 40  # sanity: the whole conversation was rendered


@pytest.mark.parametrize("tools", [TOOL_SCHEMAS, None])
def test_template_is_prefix_preserving_over_toy_demonstrations(tok, demos, tools):
    for demo in demos[:: max(1, len(demos) // 40)]:
        full = _render(tok, demo, tools)
        assert full == render_chat(demo, tools)  # transformers renders our template the same way
        for k in range(1, len(demo) + 1):  # transformers refuses an empty conversation
            assert full.startswith(_render(tok, demo[:k], tools)), k
            if k < len(demo) and demo[k]["role"] == "assistant":
                # The generation prompt is exactly where the assistant's sampled text starts.
                assert full.startswith(_render(tok, demo[:k], tools, gen=True)), k
    assert render_chat([], tools) == "" and render_chat([], tools, True) == "<|im_start|>assistant\n"


def test_template_layout_and_tool_call_json(tok, demos):
    demo = next(d for d in demos if len(d) == 7)
    text = _render(tok, demo)
    assert text.startswith(f"<|im_start|>system\n{demo[0]['content']}\nTools: lookup(name)<|im_end|>\n")
    assert _render(tok, demo[1:2]).startswith("<|im_start|>system\nTools: lookup(name)<|im_end|>\n<|im_start|>user\n")
    assert not _render(tok, demo[1:2], None).startswith("<|im_start|>system")
    blocks = re.findall(r"<\|im_start\|>assistant\n<tool_call>\n(.*?)\n</tool_call><\|im_end\|>\n", text)
    items = [a["arguments"] for a in (json.loads(b) for b in blocks)]
    assert [json.loads(b)["name"] for b in blocks] == ["lookup", "lookup"]
    assert items == [json.loads(m["tool_calls"][0]["function"]["arguments"]) for m in demo if m.get("tool_calls")]
    assert f"<|im_start|>user\n<tool_response>\n{demo[3]['content']}\n</tool_response><|im_end|>\n" in text
    assert text.endswith(f"<|im_start|>assistant\n{demo[-1]['content']}<|im_end|>\n")


def test_parallel_calls_group_results_and_dict_arguments_render_the_same(tok):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": {"name": n}}}
             for i, n in enumerate(("apple", "tiger"))]
    as_text = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
               for c in calls]
    head = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    results = [{"role": "tool", "tool_call_id": "c0", "content": "alpha"},
               {"role": "tool", "tool_call_id": "c1", "content": "kilo"}]
    msgs = head + [{"role": "assistant", "content": "Looking.", "tool_calls": calls}] + results
    text = _render(tok, msgs)
    assert text == _render(tok, head + [{"role": "assistant", "content": "Looking.", "tool_calls": as_text}] + results)
    assert ('<|im_start|>assistant\nLooking.\n<tool_call>\n{"name": "lookup", "arguments": {"name": "apple"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "lookup", "arguments": {"name": "tiger"}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\nalpha\n</tool_response>\n<tool_response>\nkilo\n</tool_response>'
            '<|im_end|>\n') in text
    # Prefix property at every cut an episode can make (not between the two grouped results).
    for k in (1, 2, 3, 5):
        assert text.startswith(_render(tok, msgs[:k])), k
