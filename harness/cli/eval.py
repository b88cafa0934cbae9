"""``harness eval``: validate everything up front, then play and store the episodes.

Order matters for "bad input loses nothing": the env, data, tasks, agent and user (including API
keys) are all checked before the run row is created or any episode starts.

Resume: re-running with the same ``--run`` name and the same settings plays only the
(task, trial) pairs that have no stored episode yet, plus those that ended in an infra error.
Different settings under an existing name are refused; ``--force-new`` deletes the old run first.
A train run, or an evaluation point of one, is never resumed nor deleted by eval.

Failing loudly (docs/reliability.md): a run that plays episodes and scores none of them, stops at
a provider's refusal of the key or the model (401/403/404; a 401 from an ``--api-base`` endpoint
given no key is a missing key, bad input: exit 2), or stops after
``--max-consecutive-infra`` infra-error episodes in a row ends with status ``failed`` and its
reason, keeps what it stored, and exits 1 with the command that resumes it. Ctrl-C and SIGTERM
leave it ``interrupted`` with its finished episodes stored, print the command that resumes it and
exit 130 / 143.

Sibling groups: ``--group-size G`` plays each task G times as one group (trial = sibling index,
distinct seeds, group id ``<task>/g0``); siblings need sampling, so an LLM agent must use
``--temperature`` > 0.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import typer
from rich.console import Console

from envs.registry import build_env, env_class, env_settings, run_metrics
from harness import results
from harness.agents import make_agent_spec
from harness.cli.eval_progress import RunProgress
from harness.cli.interrupts import exit_code, forward_sigterm, resume_command, signal_name
from harness.cli.open_files import fit_concurrency
from harness.decoding import NOT_SAMPLING_AGENTS, Decoding
from harness.defaults import DB_URL, LLM_CACHE_PATH, MAX_TOOL_CALLS
from harness.env_spec import Transport
from harness.episode_runner import EpisodeBounds, EpisodeJob, StopRun, run_episodes, run_loop, trial_seeds
from harness.errors import ConfigError, MissingKeyError, RunFailed
from harness.llm_cache import ResponseCache
from harness.options import check_ranges, is_volatile, option
from harness.policy.engine import check_rollout_engine, check_rollout_servers
from harness.redact import redact_data
from harness.store import EpisodeWriter, Store
from harness.store.owners import claim_run
from harness.types import EpisodeResult, ErrorClass

console = Console(stderr=True)


@dataclass
class EvalOptions:
    """Settings of one ``harness eval`` invocation (the command's options are generated from these fields)."""

    env: str = option(flags=("--env",))
    """Registered env, e.g. tau-airline (``harness eval --help`` lists each env's own settings)."""
    model: str | None = None
    """Agent model (litellm string)."""
    agent: str = "litellm"
    """litellm | hf (local model, see --policy) | oracle."""
    policy: str | None = None
    """Local HF model directory or id (a `harness train` checkpoint works); implies --agent hf."""
    max_new_tokens: int = option(256, minimum=1)
    """hf agent: tokens per reply."""
    device: str = "auto"
    """hf agent: auto | cpu | cuda[:N]."""
    rollout_engine: str = "hf"
    """hf agent: what samples its replies; ``hf`` (the batched KV-cache sampler) or ``vllm`` (vLLM servers)."""
    rollout_url: list[str] | None = option(None, flags=("--rollout-url",))
    """vllm: a running vLLM server that serves --policy (repeatable), started with VLLM_SERVER_DEV_MODE=1
    and --logprobs-mode processed_logprobs."""
    rollout_replicas: int = option(0, minimum=0)
    """vllm: start this many `vllm serve --policy` replicas (default: one per --rollout-gpus GPU)."""
    rollout_gpus: str | None = None
    """vllm: GPU ids the started replicas share out equally, e.g. 0,1."""
    rollout_gpu_memory: float | None = None
    """vllm: the fraction of a GPU's memory vLLM takes: started replicas' --gpu-memory-utilization
    (default vLLM's 0.9), or, with no servers named, vLLM in this process (default 0.5)."""
    trials: int = option(1, minimum=1)
    """Trials per task (pass^k needs k trials)."""
    group_size: int | None = None
    """Play each task G times as one sibling group (instead of --trials)."""
    concurrency: int = option(8, minimum=1)
    """Episodes in flight at once."""
    split: str | None = None
    """Task split (default: the env's; tau-airline: base|train|test, appworld: dev|test_normal|test_challenge|train)."""
    tasks: list[str] | None = None
    """Task ids, comma-separated or repeated."""
    seed: int = 300
    """Run seed; per-trial seeds derive from it as in tau2."""
    run: str | None = None
    """Run name; re-running the same name resumes."""
    db: str = DB_URL
    """SQLAlchemy URL of the results database."""
    force_new: bool = False
    """Delete an existing eval run of this name and start over (never a train run or its evaluation points)."""
    api_base: str | None = None
    """OpenAI-compatible endpoint for the agent model (the env's own LLM calls default to it too)."""
    temperature: float = option(0.0, minimum=0)
    """Agent sampling temperature."""
    timeout: float = option(120.0, above=0)
    """Wall-clock seconds per LLM request attempt (the whole reply must arrive within it)."""
    episode_timeout: float = option(0.0, minimum=0)
    """Wall-clock seconds an episode may take; one that runs longer ends as an infrastructure error
    (resume plays it again). 0: no limit."""
    max_tool_calls: int = option(MAX_TOOL_CALLS, minimum=1)
    """Tool calls run per assistant message; the calls past it are answered with a tool error."""
    max_retries: int = option(4, minimum=0)
    """Retries per LLM request on 429/5xx/timeouts."""
    retry_backoff: float = option(1.0, minimum=0)
    """Base seconds of the exponential backoff (with jitter)."""
    llm_client: str = "litellm"
    """litellm (any provider) | direct (lean OpenAI-compatible client; needs --api-base)."""
    cache: bool = False
    """Reuse identical LLM requests from a SQLite response cache."""
    cache_path: str = LLM_CACHE_PATH
    """Response cache file."""
    log_format: str = "rich"
    """rich (progress bar) | json (one line per episode)."""
    quiet: bool = False
    """No progress output."""
    max_consecutive_infra: int = option(20, minimum=0)
    """Stop the run (status failed, exit 1) after this many infrastructure-error episodes in a row; 0: never."""
    env_settings: dict[str, Any] = option(default_factory=dict, cli=False)
    """The env's own settings (``EnvFactory.Options`` fields: ``--env-arg key=value`` and the named
    flags an env declares, e.g. ``--user-model``); unset ones take the env's defaults."""

    def __post_init__(self) -> None:
        if self.tasks:  # "--tasks 1,2 --tasks 5" -> ["1", "2", "5"]
            self.tasks = [part.strip() for v in self.tasks for part in str(v).split(",") if part.strip()] or None

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
                             device=opts.device, max_batch=max(1, opts.concurrency),
                             rollout_engine=opts.rollout_engine, rollout_urls=opts.rollout_url,
                             rollout_replicas=opts.rollout_replicas, rollout_gpus=opts.rollout_gpus,
                             rollout_gpu_memory=opts.rollout_gpu_memory)
    agent_spec = make_agent_spec(opts.agent, **agent_options)
    return factory, tasks, agent_spec


