"""One place where the harness talks to LLM providers, through litellm.

Why a wrapper: every caller (agent, user simulator, summarizer) needs the same things — retries on
429/5xx/timeouts with backoff, a clean split between *infra* failures (provider trouble: excluded
from scores) and *agent* failures (context window exceeded: a task failure, as in the official τ²
runner), token/cost accounting per call, and the API key check before a run starts.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import functools
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError, ContextWindowError, FatalProviderError, InfraError, MissingKeyError
from harness.llm_cache import ResponseCache, cache_key
from harness.llm_limits import LimiterRegistry
from harness.redact import redact, remember
from harness.types import ToolCall, Usage

__all__ = ["LLMConfig", "LLMReply", "InfraError", "FatalProviderError", "ContextWindowError", "CallContext",
           "call_context", "complete", "check_api_key"]


@dataclass
class LLMConfig:
    """How to call one model."""

    model: str
    """litellm model string, e.g. ``openai/gpt-4.1-mini`` or ``hosted_vllm/qwen``."""
    api_base: str | None = None
    """OpenAI-compatible endpoint (vLLM, SGLang, a local proxy)."""
    api_key: str | None = None
    """Explicit key; by default litellm reads the provider's environment variable."""
    temperature: float | None = 0.0
    max_tokens: int | None = None
    timeout: float = 120.0
    """Wall-clock seconds per attempt: the whole reply must arrive within it (a server that
    trickles bytes does not keep an attempt alive)."""
    max_retries: int = 4
    """Retries after the first attempt on retryable errors."""
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)
    """Passed through to ``litellm.acompletion`` (e.g. ``reasoning_effort``)."""
    role: str = "agent"
    """Who makes the calls (``agent``, ``user``, ``summarizer``): labels the per-call records."""
    client: str = "litellm"
    """``litellm`` (every provider) or ``direct`` (lean OpenAI-compatible transport; needs api_base)."""

    def __post_init__(self) -> None:
        remember(self.api_key)  # a key not from the environment: masked like one that is

    def describe(self) -> dict[str, Any]:
        """What determines the replies (recorded on the run; never the key). Transport settings
        (timeout, retries, client) are not part of it: a resumed run may change them."""
        return {
            "model": self.model,
            "api_base": self.api_base,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class CallContext:
    """Per-episode facilities, set by the episode runner in the episode's asyncio task.

    ``calls`` receives one record per LLM call (role, model, tokens, cost, seconds, attempts,
    cached); ``limits`` throttles calls per model; ``cache`` serves repeated requests; ``trial``
    goes into the cache key."""

    trial: int | None = None
    calls: list[dict[str, Any]] | None = None
    limits: LimiterRegistry | None = None
    cache: ResponseCache | None = None
    http: Any = None
    """A shared ``DirectClient`` for ``--llm-client direct`` (one aiohttp session per run)."""


call_context: contextvars.ContextVar[CallContext] = contextvars.ContextVar("harness_call_context",
                                                                           default=CallContext())


@dataclass
class LLMReply:
    content: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    finish_reason: str | None = None


@functools.cache
def _litellm():
    """litellm, imported on first use: its import takes seconds (10 s on a busy machine), which a
    command that stops at a bad flag or an unknown env should not pay before saying so."""
    # litellm fetches its model price map from GitHub at import time unless told not to. Clusters
    # and CI are offline, and a network call at import is slow and non-reproducible: use the
    # bundled map.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.drop_params = True  # e.g. `seed` for providers that do not take it
    # A request cancelled while litellm hands it to its worker thread (Ctrl-C, SIGTERM, a stopped
    # run) leaves litellm's inner coroutine unawaited: harmless, and noise in the one line a stop
    # prints.
    warnings.filterwarnings("ignore", message=r"coroutine '\w+\.acompletion' was never awaited",
                            category=RuntimeWarning)
    return litellm


@functools.cache
def _retryable() -> tuple[type[Exception], ...]:
    litellm = _litellm()
    return (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError, litellm.InternalServerError,
            litellm.ServiceUnavailableError, litellm.BadGatewayError)


@functools.cache
def _fatal() -> tuple[type[Exception], ...]:
    """Not retryable, and not about this request: the run's key or model is wrong (HTTP 401, 403, 404)."""
    litellm = _litellm()
    return litellm.AuthenticationError, litellm.PermissionDeniedError, litellm.NotFoundError


_FATAL_STATUS = (401, 403, 404)
PLACEHOLDER_KEY = "EMPTY"
"""The key sent to an ``api_base`` when none is given (litellm's OpenAI client wants one)."""


RETRY_AFTER_MAX = 60.0
"""The longest a provider's ``Retry-After`` makes us wait before the next attempt (seconds)."""


def _retry_delay(cfg: LLMConfig, attempt: int, retry_after: float | None = None) -> float:
    # Exponential backoff with full jitter, so many episodes hitting the same 429 spread out; a
    # provider that says when to come back (Retry-After on a 429/503) is waited for at least that
    # long, capped so one odd header cannot park an episode for an hour.
    delay = random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * (2**attempt)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_MAX))
    return delay


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds from now: delta-seconds or an HTTP date; None when
    absent or unreadable (then the plain backoff applies)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _request(cfg: LLMConfig, messages, tools, seed) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(model=cfg.model, messages=messages, **cfg.extra)
    if tools:
        kwargs["tools"] = tools
    if cfg.api_base:
        kwargs["api_base"] = cfg.api_base
    if cfg.temperature is not None:
        kwargs["temperature"] = cfg.temperature
    if cfg.max_tokens is not None:
        kwargs["max_tokens"] = cfg.max_tokens
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


