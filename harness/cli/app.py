"""The ``harness`` command line.

    harness data pull tau-airline [--data-version tau3|tau2] [--from DIR]
    harness eval --env tau-airline --model openai/gpt-4.1 --user-model openai/gpt-4.1 --trials 4
    harness eval --env tau-airline --agent oracle --user scripted
    harness eval --env appworld --split dev --model openai/gpt-4.1 --appworld-url http://127.0.0.1:8001
    harness results list | show RUN | compare RUN RUN ... [--format table|csv|markdown|json]
    harness results compare TRAIN_RUN TRAIN_RUN ... [--out PNG] [--episodes]
    harness results export RUN --format tau2 --out results.json
    harness results submission RUN --out DIR --model-organization ORG --submitting-organization ORG --contact-email E
    harness rescore RUN [--apply]
    harness train --env toy --policy tiny-toy --method grpo --warm-start 300 --lr 1e-3
    harness sft --env toy --policy tiny-toy --out results/toy-sft
    harness results curves RUN
    harness view [--db URL] [--host 127.0.0.1] [--port 8000]
    harness serve-policy --policy DIR [--port 0]   (vLLM test double for CPU tests)
    harness eval --env toy --policy results/runs/RUN/checkpoints/step-000020

User errors (unknown env, task, run; missing data or keys) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from harness.console import err_console, friendly
from harness.defaults import DB_URL
from harness.errors import ConfigError
from harness.redact import redact

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain help that fits 80 columns (harness/cli/help.py)
                  context_settings={"max_content_width": 120},  # wider terminals: up to 120
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

DEFAULT_DB = DB_URL


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@data_app.command("pull")
@friendly
def data_pull(
    env: str = typer.Argument(..., help="Benchmark whose data to fetch (tau-airline)."),
    data_version: Optional[str] = typer.Option(None, "--data-version",
                                               help="The data version (tau-airline: tau3, the default, or tau2)."),
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
from harness.cli.eval import eval_command  # noqa: E402

app.command("eval")(eval_command())


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
    """pass^1..pass^k (leaderboard style), average reward, terminations, tokens and cost of a run;
    then the env's per-task rows (τ-airline: DB match and partial action reward). A train run:
    its method and settings, held-out success (final, best, 95% CI), train reward, losses, time."""
    from envs.registry import run_metrics, task_metrics
    from harness import results
    from harness.store import Store

    store = Store(db)
    if store.get_run(run).kind == "train":
        from harness.results.train_compare import train_show_table

        results.render(train_show_table(store, run), fmt)
        return
    summary = results.show_table(store, run, run_metrics)
    results.render_show(summary, task_metrics(store, store.get_run(run)), fmt)


@results_app.command("compare")
@friendly
def results_compare(
    runs: list[str] = typer.Argument(..., help="Two or more run names: all eval runs, or all train runs."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    fmt: str = typer.Option("table", "--format", help=FORMAT_HELP),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="List every task, not only those that differ."),
    out: Optional[str] = typer.Option(None, "--out",
                                      help="Train runs: PNG path of the overlaid curves "
                                           "(default results/compare-<run1>-vs-<run2>.png)."),
    episodes: bool = typer.Option(False, "--episodes",
                                  help="Train runs: also compare their last held-out eval runs episode by episode."),
    threshold: float = typer.Option(0.5, "--threshold",
                                    help="Train runs: report the first eval step whose held-out success reached this."),
    unpaired: bool = typer.Option(False, "--unpaired",
                                  help="Eval runs of different envs, data versions or splits: show their summaries "
                                       "side by side, with no per-task pairing (refused without this flag)."),
    allow_different_decoding: bool = typer.Option(
        False, "--allow-different-decoding",
        help="Compare runs that decode differently (greedy against sampled, or two temperatures; refused "
             "without this flag), with a warning."),
) -> None:
    """Side-by-side metrics, then the per-task differences. For train runs: held-out score per eval
    step, a summary per run (method, final/best held-out score, change from step 0, train reward,
    time) and a PNG of the runs' curves overlaid. Train and eval runs cannot be mixed, nor runs
    that decode differently (unless --allow-different-decoding)."""
    from harness import results
    from harness.results.train_compare import compare_train_runs, train_runs
    from harness.store import Store

    if len(runs) < 2:
        raise ConfigError("compare needs at least two run names")
    store = Store(db)
    is_train = train_runs(store, runs)
    warning = results.check_decodings(store, runs, allow_different_decoding)
    if warning is not None:
        err_console.print(warning, highlight=False, soft_wrap=True, markup=False)
    if is_train:
        if unpaired:
            raise ConfigError("--unpaired applies to eval runs only")
        compare_train_runs(store, runs, fmt, out=out, episodes=episodes, all_tasks=all_tasks, threshold=threshold,
                           echo=typer.echo, note=lambda text: err_console.print(text, highlight=False),
                           allow_different_decoding=allow_different_decoding)
        return
    if out is not None or episodes:
        raise ConfigError("--out and --episodes apply to train runs only")
    from envs.registry import run_metrics

    summary, per_task = results.compare_table(store, runs, run_metrics, unpaired=unpaired,
                                              allow_different_decoding=allow_different_decoding)
    if unpaired:
        results.render(summary, fmt)
        if fmt == "table":
            err_console.print("\n(--unpaired: no per-task comparison across task sets)")
        return
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
    from envs.registry import env_class, env_names
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
    out: str = typer.Option(..., "--out", help="File to write (atomically; - for standard output)."),
    fmt: str = typer.Option("tau2", "--format",
                            help="csv | jsonl | parquet (one row per episode), or a format of the run's env "
                                 "(tau-airline: tau2, the official τ²-bench results.json)."),
    data_version: Optional[str] = typer.Option(None, "--data-version",
                                               help="Env formats: override the run's data version "
                                                    "(tau-airline: tau3|tau2)."),

    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
) -> None:
    """Write a run as an official τ²-bench results file (`--format tau2`, for `tau2 view` /
    `tau2 evaluate-trajs`; infra-error episodes left out) or its episodes as csv / jsonl / parquet
    (every episode, infra included; jsonl adds messages, score breakdowns and per-call records)."""
    from envs.registry import env_class, env_names
    from harness.results.episode_export import EPISODE_FORMATS, export_episodes
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
    if str(path) != "-":  # with -, standard output holds the export alone
        typer.echo(f"wrote {path}")


@results_app.command("submission")
@friendly
def results_submission(
    runs: list[str] = typer.Argument(..., help="Eval runs to submit, one per domain (tau-airline: one run)."),
    out: str = typer.Option(..., "--out", help="New directory for submission.json and the trajectory files."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="Model name on the leaderboard (default: the runs' agent model, "
                                                  "for an LLM agent)."),
    model_organization: Optional[str] = typer.Option(None, "--model-organization",
                                                     help="Organization that developed the model (required)."),
    submitting_organization: Optional[str] = typer.Option(None, "--submitting-organization",
                                                          help="Organization that ran the evaluation (required)."),
    contact_email: Optional[str] = typer.Option(None, "--contact-email",
                                                help="Email for questions about the submission (required)."),
    contact_name: Optional[str] = typer.Option(None, "--contact-name", help="Name of the submitter."),
    notes: Optional[str] = typer.Option(None, "--notes",
                                        help="Methodology notes, put before the ones the harness writes."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
) -> None:
    """Package eval runs as a leaderboard submission: submission.json (pass^1..pass^4 in percent, cost,
    the benchmark version, the user simulator, standard or custom) and the official trajectory files."""
    from envs.registry import env_class
    from harness.store import Store

    store = Store(db)
    records = [store.get_run(run) for run in runs]
    envs = sorted({r.env for r in records})
    if len(envs) > 1:
        raise ConfigError(f"these runs are of different envs ({', '.join(envs)}); a submission is one benchmark's")
    models = {r.agent_model for r in records if r.agent == "litellm"}
    if model_name is None and len(models) == 1 and len(records) == sum(r.agent == "litellm" for r in records):
        model_name = models.pop()
    identity = {"model_name": model_name, "model_organization": model_organization,
                "submitting_organization": submitting_organization, "contact_email": contact_email}
    missing = [f"--{key.replace('_', '-')}" for key, value in identity.items() if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: a submission names the model, who made it, who ran it and "
                          "whom to contact, and the harness never guesses them")
    identity |= {"contact_name": contact_name, "notes": notes}
    written = env_class(envs[0]).submission(store, records, Path(out), identity)
    for path in written:
        typer.echo(f"wrote {path}")


from harness.cli import train as train_cli  # noqa: E402  (torch loads only when a train command runs)
from harness.cli.suite import train_suite_command  # noqa: E402

app.command("train")(train_cli.train_command())
app.command("sft")(train_cli.sft_command())
app.command("train-suite")(train_suite_command())
results_app.command("curves")(train_cli.curves_cmd)
methods_app = typer.Typer(help="Training methods.", no_args_is_help=True)
methods_app.command("list")(train_cli.methods_list_cmd)
app.add_typer(methods_app, name="methods")

from harness.cli.help import use_grouped_help  # noqa: E402
from harness.cli.serve_policy import serve_policy_command  # noqa: E402
from harness.cli.view import view_command  # noqa: E402  (starlette and uvicorn load only when it runs)

app.command("view")(view_command)
app.command("serve-policy")(serve_policy_command)
use_grouped_help(app)


def main() -> None:
    """Console-script entry point. A bug keeps its traceback, with secrets masked (a driver's
    error may quote a database URL, a provider's a key)."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception:
        sys.stderr.write(redact(traceback.format_exc()))
        sys.exit(1)
