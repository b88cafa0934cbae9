"""Env registry: ``@register_env("tau-airline")`` on an ``EnvFactory`` subclass (the contract is
``harness.env_spec``); ``env_class`` / ``build_env`` / ``make_env_factory`` find one by name.

Adding an env is one folder and one line: the built-in ones are imported from ``BUILTIN``; any
other module registers itself when it is named in ``HARNESS_PLUGINS`` (comma-separated importable
module names, e.g. ``HARNESS_PLUGINS=my_envs.warehouse``), so an env written outside this
repository needs nothing but its ``@register_env`` line.

Every setting an env takes is a field of its ``Options`` dataclass: ``build_env`` turns plain
values (what a run stores) into an ``Options`` instance and calls ``from_options``; unknown keys
are an error naming the env's settings.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from harness.env_spec import Env, EnvFactory, Transport
from harness.errors import ConfigError
from harness.options import check_ranges
from harness.plugins import PLUGINS_VAR, load_plugins

__all__ = ["Env", "EnvFactory", "register_env", "env_class", "env_names", "make_env_factory", "build_env",
           "training_settings", "env_settings", "run_metrics", "task_metrics", "BUILTIN", "PLUGINS_VAR",
           "SUITE_ENV"]

BUILTIN = ("envs.tau.env", "envs.appworld.env", "envs.toy.env")
"""Modules of the built-in envs, imported on first use (so ``import envs`` stays cheap)."""
SUITE_ENV = "toy"
"""The env ``harness train-suite`` uses when none is given: the one a CPU can train in minutes."""

_REGISTRY: dict[str, type[EnvFactory]] = {}
_loaded = False


def register_env(name: str) -> Callable[[type[EnvFactory]], type[EnvFactory]]:
    """Class decorator: register an ``EnvFactory`` subclass under ``name``."""

    def wrap(cls: type[EnvFactory]) -> type[EnvFactory]:
        if not (isinstance(cls, type) and issubclass(cls, EnvFactory)):
            raise TypeError(f"register_env({name!r}) takes an EnvFactory subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"env {name!r}: Options must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    load_plugins()


def env_names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def env_class(name: str) -> type[EnvFactory]:
    """The registered factory class of ``name``; unknown names are a ``ConfigError``."""
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown env '{name}'. Known envs: {', '.join(env_names())}")
    return _REGISTRY[name]


def make_env_factory(name: str, **kwargs: Any) -> EnvFactory:
    """The factory of ``name`` built from its constructor's keyword arguments (programmatic use,
    tests); commands use ``build_env``."""
    return env_class(name)(**kwargs)


def training_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the env's training defaults filled in where the user gave none (fields
    declared ``option(train=...)``; e.g. tau-airline's ``empty_reply``: a replay would repeat a
    policy's seeded empty reply and drop the episode, so training scores it agent_error instead)."""
    cls = env_class(name)
    extra = {f.name: f.metadata["train"] for f in dataclasses.fields(cls.Options)
             if "train" in f.metadata and settings.get(f.name) is None}
    return {**settings, **extra}


def env_settings(name: str, settings: dict[str, Any]) -> Any:
    """``settings`` (plain values, None meaning "the env's default") as the env's ``Options``."""
    cls = env_class(name)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(k for k, v in settings.items() if k not in known and v is not None)
    if unknown:
        raise ConfigError(f"env {name} takes no setting {', '.join(unknown)}; its settings: "
                          f"{', '.join(sorted(known)) or 'none'}")
    options = cls.Options(**{k: v for k, v in settings.items() if k in known and v is not None})
    check_ranges(options, f"env {name}")
    return options


def build_env(name: str, settings: dict[str, Any] | None = None, transport: Transport | None = None) -> EnvFactory:
    """The factory of ``name`` for ``settings``: ``Options`` built and checked, then
    ``from_options`` (which raises ``ConfigError`` / ``DataMissingError`` on bad input)."""
    options = env_settings(name, settings or {})
    return env_class(name).from_options(options, transport or Transport())


def run_metrics(store: Any, record: Any) -> dict[str, Any]:
    """The env's own summary rows of a stored run: its grader version and standard flag when the env
    declares them (``grader``, ``standard`` yes/no, ``nonstandard_reasons``), then
    ``EnvFactory.run_metrics``; none for a run of an env that is no longer registered."""
    _load()
    cls = _REGISTRY.get(record.env)
    if cls is None:
        return {}
    rows: dict[str, Any] = {}
    grader = cls.grader_version(record)
    if grader is not None:
        rows["grader"] = grader
    reasons = cls.nonstandard_reasons(record)
    if reasons is not None:
        rows["standard"] = "no" if reasons else "yes"
        rows["nonstandard_reasons"] = "; ".join(reasons) or None
    return rows | cls.run_metrics(store, record)


def task_metrics(store: Any, record: Any) -> Any:
    """The env's own per-task rows of a stored run (``EnvFactory.task_metrics``), or None."""
    _load()
    cls = _REGISTRY.get(record.env)
    return cls.task_metrics(store, record) if cls is not None else None