def _validate(opts: EvalOptions) -> None:
    if opts.policy and opts.agent == "litellm":
        opts.agent = "hf"  # --policy PATH alone means: evaluate this local model
    if opts.split is None:
        opts.split = env_class(opts.env).default_split
    repeated = [task for task, count in Counter(opts.tasks or []).items() if count > 1]
    if repeated:
        # Each (task, trial) is one stored row: a task named twice would be played twice and then
        # clash in the store, after the calls were paid for.
        raise ConfigError(f"--tasks names {', '.join(repeated)} more than once; list each task once "
                          "(use --trials to play a task several times)")
    check_rollout_engine(opts.rollout_engine)
    check_rollout_servers(opts.rollout_engine, opts.rollout_url, opts.rollout_replicas, opts.rollout_gpus,
                          opts.rollout_gpu_memory)
    if opts.log_format not in ("rich", "json"):
        raise ConfigError(f"--log-format must be rich or json, got '{opts.log_format}'")
    if opts.group_size is not None:
        if opts.group_size < 1:
            raise ConfigError("--group-size must be at least 1")
        if opts.trials != 1:
            raise ConfigError("use either --trials (independent trials) or --group-size (siblings), not both")
        opts.trials = opts.group_size


_DEFAULTS = {f.name: f.default for f in fields(EvalOptions)}

