"""Rollout engines: what samples a local policy's replies (``--rollout-engine``).

A ``LocalPolicy`` builds each episode's ``TokenTrace`` and decides when a batch of waiting turns is
sampled; the engine only samples. It receives token ids (the trace builder stays the single
source of prompt tokens, so nothing is re-tokenized) and returns the sampled ids, their
log-probs under the sampling distribution and, when asked, the top-K of that distribution (SGCD's
student distribution).

``hf`` (the default) is the harness's own batched KV-cache sampler over the trainer's
transformers model (``sampler.sample_batch``). ``vllm`` (``vllm_engine``) sends each turn to vLLM
OpenAI-compatible servers, given (``--rollout-url``) or started by the harness
(``--rollout-replicas``, ``--rollout-gpus``), or, with neither, to ``vllm.LLM`` in this process,
asleep during the update (``vllm_inprocess``); docs/rollout-engines.md.

Seeds: an episode's randomness is one stream, seeded once from the episode's seed, from which its
turns draw in order (``episode_rng``). The ``hf`` engine's stream is a ``torch.Generator``, as
before engines existed, so a seed gives the same episode as it always did; an engine whose
server takes a seed per request derives that seed from the episode's seed and the turn.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import ConfigError

if TYPE_CHECKING:  # torch loads only when an engine is made: the CLI checks the name without it
    import torch

    from harness.policy.sampler import Sample

__all__ = ["ENGINES", "HfEngine", "RolloutEngine", "SampleRequest", "SamplingSettings", "check_rollout_engine",
           "check_rollout_servers", "make_engine"]

ENGINES = ("hf", "vllm")
"""Engines this harness has; ``--rollout-engine`` takes one of them."""

_PLANNED: dict[str, str] = {}
"""Engines accepted by name but not written yet, with where their work stands."""


@dataclass(frozen=True)
class SamplingSettings:
    """How every reply of one batch is sampled."""

    temperature: float
    """0 is greedy (log-probs then come from the untempered distribution)."""
    max_new_tokens: int
    stop_ids: frozenset[int]
    """A reply ends after the first of these it samples (the chat template's end-of-turn tokens)."""
    topk: int = 0
    """Also return the K most likely tokens and their log-probs at every sampled position; 0 = off."""


@dataclass
class SampleRequest:
    """One episode's turn: its whole context so far, and its episode's random stream."""

    prompt_ids: list[int]
    rng: Any
    """What the engine's ``episode_rng`` returned for this episode."""


class RolloutEngine(Protocol):
    name: str
    concurrent: bool
    """Several ``sample`` calls may be in flight at once (the engine batches by itself)."""
    where: str
    """Where the weights that sample live, as ``harness eval`` reports the policy's device."""
    failure: BaseException | None
    """Set when the engine cannot sample any more (every rollout server gone); the rollout raises it
    once the episodes in flight have ended."""

    def episode_rng(self, seed: int) -> Any:
        """A new episode's random stream, handed back with each of its requests."""

    def sample(self, requests: list[SampleRequest], settings: SamplingSettings) -> list[Sample | BaseException]:
        """One reply per request, in order. Blocking: ``LocalPolicy`` calls it on a worker thread.
        An exception in place of a ``Sample`` fails that request's episode alone."""

    def end_episode(self, rng: Any) -> None:
        """The episode of this stream ended (a server-backed engine balances episodes over servers)."""

    def before_update(self) -> None:
        """The step's rollouts are done and the trainer's passes come: free what they need (vLLM in
        the training process sleeps until the next ``sync_weights``)."""

    syncs_weights: bool
    """The engine samples from its own copy of the weights, which ``sync_weights(model, step,
    directory)`` replaces with ``model``'s after every optimizer step (False: it samples with the
    trained model itself, and has no ``sync_weights``)."""

    def close(self) -> None:
        """Release what the engine holds (servers it started)."""


class HfEngine:
    """The batched KV-cache sampler over the policy's own transformers model."""

    name = "hf"
    concurrent = False  # one batched decode at a time on the trainer's model
    where = "the trainer's model"
    syncs_weights = False
    failure = None

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device

    def episode_rng(self, seed: int) -> torch.Generator:
        import torch

        return torch.Generator(device=self.device).manual_seed(int(seed))

    def sample(self, requests: list[SampleRequest], settings: SamplingSettings) -> list[Sample]:
        from harness.policy.sampler import sample_batch

        return sample_batch(self.model, [r.prompt_ids for r in requests], [r.rng for r in requests],
                            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            stop_ids=set(settings.stop_ids), pad_id=self.pad_id, topk=settings.topk)

    def end_episode(self, rng: Any) -> None:
        pass

    def before_update(self) -> None:
        pass

    def close(self) -> None:
        pass


def check_rollout_engine(name: str) -> None:
    """Refuse an engine this harness does not have, before anything loads (a ``ConfigError``: one
    line, exit 2)."""
    if name in ENGINES:
        return
    if name in _PLANNED:
        raise ConfigError(f"--rollout-engine {name} is not available yet ({_PLANNED[name]}); "
                          f"use --rollout-engine {ENGINES[0]}")
    raise ConfigError(f"unknown --rollout-engine '{name}'. Known: {', '.join(ENGINES)}")


def check_rollout_servers(engine: str, urls: list[str] | None, replicas: int, gpus: str | None,
                          gpu_memory: float | None = None) -> None:
    """Refuse, before anything loads, rollout flags that do not go together (one line, exit 2).
    ``vllm`` with no servers named runs vLLM in this process, which needs the package here."""
    managed = bool(replicas or gpus)
    if engine != "vllm" and (urls or managed or gpu_memory is not None):
        raise ConfigError("--rollout-url, --rollout-replicas, --rollout-gpus and --rollout-gpu-memory are for "
                          "--rollout-engine vllm")
    if urls and managed:
        raise ConfigError("give either --rollout-url (running servers) or --rollout-replicas/--rollout-gpus "
                          "(servers the harness starts), not both")
    if replicas < 0:
        raise ConfigError("--rollout-replicas must be >= 0")
    if gpu_memory is not None:
        if urls:
            raise ConfigError("--rollout-gpu-memory is for servers the harness starts or vLLM in this process; "
                              "a --rollout-url server was started with its own --gpu-memory-utilization")
        if not 0 < gpu_memory <= 1:
            raise ConfigError(f"--rollout-gpu-memory is a fraction of a GPU's memory, in (0, 1]; got {gpu_memory}")
    if engine == "vllm" and not urls and not managed:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            from harness.policy.vllm_inprocess import MISSING_VLLM

            raise ConfigError(MISSING_VLLM)
    if engine == "vllm" and managed:
        from harness.policy.vllm_replicas import SERVER_COMMAND_ENV, split_gpus

        if gpus:
            split_gpus(gpus, replicas or len([g for g in gpus.split(",") if g.strip()]) or 1)

        if not os.environ.get(SERVER_COMMAND_ENV) and shutil.which("vllm") is None:
            raise ConfigError("--rollout-replicas/--rollout-gpus start `vllm serve`, and there is no `vllm` "
                              "executable: pip install -e .[vllm] on a GPU machine, or give running servers "
                              "with --rollout-url")
    for url in urls or []:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--rollout-url {url}: give the server's base URL, e.g. http://127.0.0.1:8000")


def make_engine(cfg: Any, model: Any, tokenizer: Any) -> RolloutEngine:
    """The engine a ``PolicyConfig`` names, over ``model`` (the hf engine samples with it; the vllm
    engine's servers, or vLLM in this process, load the policy and then get ``model``'s weights by
    ``sync_weights``)."""
    check_rollout_engine(cfg.rollout_engine)
    check_rollout_servers(cfg.rollout_engine, cfg.rollout_urls, cfg.rollout_replicas, cfg.rollout_gpus,
                          cfg.rollout_gpu_memory)
    if cfg.rollout_engine == "vllm":
        from harness.policy.vllm_engine import make_vllm_engine

        return make_vllm_engine(cfg, model)
    return HfEngine(model, tokenizer.pad_token_id)
