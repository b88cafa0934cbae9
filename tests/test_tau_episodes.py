"""Full tau-airline episodes: real litellm client -> fake OpenAI server on 127.0.0.1 -> our env,
user simulator and grader. The fake server plays both the agent model and the user model from
scripts, so each test pins an exact conversation and its official score."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from envs.tau.env import GREETING, TauAirlineFactory
from envs.tau.user_sim import make_user_spec
from harness.agents import make_agent_spec
from harness.episode_runner import play_episode
from harness.types import ErrorClass, Termination

AGENT, USER = "fake-agent", "fake-user"


def _setup(server, task_id: str, data_version: str = "tau3", client: str = "litellm"):
    user = make_user_spec("litellm", model=f"openai/{USER}", api_base=server.base_url, max_retries=0, client=client)
    factory = TauAirlineFactory(data_version=data_version, user=user)
    agent = make_agent_spec("litellm", model=f"openai/{AGENT}", api_base=server.base_url, max_retries=0, client=client)
    (task,) = factory.tasks("base", [task_id])
    return factory, agent, task


def _gold_calls(task) -> list[dict]:
    return [{"tool_calls": [{"name": a["name"], "arguments": a["arguments"]}]}
            for a in task.data["evaluation_criteria"]["actions"]]


def _play(factory, agent, task, seed: int = 7):
    return asyncio.run(play_episode(factory, agent, task, trial=0, seed=seed))


@pytest.mark.parametrize("client", ["litellm", "direct"])
def test_scripted_correct_conversation_scores_one(fake_llm, client):
    factory, agent, task = _setup(fake_llm, "7", client=client)
    fake_llm.script.extend(USER, [{"content": "I need to cancel two trips, XEHM4B and 59XX6W. "
                                              "My id is daiki_muller_1116."},
                                  {"content": "Thanks. ###STOP###"}])
    fake_llm.script.extend(AGENT, _gold_calls(task) + [{"content": "Done. Your upcoming flights total $1,628."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.USER_STOP
    assert result.error_class is ErrorClass.NONE
    assert result.score.reward == 1.0 and result.score.success
    assert result.score.breakdown["db_match"] is True
    # The conversation opens with the official greeting and the agent saw the tools and the policy.
    assert result.messages[0] == {"role": "assistant", "content": GREETING}
    first_agent_call = fake_llm.requests_for(AGENT)[0]
    assert first_agent_call["messages"][0]["role"] == "system"
    assert "<policy>" in first_agent_call["messages"][0]["content"]
    assert len(first_agent_call["tools"]) == 14
    assert first_agent_call["seed"] == 7
    # The user model sees the agent's text as 'user' turns and never sees tool traffic.
    last_user_call = fake_llm.requests_for(USER)[-1]
    assert [m["role"] for m in last_user_call["messages"]] == ["system", "user", "assistant", "user"]
    assert "daiki_muller_1116" in last_user_call["messages"][0]["content"]  # the scenario
    # Tokens were counted for both sides.
    assert result.agent_usage.calls == len(task.data["evaluation_criteria"]["actions"]) + 1
    assert result.agent_usage.prompt_tokens > 0 and result.user_usage.calls == 2


def test_missing_communicate_info_scores_zero(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    fake_llm.script.extend(USER, [{"content": "Cancel XEHM4B and 59XX6W please."}, {"content": "###STOP###"}])
    fake_llm.script.extend(AGENT, _gold_calls(task) + [{"content": "Done, both are cancelled."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.USER_STOP
    assert result.score.breakdown["db_match"] is True
    assert result.score.reward == 0.0 and not result.score.success


def test_wrong_booking_scores_zero(fake_llm):
    factory, agent, task = _setup(fake_llm, "20")
    calls = _gold_calls(task)
    wrong = copy.deepcopy(calls)
    for step in wrong:
        call = step["tool_calls"][0]
        if call["name"] == "book_reservation":
            # A booking that goes through but for the wrong traveller details (same price).
            call["arguments"]["passengers"][0]["dob"] = "1970-01-01"
    fake_llm.script.extend(USER, [{"content": "I want to book a flight."}, {"content": "###STOP###"}])
    fake_llm.script.extend(AGENT, wrong + [{"content": "Your booking is confirmed."}])
    result = _play(factory, agent, task)
    booked = [m for m in result.messages if m["role"] == "tool"]
    assert booked and not booked[-1]["content"].startswith("Error"), booked[-1]["content"]
    assert result.termination is Termination.USER_STOP
    assert result.score.breakdown["db_match"] is False
    assert result.score.reward == 0.0


def test_malformed_tool_calls_come_back_as_errors_and_episode_continues(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    bad = [
        {"tool_calls": [{"name": "get_reservation_details", "arguments": '{"reservation_id": "XEHM4B"'}]},  # bad JSON
        {"tool_calls": [{"name": "teleport_customer", "arguments": {"to": "Paris"}}]},  # unknown tool
        {"tool_calls": [{"name": "get_reservation_details", "arguments": {"reservation_id": 12345}}]},  # wrong type
        {"tool_calls": [{"name": "get_reservation_details", "arguments": "[1, 2]"}]},  # not an object
    ]
    fake_llm.script.extend(USER, [{"content": "Cancel XEHM4B and 59XX6W please."}, {"content": "###STOP###"}])
    fake_llm.script.extend(AGENT, bad + _gold_calls(task) + [{"content": "All set; upcoming total $1628."}])
    result = _play(factory, agent, task)
    tool_msgs = [m for m in result.messages if m["role"] == "tool"]
    errors = [m["content"] for m in tool_msgs[:4]]
    assert all(e.startswith("Error") for e in errors), errors
    assert "not valid JSON" in errors[0]
    assert "teleport_customer" in errors[1]
    assert "JSON object" in errors[3]
    # The agent saw each error as the tool result of its own call id, and the episode went on.
    agent_calls = fake_llm.requests_for(AGENT)
    second = agent_calls[1]["messages"]
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert result.termination is Termination.USER_STOP
    assert result.score.reward == 1.0


def test_too_many_tool_errors_ends_episode_with_zero(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    factory.max_errors = 3
    fake_llm.script.extend(USER, [{"content": "Cancel XEHM4B please."}])
    fake_llm.script.extend(AGENT, [{"tool_calls": [{"name": "nope", "arguments": "{}"}]}] * 3)
    result = _play(factory, agent, task)
    assert result.termination is Termination.TOO_MANY_ERRORS
    assert result.score.reward == 0.0


def test_max_steps_counts_every_routed_message(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    factory.max_steps = 6  # user(1) agent-text(2) user(3) agent-call(4) env(5) agent-text(6) -> cut
    fake_llm.script.extend(USER, [{"content": "hi"}, {"content": "cancel XEHM4B"}])
    fake_llm.script.extend(AGENT, [{"content": "How can I help?"},
                                   {"tool_calls": [{"name": "get_reservation_details",
                                                    "arguments": {"reservation_id": "XEHM4B"}}]},
                                   {"content": "Found it."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.MAX_STEPS
    assert fake_llm.script.remaining(AGENT) == 0
    assert result.score.reward == 0.0


def test_provider_failure_is_infra_error_not_a_task_failure(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    fake_llm.script.extend(USER, [{"content": "Cancel XEHM4B please."}])
    fake_llm.script.extend(AGENT, [{"status": 500, "message": "upstream exploded"}])
    result = _play(factory, agent, task)
    assert result.error_class is ErrorClass.INFRA
    assert result.termination is Termination.INFRASTRUCTURE_ERROR
    assert "upstream exploded" in result.error or "InternalServerError" in result.error


def test_tool_result_messages_are_valid_json_for_reads(fake_llm):
    factory, agent, task = _setup(fake_llm, "7")
    fake_llm.script.extend(USER, [{"content": "What's in XEHM4B?"}, {"content": "###STOP###"}])
    fake_llm.script.extend(AGENT, [{"tool_calls": [{"name": "get_reservation_details",
                                                    "arguments": {"reservation_id": "XEHM4B"}}]},
                                   {"content": "Here it is."}])
    result = _play(factory, agent, task)
    (tool_msg,) = [m for m in result.messages if m["role"] == "tool"]
    assert json.loads(tool_msg["content"])["reservation_id"] == "XEHM4B"


@pytest.mark.parametrize("text", ["Thanks! ###STOP###", "###TRANSFER###", "I can't say. ###OUT-OF-SCOPE### bye"])
def test_each_official_stop_token_anywhere_in_the_user_text_is_a_user_stop(fake_llm, text):
    factory, agent, task = _setup(fake_llm, "7")
    fake_llm.script.extend(USER, [{"content": "What's in XEHM4B?"}, {"content": text}])
    fake_llm.script.extend(AGENT, [{"content": "Let me check."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.USER_STOP
    assert fake_llm.script.remaining(USER) == 0 and fake_llm.script.remaining(AGENT) == 0


def test_max_steps_reached_by_the_users_stop_overwrites_it(fake_llm):
    """The official loop checks its limits after every step, a user stop included."""
    factory, agent, task = _setup(fake_llm, "7")
    factory.max_steps = 3  # user(1) agent-text(2) user-stop(3) -> max_steps, not user_stop
    fake_llm.script.extend(USER, [{"content": "hi"}, {"content": "###STOP###"}])
    fake_llm.script.extend(AGENT, [{"content": "Hello."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.MAX_STEPS
    assert result.score.reward == 0.0


def test_an_empty_user_message_is_a_user_error(fake_llm):
    """A live difference kept on purpose (docs/evaluation.md): the official runner re-runs the
    episode and ends it as an infrastructure error."""
    factory, agent, task = _setup(fake_llm, "7")
    fake_llm.script.extend(USER, [{"content": "hi"}, {"content": "  "}])
    fake_llm.script.extend(AGENT, [{"content": "Hello."}])
    result = _play(factory, agent, task)
    assert result.termination is Termination.USER_ERROR
    assert result.error_class is ErrorClass.NONE and result.score.reward == 0.0
