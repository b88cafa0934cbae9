"""Rollout engines: what samples a local policy's replies (``--rollout-engine``).

A ``LocalPolicy`` builds each episode's ``TokenTrace`` and decides when a batch of waiting turns is
sampled; the engine only samples. It receives token ids (the trace builder stays the single
source of prompt tokens, so nothing is re-tokenized) and returns the sampled ids, their
log-probs under the sampling distribution and, when asked, the top-K of that distribution (SGCD's
student distribution).

``hf`` (the default) is the harness's own batched KV-cache sampler over the trainer's
transformers model (``sampler.sample_batch``). ``vllm`` is designed in docs/rollout-engines.md
and not written yet (issue 19).

Seeds: an episode's randomness is one stream, seeded once from the episode's seed, from which its
turns draw in order (``episode_rng``). The ``hf`` engine's stream is a ``torch.Generator``, as
before engines existed, so a seed gives the same episode as it always did; an engine whose
server takes a seed per request derives that seed from the episode's seed and the turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import ConfigError

if TYPE_CHECKING:  # torch loads only when an engine is made: the CLI checks the name without it
    import torch

    from harness.policy.sampler import Sample

__all__ = ["ENGINES", "HfEngine", "RolloutEngine", "SampleRequest", "SamplingSettings", "check_rollout_engine",
           "make_engine"]

ENGINES = ("hf",)
"""Engines this harness has; ``--rollout-engine`` takes one of them."""

_PLANNED = {"vllm": "issue 19: rollouts on vLLM; the design is docs/rollout-engines.md"}
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

    def episode_rng(self, seed: int) -> Any:
        """A new episode's random stream, handed back with each of its requests."""

    def sample(self, requests: list[SampleRequest], settings: SamplingSettings) -> list[Sample]:
        """One reply per request, in order. Blocking: ``LocalPolicy`` calls it on a worker thread."""


class HfEngine:
    """The batched KV-cache sampler over the policy's own transformers model."""

    name = "hf"

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


def check_rollout_engine(name: str) -> None:
    """Refuse an engine this harness does not have, before anything loads (a ``ConfigError``: one
    line, exit 2)."""
    if name in ENGINES:
        return
    if name in _PLANNED:
        raise ConfigError(f"--rollout-engine {name} is not available yet ({_PLANNED[name]}); "
                          f"use --rollout-engine {ENGINES[0]}")
    raise ConfigError(f"unknown --rollout-engine '{name}'. Known: {', '.join(ENGINES)}")


def make_engine(name: str, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    check_rollout_engine(name)
    return HfEngine(model, tokenizer.pad_token_id)
