"""``harness eval``: validate everything up front, then play and store the episodes.

Order matters for "bad input loses nothing": the env, data, tasks, agent and user (including API
keys) are all checked before the run row is created or any episode starts.

Resume: re-running with the same ``--run`` name and the same settings plays only the
(task, trial) pairs that have no stored episode yet, plus those that ended in an infra error.
Different settings under an existing name are refused; ``--force-new`` deletes the old run first.

Sibling groups: ``--group-size G`` plays each task G times as one group (trial = sibling index,
distinct seeds, group id ``<task>/g0``); siblings need sampling, so an LLM agent must use
``--temperature`` > 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from envs.registry import build_env, env_class, env_settings, run_metrics
from harness import results
from harness.env_spec import Transport
from harness.options import is_volatile
from harness.agents import make_agent_spec
from harness.episode_runner import EpisodeJob, run_episodes, run_loop, trial_seeds
from harness.errors import ConfigError
from harness.cli.eval_progress import RunProgress
from harness.llm_cache import ResponseCache
from harness.store import EpisodeWriter, Store
from harness.types import EpisodeResult

console = Console(stderr=True)


@dataclass
class EvalOptions:
    """Settings of one ``harness eval`` invocation (see ``harness eval --help``)."""

    env: str
    model: str | None = None
    agent: str = "litellm"
    trials: int = 1
    concurrency: int = 8
    split: str | None = None
    """None: the env's default split (``EnvFactory.default_split``)."""
    tasks: list[str] | None = None
    seed: int = 300
    run: str | None = None
    db: str = "sqlite:///results/harness.db"
    api_base: str | None = None
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = 4
    retry_backoff: float = 1.0
    group_size: int | None = None
    cache: bool = False
    cache_path: str = "results/llm_cache.db"
    force_new: bool = False
    log_format: str = "rich"
    llm_client: str = "litellm"
    quiet: bool = False
    policy: str | None = None
    """Local model directory or HF id for ``--agent hf`` (``--policy`` alone picks that agent)."""
    max_new_tokens: int = 256
    device: str = "auto"
    env_settings: dict[str, Any] = field(default_factory=dict)
    """The env's own settings (``EnvFactory.Options`` fields: ``--env-arg key=value`` and the named
    flags an env declares, e.g. ``--user-model``); unset ones take the env's defaults."""

    def transport(self) -> Transport:
        return Transport(api_base=self.api_base, timeout=self.timeout, max_retries=self.max_retries,
                         retry_backoff=self.retry_backoff, llm_client=self.llm_client)


def _build(opts: EvalOptions):
    """Env factory, tasks and agent spec; raises ConfigError/DataMissingError on bad input."""
    factory = build_env(opts.env, opts.env_settings, opts.transport())
    tasks = factory.tasks(opts.split, opts.tasks)
    if not tasks:
        raise ConfigError(f"no tasks selected from split '{opts.split}' of {opts.env}")
    agent_options: dict[str, Any] = {}
    if opts.agent in ("litellm", "hf") and opts.group_size and opts.group_size > 1 and not opts.temperature:
        raise ConfigError("--group-size needs sampled siblings: pass --temperature > 0 (e.g. 1.0)")
    if opts.agent == "litellm":
        agent_options = dict(model=opts.model, api_base=opts.api_base, temperature=opts.temperature,
                             timeout=opts.timeout, max_retries=opts.max_retries, backoff_base=opts.retry_backoff,
                             client=opts.llm_client)
    elif opts.agent == "hf":
        agent_options = dict(policy=opts.policy, temperature=opts.temperature, max_new_tokens=opts.max_new_tokens,
                             device=opts.device, max_batch=max(1, opts.concurrency))
    agent_spec = make_agent_spec(opts.agent, **agent_options)
    return factory, tasks, agent_spec


def _validate(opts: EvalOptions) -> None:
    if opts.policy and opts.agent == "litellm":
        opts.agent = "hf"  # --policy PATH alone means: evaluate this local model
    if opts.split is None:
        opts.split = env_class(opts.env).default_split
    if opts.log_format not in ("rich", "json"):
        raise ConfigError(f"--log-format must be rich or json, got '{opts.log_format}'")
    if opts.group_size is not None:
        if opts.group_size < 1:
            raise ConfigError("--group-size must be at least 1")
        if opts.trials != 1:
            raise ConfigError("use either --trials (independent trials) or --group-size (siblings), not both")
        opts.trials = opts.group_size


# Settings that do not change what an episode is, so a resumed run may change them (the env's own
# transport settings are the Options fields it marks ``volatile``).
_VOLATILE = ("run", "db", "concurrency", "quiet", "log_format", "force_new", "cache", "cache_path",
             "timeout", "max_retries", "retry_backoff", "llm_client")


