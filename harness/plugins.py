"""Plugins: modules named in ``HARNESS_PLUGINS`` (comma-separated importable names) are imported
once, before any registry is read, so an env, a method or a run metric written outside this
repository registers itself with its own one-line decorator (``register_env``,
``register_method``, ``run_metric``) and needs no install step.

Every registry (envs, methods, run metrics) calls ``load_plugins()`` on first use; the import is
by name, so the kernel does not depend on what a plugin imports.
"""

from __future__ import annotations

import importlib
import os

from harness.errors import ConfigError

__all__ = ["PLUGINS_VAR", "load_plugins"]

PLUGINS_VAR = "HARNESS_PLUGINS"
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import every module named in ``HARNESS_PLUGINS`` not imported yet; an unimportable one is a
    ``ConfigError`` naming it."""
    for module in (m.strip() for m in os.environ.get(PLUGINS_VAR, "").split(",")):
        if not module or module in _loaded:
            continue
        _loaded.add(module)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            _loaded.discard(module)
            raise ConfigError(f"{PLUGINS_VAR}: cannot import plugin module '{module}': {exc}") from None
