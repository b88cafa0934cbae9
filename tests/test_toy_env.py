"""The ``toy`` env: oracle through the real CLI, the tool protocol, limits, partial credit, and
deterministic, disjoint splits."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from test_cli import harness

from envs.registry import make_env_factory
from envs.toy import CODES, ITEMS, ToyFactory, demonstration, generate_split, grade
from harness.errors import ConfigError
from harness.types import AgentTurn, Termination, ToolCall

# sha256 of both splits' task data. It changes only with the generator: bump DATA_VERSION then.
PINNED_DIGEST = "153d5737afef1f5e0d08f34845bdabcddf08171b441b40f68e248bfea39899b1"


def _factory(**options) -> ToyFactory:
    return make_env_factory("toy", **options)


def _task(split: str, n_items: int):
    """The first task of ``split`` asking ``n_items`` items."""
    return next(t for t in _factory().tasks(split) if len(t.data["items"]) == n_items)


def _call(name: str, arguments: str, i: int = 1) -> ToolCall:
    return ToolCall(id=f"c{i}", name=name, arguments=arguments)


def _lookup(item: str, i: int = 1) -> AgentTurn:
    return AgentTurn(tool_calls=[_call("lookup", json.dumps({"name": item}), i)])


def _play(task, turns: list[AgentTurn], **options):
    """Play scripted turns until the env ends the episode; returns (env, observations)."""

    async def run():
        env = _factory(**options).create(task, seed=0)
        obs = [await env.reset()]
        for turn in turns:
            if obs[-1].done:
                break
            obs.append(await env.step(turn))
        return env, obs

    return asyncio.run(run())


# -- through the CLI ----------------------------------------------------------------------------

def test_oracle_scores_one_on_every_task_of_both_splits_through_the_cli(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    # No --split: eval's default for toy is the held-out test split.
    harness("eval", "--env", "toy", "--agent", "oracle", "--run", "test", "--db", db, "--quiet", check=True)
    harness("eval", "--env", "toy", "--split", "train", "--agent", "oracle", "--run", "train", "--db", db,
            "--quiet", check=True)
    for run, tasks in (("test", 60), ("train", 400)):
        row = json.loads(harness("results", "show", run, "--db", db, "--format", "json", check=True).stdout)[0]
        assert row["split"] == run and row["data_version"] == "toy-v2"
        assert row["tasks"] == tasks and row["episodes"] == tasks
        assert row["pass^1"] == pytest.approx(1.0) and row["avg_reward"] == pytest.approx(1.0)
        assert row["termination/agent_stop"] == tasks


def test_cli_rejects_unknown_split_and_task_cleanly(tmp_path):
    db = f"sqlite:///{tmp_path}/x.db"
    for extra, needles in ((["--split", "base"], ["unknown split 'base'", "train, test"]),
                           (["--tasks", "60"], ["unknown task id", "0..59"])):
        proc = harness("eval", "--env", "toy", "--agent", "oracle", "--db", db, *extra)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        for needle in needles:
            assert needle in proc.stderr, proc.stderr


# -- tasks --------------------------------------------------------------------------------------

def test_generation_is_deterministic_and_pinned():
    first = {s: generate_split(s) for s in ("train", "test")}
    assert first == {s: generate_split(s) for s in ("train", "test")}
    digest = hashlib.sha256(json.dumps(first, sort_keys=True).encode()).hexdigest()
    # A changed digest means stored toy-v2 runs no longer match their tasks: bump DATA_VERSION.
    assert digest == PINNED_DIGEST


def test_splits_are_disjoint_and_sized():
    factory = _factory()
    train, test = factory.tasks("train"), factory.tasks("test")
    assert (len(train), len(test)) == (400, 60)
    assert [t.id for t in test] == [str(i) for i in range(60)]

    def instance(t):  # what the agent must do: which items to look up, which codes to answer
        return tuple(t.data["items"]), tuple(t.data["evaluation_criteria"]["communicate_info"])

    assert not {instance(t) for t in train} & {instance(t) for t in test}
    for split in (train, test):  # both kinds of question in both splits
        assert {len(t.data["items"]) for t in split} == {1, 2}
    assert factory.tasks(None)[0].split == "test"  # eval's default split
    assert all(t.version == "toy-v2" and t.env == "toy" for t in train + test)


def test_codes_are_drawn_per_task_so_they_must_be_copied():
    tasks = _factory().tasks("train")
    per_item = {item: {t.data["codes"][item] for t in tasks} for item in ITEMS}
    assert all(len(codes) >= 8 for codes in per_item.values())
    for t in tasks:
        asked = t.data["evaluation_criteria"]["communicate_info"]
        assert asked == [t.data["codes"][i] for i in t.data["items"]] and len(set(asked)) == len(asked)
        assert set(t.data["codes"]) == set(ITEMS) and set(t.data["codes"].values()) <= set(CODES)


def test_factory_errors_and_describe():
    factory = _factory()
    with pytest.raises(ConfigError, match="unknown split 'dev' of toy; valid splits: train, test"):
        factory.tasks("dev")
    with pytest.raises(ConfigError, match=r"unknown task id\(s\) 60, x, 01"):
        factory.tasks("test", ["60", "x", "01"])
    assert [t.id for t in factory.tasks("test", ["3", "0"])] == ["3", "0"]
    assert factory.describe() == {"data_version": "toy-v2", "max_steps": 6, "max_errors": 3}
    with pytest.raises(ConfigError, match="toy-v2"):
        ToyFactory(data_version="toy-v0")


# -- protocol and grading -----------------------------------------------------------------------

def test_demonstration_is_a_gold_episode():
    task = _task("test", 2)
    demo = demonstration(task)
    assert [m["role"] for m in demo] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    turns = [AgentTurn(content=m["content"],
                     tool_calls=[ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                                 for c in m.get("tool_calls") or []])
             for m in demo if m["role"] == "assistant"]
    env, obs = _play(task, turns)
    assert env.messages == demo[1:]  # the env produced exactly the demonstrated tool results
    assert obs[0].system_prompt == demo[0]["content"] and obs[0].tools[0]["function"]["name"] == "lookup"
    assert env.termination is Termination.AGENT_STOP
    score = env.score()
    assert score.reward == 1.0 and score.success


def test_tool_results_answer_each_call_by_id_in_one_observation():
    task = _task("test", 2)
    items = task.data["items"]
    both = AgentTurn(tool_calls=[_call("lookup", json.dumps({"name": items[0]}), 1),
                                 _call("lookup", json.dumps({"name": items[1].upper()}), 2)])
    env, obs = _play(task, [both])
    assert [(m["role"], m["tool_call_id"], m["content"]) for m in obs[1].messages] == [
        ("tool", "c1", task.data["codes"][items[0]]), ("tool", "c2", task.data["codes"][items[1]])]
    assert not obs[1].done and env.tool_errors == 0


@pytest.mark.parametrize("answer, reward", [
    ("The codes are {0} and {1}.", 1.0),
    ("{0}", 0.75),                          # second code missing
    ("The codes are {1} and {0}.", 0.5),    # both looked up, order wrong
    ("The codes are {0} and {0}.", 0.75),
    ("I do not know.", 0.5),
])
def test_partial_credit_for_lookups_and_answer(answer, reward):
    task = _task("test", 2)
    codes = task.data["evaluation_criteria"]["communicate_info"]
    env, _ = _play(task, [_lookup(task.data["items"][0], 1), _lookup(task.data["items"][1], 2),
                          AgentTurn(content=answer.format(*codes))])
    score = env.score()
    assert score.reward == pytest.approx(reward) and score.success is (reward == 1.0)
    assert score.breakdown["lookups"] == [True, True]


def test_wrong_lookup_and_wrong_code():
    task = _task("test", 1)
    item, code = task.data["items"][0], task.data["evaluation_criteria"]["communicate_info"][0]
    other = next(i for i in ITEMS if i != item and task.data["codes"][i] != code)
    env, _ = _play(task, [_lookup(other), AgentTurn(content=f"The code is {task.data['codes'][other]}.")])
    assert env.score().reward == 0.0
    env, _ = _play(task, [AgentTurn(content=f"The code is {code}.")])  # guessed without looking
    assert env.score().reward == 0.5 and not env.score().success


def test_listing_every_code_cannot_earn_full_credit():
    task = _task("test", 1)
    code = task.data["evaluation_criteria"]["communicate_info"][0]
    spam = " ".join([code] + [c for c in CODES if c != code])
    env, _ = _play(task, [_lookup(task.data["items"][0]), AgentTurn(content=spam)])
    score = env.score()
    assert score.reward == pytest.approx(2 / (2 + len(CODES) - 1)) and not score.success
    assert score.breakdown["extra_codes"] == len(CODES) - 1


def test_malformed_and_unknown_calls_are_tool_errors_until_too_many():
    task = _task("test", 1)
    bad = [
        AgentTurn(tool_calls=[_call("lookup", '{"name": "apple"')]),    # malformed JSON
        AgentTurn(tool_calls=[_call("search", '{"name": "apple"}')]),   # unknown tool
        AgentTurn(tool_calls=[_call("lookup", '{"item": "apple"}')]),   # wrong argument name
    ]
    env, obs = _play(task, bad)
    contents = [o.messages[0]["content"] for o in obs[1:]]
    assert all(c.startswith("Error: ") for c in contents), contents
    assert "not valid JSON" in contents[0] and "unknown tool 'search'" in contents[1]
    assert "exactly one string argument" in contents[2]
    assert env.tool_errors == 3 and env.termination is Termination.TOO_MANY_ERRORS and obs[-1].done
    assert env.score().reward == 0.0
    # Unknown items and non-object arguments are errors too; a good lookup still earns its credit.
    env, obs = _play(task, [AgentTurn(tool_calls=[_call("lookup", '{"name": "zebra"}', 1),
                                                  _call("lookup", '["apple"]', 2)]),
                            _lookup(task.data["items"][0], 3), AgentTurn(content="")])
    assert "no item named 'zebra'" in obs[1].messages[0]["content"]
    assert "must be a JSON object" in obs[1].messages[1]["content"]
    assert env.tool_errors == 2 and env.termination is Termination.AGENT_ERROR  # empty answer
    assert env.score().reward == 0.5


def test_max_steps_ends_the_episode_with_lookup_credit_only():
    task = _task("test", 2)
    items = task.data["items"]
    turns = [_lookup(items[i % 2], i) for i in range(10)]
    env, obs = _play(task, turns, max_steps=4)
    assert len(obs) == 5 and obs[-1].done and env.termination is Termination.MAX_STEPS
    score = env.score()
    assert score.reward == 0.5 and not score.success and not score.breakdown["answered"]
    with pytest.raises(RuntimeError):
        asyncio.run(env.step(AgentTurn(content="late")))


def test_grade_reads_stored_messages_only():
    task = _task("train", 2)
    demo = demonstration(task)
    assert grade(task.data, demo[1:], "agent_stop").reward == 1.0
    assert grade(task.data, demo[1:3], "max_steps").reward == 0.25
