"""User-facing errors.

Anything raised as a ``HarnessError`` is printed by the CLI as one actionable line (no traceback)
and turns into a non-zero exit code. Use it for bad input from a user (unknown env, task id, run),
missing data or keys, and invalid configuration. Bugs stay ordinary exceptions so they keep their
traceback.
"""

from __future__ import annotations

__all__ = ["HarnessError", "DataMissingError", "ConfigError", "InfraError", "ContextWindowError"]


class HarnessError(Exception):
    """An error the user can fix; ``str(err)`` is the whole message."""

    exit_code = 2


class DataMissingError(HarnessError):
    """Benchmark data is not on disk; the message says how to get it."""


class ConfigError(HarnessError):
    """Invalid combination of options, unknown names, missing API keys."""


class InfraError(RuntimeError):
    """A provider or service failure the episode is not to blame for (auth, network, 5xx after
    retries, a dead env server): the episode is stored as ``infra_error`` and replayed on resume."""


class ContextWindowError(RuntimeError):
    """The conversation outgrew the model's context window: the agent's failure (scored 0)."""
