"""Training methods, registered by name (``@register_method("grpo")``).

A method turns sibling groups into a batch and a batch into a loss; the loop, rollout, packing,
update and checkpointing are shared (DESIGN.md §3). The contract is one base class,
``trainers.methods.base.Method``, with every hook's default and docstring; settings are
dataclasses composed from the blocks of ``trainers.method_settings``:

- ``prepare(groups, ctx) -> Prepared``: which episodes train, with what token-level advantages
  (and any extra targets: teacher log-probs, guidance ...). May call the summarizer or a teacher.
  Under torchrun every rank calls it every step, also with no groups, so it may use the
  collectives of ``trainers.distributed`` (the same calls on every rank).
- ``loss(mb, logp, norm, ctx) -> (loss, metrics)``: this micro-batch's share of the batch loss,
  built from the shared pieces in ``trainers.losses``.

And a few hooks the loop reads: ``needs_reference`` (load a frozen reference model),
``resample_rounds`` and ``keeps(group)`` (dynamic sampling), ``sampler_topk`` (what the rollout
must record), ``uses_summarizer`` (build the credit-reference summarizer), ``requires`` (what the
run must provide: a ``teacher_model``, ``privileged_info`` from the env, a ``summarizer``; checked
before any rollout), ``forward_options`` (extra keyword arguments of the training forward, e.g.
hidden states), ``needs_prepass`` / ``begin_minibatch`` (a no-grad pass over a whole mini-batch
before its loss, for weights that couple siblings across micro-batches) and
``state_dict`` / ``load_state_dict`` (method state saved in checkpoints, e.g. a synced teacher).
``MethodContext`` carries what ``prepare`` may need beyond the groups: the live model (a
privileged-context teacher is the policy itself), a separate teacher model, the tokenizer, the
env's privileged information, the store, the tasks and the summarizer.

Every method also has ``description``, ``paper`` (arXiv id), ``code`` (the official code, where
there is one) and ``sources`` (which default comes from where), which ``harness methods list``
prints with all default settings (``method_catalog``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from harness.errors import ConfigError
from harness.options import check_ranges
from harness.policy.trace import TokenTrace
from trainers.methods.base import Method

__all__ = ["Prepared", "Method", "MethodContext", "register_method", "make_method", "method_names",
           "method_catalog", "parse_method_args", "settings_builder", "REQUIREMENTS"]

REQUIREMENTS = {
    "teacher_model": "a separate teacher model (--teacher PATH, same tokenizer as the policy)",
    "privileged_info": "privileged information from the env (the answer / gold actions; toy and tau-airline have it)",
    "summarizer": "a credit-reference summarizer (--summarizer diff | <litellm model>)",
}


@dataclass
class Prepared:
    traces: list[TokenTrace]
    advantages: list[Any]
    """Per trace: one float for every sampled token, or a per-position list."""
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    token_fields: dict[str, list[Any]] = field(default_factory=dict)
    """Per-position values packed with the traces into ``MicroBatch.fields`` (one tensor
    ``[len(trace), *rest]`` per trace), e.g. teacher log-probs a loss needs."""
    groups: list[int] | None = None
    """Per trace: the index of its sibling group in this batch. The update keeps each group in one
    mini-batch when the method sets ``whole_groups`` (``trainers.update``); GRPO-family methods fill it."""
    credit: list[dict[str, Any]] = field(default_factory=list)
    """Per trace (empty: the method records none): what ``harness train --log-credit-every``
    stores beside the advantage (``trainers.credit_log``), never read by the update. ``values``:
    the method's own per-sampled-token tensors by name (``multiplier``; SGCD adds ``salience``,
    ``divergence``, ``control_divergence``); ``reference``: its group's credit-reference key."""


@dataclass
class MethodContext:
    """What ``Method.prepare`` may use besides the groups (fields may be None in unit tests)."""

    model: Any = None
    tokenizer: Any = None
    temperature: float = 1.0
    micro_batch_tokens: int = 4096
    max_new_tokens: int | None = None
    """The per-turn sampling limit (``--max-new-tokens``): DAPO's L_max."""
    store: Any = None
    run: str | None = None
    step: int = 0
    factory: Any = None
    tasks: dict[str, Any] = field(default_factory=dict)
    """Task id -> Task for the groups' tasks."""
    summarizer: Any = None
    teacher: Any = None
    """The separate teacher model (``--teacher``) for methods that require ``teacher_model``."""
    privileged: Any = None
    """``privileged(task) -> str``: the env's privileged information for a task (or None)."""


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    def wrap(fn: Callable[..., Method]) -> Callable[..., Method]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def settings_builder(name: str, method_cls: Callable[..., Method], defaults: Any) -> Callable[..., Method]:
    """The registry entry of a method whose settings are the dataclass instance ``defaults`` (a
    preset): overrides that are not None replace its fields; an unknown one is a ConfigError."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(defaults)}

    def build(**overrides: Any) -> Method:
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"method {name} does not take {', '.join(unknown)}")
        settings = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
        check_ranges(settings, f"method {name}", as_flags=False)  # finite, and inside each declared range
        return method_cls(name, settings)

    return build


_BUILTIN = ("grpo", "sgcd", "rlsd", "rlcsd", "rlad", "oisd", "tgc", "self_distill", "teacher_distill")


def _load_builtin() -> None:
    import importlib

    from harness.plugins import load_plugins

    for module in _BUILTIN:
        importlib.import_module(f"trainers.methods.{module}")
    load_plugins()  # methods registered by HARNESS_PLUGINS modules


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_method(name: str, **overrides: Any) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'. Known methods: {', '.join(method_names())}")
    return _REGISTRY[name](**overrides)


def method_catalog() -> list[dict[str, Any]]:
    """One row per registered method: name, description, paper, requirements and default settings."""
    rows = []
    for name in method_names():
        m = make_method(name)
        rows.append({"method": name, "description": m.description, "paper": m.paper, "code": m.code,
                     "sources": dict(m.sources), "requires": list(m.requires), "defaults": dict(m.settings)})
    return rows


def parse_method_args(name: str, pairs: list[str]) -> dict[str, Any]:
    """``--method-arg key=value`` strings -> typed settings of method ``name`` (typed from its
    defaults: bool / int / float / str / None-able). Unknown keys are a clear error."""
    defaults = make_method(name).settings
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--method-arg '{pair}' must look like key=value")
        key, raw = (x.strip() for x in pair.split("=", 1))
        key = key.replace("-", "_")
        if key not in defaults:
            raise ConfigError(f"method {name} has no setting '{key}'. Its settings: {', '.join(sorted(defaults))}")
        out[key] = _coerce(key, raw, defaults[key])
    return out


def _coerce(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--method-arg {key} takes true or false, got '{raw}'")
    if raw.lower() in ("none", "null") and default is None:
        return None
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float) or default is None:
            return float(raw) if default is not None or _is_number(raw) else raw
    except ValueError:
        raise ConfigError(f"--method-arg {key} takes a {type(default).__name__}, got '{raw}'") from None
    return raw


def _is_number(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False