async def complete(
    cfg: LLMConfig,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    seed: int | None = None,
) -> LLMReply:
    """One chat completion with retries. Raises ``InfraError`` or ``ContextWindowError``."""
    ctx = call_context.get()
    request = _request(cfg, messages, tools, seed)
    record: dict[str, Any] = {"role": cfg.role, "model": cfg.model, "attempts": 0, "cached": False}
    key = None
    if ctx.cache is not None:
        key = cache_key(request, ctx.trial)
        hit = ctx.cache.get(key)
        if hit is not None:
            record.update(cached=True, prompt_tokens=0, completion_tokens=0, cost=0.0, seconds=0.0)
            _log(ctx, record)
            return _from_cache(hit)

    limiter = ctx.limits.get(cfg.model, cfg.api_base) if ctx.limits is not None else None
    usage = Usage()
    last_error: Exception | None = None
    try:
        for attempt in range(cfg.max_retries + 1):
            record["attempts"] = attempt + 1
            if limiter is not None:
                await limiter.acquire()
            started = time.perf_counter()
            retry_after = None
            try:
                reply = await _attempt(cfg, request, ctx, usage)
            except _Retry as retry:
                last_error, retry_after = retry.cause, retry.retry_after
                if isinstance(retry.cause, (TimeoutError, _litellm().Timeout)):
                    # a timed-out attempt may never have reached the provider (the deadline also
                    # covers the wait for a connection): counted, so the log explains the gap
                    record["timeouts"] = record.get("timeouts", 0) + 1
                if limiter is not None and retry.rate_limited:
                    limiter.on_rate_limited()
            except (ContextWindowError, InfraError) as exc:  # FatalProviderError included
                record["error"] = type(exc).__name__
                raise
            else:
                if limiter is not None:
                    await limiter.on_success()
                usage.llm_seconds += time.perf_counter() - started
                if key is not None:
                    ctx.cache.put(key, _to_cache(reply))
                record.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                              cost=usage.cost, seconds=round(usage.llm_seconds, 4))
                return reply
            finally:
                if limiter is not None:
                    await limiter.release()
            usage.llm_seconds += time.perf_counter() - started
            if attempt < cfg.max_retries:
                await asyncio.sleep(_retry_delay(cfg, attempt, retry_after))
        record["error"] = type(last_error).__name__
        raise InfraError(
            f"{type(last_error).__name__} after {cfg.max_retries + 1} attempts: {_short(last_error)}"
        )
    finally:
        record.setdefault("seconds", round(usage.llm_seconds, 4))
        _log(ctx, record)


class _Retry(Exception):
    def __init__(self, cause: Exception, rate_limited: bool, retry_after: float | None = None):
        self.cause = cause
        self.rate_limited = rate_limited
        self.retry_after = retry_after


