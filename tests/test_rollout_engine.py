"""The rollout engine seam (``harness.policy.engine``) changes nothing: traces sampled through it
are bit-identical to what the batched sampler gives when called directly, as the policy called it
before engines existed; and ``--rollout-engine`` refuses what it does not have.

The "before" side replays each batch with ``sampler.sample_batch`` itself: the same prompts (the
trace prefix before each sampled span: the trace builder is the single source of prompt tokens),
one ``torch.Generator`` per episode seeded with the episode's seed and drawn from turn after turn,
the chat template's stop ids, the policy's temperature and top-K. Every sampled id, log-prob and
top-K row must be equal, not close.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from toy_groups import load_tiny_toy, toy_rollouts  # noqa: E402

from envs.toy import TOOL_SCHEMAS  # noqa: E402
from harness.policy.local_policy import LocalPolicy, PolicyConfig, stop_token_ids  # noqa: E402
from harness.policy.sampler import sample_batch  # noqa: E402
from harness.policy.trace import TokenTrace  # noqa: E402
from trainers.rollout import episode_seed  # noqa: E402

TOPK = 5


def _replay_and_compare(model, tokenizer, traces: list[TokenTrace], seeds: list[int], *, temperature: float,
                        max_new_tokens: int, topk: int) -> int:
    """Sample every turn of ``traces`` again by calling the sampler directly, batched as the
    lock-step policy batches them (round r: every episode that has an r-th turn, in episode
    order), and assert each turn equals the trace exactly. Returns the number of turns compared."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    stops = stop_token_ids(tokenizer, model)
    compared = 0
    for r in range(max(len(t.turns) for t in traces)):
        rows = [n for n, t in enumerate(traces) if len(t.turns) > r]
        prompts = [traces[n].input_ids[: traces[n].turns[r][0]] for n in rows]
        samples = sample_batch(model, prompts, [generators[n] for n in rows], max_new_tokens=max_new_tokens,
                               temperature=temperature, stop_ids=stops, pad_id=tokenizer.pad_token_id, topk=topk)
        for n, sample in zip(rows, samples):
            trace, (start, end) = traces[n], traces[n].turns[r]
            assert sample.ids == trace.input_ids[start:end], f"episode {n} turn {r}: other tokens"
            assert sample.logprobs == trace.logprobs[start:end], f"episode {n} turn {r}: other log-probs"
            assert torch.equal(sample.topk_ids, trace.topk_ids[r]) and torch.equal(sample.topk_logprobs,
                                                                                  trace.topk_logprobs[r])
            compared += 1
    return compared


def _tool_call(i: int) -> dict:
    return {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"name": "x"})}}


async def _conversation(policy: LocalPolicy, seed: int, turns: int) -> TokenTrace:
    """One agent through ``turns`` turns, each answered by a tool result, whatever it replied (an
    untrained policy rarely calls a tool, and the test needs several turns per episode)."""
    agent = policy.agent(seed)
    messages = [{"role": "system", "content": "Find each secret code with the lookup tool, then answer."},
                {"role": "user", "content": 'What is the code for "apple"?'}]
    for t in range(turns):
        await agent.act(messages, TOOL_SCHEMAS)
        messages.append({"role": "assistant", "content": None, "tool_calls": [_tool_call(t)]})
        messages.append({"role": "tool", "tool_call_id": f"c{t}", "name": "lookup", "content": "kilo"})
    await agent.aclose()
    return agent.trace


def test_multi_turn_traces_through_the_engine_equal_the_sampler_called_directly(tiny_toy_dir):
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    # With this turn limit some replies end on a stop id and the others are cut by the limit.
    policy = LocalPolicy(PolicyConfig(path=str(tiny_toy_dir), temperature=0.7, max_new_tokens=40, batch_wait_s=None,
                                      record_topk=TOPK, rollout_engine="hf"), model=model, tokenizer=tokenizer)
    seeds = [0, 1, 2, 3]

    async def main():
        return await asyncio.gather(*(_conversation(policy, seed, turns=3) for seed in seeds))

    traces = asyncio.run(main())
    assert policy.batches == 3, "one batch per turn, all four episodes in it"
    assert _replay_and_compare(model, tokenizer, traces, seeds, temperature=0.7, max_new_tokens=40, topk=TOPK) == 12
    ended = [trace.input_ids[end - 1] in policy.stop_ids for trace in traces for _, end in trace.turns]
    assert any(ended) and not all(ended), "both kinds of turn end are exercised"


def test_training_rollouts_through_the_engine_equal_the_sampler_called_directly(tiny_toy_dir):
    """``trainers.rollout.collect_groups`` (what ``harness train`` runs) on the real toy env."""
    toy = toy_rollouts(tiny_toy_dir, 3, group_size=3, temperature=1.0, max_new_tokens=16, record_topk=TOPK,
                       rewards=None)
    episodes = [(group.task_id, e) for group in toy.groups for e in group.episodes]
    traces = [e.trace for _, e in episodes]
    seeds = [episode_seed(0, 1, task_id, e.trial) for task_id, e in episodes]  # toy_rollouts: seed 0, step 1
    assert _replay_and_compare(toy.model, toy.tokenizer, traces, seeds, temperature=1.0, max_new_tokens=16,
                               topk=TOPK) >= len(traces)


def _harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


@pytest.mark.parametrize("command", [
    ("eval", "--env", "toy", "--policy", "tiny-toy", "--trials", "1"),
    ("train", "--env", "toy", "--policy", "tiny-toy", "--steps", "1"),
])
def test_an_unknown_rollout_engine_is_refused_in_one_line_before_anything_runs(tmp_path, command):
    db = tmp_path / "runs.db"
    unknown = _harness(*command, "--rollout-engine", "sglang", "--run", "r", "--db", f"sqlite:///{db}")
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    lines = unknown.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown --rollout-engine 'sglang'. Known: hf, vllm" in lines[0], unknown.stderr
    assert not db.exists(), "refused before the database (and a run row) was made"
