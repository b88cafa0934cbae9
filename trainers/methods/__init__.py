"""Training methods, registered by name (``@register_method("grpo")``).

A method turns sibling groups into a batch and a batch into a loss; the loop, rollout, packing,
update and checkpointing are shared (DESIGN.md §3):

- ``prepare(groups, ctx) -> Prepared``: which episodes train, with what token-level advantages
  (and any extra targets: teacher log-probs, guidance ...). May call the summarizer or a teacher.
- ``loss(mb, logp, norm, ctx) -> (loss, metrics)``: this micro-batch's share of the batch loss,
  built from the shared pieces in ``trainers.losses``.

And a few hooks the loop reads: ``needs_reference`` (load a frozen reference model),
``resample_rounds`` and ``keeps(group)`` (dynamic sampling), ``sampler_topk`` (what the rollout
must record) and ``uses_summarizer`` (build the credit-reference summarizer). ``MethodContext``
carries what ``prepare`` may need beyond the groups: the live model (a privileged-context teacher
is the policy itself), the tokenizer, the store, the tasks and the summarizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from harness.errors import ConfigError
from harness.policy.trace import TokenTrace
from harness.types import Group
from trainers.losses import LossNorm
from trainers.packing import MicroBatch

__all__ = ["Prepared", "Method", "MethodContext", "register_method", "make_method", "method_names"]


@dataclass
class Prepared:
    traces: list[TokenTrace]
    advantages: list[Any]
    """Per trace: one float for every sampled token, or a per-position list."""
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What ``Method.prepare`` may use besides the groups (fields may be None in unit tests)."""

    model: Any = None
    tokenizer: Any = None
    temperature: float = 1.0
    micro_batch_tokens: int = 4096
    store: Any = None
    run: str | None = None
    step: int = 0
    factory: Any = None
    tasks: dict[str, Any] = field(default_factory=dict)
    """Task id -> Task for the groups' tasks."""
    summarizer: Any = None


class Method(Protocol):
    name: str
    settings: dict[str, Any]
    needs_reference: bool
    resample_rounds: int
    sampler_topk: int
    uses_summarizer: bool

    def keeps(self, group: Group) -> bool: ...

    def prepare(self, groups: list[Group], ctx: Any) -> Prepared: ...

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def loss_constant(self, max_new_tokens: int) -> float | None: ...


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    def wrap(fn: Callable[..., Method]) -> Callable[..., Method]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    from trainers.methods import grpo, sgcd  # noqa: F401


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_method(name: str, **overrides: Any) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'. Known methods: {', '.join(method_names())}")
    return _REGISTRY[name](**overrides)
