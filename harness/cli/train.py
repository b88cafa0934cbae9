"""``harness train``, ``harness sft``, ``harness train-suite``, ``harness methods list`` and
``harness results curves``.

Registered by ``harness.cli.app``.
torch and transformers are imported only when a command runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from harness.console import friendly
from harness.defaults import DB_URL
from harness.options import check_ranges, option
from harness.redact import redact

DEFAULT_DB = DB_URL


# Old spellings of SGCD settings, kept as hidden aliases of --method-arg KEY=VALUE.
SGCD_ALIASES: dict[str, tuple[str, Any, str]] = {
    "--sgcd-gamma": ("gamma", float, "SGCD credit gain (--method-arg gamma=...)."),
    "--sgcd-cap": ("cap", float, "SGCD weight cap (--method-arg cap=...)."),
    "--sgcd-topk": ("topk", int, "SGCD top-K support (--method-arg topk=...)."),
    "--salience": ("salience", str, "SGCD salience mode (--method-arg salience=...)."),
    "--salience-kappa": ("salience_kappa", float, "--method-arg salience_kappa=..."),
    "--entropy-kappa": ("entropy_kappa", float, "--method-arg entropy_kappa=..."),
    "--salience-span": ("salience_span", int, "--method-arg salience_span=..."),
    "--salience-scope": ("salience_scope", str, "--method-arg salience_scope=..."),
    "--reference-max-tokens": ("reference_max_tokens", int, "--method-arg reference_max_tokens=..."),
    "--sgcd-keep": ("keep", str, "--method-arg keep=..."),
}


def _env_group():
    from envs.registry import env_class, env_names
    from harness.cli.options import flag_group

    return flag_group({name: env_class(name).Options for name in env_names()}, "env__", "Env settings")


def _repeatable(name: str, flag: str, panel: str, text: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                             default=typer.Option(None, flag, rich_help_panel=panel, help=text))


def train_command():
    """``harness train``, generated from ``TrainConfig``, the method settings blocks and every env's options."""
    from envs.registry import env_class
    from harness.cli.options import command, dataclass_params, env_values, flag_group, split_values
    from trainers.config import TrainConfig
    from trainers.method_settings import BLOCKS

    envs = _env_group()
    methods = flag_group({block.__name__: block for block in BLOCKS}, "method__", "Method settings",
                         aliases=SGCD_ALIASES)
    params = dataclass_params(TrainConfig) + methods.params + [
        _repeatable("method_arg", "--method-arg", "Method settings",
                    "A method setting as key=value (repeatable), e.g. --method-arg lam=0.3; `harness methods list` "
                    "shows each method's settings."),
        *envs.params,
        _repeatable("env_arg", "--env-arg", "Env settings", "An env setting as key=value (repeatable); "
                    "`harness eval --help` lists each env's settings."),
    ]

    def body(**values: Any) -> None:
        from trainers.methods import parse_method_args

        env_flags, method_flags = split_values(values, envs), split_values(values, methods)
        env_pairs, method_pairs = values.pop("env_arg") or [], values.pop("method_arg") or []
        overrides = {**method_flags, **parse_method_args(values["method"], method_pairs)}
        env_options = env_values(env_class(values["env"]), env_flags, env_pairs)
        run_train(TrainConfig(**values, method_overrides=overrides, env_options=env_options))

    doc = "Train a local policy on an env's train split with GRPO-family RL or a credit method; logs every step."
    return friendly(command("train", doc, params, body))


def run_train(cfg) -> None:
    """Train, then print where the results, the curves and the last checkpoint are.

    Ctrl-C or SIGTERM: the run stops at the end of the current step with a checkpoint of it (a
    second signal stops it at once), is marked ``interrupted``, and one line gives the command that
    resumes it; the exit status is 128 + the signal (130, 143)."""
    from harness.cli.interrupts import exit_code, graceful_stop, resume_command
    from harness.console import err_console
    from harness.results.curves import plot_run_curves
    from harness.store import Store
    from trainers import distributed
    from trainers.loop import StopControl, train

    control = StopControl()

    def request(name: str) -> None:
        control.reason = name

    def say(line: str) -> None:
        if distributed.is_main():
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    with graceful_stop(request):
        try:
            summary = train(cfg, echo=typer.echo, control=control)
        except KeyboardInterrupt:  # a second signal: stopped at once
            if control.run is not None:
                say(f"interrupted: run {control.run} stopped at once by {control.reason or 'Ctrl-C'} (it continues "
                    f"from its last checkpoint); resume with: {resume_command(control.run, extra=('--resume',))}")
            raise typer.Exit(exit_code()) from None
    if summary["interrupted"]:
        say(f"interrupted: run {summary['run']} stopped by {summary['interrupted']} after step {summary['step']} "
            f"(checkpoint {summary['checkpoint']}); resume with: {resume_command(summary['run'], extra=('--resume',))}")
        raise typer.Exit(exit_code())
    if not distributed.is_main():  # torchrun: rank 0 reports for the run
        return
    store = Store(cfg.db)
    _, plot = plot_run_curves(store, summary["run"], Path(summary["out_dir"]) / "curves.png")
    state = "finished" if summary["finished"] else "stopped (continue with --resume)"
    typer.echo(f"run {summary['run']} {state}; results in {redact(cfg.db)}")
    typer.echo(f"  curves:      {plot.path}   (harness results curves {summary['run']})")
    if plot.not_drawn:
        typer.echo(f"               {plot.note()}")
    typer.echo(f"  checkpoint:  {summary['checkpoint']}   "
               f"(harness eval --env {cfg.env} --policy {summary['checkpoint']})")