# Settings that do not change what an episode is, so a resumed run may change them (the env's own
# transport settings are the Options fields it marks ``volatile``).
_VOLATILE = ("run", "db", "concurrency", "quiet", "log_format", "force_new", "cache", "cache_path",
             "timeout", "max_retries", "retry_backoff", "llm_client", "max_consecutive_infra", "episode_timeout",
             "rollout_url", "rollout_replicas", "rollout_gpus", "rollout_gpu_memory")  # where rollouts run


def _env_values(opts: EvalOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The env's settings with its defaults filled in: (what defines the run, transport)."""
    options = asdict(env_settings(opts.env, opts.env_settings))
    cls = env_class(opts.env).Options
    fixed = {k: v for k, v in options.items() if not is_volatile(cls, k)}
    return fixed, {k: v for k, v in options.items() if is_volatile(cls, k)}


def _env_defaults(env: str, stored: dict[str, Any]) -> dict[str, Any]:
    """The env's settings a run stored as ``stored`` would have had, its missing ones at their defaults."""
    known = {f.name: f for f in fields(env_class(env).Options)}
    # a setting added later, whose behaviour before it existed was not its default (``option(before=)``)
    then = {k: f.metadata["before"] for k, f in known.items() if k not in stored and "before" in f.metadata}
    try:
        return asdict(env_settings(env, {k: v for k, v in stored.items() if k in known} | then))
    except ConfigError:  # stored values a newer harness refuses: no default can be inferred
        return {}


def _run_config(opts: EvalOptions, factory, agent_spec, tasks) -> dict[str, Any]:
    """What defines a run: a resumed run must match it exactly. Redacted as the store redacts it
    (an ``--api-base`` with a password), so the comparison on resume sees what was stored."""
    cfg = {k: v for k, v in asdict(opts).items() if k not in _VOLATILE and k != "env_settings"}
    cfg |= _env_values(opts)[0]  # flat, as stored before env settings had their own dataclass
    cfg["env_settings"] = factory.describe()
    cfg["agent_settings"] = agent_spec.settings
    cfg["task_ids"] = [t.id for t in tasks]
    return redact_data(cfg)


def _open_run(store: Store, opts: EvalOptions, config: dict[str, Any], factory, agent_spec):
    """The run's name, the (task, trial) pairs it already holds, and this process's claim on it
    (``harness.store.owners``: a run another live process plays is refused before it changes)."""
    name = opts.run or f"{opts.env}-{opts.agent}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    runs = {r.name: r for r in store.list_runs()}
    if name in runs:
        _refuse_other_owner(runs[name])
        if opts.force_new:
            claim_run(store, name).release()  # refused while another live process plays it
            store.delete_run(name)
        else:
            record = runs[name]
            # A key only the stored config has is a setting that no longer exists: it cannot change
            # what an episode is, so it does not block a resume.
            stored = {k: v for k, v in record.config.items() if k != "transport" and k in config}
            # A setting added since the run was created (e.g. --max-tool-calls, --grader) had its
            # default then: the env's given the run's other settings (a grader follows the data version).
            then = _DEFAULTS | _env_defaults(opts.env, record.config)
            stored |= {k: v for k, v in config.items() if k not in record.config and k in then and v == then[k]}
            if stored != config:
                changed = sorted(k for k in set(config) | set(stored) if config.get(k) != stored.get(k))
                raise ConfigError(
                    f"run '{name}' already exists with different settings ({', '.join(changed)}); "
                    f"pick another --run name, or pass --force-new to delete it and start over"
                )
            lease = claim_run(store, name)
            store.set_run_status(name, "running")
            return name, store.completed_keys(name), lease
    # Transport settings are recorded for the record but do not define the run.
    transport = {k: getattr(opts, k) for k in _VOLATILE if k not in ("run", "db")} | _env_values(opts)[1]
    # The decoding block follows from --temperature and --trials (already in config), so it is
    # stored beside the settings a resume compares, like the transport.
    decoding = _decoding(opts)
    store.create_run(
        name=name, kind="eval", env=opts.env, data_version=factory.data_version, split=opts.split,
        agent=opts.agent, agent_model=agent_spec.model, user=_user(factory)[0], user_model=_user(factory)[1],
        config={**config, "transport": transport, **({"decoding": decoding.stored()} if decoding else {})},
    )
    return name, set(), claim_run(store, name)


def _decoding(opts: EvalOptions) -> Decoding | None:
    """How the agent picks its replies; None for one that does not sample (the oracle)."""
    return None if opts.agent in NOT_SAMPLING_AGENTS else Decoding(opts.temperature, opts.trials)


def _refuse_other_owner(record) -> None:
    """Eval resumes or (``--force-new``) deletes only plain eval runs: never a train run (its steps
    and checkpoints) nor a train run's evaluation point (``<train run>/eval-step-N``)."""
    train_run = (record.config or {}).get("train_run") if record.kind == "eval" else None
    if record.kind != "eval":
        what = f"a {record.kind} run, with its steps and checkpoints"
    elif train_run is not None:
        what = f"an evaluation point of train run '{train_run}', written by harness train"
    else:
        return
    raise ConfigError(f"run '{record.name}' is {what}; eval neither resumes nor deletes it: pick another --run name")


def _user(factory) -> tuple[str | None, str | None]:
    """(kind, model) of the env's user simulator, when it has one (stored on the run)."""
    user = factory.describe().get("user")
    if not isinstance(user, dict):
        return None, None
    return user.get("kind"), user.get("model") if user.get("kind") == "litellm" else None


def run_eval(opts: EvalOptions) -> str:
    _validate(opts)
    opts.concurrency, warning = fit_concurrency(opts.concurrency)
    if warning:
        console.print(warning, highlight=False, soft_wrap=True, markup=False)
    factory, tasks, agent_spec = _build(opts)
    store = Store(opts.db)
    config = _run_config(opts, factory, agent_spec, tasks)
    name, done, lease = _open_run(store, opts, config, factory, agent_spec)
    try:
        _warn_if_nonstandard(opts.env, store.get_run(name))
        return _play(opts, factory, tasks, agent_spec, store, name, done)
    finally:
        lease.release()


def _warn_if_nonstandard(env: str, record) -> None:
    """One line naming each way the run differs from the benchmark's official setup (scores of such
    a run are not leaderboard numbers); nothing for a standard run or an env with no official setup."""
    reasons = env_class(env).nonstandard_reasons(record)
    if reasons:
        console.print(f"warning: run {record.name} is not the official {env} setup: {'; '.join(reasons)}",
                      highlight=False, soft_wrap=True, markup=False)


def _play(opts: EvalOptions, factory, tasks, agent_spec, store: Store, name: str, done: set) -> str:
    """Play the run's missing episodes, store them and set its status (the run is claimed)."""
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
            + (f", {total - len(jobs)} already stored" if done else "")
            + (f"; decoding: {_decoding(opts).sampling}" if _decoding(opts) else ""),
            highlight=False,
        )
    cache = ResponseCache(opts.cache_path) if opts.cache else None
    progress = RunProgress(name, len(jobs), log_format=opts.log_format, quiet=opts.quiet)

    writer: EpisodeWriter | None = None
    watch = _InfraWatch(opts.max_consecutive_infra)

    async def on_result(result: EpisodeResult) -> None:
        # Group commit: episodes finishing within a few ms share one transaction, written in a
        # worker thread so the event loop keeps serving other episodes (see harness.store).
        nonlocal writer
        if writer is None:  # bound to the run's event loop, so made inside it
            writer = EpisodeWriter(store, name)
        await writer.add(result)
        progress.update(result)

    bounds = EpisodeBounds(seconds=opts.episode_timeout or None, tool_calls=opts.max_tool_calls)
    pool = factory.managed_servers()
    status, reason = "failed", "the harness raised an error (see above)"
    try:
        if pool is not None and jobs:
            pool.start()  # managed AppWorld servers: up and ready before the first episode
        with progress:
            run_loop(run_episodes(factory, agent_spec, jobs, opts.concurrency, on_result, cache=cache,
                                  stop=watch.see, bounds=bounds))
        status, reason = watch.verdict()
    except StopRun as exc:
        reason = str(exc)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM forwarded as one (harness.cli.interrupts)
        status, reason = "interrupted", f"stopped by {signal_name()}"
        raise
    finally:
        store.set_run_status(name, status, reason)
        if cache is not None:
            cache.close()
        if pool is not None:
            pool.close()
        if status == "interrupted":
            console.print(f"interrupted: run {name} {reason}; its finished episodes are stored; resume with: "
                          f"{resume_command(name)}", highlight=False, soft_wrap=True, markup=False)

    if opts.log_format == "rich":
        results.render(results.show_table(store, name, run_metrics), "table")
    if watch.missing_key is not None:
        raise ConfigError(f"{watch.missing_key}. Run {name} is stored as failed; set the key and resume with: "
                          f"{resume_command(name)}")
    if status == "failed":
        raise RunFailed(f"run {name} failed: {reason}. Its {progress.done} new episode(s) are stored; fix the "
                        f"cause and resume with: {resume_command(name)}")
    if progress.infra and not opts.quiet:
        console.print(f"{progress.infra} episode(s) hit infrastructure errors; re-run with --run {name} to retry them.")
    return name


