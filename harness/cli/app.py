"""The ``harness`` command line.

    harness data pull tau-airline [--data-version tau3|tau2] [--from DIR]
    harness eval --env tau-airline --model openai/gpt-4.1 --user-model openai/gpt-4.1 --trials 4
    harness eval --env tau-airline --agent oracle --user scripted
    harness eval --env appworld --split dev --model openai/gpt-4.1 --appworld-url http://127.0.0.1:8001
    harness results list | show RUN | compare RUN RUN ... [--format table|csv|markdown|json]
    harness results compare TRAIN_RUN TRAIN_RUN ... [--out PNG] [--episodes]
    harness results export RUN --format tau2 --out results.json
    harness rescore RUN [--apply]
    harness train --env toy --policy tiny-toy --method grpo --warm-start 300 --lr 1e-3
    harness sft --env toy --policy tiny-toy --out results/toy-sft
    harness results curves RUN
    harness eval --env toy --policy results/runs/RUN/checkpoints/step-000020

User errors (unknown env, task, run; missing data or keys) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from harness.console import err_console, friendly
from harness.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Agentic tool-use benchmark harness and trainer.")
data_app = typer.Typer(no_args_is_help=True, help="Download and verify benchmark data.")
results_app = typer.Typer(no_args_is_help=True, help="Inspect and compare stored runs.")
app.add_typer(data_app, name="data")
app.add_typer(results_app, name="results")



def _mount_env_commands() -> None:
    """Each env's own commands (``EnvFactory.cli``) as ``harness <env> ...``, with the same
    one-line errors as every other command."""
    from envs.registry import env_class, env_names

    for name in env_names():
        sub = env_class(name).cli()
        if sub is not None:
            app.add_typer(sub, name=name)


_mount_env_commands()

DEFAULT_DB = "sqlite:///results/harness.db"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@data_app.command("pull")
@friendly
def data_pull(
    env: str = typer.Argument(..., help="Benchmark whose data to fetch (tau-airline)."),
    data_version: Optional[str] = typer.Option(None, "--data-version", help="The data version (tau-airline: tau3, the default, or tau2)."),
    from_dir: Optional[str] = typer.Option(None, "--from", help="Copy from a local mirror instead of downloading."),
    force: bool = typer.Option(False, "--force", help="Re-fetch files even if cached and valid."),
) -> None:
    """Download the official data files at a pinned commit, verify checksums, cache them."""
    from envs.registry import env_class

    path = env_class(env).pull_data(data_version, from_dir, force,
                                    lambda path, status: err_console.print(f"  {status:<10} {path}", highlight=False))
    typer.echo(f"{env} data{' ' + data_version if data_version else ''} ready in {path}")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
def _split_ids(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [part.strip() for v in values for part in v.split(",") if part.strip()]
    return out or None


@app.command("eval")
@friendly
def eval_cmd(
    env: str = typer.Option(..., "--env", help="Registered env, e.g. tau-airline."),
    model: Optional[str] = typer.Option(None, "--model", help="Agent model (litellm string)."),
    agent: str = typer.Option("litellm", "--agent", help="litellm | hf (local model, see --policy) | oracle."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Local HF model directory or id (a `harness train` checkpoint works); implies --agent hf."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="hf agent: tokens per reply."),
    device: str = typer.Option("auto", "--device", help="hf agent: auto | cpu | cuda[:N]."),
    user: Optional[str] = typer.Option(None, "--user", help="User simulator: litellm | scripted."),
    user_model: Optional[str] = typer.Option(None, "--user-model", help="User simulator model (litellm string)."),
    trials: int = typer.Option(1, "--trials", min=1, help="Trials per task (pass^k needs k trials)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Episodes in flight at once."),
    split: Optional[str] = typer.Option(None, "--split", help="Task split (tau-airline: base|train|test, default base; appworld: dev|test_normal|test_challenge|train, default test_normal)."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Task ids, comma-separated or repeated."),
    seed: int = typer.Option(300, "--seed", help="Run seed; per-trial seeds derive from it as in tau2."),
    data_version: Optional[str] = typer.Option(None, "--data-version", help="tau3 (default) or tau2 task set."),
    run: Optional[str] = typer.Option(None, "--run", help="Run name; re-running the same name resumes."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
    api_base: Optional[str] = typer.Option(None, "--api-base", help="OpenAI-compatible endpoint for the agent model."),
    user_api_base: Optional[str] = typer.Option(None, "--user-api-base", help="Endpoint for the user model (default: --api-base)."),
    temperature: float = typer.Option(0.0, "--temperature", help="Agent sampling temperature."),
    user_temperature: Optional[float] = typer.Option(None, "--user-temperature", help="User simulator temperature."),
    user_guidelines: Optional[str] = typer.Option(None, "--user-guidelines", help="ours | official (the pulled guidelines file)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Routed messages before an episode is cut (tau2: 200)."),
    max_errors: Optional[int] = typer.Option(None, "--max-errors", help="Tool errors before an episode is cut (tau2: 10)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per LLM request."),
    max_retries: int = typer.Option(4, "--max-retries", help="Retries per LLM request on 429/5xx/timeouts."),
    retry_backoff: float = typer.Option(1.0, "--retry-backoff", help="Base seconds of the exponential backoff (with jitter)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Play each task G times as one sibling group."),
    cache: bool = typer.Option(False, "--cache", help="Reuse identical LLM requests from a SQLite response cache."),
    cache_path: str = typer.Option("results/llm_cache.db", "--cache-path", help="Response cache file."),
    force_new: bool = typer.Option(False, "--force-new", help="Delete an existing run of this name and start over."),
    log_format: str = typer.Option("rich", "--log-format", help="rich (progress bar) | json (one line per episode)."),
    llm_client: str = typer.Option("litellm", "--llm-client", help="litellm (any provider) | direct (lean OpenAI-compatible client; needs --api-base)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    appworld_root: Optional[str] = typer.Option(None, "--appworld-root", envvar="APPWORLD_ROOT",
                                                help="AppWorld root (holds data/datasets/<split>.txt); default $APPWORLD_ROOT."),
    appworld_url: Optional[list[str]] = typer.Option(None, "--appworld-url", help="Pre-started AppWorld environment server URL (repeatable; one episode per server at a time)."),
    appworld_servers: Optional[int] = typer.Option(None, "--appworld-servers", min=1, help="AppWorld: environment server processes to start from the side venv (one episode each at a time), when no --appworld-url is given."),
    max_interactions: Optional[int] = typer.Option(None, "--max-interactions", min=1, help="AppWorld: code executions per episode (published eval setting: 50)."),
) -> None:
    """Play every selected task --trials times and store each episode; prints pass^k at the end."""
    from harness.cli.eval import EvalOptions, run_eval

    env_args = {"data_version": data_version, "user": user, "user_model": user_model, "user_api_base": user_api_base,
                "user_temperature": user_temperature, "user_guidelines": user_guidelines, "max_steps": max_steps,
                "max_errors": max_errors, "appworld_root": appworld_root,
                "appworld_urls": list(appworld_url) if appworld_url else None,
                "appworld_servers": appworld_servers, "max_interactions": max_interactions}
    opts = EvalOptions(
        env=env, model=model, agent=agent, trials=trials,
        concurrency=concurrency, split=split, tasks=_split_ids(tasks), seed=seed,
        run=run, db=db, api_base=api_base, temperature=temperature,
        timeout=timeout, max_retries=max_retries, retry_backoff=retry_backoff,
        group_size=group_size, cache=cache, cache_path=cache_path, force_new=force_new,
        log_format=log_format, llm_client=llm_client, quiet=quiet,
        policy=policy, max_new_tokens=max_new_tokens, device=device,
        env_settings={k: v for k, v in env_args.items() if v is not None},
    )
    run_eval(opts)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
FORMAT_HELP = "table | csv | markdown | json"


@results_app.command("list")
@friendly
def results_list(
    db: str = typer.Option(DEFAULT_DB, "--db"),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """All runs in the database."""
    from harness import results
    from harness.store import Store

    results.render(results.runs_table(Store(db)), fmt)


@results_app.command("show")
@friendly
def results_show(
    run: str = typer.Argument(..., help="Run name."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
) -> None:
    """pass^1..pass^k (leaderboard style), average reward, terminations, tokens and cost of a run."""
    from harness import results
    from harness.store import Store

    from envs.registry import run_metrics

    results.render(results.show_table(Store(db), run, run_metrics), fmt)


@results_app.command("compare")
@friendly
def results_compare(
    runs: list[str] = typer.Argument(..., help="Two or more run names: all eval runs, or all train runs."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="List every task, not only those that differ."),
    out: Optional[str] = typer.Option(None, "--out", help="Train runs: PNG path of the overlaid curves (default results/compare-<run1>-vs-<run2>.png)."),
    episodes: bool = typer.Option(False, "--episodes", help="Train runs: also compare their last held-out eval runs episode by episode."),
    threshold: float = typer.Option(0.5, "--threshold", help="Train runs: report the first eval step whose held-out success reached this."),
) -> None:
    """Side-by-side metrics, then the per-task differences. For train runs: held-out score per eval
    step, a summary per run (method, final/best held-out score, change from step 0, train reward,
    time) and a PNG of the runs' curves overlaid. Train and eval runs cannot be mixed."""
    from harness import results
    from harness.store import Store
    from harness.train_compare import compare_train_runs, train_runs

    if len(runs) < 2:
        raise ConfigError("compare needs at least two run names")
    store = Store(db)
    if train_runs(store, runs):
        compare_train_runs(store, runs, fmt, out=out, episodes=episodes, all_tasks=all_tasks, threshold=threshold,
                           echo=typer.echo,
                           note=lambda text: err_console.print(text, highlight=False))
        return
    if out is not None or episodes:
        raise ConfigError("--out and --episodes apply to train runs only")
    from envs.registry import run_metrics

    summary, per_task = results.compare_table(store, runs, run_metrics)
    if not all_tasks and "differs" in per_task.columns:
        per_task = per_task[per_task["differs"]].drop(columns=["differs"])
    if fmt == "json":  # one parseable document
        import json

        doc = {key: json.loads(results.render(df, "json", echo=False))
               for key, df in (("summary", summary), ("per_task", per_task))}
        typer.echo(json.dumps(doc, indent=2))
        return
    results.render(summary, fmt)
    if fmt == "table":
        err_console.print(f"\nPer-task success rate ({'all tasks' if all_tasks else 'tasks that differ'}):")
    results.render(per_task, fmt)