@dataclass
class SftOptions:
    """Settings of ``harness sft``."""

    env: str = option(flags=("--env",))
    """Env whose demonstrations to learn (e.g. toy)."""
    policy: str = option(flags=("--policy",))
    """HF model id or directory; `tiny-toy` builds the tiny model."""
    out: str = option(flags=("--out",))
    """Directory to save the fine-tuned model to."""
    steps: int = option(600, minimum=1)
    """Supervised steps, in rounds of 200 with a fresh optimizer each. 600, lr and batch size are
    the README's toy warm start (`train --warm-start 600`); 300 left the toy at held-out success 0."""
    lr: float = 1e-3
    """Learning rate (as `train --warm-start-lr`)."""
    batch_size: int = option(16, minimum=1)
    """Demonstrations per step (as `train --warm-start-batch`)."""
    split: str = "train"
    """The split whose demonstrations to learn."""
    seed: int = 0
    """Seeds the batches (and the initial weights of a built policy)."""
    device: str = "auto"
    """auto | cpu | cuda[:N]."""


def sft_command():
    from harness.cli.options import command, dataclass_params

    doc = "Supervised warm start: fine-tune on the env's oracle demonstrations, save to --out."
    return friendly(command("sft", doc, dataclass_params(SftOptions), lambda **v: run_sft(SftOptions(**v))))


def run_sft(o: SftOptions) -> None:
    check_ranges(o, "harness sft")
    from envs.registry import make_env_factory
    from harness.cli.interrupts import exit_code, forward_sigterm, signal_name
    from harness.console import err_console
    from trainers.model_setup import load_policy
    from trainers.sft import demonstration_traces, require_demonstrations, warm_start

    factory = make_env_factory(o.env)
    require_demonstrations(factory, "harness sft")  # before loading a model for nothing
    tasks = factory.tasks(o.split, None)
    with forward_sigterm():  # SIGTERM (a scheduler, kill) ends it like Ctrl-C: one line, 128 + signal
        try:
            model, tokenizer, _ = load_policy(o.policy, Path(o.out), o.device, seed=o.seed)
            traces = demonstration_traces(factory, tokenizer, tasks, "harness sft")
            losses = warm_start(model, traces, steps=o.steps, lr=o.lr, batch_size=o.batch_size, seed=o.seed,
                                progress=lambda line: err_console.print(line, highlight=False, markup=False))
        except KeyboardInterrupt:  # before the model is saved: --out holds no half-trained model
            err_console.print(f"interrupted: sft stopped by {signal_name()} before saving the fine-tuned model to "
                              f"{o.out}; run the same command again", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(exit_code()) from None
    model.save_pretrained(o.out)
    tokenizer.save_pretrained(o.out)
    typer.echo(f"sft: {o.steps} steps on {len(traces)} demonstrations, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
               f"saved to {o.out}")


@friendly
def curves_cmd(
    run: str = typer.Argument(..., help="Train run name."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    out: Optional[str] = typer.Option(None, "--out", help="PNG path (default results/runs/<run>/curves.png)."),
    metrics: Optional[str] = typer.Option(None, "--metrics",
                                          help="Comma-separated metric names, drawn even when flat "
                                               "(default: the headline ones that vary)."),
    fmt: str = typer.Option("table", "--format", help="table | csv | markdown | json"),
) -> None:
    """Learning curves of a train run: a PNG plot and a per-step table."""
    from harness import results
    from harness.results.curves import plot_run_curves
    from harness.store import Store
    from trainers.config import default_run_dir

    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    frame, plot = plot_run_curves(Store(db), run, Path(out) if out else default_run_dir(run) / "curves.png", wanted)
    results.render(frame, fmt)
    typer.echo(f"plot: {plot.path}")
    if plot.not_drawn:
        typer.echo(plot.note())


@friendly
def methods_list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable: one object per method."),
) -> None:
    """List the training methods: description, paper, official code, what each needs, its default settings
    and where each default comes from."""
    import json
    import textwrap

    from trainers.methods import REQUIREMENTS, method_catalog

    rows = method_catalog()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        needs = ", ".join(row["requires"]) or "-"
        source = f"arXiv {row['paper']}" if row['paper'] else "-"
        typer.echo(f"{row['method']:<10} {source:<17} needs: {needs}")
        typer.echo(f"    {row['description']}")
        typer.echo(f"    official code: {row['code'] or 'not recorded yet'}")
        defaults = "  ".join(f"{k}={v}" for k, v in row["defaults"].items())
        typer.echo(f"    defaults: {defaults}")
        for settings, where in row["sources"].items():  # wrapped to stay readable in a terminal
            typer.echo(textwrap.fill(f"{settings}: {where}", width=110, initial_indent="      ",
                                     subsequent_indent="          ", break_on_hyphens=False))
        if not row["sources"]:  # a plugin method that records none (every built-in one does)
            typer.echo("      (where each default comes from: not recorded yet; see the method's module docstring)")
    typer.echo("\nneeds: " + "; ".join(f"{k} = {v}" for k, v in REQUIREMENTS.items()))
    typer.echo("Change a setting with --method-arg key=value (or the named options of harness train).")