class _InfraWatch:
    """Decides whether an eval run failed: at the first fatal provider error (a bad key, an unknown
    model) or after ``limit`` infra-error episodes in a row it stops the run (``see`` returns the
    reason, for ``run_episodes``' ``stop``); a run that played episodes and scored none failed too."""

    def __init__(self, limit: int):
        self.limit = limit
        self.played = self.scored = self.streak = 0
        self.last_error: str | None = None
        self.missing_key: str | None = None
        """The error of an endpoint that needs a key none was given for: bad input (exit 2)."""

    def see(self, result: EpisodeResult) -> str | None:
        self.played += 1
        if result.error_class is not ErrorClass.INFRA:
            self.scored += 1
            self.streak = 0
            return None
        self.streak += 1
        self.last_error = result.error
        if result.fatal:
            if MissingKeyError.MARK in (result.error or ""):
                self.missing_key = result.error
            return (f"stopped at the first episode the provider refused, since every episode would be refused "
                    f"alike ({result.error})")
        if self.limit and self.streak >= self.limit:
            return (f"stopped after {self.streak} episodes in a row hit infrastructure errors "
                    f"(--max-consecutive-infra {self.limit}; last: {result.error})")
        return None

    def verdict(self) -> tuple[str, str | None]:
        """(status, reason) of a run whose episodes all ended."""
        if self.played and not self.scored:
            return "failed", (f"no episode was scored: all {self.played} played episode(s) hit infrastructure "
                              f"errors (last: {self.last_error})")
        return "finished", None


