"""An empty agent message on tau-airline ends like it does in the official 1.x runner: the attempt is
void, the episode is played again from the start (fresh env and user, same seed) up to
``--max-retries`` times, and only then stored as an infrastructure error, which scores leave out
and a resume plays again. ``--env-arg empty_reply=agent-error`` keeps the older ending (agent_error,
reward 0). The real litellm client talks to the fake OpenAI-compatible server, which counts the
requests, so the retries are seen to happen."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import TauPolicy
from test_tau_episodes import _gold_calls, _play

from envs.tau.env import TauAirlineFactory
from envs.tau.user_sim import make_user_spec
from harness.agents import make_agent_spec
from harness.episode_runner import play_episode
from harness.llm_cache import ResponseCache
from harness.store import Store
from harness.types import ErrorClass, Termination

AGENT, USER = "fake-agent", "fake-user"
# Everything the official message check calls empty: no tool calls and no text, null or blank.
EMPTY_REPLIES = [{"content": ""}, {"content": None}, {"content": "  \n\t"}, {"content": ""}]


def _setup(server, empty_reply: str = "retry", retries: int = 3):
    factory = TauAirlineFactory(data_version="tau3", user=make_user_spec("scripted"), empty_reply=empty_reply,
                                empty_reply_retries=retries)
    agent = make_agent_spec("litellm", model=f"openai/{AGENT}", api_base=server.base_url, max_retries=0)
    (task,) = factory.tasks("base", ["7"])
    return factory, agent, task


def test_an_agent_that_stays_empty_is_played_again_then_stored_as_an_infra_error(fake_llm):
    factory, agent, task = _setup(fake_llm, retries=3)
    fake_llm.script.extend(AGENT, EMPTY_REPLIES)
    result = _play(factory, agent, task)

    assert result.error_class is ErrorClass.INFRA
    assert result.termination is Termination.INFRASTRUCTURE_ERROR
    assert "empty message" in result.error and "4 attempt(s)" in result.error, result.error
    assert result.score.reward == 0.0 and result.score.breakdown == {"note": "not graded: infrastructure error"}
    # 1 + 3 retries reached the server, each one the first agent turn of a fresh episode (the
    # scripted user opened again, so the env and the user were new) with the same seed.
    requests = fake_llm.requests_for(AGENT)
    assert len(requests) == 4 and fake_llm.script.remaining(AGENT) == 0
    assert all(r["messages"] == requests[0]["messages"] for r in requests)
    assert [m["role"] for m in requests[0]["messages"]] == ["system", "assistant", "user"]
    assert {r["seed"] for r in requests} == {7}
    # Every attempt was paid for and is counted; the stored trajectory is the last attempt's.
    assert result.agent_usage.calls == 4 and len(result.llm_calls) == 4
    assert [m["role"] for m in result.messages] == ["assistant", "user", "assistant"]
    assert not (result.messages[-1].get("content") or "").strip() and not result.messages[-1].get("tool_calls")


def test_an_agent_empty_once_succeeds_on_the_replay_and_the_replay_is_stored(fake_llm):
    factory, agent, task = _setup(fake_llm, retries=3)
    gold = _gold_calls(task) + [{"content": "Done. Your upcoming flights total $1,628."}]
    fake_llm.script.extend(AGENT, [{"content": None}, *gold])
    result = _play(factory, agent, task)

    assert result.error_class is ErrorClass.NONE and result.error is None
    assert result.termination is Termination.USER_STOP
    assert result.score.reward == 1.0 and result.score.success
    assert len(fake_llm.requests_for(AGENT)) == 1 + len(gold)
    # The stored episode is the successful attempt alone: greeting, opening line, the gold calls
    # with their results, the final text, the user's stop; no trace of the empty message.
    assert [m["role"] for m in result.messages[:2]] == ["assistant", "user"]
    agent_messages = [m for m in result.messages[1:] if m["role"] == "assistant"]
    assert len(agent_messages) == len(gold)
    assert all((m.get("content") or "").strip() or m.get("tool_calls") for m in agent_messages)
    assert result.messages[-1] == {"role": "user", "content": "###STOP###"}
    assert result.agent_usage.calls == 1 + len(gold)  # the voided attempt's call is still counted


def test_a_replay_goes_past_the_response_cache(fake_llm, tmp_path):
    """With --cache the replay's first request equals the voided attempt's: served from the cache
    it would repeat the empty reply in every attempt."""
    factory, agent, task = _setup(fake_llm, retries=1)
    gold = _gold_calls(task) + [{"content": "Done. Your upcoming flights total $1,628."}]
    fake_llm.script.extend(AGENT, [{"content": ""}, *gold])
    cache = ResponseCache(str(tmp_path / "cache.db"))
    try:
        result = asyncio.run(play_episode(factory, agent, task, trial=0, seed=7, cache=cache))
    finally:
        cache.close()
    assert result.error_class is ErrorClass.NONE and result.score.reward == 1.0, result.error
    assert len(fake_llm.requests_for(AGENT)) == 1 + len(gold)


def test_agent_error_setting_keeps_the_old_ending(fake_llm):
    factory, agent, task = _setup(fake_llm, empty_reply="agent-error")
    fake_llm.script.extend(AGENT, EMPTY_REPLIES)
    result = _play(factory, agent, task)

    assert result.termination is Termination.AGENT_ERROR
    assert result.error_class is ErrorClass.NONE  # a scored task failure, not an infra error
    assert result.score.reward == 0.0
    assert len(fake_llm.requests_for(AGENT)) == 1  # never played again


# --- through `harness eval`, with the scores and a resume --------------------------------------

class EmptyOn:
    """The τ policy, except that the agent's first ``times`` replies on task ``task_id`` are empty."""

    def __init__(self, policy: TauPolicy, task_id: str, times: int):
        self.policy, self.task_id, self.left = policy, task_id, times

    def __call__(self, body: dict) -> dict:
        if body.get("model") == AGENT and self.left > 0:
            if self.policy.task_for_agent_messages(body.get("messages") or []) == self.task_id:
                self.left -= 1
                return {"content": ""}
        return self.policy(body)


