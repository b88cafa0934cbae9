"""A CPU stand-in for the subset of vLLM 0.34's Python API that the in-process ``vllm`` engine
uses (``harness/policy/vllm_inprocess.py``), over the harness's own sampler, for tests: put
``tests/vllm_inprocess`` first on ``sys.path`` (or ``PYTHONPATH``) and ``import vllm`` finds it.

What it shares with vLLM is checked against the wheel by ``tests/test_vllm_inprocess.py``: every
argument it accepts is one vLLM's ``LLM``/``EngineArgs``/``SamplingParams`` has, every method is
one of ``LLM``'s with parameter names vLLM's has, every output field is one vLLM's outputs have.
Where vLLM leaves behaviour to the caller it is strict, so that a caller's mistake shows:

- ``generate`` while any memory is asleep raises (vLLM: undefined; the caller must wake it);
- ``sleep(2)`` fills the weights with NaN (vLLM frees them; waking gives uninitialised memory),
  ``sleep(1)`` keeps a copy and restores it on ``wake_up(["weights"])``; loaded LoRA adapters are
  dropped (the engine names a new adapter id after a sync anyway);
- ``collective_rpc("reload_weights")`` while the KV cache holds prefixes computed with the old
  weights makes the next ``generate`` raise until ``reset_prefix_cache`` (vLLM would silently
  reuse that stale KV); a sleep empties the cache, as vLLM's does;
- a field outside the subset is a ``TypeError``, a warping sampling setting a ``ValueError``.

Every call is appended to ``LLM.calls`` (and, with ``HARNESS_VLLM_DOUBLE_LOG`` set, to that file,
one JSON line each) so tests can check the order of sleep, wake and reload.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, TypedDict

__version__ = "0.34.0+harness.double"

LLM_ARGUMENTS = frozenset({"model", "seed", "gpu_memory_utilization", "tensor_parallel_size", "logprobs_mode",
                           "max_logprobs", "generation_config", "enable_sleep_mode", "enable_lora",
                           "max_lora_rank", "max_loras"})
"""``LLM(...)`` keywords the double accepts: ``LLM.__init__`` parameters and ``EngineArgs`` fields."""
SAMPLING_FIELDS = frozenset({"n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                             "stop_token_ids", "ignore_eos", "seed", "logprobs", "detokenize",
                             "skip_special_tokens"})
"""``SamplingParams`` fields the double accepts."""
_NEUTRAL = {"n": 1, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
_TAGS = ("weights", "kv_cache", "scheduling")


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


class SamplingParams:
    def __init__(self, **fields: Any):
        unknown = set(fields) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams (double): unexpected field(s) {sorted(unknown)}")
        for name, neutral in _NEUTRAL.items():
            if fields.get(name, neutral) != neutral:
                raise ValueError(f"SamplingParams (double): {name}={fields[name]!r} would warp the sampling "
                                 "distribution the log-probs describe")
        self.max_tokens = fields.get("max_tokens", 16)
        self.temperature = float(fields.get("temperature", 1.0))
        self.stop_token_ids = list(fields.get("stop_token_ids") or [])
        self.ignore_eos = bool(fields.get("ignore_eos", False))
        self.seed = fields.get("seed")
        self.logprobs = fields.get("logprobs")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class WeightVersionSpan:
    version: str
    start: int
    end: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[WeightVersionSpan] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


class LLM:
    def __init__(self, model: str, *, seed: int = 0, gpu_memory_utilization: float | None = None,
                 tensor_parallel_size: int = 1, **engine_args: Any):
        from harness.policy.serve_policy import load_policy_server

        unknown = set(engine_args) - LLM_ARGUMENTS
        if unknown:
            raise TypeError(f"EngineArgs (double): unexpected argument(s) {sorted(unknown)}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.calls: list[tuple] = []
        self._record("LLM", model=model, **engine_args, gpu_memory_utilization=gpu_memory_utilization)
        self._server = load_policy_server(model, max_logprobs=engine_args.get("max_logprobs", 20),
                                          logprobs_mode=engine_args.get("logprobs_mode", "raw_logprobs"))
        self._sleep_mode = bool(engine_args.get("enable_sleep_mode", False))
        self._lora = bool(engine_args.get("enable_lora", False))
        self._max_lora_rank = int(engine_args.get("max_lora_rank", 16))
        self._max_loras = int(engine_args.get("max_loras", 1))
        self._adapters: dict[int, Any] = {}  # lora_int_id -> model, least recently used first
        self._asleep: set[str] = set()
        self._level = 0
        self._offloaded: dict[str, Any] | None = None
        self._cached = False  # the prefix cache holds KV of the weights it was computed with
        self._stale = False
        self._version = "default"

    # -- sampling --------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: Any = True,
                 lora_request: Any = None) -> list[RequestOutput]:
        import torch

        from harness.policy.sampler import sample_batch

        prompts = prompts if isinstance(prompts, list) else [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()]
        params = params * len(prompts) if len(params) == 1 else params
        self._record("generate", n=len(prompts), lora=getattr(lora_request, "lora_int_id", None))
        if self._asleep:
            raise RuntimeError(f"vLLM double: generate while {sorted(self._asleep)} sleep; wake_up first")
        if self._stale:
            raise RuntimeError("vLLM double: the weights changed while the prefix cache held KV of the old ones; "
                               "reset_prefix_cache first (vLLM would reuse the stale KV)")
        if len(params) != len(prompts):
            raise ValueError("the lengths of prompts and sampling_params must be the same")
        for prompt in prompts:
            if not isinstance(prompt, dict) or set(prompt) != {"prompt_token_ids"}:
                raise TypeError(f"vLLM double: token-id prompts only (TokensPrompt), got {prompt!r:.80}")
        model = self._adapter(lora_request) if lora_request is not None else self._server.model
        server = self._server
        outputs = []
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            ids = list(prompt["prompt_token_ids"])
            stops = set(param.stop_token_ids)
            if not param.ignore_eos and server.eos_id is not None:
                stops.add(server.eos_id)
            seed = param.seed if param.seed is not None else int.from_bytes(os.urandom(7), "little")
            k = param.logprobs or 0
            if k > server.max_logprobs:
                raise ValueError(f"Requested sample logprobs of {k}, which is greater than max allowed: "
                                 f"{server.max_logprobs}")
            sample = sample_batch(model, [ids], [torch.Generator().manual_seed(seed)], max_new_tokens=param.max_tokens,
                                  temperature=param.temperature, stop_ids=stops, pad_id=server.pad_id, topk=k)[0]
            rows = None
            if param.logprobs is not None:
                rows = []
                for pos, (token, value) in enumerate(zip(sample.ids, sample.logprobs)):
                    row = {token: Logprob(value)}  # the sampled token first, then the top K
                    if k:
                        for rank, (top, top_lp) in enumerate(zip(sample.topk_ids[pos].tolist(),
                                                                 sample.topk_logprobs[pos].tolist()), start=1):
                            row.setdefault(top, Logprob(top_lp, rank))
                    rows.append(row)
            stopped = bool(sample.ids) and sample.ids[-1] in stops
            by_eos = stopped and sample.ids[-1] == server.eos_id and not param.ignore_eos
            outputs.append(RequestOutput(
                request_id=str(index), prompt=None, prompt_token_ids=ids, prompt_logprobs=None, finished=True,
                outputs=[CompletionOutput(
                    index=0, text="", token_ids=list(sample.ids), cumulative_logprob=float(sum(sample.logprobs)),
                    logprobs=rows, finish_reason="stop" if stopped else "length",
                    stop_reason=sample.ids[-1] if stopped and not by_eos else None,
                    weight_versions=[WeightVersionSpan(self._version, 0, len(sample.ids))])]))
        self._cached = True
        return outputs

    def _adapter(self, request: Any) -> Any:
        if not self._lora:
            raise ValueError("LoRA is not enabled (enable_lora=True)")
        if request.lora_int_id not in self._adapters:
            settings = json.loads(open(os.path.join(request.lora_path, "adapter_config.json")).read())
            if int(settings["r"]) > self._max_lora_rank:
                raise ValueError(f"LoRA rank {settings['r']} is greater than max_lora_rank {self._max_lora_rank}")
            self._adapters[request.lora_int_id] = self._server._load_adapter(request.lora_path)
            while len(self._adapters) > self._max_loras:  # least recently used goes
                self._adapters.pop(next(iter(self._adapters)))
        self._adapters[request.lora_int_id] = self._adapters.pop(request.lora_int_id)
        return self._adapters[request.lora_int_id]

    # -- memory ----------------------------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort", reset_connector: bool = True) -> None:
        import torch

        self._record("sleep", level=level)
        if not self._sleep_mode:
            raise ValueError("Sleep mode is not enabled (enable_sleep_mode=True)")
        if level not in (1, 2):
            raise ValueError(f"the double sleeps at level 1 or 2, not {level}")
        params = dict(self._server.model.named_parameters())
        self._offloaded = {n: p.detach().clone() for n, p in params.items()} if level == 1 else None
        with torch.no_grad():
            for param in params.values():
                param.fill_(float("nan"))
        self._adapters.clear()
        self._asleep, self._level = {"weights", "kv_cache"}, level
        self._cached = self._stale = False  # the KV cache is dropped

    def wake_up(self, tags: list[str] | None = None) -> bool:
        import torch

        self._record("wake_up", tags=tags)
        tags = list(_TAGS) if tags is None else tags
        if not set(tags) <= set(_TAGS):
            raise ValueError(f"wake_up tags must be among {_TAGS}, got {tags}")
        if "weights" in tags and "weights" in self._asleep and self._offloaded is not None:
            with torch.no_grad():
                for name, param in self._server.model.named_parameters():
                    param.copy_(self._offloaded[name])
            self._offloaded = None
        self._asleep -= set(tags)
        return not self._asleep

    # -- weights ---------------------------------------------------------------------------------
    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        from harness.policy.serve_policy import ApiError

        self._record("collective_rpc", method=method, kwargs=kwargs)
        if method != "reload_weights" or args or set(kwargs or {}) != {"weights_path"}:
            raise ValueError("the double runs collective_rpc('reload_weights', kwargs={'weights_path': DIR}) only")
        if "weights" in self._asleep:
            raise RuntimeError("vLLM double: reload_weights while the weights sleep; wake_up(['weights']) first")
        try:
            self._server._reload(kwargs["weights_path"])
        except ApiError as exc:
            raise RuntimeError(str(exc)) from None
        self._stale = self._cached
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self._record("reset_prefix_cache")
        self._cached = self._stale = False
        return True

    def update_weight_version(self, new_version: str) -> None:
        self._record("update_weight_version", new_version=new_version)
        self._version = new_version

    def get_weight_version(self) -> str:
        return self._version

    def _record(self, call: str, **details: Any) -> None:
        self.calls.append((call, details))
        log = os.environ.get("HARNESS_VLLM_DOUBLE_LOG")
        if log:
            with open(log, "a") as out:
                out.write(json.dumps({"call": call, **details}, default=str) + "\n")