async def _attempt(cfg: LLMConfig, request: dict[str, Any], ctx: CallContext, usage: Usage) -> LLMReply:
    """One request, within ``cfg.timeout`` wall-clock seconds. Raises ``_Retry`` for transient
    failures, ``ContextWindowError``/``InfraError`` for final ones.

    The deadline is ours because the clients' own timeouts are not deadlines: litellm's (httpx's)
    restarts on every byte read, so a server that sends one byte every few seconds would hold the
    episode forever."""
    try:
        async with asyncio.timeout(cfg.timeout):
            if cfg.client == "direct":
                return await _attempt_direct(cfg, request, ctx, usage)
            return await _attempt_litellm(cfg, request, usage)
    except FatalProviderError as exc:
        # No key was given, neither as a key nor in the URL (a gateway's ?key=): it is missing, not wrong.
        if exc.status == 401 and cfg.api_key == PLACEHOLDER_KEY and redact(cfg.api_base) == cfg.api_base:
            raise MissingKeyError(
                f"{cfg.role} model '{cfg.model}': the endpoint {cfg.api_base} refused a request without a key "
                f"({exc}), so it {MissingKeyError.MARK}: set OPENAI_API_KEY", status=401) from None
        raise
    except TimeoutError:
        raise _Retry(TimeoutError(f"no complete reply within {cfg.timeout:g}s (--timeout)"), False) from None


async def _attempt_litellm(cfg: LLMConfig, request: dict[str, Any], usage: Usage) -> LLMReply:
    litellm = _litellm()
    try:
        response = await litellm.acompletion(
            **request,
            timeout=cfg.timeout,
            num_retries=0,  # retries are ours: litellm's would hide them from our accounting
            **({"api_key": cfg.api_key} if cfg.api_key else {}),
        )
    except litellm.ContextWindowExceededError as exc:
        raise ContextWindowError(_short(exc)) from None
    except _retryable() as exc:
        raise _Retry(exc, isinstance(exc, litellm.RateLimitError), _litellm_retry_after(exc)) from None
    except litellm.BadRequestError as exc:
        # Not retryable and not the agent's fault: the provider rejecting this request. Kept out of
        # the score like other infra failures.
        raise InfraError(f"{type(exc).__name__}: {_short(exc)}") from None
    except Exception as exc:
        status = getattr(exc, "status_code", None)
        if isinstance(exc, _fatal()) or status in _FATAL_STATUS:
            # A bad key, no access or an unknown model: every other request of the run would fail
            # the same way, so the run stops (docs/reliability.md "Failing loudly"). litellm maps
            # some providers' 403 to a plain APIError, hence the status code.
            status = 401 if isinstance(exc, _litellm().AuthenticationError) else status
            raise FatalProviderError(f"{type(exc).__name__} (HTTP {status}): {_short(exc)}", status=status) from None
        raise
    return _parse(response, usage)


async def _attempt_direct(cfg: LLMConfig, request: dict[str, Any], ctx: CallContext, usage: Usage) -> LLMReply:
    from harness.openai_direct import DirectClient, RetryableError, price

    body = {k: v for k, v in request.items() if k != "api_base"}
    body["model"] = cfg.model.split("/", 1)[1] if "/" in cfg.model else cfg.model
    client = ctx.http or DirectClient()
    try:
        reply = await client.chat(cfg.api_base, cfg.api_key, body, cfg.timeout)
    except RetryableError as exc:
        raise _Retry(exc, exc.rate_limited, retry_after_seconds(exc.retry_after)) from None
    finally:
        if ctx.http is None:
            await client.close()
    usage.calls += 1
    usage.prompt_tokens += reply.prompt_tokens
    usage.completion_tokens += reply.completion_tokens
    usage.cost += price(cfg.model, reply.prompt_tokens, reply.completion_tokens)
    calls = [ToolCall(id=call_id, name=name, arguments=arguments) for call_id, name, arguments in reply.tool_calls]
    return LLMReply(content=reply.content, tool_calls=calls, usage=usage, finish_reason=reply.finish_reason)


def _litellm_retry_after(exc: Exception) -> float | None:
    # litellm keeps the provider's response headers on the exception (its ``response`` object
    # may carry none).
    headers = getattr(exc, "litellm_response_headers", None) or getattr(getattr(exc, "response", None), "headers", None)
    try:
        return retry_after_seconds(headers.get("retry-after")) if headers else None
    except AttributeError:
        return None


def _log(ctx: CallContext, record: dict[str, Any]) -> None:
    if ctx.calls is not None:
        ctx.calls.append(record)


def _to_cache(reply: LLMReply) -> dict[str, Any]:
    return {
        "content": reply.content,
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls],
        "finish_reason": reply.finish_reason,
    }


def _from_cache(hit: dict[str, Any]) -> LLMReply:
    calls = [ToolCall(**c) for c in hit.get("tool_calls") or []]
    return LLMReply(content=hit.get("content"), tool_calls=calls, usage=Usage(), finish_reason=hit.get("finish_reason"))