def _env_values(opts: EvalOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The env's settings with its defaults filled in: (what defines the run, transport)."""
    options = asdict(env_settings(opts.env, opts.env_settings))
    cls = env_class(opts.env).Options
    fixed = {k: v for k, v in options.items() if not is_volatile(cls, k)}
    return fixed, {k: v for k, v in options.items() if is_volatile(cls, k)}


def _run_config(opts: EvalOptions, factory, agent_spec, tasks) -> dict[str, Any]:
    """What defines a run: a resumed run must match it exactly."""
    cfg = {k: v for k, v in asdict(opts).items() if k not in _VOLATILE and k != "env_settings"}
    cfg |= _env_values(opts)[0]  # flat, as stored before env settings had their own dataclass
    cfg["env_settings"] = factory.describe()
    cfg["agent_settings"] = agent_spec.settings
    cfg["task_ids"] = [t.id for t in tasks]
    return cfg


def _open_run(store: Store, opts: EvalOptions, config: dict[str, Any], factory, agent_spec):
    name = opts.run or f"{opts.env}-{opts.agent}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    existing = {r.name for r in store.list_runs()}
    if name in existing and opts.force_new:
        store.delete_run(name)
        existing.discard(name)
    if name in existing:
        record = store.get_run(name)
        # A key only the stored config has is a setting that no longer exists: it cannot change
        # what an episode is, so it does not block a resume.
        stored = {k: v for k, v in record.config.items() if k != "transport" and k in config}
        if stored != config:
            changed = sorted(k for k in set(config) | set(stored) if config.get(k) != stored.get(k))
            raise ConfigError(
                f"run '{name}' already exists with different settings ({', '.join(changed)}); "
                f"pick another --run name, or pass --force-new to delete it and start over"
            )
        store.set_run_status(name, "running")
        return name, store.completed_keys(name)
    # Transport settings are recorded for the record but do not define the run.
    transport = {k: getattr(opts, k) for k in _VOLATILE if k not in ("run", "db")} | _env_values(opts)[1]
    store.create_run(
        name=name, kind="eval", env=opts.env, data_version=factory.data_version, split=opts.split,
        agent=opts.agent, agent_model=agent_spec.model, user=_user(factory)[0], user_model=_user(factory)[1],
        config={**config, "transport": transport},
    )
    return name, set()


def _user(factory) -> tuple[str | None, str | None]:
    """(kind, model) of the env's user simulator, when it has one (stored on the run)."""
    user = factory.describe().get("user")
    if not isinstance(user, dict):
        return None, None
    return user.get("kind"), user.get("model") if user.get("kind") == "litellm" else None


def run_eval(opts: EvalOptions) -> str:
    _validate(opts)
    factory, tasks, agent_spec = _build(opts)
    store = Store(opts.db)
    config = _run_config(opts, factory, agent_spec, tasks)
    name, done = _open_run(store, opts, config, factory, agent_spec)
    factory.begin_run(name)

    seeds = trial_seeds(opts.seed, opts.trials)
    grouped = opts.group_size is not None
    jobs = [
        EpisodeJob(task=t, trial=trial, seed=seeds[trial], group_id=f"{t.id}/g0" if grouped else None)
        for trial in range(opts.trials)
        for t in tasks
        if (t.id, trial) not in done
    ]
    total = len(tasks) * opts.trials
    if not opts.quiet and opts.log_format == "rich":
        console.print(
            f"run [bold]{name}[/]: {len(tasks)} tasks x {opts.trials} {'siblings' if grouped else 'trials'} "
            f"on {opts.env} ({factory.data_version}), {len(jobs)} to play"
            + (f", {total - len(jobs)} already stored" if done else ""),
            highlight=False,
        )
    cache = ResponseCache(opts.cache_path) if opts.cache else None
    progress = RunProgress(name, len(jobs), log_format=opts.log_format, quiet=opts.quiet)

    writer: EpisodeWriter | None = None

    async def on_result(result: EpisodeResult) -> None:
        # Group commit: episodes finishing within a few ms share one transaction, written in a
        # worker thread so the event loop keeps serving other episodes (see harness.store).
        nonlocal writer
        if writer is None:  # bound to the run's event loop, so made inside it
            writer = EpisodeWriter(store, name)
        await writer.add(result)
        progress.update(result)

    pool = factory.managed_servers()
    status = "failed"
    try:
        if pool is not None and jobs:
            pool.start()  # managed AppWorld servers: up and ready before the first episode
        with progress:
            run_loop(run_episodes(factory, agent_spec, jobs, opts.concurrency, on_result, cache=cache))
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        store.set_run_status(name, status)
        if cache is not None:
            cache.close()
        if pool is not None:
            pool.close()

    if opts.log_format == "rich":
        results.render(results.show_table(store, name, run_metrics), "table")
    if progress.infra and not opts.quiet:
        console.print(f"{progress.infra} episode(s) hit infrastructure errors; re-run with --run {name} to retry them.")
    return name
