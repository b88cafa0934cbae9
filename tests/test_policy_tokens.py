"""Token-exact traces from the local policy backend, on a real tiny Qwen2 model.

Multi-turn conversations with tool calls and tool results are driven through ``PolicyAgent``
(several episodes batched together). Checked: every sampled span in the trace is exactly what the
sampler returned, the model was conditioned on exactly the trace prefix, the mask is 1 on sampled
tokens only, and a training forward pass over the packed traces recomputes the sampling
log-probs (max abs diff <= 1e-4 in fp32), so the PPO ratio is 1 before the first update.
"""

from __future__ import annotations

import asyncio
import json

import pytest

torch = pytest.importorskip("torch")

from toy_groups import build_tiny_toy  # noqa: E402

from envs.toy import TOOL_SCHEMAS  # noqa: E402
from harness.policy import sampler  # noqa: E402
from harness.policy.chat_tokens import ChatTokenizer  # noqa: E402
from harness.policy.local_policy import LocalPolicy, PolicyConfig  # noqa: E402
from harness.policy.tool_parsers import parse_reply  # noqa: E402
from trainers.losses import token_logprobs  # noqa: E402
from trainers.packing import pack  # noqa: E402


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_tiny_toy(tmp_path_factory, "tok-policy", seed=1)


def _tool_call(i: int, name: str) -> dict:
    return {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"name": name})}}


async def _conversation(policy: LocalPolicy, seed: int, turns: int):
    """Drive one agent through ``turns`` turns; after each reply the 'env' answers with a tool
    result (the assistant message in history carries a real tool call) or a user message."""
    agent = policy.agent(seed)
    messages = [{"role": "system", "content": "Find each secret code with the lookup tool, then answer."},
                {"role": "user", "content": 'What are the codes for "apple" and "tiger"?'}]
    for t in range(turns):
        turn = await agent.act(messages, TOOL_SCHEMAS)
        if t % 2 == 0:  # pretend the model called lookup: history holds a tool call, then its result
            messages.append({"role": "assistant", "content": None, "tool_calls": [_tool_call(t, "apple")]})
            messages.append({"role": "tool", "tool_call_id": f"c{t}", "name": "lookup", "content": "kilo"})
        else:
            messages.append(turn.to_message())
            messages.append({"role": "user", "content": "and the other one?"})
    await agent.aclose()
    return agent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_traces_are_token_exact_and_logprobs_recompute(policy_dir, monkeypatch, temperature):
    calls = []
    real = sampler.sample_batch

    def recording(model, prompts, generators, **kw):
        samples = real(model, prompts, generators, **kw)
        calls.append([(list(p), list(s.ids)) for p, s in zip(prompts, samples)])
        return samples

    monkeypatch.setattr(sampler, "sample_batch", recording)  # what the hf rollout engine calls
    policy = LocalPolicy(PolicyConfig(path=str(policy_dir), temperature=temperature, max_new_tokens=24,
                                      batch_wait_s=None, device="cpu"))

    async def main():
        return await asyncio.gather(*(_conversation(policy, seed, turns=4) for seed in range(5)))

    agents = asyncio.run(main())
    assert len(calls) == 4 and all(len(batch) == 5 for batch in calls), "five episodes, batched per turn"
    sampled = [pair for batch in calls for pair in batch]
    for agent in agents:
        trace = agent.trace
        assert len(trace.turns) == 4
        assert len(trace.input_ids) == len(trace.mask) == len(trace.logprobs)
        for start, end in trace.turns:
            ids = trace.input_ids[start:end]
            # the model saw exactly the trace prefix, and sampled exactly these ids
            assert (trace.input_ids[:start], ids) in sampled
        in_turn = {i for s, e in trace.turns for i in range(s, e)}
        assert [i for i, m in enumerate(trace.mask) if m] == sorted(in_turn)
        assert all(lp == 0.0 for lp, m in zip(trace.logprobs, trace.mask) if not m)

    # a training forward pass over the packed traces gives back the sampling log-probs
    packed = pack([a.trace for a in agents], [0.0] * len(agents), max_tokens=2048)
    worst = 0.0
    with torch.no_grad():
        for mb in packed.micro_batches:
            logits = policy.model(**mb.model_inputs()).logits
            logp = token_logprobs(logits, mb.input_ids, temperature)
            live = mb.loss_mask > 0
            assert int(live.sum()) > 0
            worst = max(worst, float((logp - mb.old_logprobs)[live].abs().max()))
            assert torch.allclose(torch.exp(logp - mb.old_logprobs)[live], torch.ones(int(live.sum())), atol=1e-4)
    assert worst <= 1e-4, f"max |recomputed - sampled| log-prob = {worst}"