def _short(exc: Exception | None, limit: int = 300) -> str:
    text = " ".join(redact(str(exc)).split())  # before the cut: no half key survives it
    return text if len(text) <= limit else text[:limit] + "..."


def _parse(response: Any, usage: Usage) -> LLMReply:
    """litellm's response object as an ``LLMReply``; raises ``_Retry`` for a reply without a choice
    (the direct client retries it as a malformed body too)."""
    from harness.openai_direct import finish_reason, new_call_id

    if not response.choices:
        raise _Retry(ValueError("malformed response: no choices"), False)
    choice = response.choices[0]
    message = choice.message
    calls = []
    for tc in getattr(message, "tool_calls", None) or []:
        fn = tc.function
        calls.append(ToolCall(id=tc.id or new_call_id(), name=fn.name or "", arguments=fn.arguments or ""))
    raw_usage = getattr(response, "usage", None)
    usage.calls += 1
    if raw_usage is not None:
        usage.prompt_tokens += int(getattr(raw_usage, "prompt_tokens", 0) or 0)
        usage.completion_tokens += int(getattr(raw_usage, "completion_tokens", 0) or 0)
    # litellm already priced the response from its bundled price map while logging it; computing
    # it again would double the per-call CPU cost. Unknown models (local servers) price as 0.
    hidden = getattr(response, "_hidden_params", None) or {}
    usage.cost += float(hidden.get("response_cost") or 0.0)
    return LLMReply(
        content=message.content,
        tool_calls=calls,
        usage=usage,
        finish_reason=finish_reason(getattr(choice, "finish_reason", None), bool(calls)),
    )


def check_api_key(cfg: LLMConfig, role: str) -> None:
    """Fail before any episode starts if the provider key is missing.

    With an explicit ``api_base`` (local vLLM/SGLang server or proxy) no key is required; litellm's
    OpenAI client still wants one, so we pass a placeholder. Such an endpoint that does need a key
    answers the first call with 401, which raises ``MissingKeyError`` (``_attempt``).
    """
    if cfg.client not in ("litellm", "direct"):
        raise ConfigError(f"--llm-client must be litellm or direct, got '{cfg.client}'")
    if cfg.client == "direct" and not cfg.api_base:
        raise ConfigError(f"{role} model '{cfg.model}': --llm-client direct needs --api-base "
                          "(an OpenAI-compatible server)")

    if cfg.client == "litellm":
        _check_provider(cfg, role)
    if cfg.api_key:
        return
    if cfg.api_base:
        provider = cfg.model.split("/", 1)[0]
        if provider in ("openai", "hosted_vllm", "openai_like") or "/" not in cfg.model:
            cfg.api_key = os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY
        return
    # An exported-but-empty variable (OPENAI_API_KEY=) counts as missing: litellm would accept it
    # and every request would then fail with an authentication error.
    empty = {k: v for k, v in os.environ.items() if v.strip() == ""}
    for key in empty:
        del os.environ[key]
    try:
        report = _litellm().validate_environment(model=cfg.model)
    except Exception as exc:  # unknown provider prefix and similar
        raise ConfigError(f"{role} model '{cfg.model}': {_short(exc)}") from None
    finally:
        os.environ.update(empty)
    missing = report.get("missing_keys") or []
    if missing:
        raise ConfigError(
            f"{role} model '{cfg.model}' needs {', '.join(missing)} in the environment "
            f"(or pass --api-base for an OpenAI-compatible server)."
        )


def _check_provider(cfg: LLMConfig, role: str) -> None:
    """litellm must know the model's provider (``openai/...``, ``hosted_vllm/...``, a bare name it
    knows), or every call of the run fails alike: refused here, before any run row. Offline:
    ``get_llm_provider`` only reads the model string (and the api_base)."""
    try:
        _litellm().get_llm_provider(cfg.model, api_base=cfg.api_base)
    except Exception:  # litellm raises its BadRequestError for an unknown provider
        prefix = cfg.model.split("/", 1)[0] if "/" in cfg.model else None
        what = f"litellm knows no provider '{prefix}'" if prefix else "litellm cannot tell its provider"
        raise ConfigError(f"{role} model '{cfg.model}': {what}; write provider/model, e.g. openai/gpt-4.1, or "
                          "hosted_vllm/NAME with --api-base (https://docs.litellm.ai/docs/providers)") from None
