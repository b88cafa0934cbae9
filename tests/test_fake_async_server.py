"""The lean asyncio fake server used by bench/runner_throughput.py speaks the same wire format as the
threaded test fake: replies, tool calls, error statuses, delays, through both LLM clients; and
``run_loop`` runs the harness on the standard loop or on uvloop."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes.openai_async_server import AsyncFakeOpenAIServer
from fakes.openai_server import ScriptedResponder

from harness.episode_runner import loop_name, run_loop
from harness.errors import ConfigError
from harness.llm import InfraError, LLMConfig, complete

MSG = [{"role": "user", "content": "hi"}]


def _cfg(server, client: str, **kw) -> LLMConfig:
    return LLMConfig(model="openai/fake", api_base=server.base_url, api_key="sk-test", client=client,
                     max_retries=kw.pop("max_retries", 0), backoff_base=0.01, **kw)


@pytest.mark.parametrize("client", ["direct", "litellm"])
def test_replies_tool_calls_statuses_and_delay(client):
    script = ScriptedResponder({"fake": [
        {"content": "hello", "delay": 0.2},
        {"tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "u1"}}]},
        {"status": 401, "message": "bad key"},
    ]})
    with AsyncFakeOpenAIServer(script) as server:
        started = time.perf_counter()
        reply = asyncio.run(complete(_cfg(server, client), MSG))
        assert reply.content == "hello" and time.perf_counter() - started >= 0.2
        reply = asyncio.run(complete(_cfg(server, client), MSG,
                                     tools=[{"type": "function", "function": {"name": "get_user_details"}}]))
        assert reply.tool_calls[0].parsed_arguments() == {"user_id": "u1"}
        with pytest.raises(InfraError):
            asyncio.run(complete(_cfg(server, client), MSG))
        assert server.calls == 3


def test_concurrent_delayed_replies_overlap():
    # 32 calls of 0.3 s each finish in about 0.3 s: the delay is a timer, not a busy thread.
    with AsyncFakeOpenAIServer(lambda request: {"content": "ok", "delay": 0.3}) as server:
        async def main():
            return await asyncio.gather(*(complete(_cfg(server, "direct"), MSG) for _ in range(32)))

        started = time.perf_counter()
        replies = run_loop(main())
        assert [r.content for r in replies] == ["ok"] * 32
        assert time.perf_counter() - started < 2.0


def test_run_loop_choices():
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(which(), "asyncio").startswith("asyncio")
    assert loop_name("asyncio") == "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert loop_name("auto") == "asyncio"
        with pytest.raises(ConfigError, match="uvloop is not installed"):
            run_loop(which(), "uvloop")
    else:
        assert loop_name("auto") == "uvloop"
        assert run_loop(which(), "auto").startswith("uvloop")
