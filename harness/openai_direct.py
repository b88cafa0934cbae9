"""A lean transport for OpenAI-compatible endpoints (``--llm-client direct``).

Why: at hundreds of episodes in flight against a local vLLM/SGLang server, the client's CPU cost
per call decides throughput. litellm plus the OpenAI SDK spend several milliseconds of CPU per
call (request transformation, logging, pricing); this transport posts the JSON body with one
shared aiohttp session and reads the reply, well under a millisecond. litellm stays the default
because it speaks every provider; ``direct`` only speaks the OpenAI chat-completions wire format
(``api_base`` required). Error classes match what ``harness.llm`` expects: retryable failures
raise ``RetryableError`` (``rate_limited`` set for 429, ``retry_after`` the header as sent), a
reply that does not arrive within ``timeout`` seconds ``TimeoutError``, context overflow raises
``ContextWindowError``, 401/403/404 raise ``FatalProviderError`` and other 4xx ``InfraError``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from harness.errors import ContextWindowError, FatalProviderError, InfraError
from harness.redact import redact

__all__ = ["RetryableError", "DirectClient", "DirectReply", "finish_reason", "price"]


class RetryableError(RuntimeError):
    def __init__(self, message: str, rate_limited: bool = False, retry_after: str | None = None):
        super().__init__(message)
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        """The reply's ``Retry-After`` header as sent, if any."""


_dumps = json.JSONEncoder().encode  # json.dumps with default settings, minus its per-call argument checks

_CONTEXT_HINTS = ("context length", "context_length", "maximum context", "too many tokens", "context window")


class _ConstantJson:
    """JSON text of objects that every call of a run repeats unchanged: the tool schemas (one list
    object per env) and system prompts (one message per episode, never mutated). Keyed by object
    identity and holding a reference, so an id can never be reused for another object; bounded."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._cache: dict[int, tuple[Any, str]] = {}

    def encode(self, obj: Any) -> str:
        hit = self._cache.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        text = _dumps(obj)
        if len(self._cache) >= self.size:
            self._cache.pop(next(iter(self._cache)))  # oldest first: dicts keep insertion order
        self._cache[id(obj)] = (obj, text)
        return text


class DirectClient:
    """One aiohttp session per event loop (created lazily, closed by ``close``).

    Per-call work is kept to what each call needs: the URL, headers and timeout objects are built
    once per (endpoint, key, timeout) and reused, and the reply is read as bytes and parsed
    without a charset detection pass (the OpenAI wire format is UTF-8 JSON)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._constants = _ConstantJson()
        self._targets: dict[tuple[str, str | None, float], tuple[str, dict[str, str], aiohttp.ClientTimeout]] = {}

    def _target(self, api_base: str, api_key: str | None, timeout: float):
        # Headers hold the key: kept in memory only, as before (never logged or stored).
        key = (api_base, api_key, timeout)
        target = self._targets.get(key)
        if target is None:
            headers = {"Content-Type": "application/json"}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            target = (api_base.rstrip("/") + "/chat/completions", headers, aiohttp.ClientTimeout(total=timeout))
            self._targets[key] = target
        return target

    def encode_body(self, body: dict[str, Any]) -> bytes:
        """``json.dumps(body)`` as UTF-8, reusing the cached text of tool lists and system messages
        (about a quarter of this client's CPU per call otherwise goes to re-encoding them). Bytes,
        so aiohttp sends them as they are instead of re-encoding a str per call."""
        parts = []
        for key, value in body.items():
            if key == "tools":
                text = self._constants.encode(value)
            elif key == "messages":
                text = "[" + ",".join(
                    self._constants.encode(m) if m.get("role") == "system" else _dumps(m) for m in value) + "]"
            else:
                text = _dumps(value)
            parts.append(f"{_dumps(key)}:{text}")
        return ("{" + ",".join(parts) + "}").encode()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection cap of our own: concurrency is governed by the run's limiters.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def chat(self, api_base: str, api_key: str | None, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        url, headers, client_timeout = self._target(api_base, api_key, timeout)
        try:
            async with self._get_session().post(url, data=self.encode_body(body), headers=headers,
                                                timeout=client_timeout) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except asyncio.TimeoutError:
            raise  # reported by the caller like its own deadline (harness.llm), one message for both
        except aiohttp.ClientError as exc:
            raise RetryableError(f"connection error: {exc}") from None
        if status == 200:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and "choices" not in payload and isinstance(payload.get("error"), dict):
                # An error object sent with status 200 (some proxies do): litellm refuses it as a bad
                # request, not retried, and so does this client.
                raise InfraError(f"provider error in a 200 reply: {str(payload['error'].get('message'))[:300]}")
            try:
                return parse_reply(payload)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                pass  # reported below with the body text
        text = redact(raw.decode("utf-8", errors="replace"))  # before the cuts below: no half key survives
        if status == 429:
            raise RetryableError(f"HTTP 429: {text[:200]}", rate_limited=True, retry_after=retry_after)
        if status >= 500 or status == 408:
            raise RetryableError(f"HTTP {status}: {text[:200]}", retry_after=retry_after)
        if status >= 400:
            if any(h in text.lower() for h in _CONTEXT_HINTS):
                raise ContextWindowError(text[:300])
            if status in (401, 403, 404):  # bad key, no access, unknown model: every request fails alike
                raise FatalProviderError(f"HTTP {status}: {text[:300]}", status=status)
            raise InfraError(f"HTTP {status}: {text[:300]}")
        raise RetryableError(f"malformed response body: {text[:200]!r}")


