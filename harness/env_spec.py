"""The env contract: what a benchmark gives the harness, every hook with its default.

An env is a subclass of ``EnvFactory`` registered under a name, in its own folder under ``envs/``
(or in any module named by ``HARNESS_PLUGINS``, see ``envs.registry``):

    @dataclass
    class MyOptions:
        difficulty: int = option(1, flags=("--difficulty",))
        \"\"\"How hard the generated tasks are.\"\"\"

    @register_env("my-env")
    class MyFactory(EnvFactory):
        Options = MyOptions
        def __init__(self, difficulty: int = 1): ...
        @classmethod
        def from_options(cls, options, transport): return cls(difficulty=options.difficulty)
        def tasks(self, split, task_ids=None): ...   # -> list[Task]
        def create(self, task, seed): ...            # -> an Env (below)

The factory knows its tasks and creates one ``Env`` per episode. Everything else is an optional
hook; the base class's default means "this env does not provide it", and ``provides(name)`` says
whether a subclass does (a method that needs privileged information asks before any model loads).
Nothing outside ``envs/`` knows an env by name: commands, trainers and results read these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from harness.errors import ConfigError
from harness.types import AgentTurn, Observation, Score, Task, Termination, Usage

__all__ = ["Env", "EnvFactory", "NoOptions", "Transport", "Regrade", "ManagedServers"]

Regrade = Callable[[str, list[dict[str, Any]], str], Score]
"""``(task_id, messages, termination value) -> Score``: a stored episode graded again."""


class Env(Protocol):
    """One episode of one task."""

    messages: list[dict[str, Any]]
    """The whole trajectory so far (what gets stored), without the system prompt."""
    termination: Termination | None
    user_usage: Usage
    env_seconds: float

    async def reset(self) -> Observation: ...

    async def step(self, turn: AgentTurn) -> Observation: ...

    def finish(self, termination: Termination) -> None:
        """End the episode from outside (agent crashed, provider failed)."""

    def score(self) -> Score: ...


class ManagedServers(Protocol):
    """Server processes an env starts for a run (AppWorld's pool): up before the first episode,
    closed after the last."""

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class NoOptions:
    """This env takes no settings."""


@dataclass(frozen=True)
class Transport:
    """How an env's own LLM calls (a user simulator) reach their provider: the command's
    ``--timeout``, ``--max-retries``, ``--retry-backoff``, ``--llm-client`` and the agent's
    ``--api-base`` (a default for the env's own endpoint)."""

    api_base: str | None = None
    timeout: float = 120.0
    max_retries: int = 4
    retry_backoff: float = 1.0
    llm_client: str = "litellm"


class EnvFactory:
    """A benchmark: its tasks, one ``Env`` per episode, and the hooks below."""

    name: ClassVar[str] = ""
    """The registered name (``register_env`` sets it)."""
    Options: ClassVar[type] = NoOptions
    """The env's settings, a dataclass with one documented field each (``harness.options``):
    ``--env-arg key=value`` on the command line, and named flags where a field declares them."""
    default_split: ClassVar[str] = "test"
    """The split ``harness eval`` plays when ``--split`` is not given."""
    train_split: ClassVar[str] = "train"
    """The split ``harness train`` samples from."""
    heldout_split: ClassVar[str] = "test"
    """The split training evaluates on (held out from ``train_split``)."""
    export_formats: ClassVar[tuple[str, ...]] = ()
    """Formats ``harness results export --format F`` writes for this env's runs (``export``)."""

    data_version: str = ""
    """The version of the task data, recorded on every run."""
    tool_schemas: list[dict[str, Any]] | None = None
    """The tools in OpenAI format, when fixed for the env (demonstrations are rendered with them)."""

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Any, transport: Transport) -> "EnvFactory":
        """The factory for ``options`` (an ``Options`` instance): builds what they describe (a
        user simulator, a server pool) and raises ``ConfigError`` / ``DataMissingError`` on bad
        input. Default: ``cls(**fields of options)``."""
        from dataclasses import asdict

        return cls(**asdict(options))

    def tasks(self, split: str, task_ids: list[str] | None = None) -> list[Task]:
        """The tasks of ``split`` (all, or the given ids; an unknown id is a ``ConfigError``)."""
        raise NotImplementedError

    def create(self, task: Task, seed: int) -> Env:
        """A fresh env for one episode of ``task``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings that define what an episode is, recorded on the run (compared on resume)."""
        return {}

    # -- optional hooks -----------------------------------------------------------------------
    def privileged_info(self, task: Task) -> str | None:
        """The task's solution as text (the answer, the gold actions), for teachers that see
        privileged information (RLSD, OPSD). Never shown to the acting policy."""
        return None

    def demonstration(self, task: Task) -> list[dict[str, Any]] | None:
        """A gold conversation in OpenAI format, for supervised warm starts."""
        return None

    def redaction_literals(self, task: Task) -> list[str]:
        """Literals the SGCD summarizer must never see or write (answers, ids, credentials)."""
        return []

    def managed_servers(self) -> ManagedServers | None:
        """Server processes this factory starts for a run (started before the first episode and
        closed after the last by whoever runs the episodes), or None."""
        return None

    def begin_run(self, run: str) -> None:
        """Told the run's name before its episodes start (AppWorld names its experiments after it)."""

    @classmethod
    def regrader(cls, run: Any) -> Regrade | None:
        """A grader for the stored episodes of ``run`` (a ``RunRecord``), for ``harness rescore``;
        None: this env's runs cannot be re-graded offline."""
        return None

    @classmethod
    def run_metrics(cls, store: Any, run: Any) -> dict[str, Any]:
        """Env-specific summary rows of a stored run (AppWorld: TGC and SGC), shown by
        ``harness results show`` and ``compare`` next to the shared ones."""
        return {}

    @classmethod
    def grader_version(cls, run: Any) -> str | None:
        """The official grading a stored run (a ``RunRecord``) was scored under, e.g. tau-airline's
        ``tau-1.0.1``: shown by ``results show`` / ``compare``, and ``compare`` pairs only runs of one
        version. None: the env declares no version."""
        return None

    @classmethod
    def nonstandard_reasons(cls, run: Any) -> list[str] | None:
        """How a stored run's setup differs from the benchmark's official (leaderboard) one, one short
        reason each; [] means standard. ``harness eval`` warns with them as a run starts and
        ``results show`` reports them. None: the benchmark defines no official setup."""
        return None

    @classmethod
    def submission(cls, store: Any, runs: list[Any], out: Path, identity: dict[str, Any]) -> list[Path]:
        """Package stored runs (``RunRecord``s, all of this env) as the benchmark's leaderboard
        submission in the new directory ``out`` (``harness results submission``); ``identity`` holds
        the submitter's flags. Returns the files written."""
        raise ConfigError(f"env {cls.name} has no leaderboard submission")

    @classmethod
    def task_metrics(cls, store: Any, run: Any) -> Any:
        """Env-specific per-task rows of a stored run (a ``pandas.DataFrame`` indexed by
        ``task_id``; τ-airline: DB match and partial action reward), shown by ``harness results
        show`` after the summary; None: the env has none."""
        return None

    @classmethod
    def export(cls, fmt: str, store: Any, run: Any, out: Path, **options: Any) -> Path:
        """Write ``run`` in format ``fmt`` (one of ``export_formats``) to ``out``."""
        raise ConfigError(f"env {cls.name} exports no format '{fmt}'")

    @classmethod
    def pull_data(cls, version: str | None, from_dir: str | None, force: bool,
                  progress: Callable[[str, str], None]) -> Path:
        """Fetch and verify the env's data (``harness data pull ENV``); returns where it is."""
        raise ConfigError(f"env {cls.name} has no data to pull")

    @classmethod
    def cli(cls) -> Any:
        """A typer app of env-specific commands, mounted as ``harness <name> ...``; or None."""
        return None

    @classmethod
    def provides(cls, hook: str) -> bool:
        """Whether this env implements ``hook`` (overrides the base class's default)."""
        mine, base = getattr(cls, hook), getattr(EnvFactory, hook)
        return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)