def eval_command():
    """The ``harness eval`` typer command, generated from ``EvalOptions`` and every env's options."""
    from envs.registry import env_names
    from harness.cli.options import command, dataclass_params, env_values, flag_group, split_values
    from harness.console import friendly

    envs = flag_group({name: env_class(name).Options for name in env_names()}, "env__", "Env settings")
    env_arg = inspect.Parameter("env_arg", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                                default=typer.Option(None, "--env-arg", rich_help_panel="Env settings",
                                                     help=_env_arg_help()))

    def body(**values: Any) -> None:
        flags = split_values(values, envs)
        pairs = values.pop("env_arg") or []
        opts = EvalOptions(**values)
        check_ranges(opts, "harness eval")
        opts.env_settings = env_values(env_class(opts.env), flags, pairs)
        with forward_sigterm():  # SIGTERM (a scheduler, kill) stops the run as Ctrl-C does
            try:
                run_eval(opts)
            except KeyboardInterrupt:
                raise typer.Exit(exit_code()) from None

    doc = "Play every selected task --trials times and store each episode; prints pass^k at the end."
    return friendly(command("eval", doc, dataclass_params(EvalOptions) + envs.params + [env_arg], body))


def _env_arg_help() -> str:
    """``--env-arg``'s help: every env's settings, with their defaults."""
    from envs.registry import env_names
    from harness.options import describe_fields

    parts = []
    for name in env_names():
        rows = describe_fields(env_class(name).Options)
        parts.append(f"{name}: " + (", ".join(f"{r['name']}={r['default']}" for r in rows) or "none"))
    return "An env setting as key=value (repeatable). " + "; ".join(parts) + "."