@app.command("rescore")
@friendly
def rescore_cmd(
    run: str = typer.Argument(..., help="Run name."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
    apply: bool = typer.Option(False, "--apply", help="Write the new scores back (one transaction)."),
) -> None:
    """Re-grade a stored run with the current grader (no LLM calls) and list the verdicts that change."""
    from envs.registry import env_names, env_class
    from harness.rescore import rescore
    from harness.store import Store

    store = Store(db)
    env = store.get_run(run).env
    report = rescore(store, run, env_class(env).regrader if env in env_names() else None, apply=apply)
    for c in report.changed:
        typer.echo(f"task {c.task_id} trial {c.trial}: reward {c.old_reward:g} -> {c.new_reward:g}")
    done = "written" if apply else "not written (use --apply)"
    typer.echo(f"{report.run}: {report.episodes} episodes re-graded, {report.skipped_infra} infra skipped; "
               f"{len(report.changed)} changed verdicts, {report.breakdown_updates} stale breakdowns"
               + (f"; {done}" if report.changed or report.breakdown_updates else ""))


@results_app.command("export")
@friendly
def results_export(
    run: str = typer.Argument(..., help="Run name."),
    out: str = typer.Option(..., "--out", help="Path of the file to write."),
    fmt: str = typer.Option("tau2", "--format",
                            help="csv | jsonl | parquet (one row per episode), or a format of the run's env "
                                 "(tau-airline: tau2, the official τ²-bench results.json)."),
    data_version: Optional[str] = typer.Option(None, "--data-version", help="Env formats: override the run's data version (tau-airline: tau3|tau2)."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
) -> None:
    """Write a run as an official τ²-bench results file (`--format tau2`, for `tau2 view` /
    `tau2 evaluate-trajs`; infra-error episodes left out) or its episodes as csv / jsonl / parquet
    (every episode, infra included; jsonl adds messages, score breakdowns and per-call records)."""
    from envs.registry import env_class, env_names
    from harness.episode_export import EPISODE_FORMATS, export_episodes
    from harness.store import Store

    store = Store(db)
    env = store.get_run(run).env
    env_formats = env_class(env).export_formats if env in env_names() else ()
    if fmt in EPISODE_FORMATS:
        if data_version is not None:
            raise ConfigError(f"--data-version applies to the env's own formats ({', '.join(env_formats) or 'none'})")
        path = export_episodes(store, run, out, fmt)
    elif fmt in env_formats:
        path = env_class(env).export(fmt, store, run, out, data_version=data_version)
    else:
        all_formats = sorted({f for name in env_names() for f in env_class(name).export_formats})
        if fmt in all_formats:
            raise ConfigError(f"run {run!r} is a {env!r} run; the {fmt} format is for other envs' runs "
                              f"(this run: {', '.join([*env_formats, *EPISODE_FORMATS])})")
        raise ConfigError(f"unknown export format {fmt!r}; supported: {', '.join([*all_formats, *EPISODE_FORMATS])}")
    typer.echo(f"wrote {path}")


from harness.cli import train as train_cli  # noqa: E402  (torch loads only when a train command runs)

app.command("train")(train_cli.train_cmd)
app.command("sft")(train_cli.sft_cmd)
app.command("train-suite")(train_cli.train_suite_cmd)
results_app.command("curves")(train_cli.curves_cmd)
methods_app = typer.Typer(help="Training methods.", no_args_is_help=True)
methods_app.command("list")(train_cli.methods_list_cmd)
app.add_typer(methods_app, name="methods")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
