"""``harness serve-policy``: a CPU test double of the vLLM 0.34 server, over the harness's own sampler.

It speaks exactly the subset of vLLM's HTTP API that ``--rollout-engine vllm`` uses (routes, field
names, response shapes and error shapes as read from vLLM 0.34.0's source, docs/rollout-engines.md),
so the whole vLLM engine path (requests, log-probs, top-K, stop ids, seeds, pause / weight sync /
resume, LoRA adapters) runs in CPU tests over real HTTP. It is not a production server: replies
are sampled by ``sampler.sample_batch`` on the policy's transformers model, batch by batch.

Where it is stricter than vLLM, on purpose: a completion request field outside
``COMPLETION_REQUEST_FIELDS`` is refused with a 400 naming it (vLLM ignores unknown fields with a
debug log, so a misspelled field would otherwise pass unnoticed), and so are sampling settings that
would warp the distribution (``top_p`` < 1, ``top_k`` > 0, ``min_p`` > 0, a repetition penalty) and
text prompts (only token-id prompts).

Sampling: each request's ``seed`` seeds its own ``torch.Generator`` (a random seed when none is
given, as vLLM does), so a request's reply is the one ``sample_batch`` gives for that prompt and
seed, whichever requests share its batch. Requests waiting together with the same settings and
model are sampled as one batch. Log-probs are those of the tempered distribution the token was
drawn from (vLLM's ``processed_logprobs``); with ``--logprobs-mode raw_logprobs`` they are
recomputed from the untempered distribution, as vLLM's default mode reports them.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from harness.errors import ConfigError

__all__ = ["COMPLETION_REQUEST_FIELDS", "COMPLETION_RESPONSE_FIELDS", "COMPLETION_CHOICE_FIELDS",
           "COMPLETION_LOGPROBS_FIELDS", "LOAD_LORA_FIELDS", "LOGPROBS_MODES", "ROUTES", "PolicyServer",
           "create_app", "load_policy_server", "serve"]

log = logging.getLogger("harness.serve_policy")

COMPLETION_REQUEST_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "stop_token_ids", "ignore_eos", "seed", "logprobs", "add_special_tokens", "return_tokens_as_token_ids",
    "return_token_ids", "skip_special_tokens", "return_weight_versions",
)
"""The ``POST /v1/completions`` fields the double accepts: the ones the vLLM engine sends (names of
vLLM 0.34's ``CompletionRequest``; tests/test_vllm_protocol.py checks them against its source)."""

COMPLETION_RESPONSE_FIELDS = ("id", "object", "created", "model", "choices", "usage")
COMPLETION_CHOICE_FIELDS = ("index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                            "prompt_token_ids", "weight_versions")
COMPLETION_LOGPROBS_FIELDS = ("text_offset", "token_logprobs", "tokens", "top_logprobs")
LOAD_LORA_FIELDS = ("lora_name", "lora_path", "load_inplace")

ROUTES = (
    ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/server_info"), ("POST", "/v1/completions"),
    ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/collective_rpc"),
    ("POST", "/update_weight_version"), ("GET", "/weight_info"), ("POST", "/v1/load_lora_adapter"),
)
"""Every route the double serves (method, path), each one a route of vLLM 0.34's server."""

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
PAUSE_MODES = ("abort", "wait", "keep")
RPC_METHODS = ("reload_weights",)
PAUSED = "Generation is paused. Please retry after it resumes."
"""vLLM's message for a request refused while paused (``EngineCore._reject_add_while_paused``)."""
LOGPROB_FLOOR = -9999.0
"""vLLM clamps every returned log-prob here (JSON has no -inf)."""
_INT64 = (-(2**63), 2**63 - 1)


class ApiError(Exception):
    """A request the double refuses: answered as vLLM's ``ErrorResponse``."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError",
             500: "InternalServerError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.TYPES[self.status],
                                       "param": self.param, "code": self.status}}, status_code=self.status)


@dataclass(frozen=True)
class _Settings:
    """What must be equal for requests to share one ``sample_batch`` call."""

    model: str
    temperature: float
    max_tokens: int
    stop_ids: frozenset[int]
    logprobs: int | None


@dataclass
class _Job:
    settings: _Settings
    prompt: list[int]
    seed: int
    done: asyncio.Future


@dataclass
class _Adapter:
    path: str
    model: Any


@dataclass
class PolicyServer:
    """The served model, its LoRA adapters, the weight version and the pause state."""

    model: Any
    tokenizer: Any
    model_name: str
    model_path: str
    max_logprobs: int = 20
    logprobs_mode: str = "processed_logprobs"
    weight_version: str = "default"
    """vLLM's engine starts at "default" (``EngineCore._weight_version``)."""
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    paused: str | None = None
    """None, or the mode of the ``/pause`` in force."""
    _queue: list[_Job] = field(default_factory=list)
    _in_flight: int = 0

    def __post_init__(self):
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 2**31)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        # asyncio primitives are made in the server's loop (``start``), not here.

    # ---- sampling --------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Condition()
        self._model_lock = asyncio.Lock()
        self._loop_task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        self._loop_task.cancel()
        try:
            await self._loop_task
        except asyncio.CancelledError:
            pass

    async def complete(self, settings: _Settings, prompt: list[int], seed: int) -> Any:
        job = _Job(settings, prompt, seed, asyncio.get_running_loop().create_future())
        self._in_flight += 1
        try:
            self._queue.append(job)
            self._wakeup.set()
            return await job.done
        finally:
            self._in_flight -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            jobs, self._queue = self._queue, []
            groups: dict[_Settings, list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[job.settings].append(job)
            for settings, group in groups.items():
                if self.paused == "keep":  # frozen: these wait in the queue for /resume
                    self._queue[:0] = group
                    continue
                if self.paused == "abort":  # not started yet: ended like the queued ones
                    for job in group:
                        job.done.set_exception(ApiError(PAUSED, 503))
                    continue
                async with self._model_lock:
                    try:
                        results = await asyncio.to_thread(self._sample, settings, group)
                    except Exception as exc:  # a bug, not the caller's: 500, traceback in this terminal
                        log.exception("sampling failed")
                        for job in group:
                            if not job.done.done():
                                job.done.set_exception(ApiError(f"sampling failed: {exc}", 500))
                        continue
                for job, result in zip(group, results):
                    if not job.done.done():
                        job.done.set_result(result)

    def _sample(self, settings: _Settings, jobs: list[_Job]) -> list[tuple[Any, str]]:
        import torch

        from harness.policy.sampler import sample_batch

        model = self.adapters[settings.model].model if settings.model in self.adapters else self.model
        generators = [torch.Generator(device=self.device).manual_seed(job.seed) for job in jobs]
        stop_ids = set(settings.stop_ids)
        samples = sample_batch(model, [job.prompt for job in jobs], generators,
                               max_new_tokens=settings.max_tokens, temperature=settings.temperature,
                               stop_ids=stop_ids, pad_id=self.pad_id, topk=settings.logprobs or 0)
        if self.logprobs_mode == "raw_logprobs" and settings.temperature not in (0, 1):
            for job, sample in zip(jobs, samples):
                _rescore_untempered(model, job.prompt, sample, settings.logprobs or 0)
        return [(sample, self.weight_version) for sample in samples]

    # ---- pause / resume ---------------------------------------------------------------------
    async def pause(self, mode: str) -> None:
        self.paused = mode
        if mode == "abort":  # the double cannot stop a batch half way: queued requests end, the running one drains
            queued, self._queue = self._queue, []
            for job in queued:
                job.done.set_exception(ApiError(PAUSED, 503))
        if mode in ("wait", "abort"):
            async with self._idle:
                await self._idle.wait_for(lambda: self._in_flight == 0)
        else:  # keep: the running batch ends, queued and new requests wait for /resume
            async with self._model_lock:
                pass

    def resume(self) -> None:
        self.paused = None
        self._wakeup.set()

    # ---- weights ------------------------------------------------------------------------------
    async def reload_weights(self, weights_path: str) -> None:
        async with self._model_lock:
            await asyncio.to_thread(self._reload, weights_path)

    def _reload(self, weights_path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        try:
            fresh = AutoModelForCausalLM.from_pretrained(weights_path, dtype=next(self.model.parameters()).dtype)
        except (OSError, ValueError) as exc:
            raise ApiError(f"cannot load weights from {weights_path!r}: {str(exc).splitlines()[0]}",
                           param="weights_path") from None
        try:
            with torch.no_grad():  # in place, as vLLM's reload_weights: same architecture, new values
                self.model.load_state_dict(fresh.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ApiError(f"weights in {weights_path!r} do not fit the served model: "
                           f"{str(exc).splitlines()[0]}", param="weights_path") from None
        for adapter in self.adapters.values():  # adapters apply over the new base weights
            adapter.model = self._load_adapter(adapter.path)

    async def load_lora(self, name: str, path: str) -> None:
        async with self._model_lock:
            adapter = await asyncio.to_thread(self._load_adapter, path)
            self.adapters[name] = _Adapter(path, adapter)

    def _load_adapter(self, path: str) -> Any:
        from peft import PeftModel

        # peft injects its layers into the model it wraps: a copy keeps the base model unchanged
        try:
            return PeftModel.from_pretrained(copy.deepcopy(self.model), path).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ApiError(f"cannot load LoRA adapter from {path!r}: {str(exc).splitlines()[0]}",
                           404, param="lora_path") from None

    # ---- requests -----------------------------------------------------------------------------
    def served_models(self) -> list[str]:
        return [self.model_name, *self.adapters]

    def parse_completion(self, body: Any) -> tuple[_Settings, list[int], int, dict]:
        """The request's settings, prompt and seed, or an ``ApiError`` saying what is wrong."""
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        unknown = sorted(set(body) - set(COMPLETION_REQUEST_FIELDS))
        if unknown:
            raise ApiError(f"field(s) {', '.join(unknown)} are outside the subset of vLLM's /v1/completions "
                           f"this test double serves ({', '.join(COMPLETION_REQUEST_FIELDS)})", param=unknown[0])
        model = body.get("model") or self.model_name
        if model not in self.served_models():
            raise ApiError(f"The model `{model}` does not exist. Valid aliases: {', '.join(self.served_models())}.",
                           404, param="model")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(_is_int(t) for t in prompt):
            raise ApiError("prompt must be a non-empty list of token ids (this double takes no text prompts)",
                           param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(f"Token id {bad[0]} is out of vocabulary", param="prompt")
        max_tokens = _get(body, "max_tokens", 16, int)
        if max_tokens < 1:
            raise ApiError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if len(prompt) + max_tokens > self.max_model_len:
            raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, "
                           f"{max_tokens} in the completion).", param="max_tokens")
        temperature = float(_get(body, "temperature", 1.0, (int, float)))
        if temperature < 0:
            raise ApiError(f"temperature must be >= 0, got {temperature}", param="temperature")
        for name, neutral in (("top_p", (1,)), ("top_k", (0, -1)), ("min_p", (0,)), ("repetition_penalty", (1,))):
            value = _get(body, name, neutral[0], (int, float))
            if value not in neutral:
                raise ApiError(f"{name}={value} would warp the sampling distribution; this double samples it "
                               f"untouched ({name} {' or '.join(map(str, neutral))})", param=name)
        stop_ids = _get(body, "stop_token_ids", [], list)
        if not all(_is_int(t) for t in stop_ids):
            raise ApiError("stop_token_ids must be a list of token ids", param="stop_token_ids")
        stops = set(stop_ids)
        if not _get(body, "ignore_eos", False, bool) and self.eos_id is not None:  # vLLM stops on EOS too
            stops.add(self.eos_id)
        seed = _get(body, "seed", None, int)
        if seed is not None and not _INT64[0] <= seed <= _INT64[1]:
            raise ApiError(f"seed must be a 64-bit signed integer, got {seed}", param="seed")
        logprobs = _get(body, "logprobs", None, int)
        if logprobs is not None and not 0 <= logprobs <= self.max_logprobs:
            raise ApiError(f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
                           f"{self.max_logprobs}" if logprobs > 0 else "`logprobs` must be a positive value",
                           param="logprobs")
        flags = {name: _get(body, name, default, bool) for name, default in (
            ("return_tokens_as_token_ids", False), ("return_token_ids", False), ("skip_special_tokens", True),
            ("return_weight_versions", False), ("add_special_tokens", True), ("ignore_eos", False))}
        settings = _Settings(model, temperature, max_tokens, frozenset(stops), logprobs)
        return settings, list(prompt), secrets.randbits(63) if seed is None else seed, flags

    def completion_response(self, settings: _Settings, prompt: list[int], sample: Any, version: str,
                            flags: dict) -> dict:
        ids = list(sample.ids)
        stopped = sample.ended
        # vLLM's check_stop tests EOS first (stop_reason None), then the stop ids (stop_reason the id)
        by_eos = stopped and ids[-1] == self.eos_id and not flags["ignore_eos"]
        stop_reason = ids[-1] if stopped and not by_eos else None
        text_ids = ids[:-1] if stopped else ids  # vLLM leaves the stop token out of the text
        choice = {
            "index": 0,
            "text": self.tokenizer.decode(text_ids, skip_special_tokens=flags["skip_special_tokens"]),
            "logprobs": None if settings.logprobs is None else self._logprobs(sample, settings.logprobs,
                                                                              flags["return_tokens_as_token_ids"]),
            "finish_reason": "stop" if stopped else "length",
            "stop_reason": stop_reason,
            "token_ids": ids if flags["return_token_ids"] else None,
            "prompt_token_ids": prompt if flags["return_token_ids"] else None,
            "weight_versions": [{"version": version, "start": 0, "end": len(ids)}]
            if flags["return_weight_versions"] else None,
        }
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + len(ids),
                          "completion_tokens": len(ids)}}

    def _logprobs(self, sample: Any, k: int, as_ids: bool) -> dict:
        """vLLM's ``CompletionLogProbs``: per position the sampled token first, then the top K
        (so K + 1 entries, or K when the sampled token is among them), every value clamped."""
        def name(token_id: int) -> str:
            return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

        tokens, top, offsets, offset = [], [], [], 0
        for pos, (token_id, logprob) in enumerate(zip(sample.ids, sample.logprobs)):
            tokens.append(name(token_id))
            entries = {tokens[-1]: max(logprob, LOGPROB_FLOOR)}
            if k:
                for top_id, top_lp in zip(sample.topk_ids[pos].tolist(), sample.topk_logprobs[pos].tolist()):
                    entries.setdefault(name(top_id), max(top_lp, LOGPROB_FLOOR))
            top.append(entries)
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"text_offset": offsets, "token_logprobs": [max(lp, LOGPROB_FLOOR) for lp in sample.logprobs],
                "tokens": tokens, "top_logprobs": top}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(body: dict, name: str, default: Any, kind: Any) -> Any:
    """``body[name]`` (``default`` when absent or null), refused with a 400 when of the wrong type."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}", param=name)
    return value


def _rescore_untempered(model: Any, prompt: list[int], sample: Any, topk: int) -> None:
    """Replace a sample's log-probs (and top-K) by those of the untempered distribution: what
    vLLM's ``raw_logprobs`` mode reports, computed from one forward pass over prompt + reply."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        ids = torch.tensor([prompt + sample.ids[:-1]], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
        logp = torch.log_softmax(logits, dim=-1)
    sample.logprobs = logp[torch.arange(len(sample.ids)), torch.tensor(sample.ids)].tolist()
    if topk:
        values, indices = logp.topk(topk, dim=-1)
        sample.topk_ids, sample.topk_logprobs = indices.to(torch.int32).cpu(), values.cpu()


def create_app(server: PolicyServer) -> Starlette:
    """The Starlette app serving ``ROUTES`` for ``server``."""

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return exc.response()
        return endpoint

    async def body_of(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError("the request body is not JSON") from None

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        now = int(time.time())
        cards = [{"id": server.model_name, "object": "model", "created": now, "owned_by": "vllm",
                  "root": server.model_path, "parent": None, "max_model_len": server.max_model_len}]
        cards += [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": adapter.path,
                   "parent": server.model_name} for name, adapter in server.adapters.items()]
        return JSONResponse({"object": "list", "data": cards})

    async def server_info(request: Request) -> Response:
        if request.query_params.get("config_format", "text") != "json":
            raise ApiError("this double serves /server_info?config_format=json only", param="config_format")
        return JSONResponse({"vllm_config": {"model_config": {
            "model": server.model_path, "served_model_name": server.model_name,
            "max_model_len": server.max_model_len, "max_logprobs": server.max_logprobs,
            "logprobs_mode": server.logprobs_mode, "generation_config": "vllm"}},
            "vllm_env": {"VLLM_SERVER_DEV_MODE": True, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": True},
            "system_env": {}})

    async def completions(request: Request) -> Response:
        if server.paused in ("wait", "abort"):
            raise ApiError(PAUSED, 503)
        body = await body_of(request)
        settings, prompt, seed, flags = server.parse_completion(body)
        sample, version = await server.complete(settings, prompt, seed)
        return JSONResponse(server.completion_response(settings, prompt, sample, version, flags))

    async def pause(request: Request) -> Response:
        mode = request.query_params.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise ApiError(f"Invalid pause mode: {mode} (one of {', '.join(PAUSE_MODES)})", param="mode")
        await server.pause(mode)
        return JSONResponse({"status": "paused"})

    async def resume(request: Request) -> Response:
        server.resume()
        return JSONResponse({"status": "resumed"})

    async def is_paused(request: Request) -> Response:
        return JSONResponse({"is_paused": server.paused is not None})

    async def collective_rpc(request: Request) -> Response:
        body = await body_of(request)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            raise ApiError("Missing 'method' in request body", param="method")
        if method not in RPC_METHODS:
            raise ApiError(f"this double runs collective_rpc method {' or '.join(RPC_METHODS)} only, "
                           f"not {method!r}", param="method")
        kwargs = body.get("kwargs") or {}
        path = kwargs.get("weights_path") if isinstance(kwargs, dict) else None
        if not isinstance(path, str) or not path:
            raise ApiError("reload_weights needs kwargs.weights_path: a save_pretrained directory",
                           param="weights_path")
        await server.reload_weights(path)
        return JSONResponse({"results": [None]})  # one worker; Worker.reload_weights returns None

    async def update_weight_version(request: Request) -> Response:
        body = await body_of(request)
        version = body.get("new_version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            raise ApiError("new_version must be a string", param="new_version")
        server.weight_version = version
        return JSONResponse({"success": True, "new_version": version})

    async def weight_info(request: Request) -> Response:
        return JSONResponse({"weight_version": server.weight_version})

    async def load_lora_adapter(request: Request) -> Response:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError("Both 'lora_name' and 'lora_path' must be provided.")
        if name == server.model_name:
            raise ApiError(f"The lora adapter '{name}' conflicts with a served base model.")
        if name in server.adapters and not body.get("load_inplace", False):
            raise ApiError(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                           "in place, set 'load_inplace' to True.")
        await server.load_lora(name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    handlers = {"/health": health, "/v1/models": models, "/server_info": server_info,
                "/v1/completions": completions, "/pause": pause, "/resume": resume, "/is_paused": is_paused,
                "/collective_rpc": collective_rpc, "/update_weight_version": update_weight_version,
                "/weight_info": weight_info, "/v1/load_lora_adapter": load_lora_adapter}
    routes = [Route(path, guarded(handlers[path]), methods=[method]) for method, path in ROUTES]

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return ApiError(f"internal error: {exc}", 500).response()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={500: on_error})


def load_policy_server(policy: str, *, served_model_name: str | None = None, max_logprobs: int = 20,
                       logprobs_mode: str = "processed_logprobs", device: str = "cpu") -> PolicyServer:
    """Load the policy (a ``save_pretrained`` directory) in float32 and wrap it; ConfigError on bad settings."""
    from harness.policy.local_policy import load_model_and_tokenizer

    if logprobs_mode not in LOGPROBS_MODES:
        raise ConfigError(f"unknown --logprobs-mode '{logprobs_mode}'. Known: {', '.join(LOGPROBS_MODES)}")
    if max_logprobs < 0:
        raise ConfigError(f"--max-logprobs must be >= 0, got {max_logprobs}")
    model, tokenizer = load_model_and_tokenizer(policy, device, "float32")
    return PolicyServer(model=model, tokenizer=tokenizer, model_name=served_model_name or policy, model_path=policy,
                        max_logprobs=max_logprobs, logprobs_mode=logprobs_mode)


def serve(server: PolicyServer, sock: Any) -> None:
    """Serve on an already bound socket until SIGINT / SIGTERM, then exit normally (status 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn shuts down gracefully, then raises the signal it caught again, so the process
            # would die by it (status -15, or a KeyboardInterrupt traceback); being told to stop is
            # this server's normal end.
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
