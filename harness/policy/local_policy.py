"""A local Hugging Face causal LM as an agent, with token-exact traces.

One ``LocalPolicy`` holds the model and tokenizer; it makes one ``PolicyAgent`` per episode. The
episodes run as asyncio tasks (the same runner as API models); each agent turn submits its full
token context to the policy's batcher, which has its rollout engine (``engine.py``; by default
``hf``, one batched, KV-cached decode: ``sampler.sample_batch``) sample one reply per waiting
episode on a worker thread, so env steps and LLM user simulators keep running meanwhile.

When does a batch start? With ``batch_wait_s=None`` (training) only when every open episode is
waiting (or ``max_batch`` are): rollouts are then lock-step and reproducible. With a wait time
(evaluation against slow user simulators) a batch also starts that many seconds after its first
request, so a slow episode does not hold the others back.

Each agent builds its ``TokenTrace`` as the episode goes (``chat_tokens.ChatTokenizer``): prompt
deltas with mask 0, sampled ids with mask 1 and their sampling log-probs. Nothing sampled is ever
decoded and re-tokenized for training; decoding is only used to read tool calls.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError
from harness.llm import ContextWindowError
from harness.policy.chat_tokens import ChatTokenizer
from harness.policy.engine import SampleRequest, SamplingSettings, check_rollout_engine, make_engine
from harness.policy.sampler import Sample
from harness.policy.tool_parsers import TOOL_FORMATS, detect_tool_format, parse_reply
from harness.policy.trace import TokenTrace
from harness.threads import apply_torch_threads
from harness.types import AgentTurn, Usage

__all__ = ["PolicyConfig", "LocalPolicy", "PolicyAgent", "check_model_path", "load_model_and_tokenizer", "pick_device"]

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class PolicyConfig:
    """How a local policy samples."""

    path: str
    """Local model directory (``save_pretrained`` layout) or a Hugging Face model id."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda[:N]``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32`` or ``bfloat16``."""
    temperature: float = 1.0
    max_new_tokens: int = 256
    """Per-turn sampling limit; a reply cut here gets its end-of-turn token added (mask 0)."""
    max_batch: int = 64
    batch_wait_s: float | None = 0.05
    """Seconds a batch waits for more episodes after its first request; None = lock-step."""
    tool_format: str = "auto"
    """``auto`` (from the chat template), ``qwen`` or ``json``."""
    max_context: int | None = None
    """Token limit of one episode; default: the model's ``max_position_embeddings``."""
    record_topk: int = 0
    """Keep the K most likely tokens and their log-probs at every sampled token (SGCD's student
    distribution); 0 = off."""
    rollout_engine: str = "hf"
    """What samples the replies (``harness.policy.engine``); ``hf``: the batched sampler over ``model``."""
    rollout_urls: list[str] | None = None
    """``vllm``: running servers to sample from (``--rollout-url``)."""
    rollout_replicas: int = 0
    """``vllm``: servers the harness starts (``--rollout-replicas``; default one per ``--rollout-gpus`` GPU)."""
    rollout_gpus: str | None = None
    """``vllm``: the GPUs (``CUDA_VISIBLE_DEVICES`` ids) the started servers share out equally."""
    rollout_gpu_memory: float | None = None
    """``vllm``: the fraction of a GPU's memory vLLM takes (started servers: vLLM's 0.9 by default;
    in this process: ``vllm_inprocess.DEFAULT_GPU_MEMORY``)."""
    rollout_log_dir: str | None = None
    """``vllm``: where started servers write their logs (default: a temporary directory)."""
    trained: bool = False
    """The harness trains this model: a ``vllm`` engine's servers get its weights by ``sync_weights``
    (so a given server may serve any model of its architecture)."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device")
    return torch.device(device)


def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype '{dtype}'. Known: auto, float32, bfloat16")
    return table[dtype]


def _load_adapter(local: Path, dtype: torch.dtype, trainable: bool):
    # A LoRA checkpoint of `harness train --lora-rank` holds only the adapter; its config names
    # the base model, which peft loads first.
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError:
        raise ConfigError(f"policy '{local}' is a LoRA adapter checkpoint; loading it needs peft "
                          "(pip install peft)") from None
    return AutoPeftModelForCausalLM.from_pretrained(str(local), dtype=dtype, is_trainable=trainable)


def check_model_path(path: str, what: str = "policy") -> bool:
    """Refuse a local directory that holds no model (no ``config.json``, no LoRA
    ``adapter_config.json``), before anything loads; a path that does not exist is taken for a
    hub id. Returns whether it is an adapter checkpoint."""
    local = Path(path).expanduser()
    adapter = local.exists() and (local / "adapter_config.json").exists() and not (local / "config.json").exists()
    if local.exists() and not adapter and not (local / "config.json").exists():
        raise ConfigError(f"{what} '{path}' is a directory without config.json; give a model saved "
                          "with save_pretrained (or a checkpoint directory of `harness train`)")
    return adapter


def load_model_and_tokenizer(path: str, device: str = "auto", dtype: str = "auto", trainable: bool = False):
    """Load a causal LM (or a LoRA adapter checkpoint over its base) and its tokenizer; a clear
    ConfigError when the path is not a model."""
    from transformers import AutoModelForCausalLM

    apply_torch_threads()  # before any work: torch's default oversubscribes a shared machine
    dev = pick_device(device)
    local = Path(path).expanduser()
    adapter = check_model_path(path)
    tokenizer = _load_tokenizer(path)
    try:
        if adapter:
            model = _load_adapter(local, _pick_dtype(dtype, dev), trainable)
        else:
            model = AutoModelForCausalLM.from_pretrained(_source(path), dtype=_pick_dtype(dtype, dev))
    except OSError as exc:
        raise _cannot_load(path, exc) from None
    return model.to(dev).eval(), tokenizer


def _source(path: str) -> str:
    """What ``from_pretrained`` gets for a ``--policy``: the local directory (``~`` expanded) when
    there is one, else the Hugging Face id as given."""
    local = Path(path).expanduser()
    return str(local) if local.exists() else path


def _cannot_load(path: str, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot load policy '{path}': {str(exc).splitlines()[0]} "
                       "(give a local model directory, or a Hugging Face id that is cached or reachable)")


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    return {i for i in ids if i is not None}


class _ServedModel:
    """What ``LocalPolicy`` reads of a model whose weights only rollout servers hold (``vllm``
    engine, ``harness eval``): its config and generation config, no parameters, so the harness
    process does not load the weights a second time (on a GPU they would take the memory vLLM plans
    to use)."""

    def __init__(self, path: str):
        from transformers import AutoConfig, GenerationConfig

        if check_model_path(path):  # an adapter checkpoint: the config is its base model's
            import json

            path = json.loads((Path(path).expanduser() / "adapter_config.json").read_text())["base_model_name_or_path"]
        source = _source(path)
        try:
            self.config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise _cannot_load(path, exc) from None
        try:
            self.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # none saved: the tokenizer's EOS and the chat template's end tokens stop a turn
            self.generation_config = None

    def parameters(self):
        return iter([torch.empty(0)])


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_source(path))
    except OSError as exc:
        raise _cannot_load(path, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class LocalPolicy:
    def __init__(self, cfg: PolicyConfig, model: Any = None, tokenizer: Any = None, engine: Any = None):
        """``engine``: share another policy's engine (held-out evaluation during training samples
        from the same servers); default: a new one, as ``cfg`` names."""
        if cfg.tool_format not in ("auto", *TOOL_FORMATS):
            raise ConfigError(f"unknown --tool-format '{cfg.tool_format}'. Known: auto, {', '.join(TOOL_FORMATS)}")
        if cfg.temperature < 0:
            raise ConfigError("--temperature must be >= 0")
        check_rollout_engine(cfg.rollout_engine)  # before the model loads
        self.cfg = cfg
        if model is None and cfg.rollout_engine == "vllm":
            check_model_path(cfg.path)
            model, tokenizer = _ServedModel(cfg.path), _load_tokenizer(cfg.path)
        elif model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.path, cfg.device, cfg.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.tool_format = (detect_tool_format(tokenizer.chat_template) if cfg.tool_format == "auto"
                            else cfg.tool_format)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.engine = engine if engine is not None else make_engine(cfg, model, tokenizer)
        self.sampling = SamplingSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                         stop_ids=frozenset(self.stop_ids), topk=cfg.record_topk)
        self.max_context = cfg.max_context or int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self._pending: list[tuple[SampleRequest, asyncio.Future]] = []
        self._open = 0
        self._running = 0
        """Batches in flight: at most one, unless the engine batches by itself (``concurrent``: vLLM
        schedules requests continuously, so a batch need not wait for the previous one's slowest reply)."""
        self._timer: asyncio.TimerHandle | None = None
        self._kick_scheduled = False
        self.batches = 0
        self.batched_requests = 0

    def describe(self) -> dict[str, Any]:
        served = isinstance(self.model, _ServedModel)  # the weights are on the rollout servers only
        return {"policy": self.cfg.path, "temperature": self.cfg.temperature,
                "max_new_tokens": self.cfg.max_new_tokens, "tool_format": self.tool_format,
                "device": self.engine.where if served else str(self.device),
                "dtype": "as served" if served else str(next(self.model.parameters()).dtype)}

    def agent(self, seed: int) -> "PolicyAgent":
        return PolicyAgent(self, seed)

    # -- batching -------------------------------------------------------------------------------
    def _opened(self) -> None:
        self._open += 1

    def _closed(self) -> None:
        self._open -= 1
        self._kick()

    async def generate(self, request: SampleRequest) -> Sample:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        # Decide on the next loop iteration, not now: episodes started together (or woken by the
        # same finished batch) are all in the ready queue, and get to register and submit first.
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._decide)

    def _decide(self) -> None:
        self._kick_scheduled = False
        if self._busy() or not self._pending:
            return
        if len(self._pending) >= max(1, min(self._open, self.cfg.max_batch)):
            self._launch()
        elif self.cfg.batch_wait_s is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.cfg.batch_wait_s, self._launch)

    def _busy(self) -> bool:
        return self._running > 0 and not self.engine.concurrent

    def _launch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy() or not self._pending:
            return
        batch, self._pending = self._pending[: self.cfg.max_batch], self._pending[self.cfg.max_batch:]
        self._running += 1
        asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[SampleRequest, asyncio.Future]]) -> None:
        try:
            samples = await asyncio.to_thread(self.engine.sample, [request for request, _ in batch], self.sampling)
            self.batches += 1
            self.batched_requests += len(batch)
            for (_, future), sample in zip(batch, samples):
                if future.done():
                    continue
                if isinstance(sample, BaseException):  # this request's episode fails alone
                    future.set_exception(sample)
                else:
                    future.set_result(sample)
        except BaseException as exc:  # noqa: BLE001 (e.g. out of memory: every waiting episode hears it)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._running -= 1
            self._kick()