def test_prompt_deltas_match_the_template_and_keep_sampled_tokens(policy_dir):
    """The trace of a conversation whose replies are template-shaped decodes to exactly the
    template's rendering of that conversation (no token was re-tokenized, no glue lost)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    chat = ChatTokenizer(tok, TOOL_SCHEMAS)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": 'code for "apple"?'}]
    ids = chat.first_prompt(messages)
    reply = {"role": "assistant", "content": None, "tool_calls": [_tool_call(0, "apple")]}
    full = chat.render(messages + [reply], generation_prompt=False)
    body = full[len(chat.render(messages, generation_prompt=True)):-len(chat.after_eos)]
    ids += chat.encode(body)  # what a model that sampled the canonical reply produced
    new = [{"role": "tool", "tool_call_id": "c0", "name": "lookup", "content": "kilo"}]
    ids += chat.delta(messages + [reply], new, ended_with_eos=True)
    assert tok.decode(ids) == chat.render(messages + [reply] + new, generation_prompt=True)
    # a reply cut by the token limit gets the end-of-turn token as prompt (mask 0)
    cut = chat.delta(messages + [reply], new, ended_with_eos=False)
    assert cut[: len(chat.encode(chat.eos_text))] == chat.encode(chat.eos_text)


def test_tool_parsers():
    content, calls = parse_reply('<tool_call>\n{"name": "lookup", "arguments": {"name": "apple"}}\n</tool_call>',
                                 "qwen")
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("lookup", {"name": "apple"})]
    content, calls = parse_reply('Sure. <tool_call>{"name": "a", "arguments": {}}</tool_call>'
                                 '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>', "qwen")
    assert content == "Sure." and [c.name for c in calls] == ["a", "b"] and calls[1].arguments == '{"x": 1}'
    # malformed JSON is kept as a call (the env answers with an error the model can see)
    _, calls = parse_reply('<tool_call>{"name": "lookup", "arguments": {"name": </tool_call>', "qwen")
    assert calls[0].name == "lookup" and "arguments" in calls[0].arguments
    with pytest.raises(ValueError):
        calls[0].parsed_arguments()
    # an unterminated block (cut by the token limit) is still read
    _, calls = parse_reply('<tool_call>{"name": "lookup", "arguments": {"name": "x"}}', "qwen")
    assert calls and calls[0].name == "lookup"
    assert parse_reply("The codes are kilo.", "qwen") == ("The codes are kilo.", [])
    # generic JSON fallback
    _, calls = parse_reply('{"name": "lookup", "parameters": {"name": "apple"}}', "json")
    assert calls[0].name == "lookup" and json.loads(calls[0].arguments) == {"name": "apple"}
    content, calls = parse_reply('Calling:\n```json\n[{"name": "a", "arguments": {}}]\n```', "json")
    assert [c.name for c in calls] == ["a"] and content == "Calling:"
    assert parse_reply("just text", "json") == ("just text", [])


def test_bad_policy_paths_are_clear(tmp_path):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="without config.json"):
        LocalPolicy(PolicyConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="unknown --tool-format"):
        LocalPolicy(PolicyConfig(path=str(tmp_path), tool_format="xml"))
