"""harness.llm through the real litellm client against the fake server: retries, error classes,
accounting (tokens, cost from litellm's bundled price map), the response cache, the limiter."""

from __future__ import annotations

import asyncio
import time

import litellm
import pytest
from fakes.openai_server import FakeOpenAIServer, ScriptedResponder

from harness.llm import CallContext, ContextWindowError, InfraError, LLMConfig, call_context, complete
from harness.llm_cache import ResponseCache
from harness.llm_limits import AdaptiveLimiter, LimiterRegistry

MSG = [{"role": "user", "content": "hi"}]


def _cfg(server, model="fake", **kw):
    return LLMConfig(model=f"openai/{model}", api_base=server.base_url, api_key="k", backoff_base=0.01, **kw)


def _run_with(ctx: CallContext, coro_fn):
    async def main():
        call_context.set(ctx)
        return await coro_fn()

    return asyncio.run(main())


def test_cost_comes_from_the_bundled_price_map():
    def responder(r):
        return {"content": "hello", "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}

    with FakeOpenAIServer(responder) as server:
        reply = asyncio.run(complete(_cfg(server, "gpt-4o-mini"), MSG))
    price = litellm.model_cost["gpt-4o-mini"]
    expected = 1000 * price["input_cost_per_token"] + 100 * price["output_cost_per_token"]
    assert reply.usage.prompt_tokens == 1000 and reply.usage.completion_tokens == 100
    assert reply.usage.cost == pytest.approx(expected) and expected > 0


def test_retries_429_and_500_then_succeeds_and_records_attempts():
    script = ScriptedResponder({"fake": [{"status": 429}, {"status": 500}, {"content": "ok"}]})
    with FakeOpenAIServer(script) as server:
        ctx = CallContext(calls=[])
        reply = _run_with(ctx, lambda: complete(_cfg(server, role="user"), MSG))
    assert reply.content == "ok"
    (record,) = ctx.calls
    assert record["attempts"] == 3 and record["role"] == "user" and not record["cached"]


def test_exhausted_retries_raise_infra_error():
    script = ScriptedResponder({"fake": [{"status": 503}] * 3})
    with FakeOpenAIServer(script) as server:
        with pytest.raises(InfraError, match="after 3 attempts"):
            asyncio.run(complete(_cfg(server, max_retries=2), MSG))


def test_timeout_is_retried():
    script = ScriptedResponder({"fake": [{"content": "late", "delay": 1.5}, {"content": "ok"}]})
    with FakeOpenAIServer(script) as server:
        reply = asyncio.run(complete(_cfg(server, timeout=0.5), MSG))
    assert reply.content == "ok"


def test_malformed_body_is_retried():
    script = ScriptedResponder({"fake": [{"raw": "{not json"}, {"content": "ok"}]})
    with FakeOpenAIServer(script) as server:
        reply = asyncio.run(complete(_cfg(server), MSG))
    assert reply.content == "ok"


def test_context_window_error_is_an_agent_failure():
    message = "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens."
    script = ScriptedResponder({"fake": [{"status": 400, "message": message}]})
    with FakeOpenAIServer(script) as server:
        with pytest.raises(ContextWindowError):
            asyncio.run(complete(_cfg(server), MSG))


def test_cache_key_includes_trial_index(tmp_path):
    script = ScriptedResponder({"fake": [{"content": "trial0"}, {"content": "trial1"}]})
    cache = ResponseCache(tmp_path / "cache.db")
    with FakeOpenAIServer(script) as server:
        cfg = _cfg(server)
        first = _run_with(CallContext(trial=0, cache=cache, calls=[]), lambda: complete(cfg, MSG, seed=1))
        second = _run_with(CallContext(trial=1, cache=cache, calls=[]), lambda: complete(cfg, MSG, seed=1))
        ctx = CallContext(trial=0, cache=cache, calls=[])
        again = _run_with(ctx, lambda: complete(cfg, MSG, seed=1))
        assert len(server.requests) == 2  # the third answer came from the cache
    assert (first.content, second.content, again.content) == ("trial0", "trial1", "trial0")
    assert ctx.calls[0]["cached"] and again.usage.cost == 0.0


def test_limiter_halves_on_429_and_recovers():
    async def main():
        lim = AdaptiveLimiter(max_limit=8, cooldown=0.0)
        lim.on_rate_limited()
        assert lim.limit == 4
        lim.on_rate_limited()
        assert lim.limit == 2
        for _ in range(2 + 3 + 4 + 5 + 6 + 7):
            await lim.on_success()
        assert lim.limit == 8
        return lim

    asyncio.run(main())


def test_limiter_caps_in_flight_calls():
    in_flight, peak = 0, 0

    async def worker(lim):
        nonlocal in_flight, peak
        await lim.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        await lim.release()

    async def main():
        lim = LimiterRegistry(max_limit=3).get("m", None)
        await asyncio.gather(*(worker(lim) for _ in range(20)))

    asyncio.run(main())
    assert peak == 3


# -- the lean OpenAI-compatible transport (--llm-client direct) behaves the same way ----------
def test_direct_client_retries_and_prices_like_litellm():
    script = ScriptedResponder({"gpt-4o-mini": [{"status": 429}, {"raw": "{broken"}, {"status": 502},
                                                {"content": "ok",
                                                 "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}]})
    with FakeOpenAIServer(script) as server:
        ctx = CallContext(calls=[])
        reply = _run_with(ctx, lambda: complete(_cfg(server, "gpt-4o-mini", client="direct"), MSG, seed=3))
        sent = server.requests[-1]
    price = litellm.model_cost["gpt-4o-mini"]
    assert reply.content == "ok" and ctx.calls[0]["attempts"] == 4
    assert reply.usage.cost == pytest.approx(1000 * price["input_cost_per_token"]
                                             + 100 * price["output_cost_per_token"])
    assert sent["model"] == "gpt-4o-mini" and sent["seed"] == 3 and "api_base" not in sent


def test_direct_client_error_classes():
    overflow = "This model's maximum context length is 8192 tokens."
    script = ScriptedResponder({"fake": [{"status": 400, "message": overflow}, {"status": 401, "message": "bad key"},
                                         {"content": None, "delay": 1.0}, {"content": "x", "delay": 1.0}]})
    with FakeOpenAIServer(script) as server:
        with pytest.raises(ContextWindowError):
            asyncio.run(complete(_cfg(server, client="direct"), MSG))
        with pytest.raises(InfraError, match="401"):
            asyncio.run(complete(_cfg(server, client="direct"), MSG))
        with pytest.raises(InfraError, match="timeout"):
            asyncio.run(complete(_cfg(server, client="direct", timeout=0.3, max_retries=1), MSG))


def test_direct_client_tool_calls_round_trip():
    script = ScriptedResponder({"fake": [{"tool_calls": [{"name": "get_user_details",
                                                          "arguments": {"user_id": "u1"}}]}]})
    with FakeOpenAIServer(script) as server:
        reply = asyncio.run(complete(_cfg(server, client="direct"), MSG,
                                     tools=[{"type": "function", "function": {"name": "get_user_details"}}]))
    (call,) = reply.tool_calls
    assert call.name == "get_user_details" and call.parsed_arguments() == {"user_id": "u1"}


def test_direct_client_body_encoding_equals_json_dumps():
    import json as _json

    from harness.openai_direct import DirectClient

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    system = {"role": "system", "content": "policy ü \"quoted\""}
    client = DirectClient()
    for turn in range(3):  # second and third calls come from the cache
        body = {"model": "m", "messages": [system, {"role": "user", "content": f"hi {turn}"}], "tools": tools,
                "temperature": 0.0, "seed": 7}
        assert _json.loads(client.encode_body(body)) == body


# -- deadlines and Retry-After, on both clients ------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("client", ["litellm", "direct"])
def test_a_trickling_server_cannot_hold_an_attempt_past_its_timeout(client):
    """--timeout is a wall-clock deadline per attempt: a server that sends its headers and then one
    byte every 0.2 s never trips a per-read timeout, yet each attempt ends after 1 s and the call
    gives up as an infra error after its 2 attempts."""
    script = ScriptedResponder({"fake": [{"trickle": 0.2}] * 2})
    with FakeOpenAIServer(script) as server:
        ctx = CallContext(calls=[])
        started = time.perf_counter()
        with pytest.raises(InfraError, match="after 2 attempts: no complete reply within 1s"):
            _run_with(ctx, lambda: complete(_cfg(server, client=client, timeout=1.0, max_retries=1), MSG))
        elapsed = time.perf_counter() - started
    assert 2.0 <= elapsed < 4.0, elapsed
    assert ctx.calls[0]["attempts"] == 2 and ctx.calls[0]["error"] == "TimeoutError"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("client", ["litellm", "direct"])
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_waited_for(client, status):
    """A 429/503 with Retry-After: 1 is retried no sooner than a second later, though the jittered
    backoff alone (base 0.01 s) would retry at once."""
    script = ScriptedResponder({"fake": [{"status": status, "headers": {"Retry-After": "1"}}, {"content": "ok"}]})
    with FakeOpenAIServer(script) as server:
        started = time.perf_counter()
        reply = asyncio.run(complete(_cfg(server, client=client), MSG))
        elapsed = time.perf_counter() - started
    assert reply.content == "ok"
    assert 1.0 <= elapsed < 3.0, elapsed


def test_retry_after_header_forms():
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    from harness.llm import RETRY_AFTER_MAX, LLMConfig, _retry_delay, retry_after_seconds

    in_five = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=5), usegmt=True)
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(" 0.5 ") == 0.5
    assert 3.0 < retry_after_seconds(in_five) <= 5.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0.0 and retry_after_seconds("nan") is None
    cfg = LLMConfig(model="openai/x", backoff_base=0.0)
    assert _retry_delay(cfg, 0, 3600.0) == RETRY_AFTER_MAX  # an absurd header is capped