class PolicyAgent:
    """One episode's agent: renders new messages to tokens, samples, parses tool calls."""

    def __init__(self, policy: LocalPolicy, seed: int):
        self.policy = policy
        self.trace = TokenTrace()
        self.rng = policy.engine.episode_rng(seed)
        self._chat: ChatTokenizer | None = None
        self._seen = 0
        self._last_ended = True
        self._closed = False
        # Counted as an open episode (for lock-step batching) from its first turn, not from its
        # creation: an episode still waiting for its env (e.g. for a free AppWorld server held by
        # another episode of the batch) must not hold the batch back, or the two wait forever.
        self._registered = False

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> AgentTurn:
        policy = self.policy
        if not self._registered:
            self._registered = True
            policy._opened()
        if self._chat is None:
            self._chat = ChatTokenizer(policy.tokenizer, tools)
            prompt = self._chat.first_prompt(messages)
            self.trace.first_prompt_len = len(prompt)
            self.trace.context = {"messages": [dict(m) for m in messages], "tools": tools}
        else:
            prompt = self._chat.delta(messages[: self._seen], messages[self._seen:], self._last_ended)
        self.trace.add_prompt(prompt)
        if len(self.trace) + policy.cfg.max_new_tokens > policy.max_context:
            raise ContextWindowError(f"{len(self.trace)} tokens + {policy.cfg.max_new_tokens} new exceed "
                                     f"the policy's context of {policy.max_context}")
        started = time.perf_counter()
        sample = await policy.generate(SampleRequest(list(self.trace.input_ids), self.rng))
        self.trace.add_response(sample.ids, sample.logprobs, sample.topk_ids, sample.topk_logprobs)
        self._last_ended = sample.ended
        if not sample.ended:
            self.trace.truncated = True
        self._seen = len(messages) + 1  # the runner appends our reply before the env's answer
        body = sample.ids[:-1] if sample.ended else sample.ids
        text = policy.tokenizer.decode(body, skip_special_tokens=False)
        content, calls = parse_reply(text, policy.tool_format)
        usage = Usage(prompt_tokens=len(self.trace) - len(sample.ids), completion_tokens=len(sample.ids),
                      calls=1, llm_seconds=time.perf_counter() - started)
        return AgentTurn(content=content, tool_calls=calls, usage=usage,
                         raw={"finish_reason": "stop" if sample.ended else "length"})

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.policy.engine.end_episode(self.rng)
            if self._registered:
                self.policy._closed()