@dataclass
class DirectReply:
    content: str | None
    tool_calls: list[tuple[str, str, str]]
    """(id, name, arguments as JSON text) per call."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def parse_reply(payload: Any) -> DirectReply:
    """The first choice of a chat-completions body, held to what litellm accepts (both clients must
    take the same replies, ``tests/test_reply_shapes.py``): a ``choices`` list with a message
    object, text content or none, tool calls with a ``function`` object whose arguments are JSON
    text or an object (sent as its JSON text). Anything else raises (``ValueError`` and the like),
    which ``chat`` turns into a retryable "malformed response body"."""
    choice = payload["choices"][0]
    message = choice["message"]
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError("content is not text")
    calls = []
    for raw_call in message.get("tool_calls") or []:
        function = raw_call["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        elif arguments is not None and not isinstance(arguments, str):
            raise ValueError("tool call arguments are neither JSON text nor an object")
        calls.append((raw_call.get("id") or new_call_id(), function.get("name") or "", arguments or ""))
    usage = payload.get("usage") or {}
    return DirectReply(content=content, tool_calls=calls, finish_reason=finish_reason(choice.get("finish_reason"),
                                                                                      bool(calls)),
                       prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0))


def new_call_id() -> str:
    """An id for a tool call the provider sent without one: unique, as litellm makes them, since a
    later message answers the call by its id."""
    return f"call_{uuid.uuid4().hex[:24]}"


# How litellm names the finish reasons that OpenAI-compatible servers send; any other value
# (or none) is "stop", as in litellm.
_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter",
                   "function_call": "function_call", "max_tokens": "length", "eos": "stop", "eos_token": "stop",
                   "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
                   "content_filtered": "content_filter", "refusal": "content_filter"}


def finish_reason(value: Any, has_tool_calls: bool) -> str:
    """The finish reason as litellm reports it: mapped to the OpenAI names, and "tool_calls" for a
    "stop" that ends a message with tool calls."""
    reason = _FINISH_REASONS.get(value, "stop") if isinstance(value, str) else "stop"
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


def price(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Cost from litellm's bundled price map (0 for models it does not know, e.g. local ones)."""
    import litellm

    name = model.split("/", 1)[1] if "/" in model else model
    entry = litellm.model_cost.get(model) or litellm.model_cost.get(name)
    if not entry:
        return 0.0
    return prompt_tokens * float(entry.get("input_cost_per_token") or 0.0) + completion_tokens * float(
        entry.get("output_cost_per_token") or 0.0
    )
