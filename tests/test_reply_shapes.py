"""Both LLM clients (litellm, ``--llm-client direct``) accept exactly the same reply shapes and reach
the same verdict on each: the same parsed reply, or the same error class after the same number of
attempts (retried or not). Every shape goes through the real client against the fake server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fakes.openai_server import FakeOpenAIServer, ScriptedResponder

from harness.llm import CallContext, LLMConfig, call_context, complete

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def _message(**fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": "hi", **fields}


_PLAIN = object()
_LEFT_OUT = object()


def _body(choices: Any = _PLAIN, usage: Any = USAGE, **extra: Any) -> str:
    """A chat-completions body; ``_LEFT_OUT`` leaves a field out, None sends null."""
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": _one(_message()) if choices is _PLAIN else choices, "usage": usage, **extra}
    return json.dumps({k: v for k, v in body.items() if v is not _LEFT_OUT})


def _call(arguments: Any, name: Any = "lookup", call_id: Any = "c1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _one(message: dict[str, Any], finish_reason: Any = "stop") -> list[dict[str, Any]]:
    return [{"index": 0, "message": message, "finish_reason": finish_reason}]


SHAPES: dict[str, dict[str, Any]] = {
    "plain": {"raw": _body()},
    "missing choices": {"raw": _body(choices=_LEFT_OUT)},
    "empty choices": {"raw": _body(choices=[])},
    "choices null": {"raw": _body(choices=None)},
    "choice without message": {"raw": _body(choices=[{"index": 0, "finish_reason": "stop"}])},
    "message null": {"raw": _body(choices=_one(None))},
    "null content, no tool calls": {"raw": _body(choices=_one(_message(content=None)))},
    "empty content": {"raw": _body(choices=_one(_message(content="")))},
    "content not a string": {"raw": _body(choices=_one(_message(content=42)))},
    "content a list of parts": {"raw": _body(choices=_one(_message(content=[{"type": "text", "text": "hi"}])))},
    "tool call, arguments not JSON": {"raw": _body(choices=_one(_message(content=None,
                                                                         tool_calls=[_call("{not json")])))},
    "tool call, arguments a JSON list": {"raw": _body(choices=_one(_message(content=None,
                                                                            tool_calls=[_call("[1, 2]")])))},
    "tool call, arguments an object": {"raw": _body(choices=_one(_message(content=None,
                                                                          tool_calls=[_call({"a": 1})])))},
    "tool call, arguments null": {"raw": _body(choices=_one(_message(content=None, tool_calls=[_call(None)])))},
    "tool call without id": {"raw": _body(choices=_one(_message(content=None,
                                                                tool_calls=[_call("{}", call_id=None)])))},
    "tool call without function": {"raw": _body(choices=_one(_message(content=None,
                                                                      tool_calls=[{"id": "c1", "type": "function"}])))},
    "tool call, name null": {"raw": _body(choices=_one(_message(content=None, tool_calls=[_call("{}", name=None)])))},
    "tool call, arguments a number": {"raw": _body(choices=_one(_message(content=None, tool_calls=[_call(5)])))},
    "tool call, arguments a list": {"raw": _body(choices=_one(_message(content=None, tool_calls=[_call([1])])))},
    "tool_calls an object": {"raw": _body(choices=_one(_message(content=None, tool_calls=_call("{}"))))},
    "choices an object": {"raw": _body(choices={"index": 0})},
    "tool_calls null": {"raw": _body(choices=_one(_message(tool_calls=None)))},
    "tool_calls empty": {"raw": _body(choices=_one(_message(tool_calls=[])))},
    "missing usage": {"raw": _body(usage=_LEFT_OUT)},
    "usage null": {"raw": _body(usage=None)},
    "usage partial": {"raw": _body(usage={"prompt_tokens": 5})},
    "extra fields": {"raw": _body(system_fingerprint="fp", service_tier="default",
                                  choices=_one(_message(refusal=None, annotations=[]), "stop"))},
    "finish_reason length": {"raw": _body(choices=_one(_message(content="cut"), "length"))},
    "finish_reason eos": {"raw": _body(choices=_one(_message(), "eos"))},
    "finish_reason max_tokens": {"raw": _body(choices=_one(_message(), "max_tokens"))},
    "finish_reason unknown": {"raw": _body(choices=_one(_message(), "abort"))},
    "finish_reason length with tool calls": {"raw": _body(choices=_one(_message(tool_calls=[_call("{}")]),
                                                                       "length"))},
    "finish_reason missing": {"raw": _body(choices=[{"index": 0, "message": _message()}])},
    "two choices": {"raw": _body(choices=_one(_message(content="first")) + _one(_message(content="second")))},
    "HTML body": {"raw": "<html><body>502 Bad Gateway</body></html>", "content_type": "text/html"},
    "empty body": {"raw": ""},
    "JSON null": {"raw": "null"},
    "JSON list": {"raw": "[]"},
    "truncated JSON": {"raw": _body()[:40]},
    "error object with 200": {"raw": json.dumps({"error": {"message": "overloaded", "type": "server_error"}})},
}


def _verdict(server: FakeOpenAIServer, client: str, shape: dict[str, Any]) -> tuple:
    """What the client made of ``shape`` (sent for every attempt): the parsed reply, or the error
    class and how many attempts it took (2: retried, 1: final at once)."""
    server.responder.extend("fake", [shape, shape])
    cfg = LLMConfig(model="openai/fake", api_base=server.base_url, api_key="k", client=client, max_retries=1,
                    backoff_base=0.0, timeout=5)
    ctx = CallContext(calls=[])

    async def main():
        call_context.set(ctx)
        return await complete(cfg, [{"role": "user", "content": "hi"}])

    try:
        reply = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 (the verdict is the exception's class)
        server.responder.queues["fake"].clear()
        return ("error", type(exc).__name__, ctx.calls[0]["attempts"])
    server.responder.queues["fake"].clear()
    # Every shape sends the id "c1"; a call sent without one gets a fresh unique id from either client.
    calls = [(c.id if c.id == "c1" else "<made up>", c.name, c.arguments) for c in reply.tool_calls]
    return ("reply", reply.content, calls, reply.finish_reason, reply.usage.prompt_tokens,
            reply.usage.completion_tokens)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(ScriptedResponder()) as fake:
        yield fake


@pytest.mark.parametrize("name", list(SHAPES))
def test_both_clients_reach_the_same_verdict(server, name):
    verdicts = {client: _verdict(server, client, SHAPES[name]) for client in ("litellm", "direct")}
    assert verdicts["litellm"] == verdicts["direct"]