def _harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OPENAI_API_KEY": ""}, timeout=180)


def _eval(server, db: str, *extra: str) -> subprocess.CompletedProcess:
    return _harness("eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model",
                    f"openai/{USER}", "--api-base", server.base_url, "--tasks", "7,14", "--run", "empty",
                    "--db", db, "--quiet", "--concurrency", "1", "--max-retries", "2", "--retry-backoff", "0", *extra)


def _show(db: str) -> dict:
    shown = _harness("results", "show", "empty", "--db", db, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)[0]


def _agent_requests(server, task_id: str) -> int:
    return sum(1 for body in server.requests if body.get("model") == AGENT
               and TauPolicy.task_for_agent_messages(body["messages"]) == task_id)


def test_eval_leaves_the_infra_episode_out_of_the_scores_and_a_resume_plays_it(tmp_path):
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    policy = TauPolicy(AGENT, USER, sabotage=lambda task_id, seed: False)
    responder = EmptyOn(policy, "7", times=4)
    with FakeOpenAIServer(responder) as server:
        first = _eval(server, db)
        assert first.returncode == 0, first.stderr
        assert "Traceback" not in first.stderr
        # --max-retries 2: task 7 was tried three times, each ending at its first agent reply.
        assert _agent_requests(server, "7") == 3 and policy.openings["7"] == 3
        summary = _show(db)
        assert summary["episodes"] == 2 and summary["infra_episodes"] == 1 and summary["scored_episodes"] == 1
        assert summary["termination/infrastructure_error"] == 1
        # Task 14 alone is scored: 1.0, not the 0.5 an infra episode counted as a failure would give.
        assert summary["pass^1"] == 1.0 and summary["avg_reward"] == 1.0

        # A resume plays task 7 again: empty once more, then played again and solved.
        again = _eval(server, db)
        assert again.returncode == 0, again.stderr
        summary = _show(db)
        assert summary["infra_episodes"] == 0 and summary["scored_episodes"] == 2
        assert summary["pass^1"] == 1.0 and summary["avg_reward"] == 1.0
        assert policy.openings == {"7": 5, "14": 1}
        assert _agent_requests(server, "7") == 3 + 1 + len(policy.actions("7")) + 1


def test_eval_agent_error_setting_and_a_bad_value(tmp_path):
    db = f"sqlite:///{tmp_path / 'old.db'}"
    policy = TauPolicy(AGENT, USER, sabotage=lambda task_id, seed: False)
    with FakeOpenAIServer(EmptyOn(policy, "7", times=1)) as server:
        bad = _eval(server, db, "--env-arg", "empty_reply=never")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith("error: empty_reply must be retry or agent-error"), \
            bad.stderr
        assert not server.requests  # refused before any episode

        old = _eval(server, db, "--env-arg", "empty_reply=agent-error")
        assert old.returncode == 0, old.stderr
        assert _agent_requests(server, "7") == 1
        # The setting defines the run: resuming it with the other value is refused.
        other = _eval(server, db)
        assert other.returncode == 2 and "different settings (empty_reply)" in other.stderr, other.stderr
    summary = _show(db)
    assert summary["infra_episodes"] == 0 and summary["termination/agent_error"] == 1
    assert summary["pass^1"] == 0.5 and summary["avg_reward"] == 0.5
    store = Store(db)
    try:
        assert store.get_run("empty").config["empty_reply"] == "agent-error"
    finally:
        store.close()


def test_training_scores_an_empty_reply_as_agent_error_unless_told_otherwise():
    """``harness train`` builds its env through ``training_settings``: a seeded local policy would
    repeat its empty reply on every replay, and the episode would leave its group as infra, so an
    empty reply would never be penalised. Evaluation keeps the official replay."""
    import trainers.loop as loop
    from envs.registry import build_env, training_settings
    from harness.env_spec import Transport

    assert training_settings("tau-airline", {})["empty_reply"] == "agent-error"
    assert training_settings("tau-airline", {"empty_reply": "retry"})["empty_reply"] == "retry"
    assert "empty_reply" not in training_settings("toy", {})
    scripted = {"user": "scripted"}
    trained = build_env("tau-airline", training_settings("tau-airline", scripted), Transport())
    assert trained.empty_reply == "agent-error"
    assert build_env("tau-airline", scripted, Transport()).empty_reply == "retry"
    assert loop.training_settings is training_settings  # the trainer builds its env through it
