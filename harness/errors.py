"""User-facing errors.

Anything raised as a ``HarnessError`` is printed by the CLI as one actionable line (no traceback)
and turns into a non-zero exit code. Use it for bad input from a user (unknown env, task id, run),
missing data or keys, and invalid configuration. Bugs stay ordinary exceptions so they keep their
traceback.
"""

from __future__ import annotations

__all__ = ["HarnessError", "DataMissingError", "ConfigError", "RunFailed", "InfraError", "FatalProviderError",
           "MissingKeyError", "ReplayEpisode", "ContextWindowError"]


class HarnessError(Exception):
    """An error the user can fix; ``str(err)`` is the whole message."""

    exit_code = 2


class DataMissingError(HarnessError):
    """Benchmark data is not on disk; the message says how to get it."""


class ConfigError(HarnessError):
    """Invalid combination of options, unknown names, missing API keys."""


class RunFailed(HarnessError):
    """A run that started but could not do its work (every episode an infrastructure error, a
    provider refusing the key or the model): its status is ``failed``, what it stored is kept, and
    the message says how to resume. Exit status 1 (bad input is 2)."""

    exit_code = 1


class InfraError(RuntimeError):
    """A provider or service failure the episode is not to blame for (auth, network, 5xx after
    retries, a dead env server): the episode is stored as ``infra_error`` and replayed on resume."""


class FatalProviderError(InfraError):
    """The provider refused a request for a reason that every other request of the run would hit
    too: a bad or missing key (401), no access (403), an unknown model or endpoint (404). Stored
    like any infra error; ``harness eval`` stops the run at the first one instead of paying for
    more calls. ``status``: the HTTP status, when known."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class MissingKeyError(FatalProviderError):
    """An endpoint given with ``--api-base`` / ``--user-api-base`` and no key (local servers need
    none, so none was required up front) answered 401: it needs one. Bad input, found at the first
    call: ``harness eval`` stops there and exits 2 (``MARK`` in the stored error tells it apart)."""

    MARK = "needs an API key"


class ReplayEpisode(InfraError):
    """Raised by an env: this attempt at the episode is void and the episode is to be played again
    from the start (a fresh env and agent, the same seed), at most ``retries`` more times. When no
    attempt is left the episode is stored like any infra error (excluded from scores, replayed on
    resume). tau-airline raises it on an empty agent message, as the official τ² runner re-runs a
    simulation that raised (``tau2.runner.progress.run_with_retry``)."""

    def __init__(self, reason: str, retries: int):
        super().__init__(reason)
        self.retries = retries


class ContextWindowError(RuntimeError):
    """The conversation outgrew the model's context window: the agent's failure (scored 0)."""
