"""``harness train``, ``harness sft`` and ``harness results curves``.

Registered by ``harness.cli.app``.
torch and transformers are imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from envs.registry import SUITE_ENV
from harness.console import friendly

DEFAULT_DB = "sqlite:///results/harness.db"


@friendly
def train_cmd(
    env: str = typer.Option(..., "--env", help="Registered env: toy, tau-airline, ..."),
    policy: str = typer.Option(..., "--policy", help="HF model id or local directory to train; `tiny-toy` builds a tiny from-scratch model."),
    method: str = typer.Option("grpo", "--method", help="Training method; `harness methods list` shows them all."),
    method_arg: Optional[list[str]] = typer.Option(None, "--method-arg", help="A method setting as key=value (repeatable), e.g. --method-arg lam=0.3; `harness methods list` shows each method's settings."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Separate teacher model (HF id or directory, same tokenizer) for rlad, opd, grpo_kl."),
    run: Optional[str] = typer.Option(None, "--run", "--run-name", help="Run name (default: train-<env>-<method>-<time>); under torchrun spell it --run-name (torchrun reads --run as its own --run-path)."),
    resume: bool = typer.Option(False, "--resume", help="Continue run --run from its latest checkpoint."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Leave after N steps this time (checkpointed); --resume continues."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL of the results database."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Checkpoints and plots (default results/runs/<run>)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Policy-update steps."),
    tasks_per_step: int = typer.Option(8, "--tasks-per-step", min=1, help="Training tasks per step."),
    group_size: int = typer.Option(8, "--group-size", min=2, help="Sibling episodes per task (G)."),
    seed: int = typer.Option(0, "--seed"),
    train_split: str = typer.Option("train", "--train-split"),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Held-out split (default test; dev for appworld)."),
    eval_every: int = typer.Option(10, "--eval-every", min=0, help="Evaluate every N steps (and at step 0 and the end); 0 = never."),
    eval_tasks: Optional[int] = typer.Option(None, "--eval-tasks", min=1, help="Evaluate on the first N held-out tasks only."),
    eval_temperature: float = typer.Option(0.0, "--eval-temperature", help="0 = greedy; > 0 = the sampling policy's success rate."),
    eval_trials: int = typer.Option(1, "--eval-trials", min=1, help="Samples per held-out task (fixed seeds)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Rollout sampling temperature (> 0)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens per agent turn."),
    lr: float = typer.Option(1e-6, "--lr"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant | cosine | linear."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", min=0),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    ppo_epochs: int = typer.Option(1, "--ppo-epochs", min=1),
    mini_batches: int = typer.Option(1, "--mini-batches", min=1, help="Optimizer steps per epoch."),
    micro_batch_tokens: int = typer.Option(4096, "--micro-batch-tokens", min=2, help="Token budget of one packed micro-batch."),
    warm_start: int = typer.Option(0, "--warm-start", min=0, help="Supervised steps on the env's demonstrations first."),
    warm_start_lr: float = typer.Option(1e-3, "--warm-start-lr"),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", min=1),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    lora_rank: int = typer.Option(0, "--lora-rank", min=0, help="Train LoRA adapters of this rank (needs peft)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]."),
    tracker: str = typer.Option("none", "--tracker", help="none | tensorboard | wandb (the database always logs)."),
    quiet: bool = typer.Option(False, "--quiet", help="No per-step lines."),
    loss_agg: Optional[str] = typer.Option(None, "--loss-agg", help="token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (default: the method's)."),
    clip_low: Optional[float] = typer.Option(None, "--clip-low", help="PPO clip epsilon below 1."),
    clip_high: Optional[float] = typer.Option(None, "--clip-high", help="PPO clip epsilon above 1 (DAPO clip-higher)."),
    std_normalize: Optional[bool] = typer.Option(None, "--std-normalize/--no-std-normalize", help="Divide advantages by the group std."),
    kl_coef: Optional[float] = typer.Option(None, "--kl-coef", help="KL-to-reference weight (0: no reference model)."),
    kl_estimator: Optional[str] = typer.Option(None, "--kl-estimator", help="k1 | k2 | k3."),
    dynamic_sampling: Optional[str] = typer.Option(None, "--dynamic-sampling", help="off | drop | resample (zero-variance groups)."),
    resample_budget: Optional[int] = typer.Option(None, "--resample-budget", min=0, help="Extra rollout rounds per step when resampling."),
    data_version: Optional[str] = typer.Option(None, "--data-version", help="tau-airline task set: tau3 (default) | tau2."),
    user: Optional[str] = typer.Option(None, "--user", help="tau-airline user simulator: litellm (default) | scripted."),
    user_model: Optional[str] = typer.Option(None, "--user-model", help="litellm model of the tau user simulator."),
    user_api_base: Optional[str] = typer.Option(None, "--user-api-base", help="OpenAI-compatible endpoint of the user model."),
    user_temperature: Optional[float] = typer.Option(None, "--user-temperature"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="tau-airline: messages per episode before it is cut."),
    appworld_root: Optional[str] = typer.Option(None, "--appworld-root", envvar="APPWORLD_ROOT", help="AppWorld data root."),
    appworld_url: Optional[list[str]] = typer.Option(None, "--appworld-url", help="Pre-started AppWorld server (repeatable)."),
    appworld_servers: Optional[int] = typer.Option(None, "--appworld-servers", min=1, help="Managed AppWorld servers to start."),
    max_interactions: Optional[int] = typer.Option(None, "--max-interactions", help="AppWorld: code executions per episode."),
    summarizer: str = typer.Option("diff", "--summarizer", help="SGCD credit-reference writer: diff (built-in, no LLM) or a litellm model."),
    summarizer_api_base: Optional[str] = typer.Option(None, "--summarizer-api-base", help="OpenAI-compatible endpoint of the summarizer."),
    sgcd_gamma: Optional[float] = typer.Option(None, "--sgcd-gamma", help="SGCD credit gain gamma (W = clip(1 + gamma*s, 1, cap)); 0 = GRPO."),
    sgcd_cap: Optional[float] = typer.Option(None, "--sgcd-cap", help="SGCD weight cap c (>= 1)."),
    sgcd_topk: Optional[int] = typer.Option(None, "--sgcd-topk", help="Top-K support of the teacher-student KL."),
    salience_mode: Optional[str] = typer.Option(None, "--salience", help="absolute (default) | spike | zscore | minmax | none."),
    salience_kappa: Optional[float] = typer.Option(None, "--salience-kappa", help="Relative salience modes: robust z at which salience saturates."),
    entropy_kappa: Optional[float] = typer.Option(None, "--entropy-kappa", help="Teacher-entropy gate (robust z; 0 = off, the default)."),
    salience_span: Optional[int] = typer.Option(None, "--salience-span", help="Dilate spikes over N following tokens."),
    salience_scope: Optional[str] = typer.Option(None, "--salience-scope", help="group | trajectory (median/MAD population)."),
    reference_max_tokens: Optional[int] = typer.Option(None, "--reference-max-tokens", help="Longest credit reference in the teacher context (cut per section)."),
    sgcd_keep: Optional[str] = typer.Option(None, "--sgcd-keep", help="mixed (success+failure) | spread (any reward spread)."),
) -> None:
    """Train a local policy on an env's train split with GRPO-family RL; logs every step."""
    from harness.curves import curves_frame, plot_curves
    from harness.store import Store
    from trainers.config import TrainConfig
    from trainers.loop import train
    from trainers.methods import parse_method_args

    overrides = {"loss_agg": loss_agg, "clip_low": clip_low, "clip_high": clip_high, "normalize_std": std_normalize,
                 "kl_coef": kl_coef, "kl_estimator": kl_estimator, "dynamic_sampling": dynamic_sampling,
                 "resample_budget": resample_budget, "gamma": sgcd_gamma, "cap": sgcd_cap, "topk": sgcd_topk,
                 "salience": salience_mode, "salience_kappa": salience_kappa, "entropy_kappa": entropy_kappa,
                 "salience_span": salience_span, "salience_scope": salience_scope,
                 "reference_max_tokens": reference_max_tokens, "keep": sgcd_keep}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(parse_method_args(method, list(method_arg or [])))
    env_settings = {"data_version": data_version, "user": user, "user_model": user_model, "user_api_base": user_api_base,
                    "user_temperature": user_temperature, "max_steps": max_steps, "appworld_root": appworld_root,
                    "appworld_urls": list(appworld_url) if appworld_url else None,
                    "appworld_servers": appworld_servers, "max_interactions": max_interactions}
    cfg = TrainConfig(
        env=env, policy=policy, method=method, method_overrides=overrides, teacher=teacher,
        run=run, db=db, out_dir=out_dir, seed=seed, steps=steps, tasks_per_step=tasks_per_step,
        group_size=group_size, train_split=train_split, eval_split=eval_split, eval_every=eval_every,
        eval_tasks=eval_tasks, eval_temperature=eval_temperature, eval_trials=eval_trials, temperature=temperature, max_new_tokens=max_new_tokens, lr=lr,
        lr_schedule=lr_schedule, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
        ppo_epochs=ppo_epochs, mini_batches=mini_batches, micro_batch_tokens=micro_batch_tokens,
        warm_start=warm_start, warm_start_lr=warm_start_lr, checkpoint_every=checkpoint_every, resume=resume, stop_after=stop_after,
        gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank, device=device, tracker=tracker,
        quiet=quiet, summarizer=summarizer, summarizer_api_base=summarizer_api_base,
        env_options={k: v for k, v in env_settings.items() if v is not None},
    )
    summary = train(cfg, echo=typer.echo)
    from trainers import distributed

    if not distributed.is_main():  # torchrun: rank 0 reports for the run
        return
    store = Store(db)
    frame = curves_frame(store, summary["run"])
    plot = plot_curves(frame, Path(summary["out_dir"]) / "curves.png", summary["run"])
    state = "finished" if summary["finished"] else "stopped (continue with --resume)"
    typer.echo(f"run {summary['run']} {state}; results in {db}")
    typer.echo(f"  curves:      {plot}   (harness results curves {summary['run']})")
    typer.echo(f"  checkpoint:  {summary['checkpoint']}   (harness eval --env {env} --policy {summary['checkpoint']})")


@friendly
def sft_cmd(
    env: str = typer.Option(..., "--env", help="Env whose demonstrations to learn (toy)."),
    policy: str = typer.Option(..., "--policy", help="HF model id or directory; `tiny-toy` builds the tiny model."),
    out: str = typer.Option(..., "--out", help="Directory to save the fine-tuned model to."),
    steps: int = typer.Option(300, "--steps", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    split: str = typer.Option("train", "--split"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Supervised warm start: fine-tune on the env's oracle demonstrations, save to --out."""
    from envs.registry import make_env_factory
    from trainers.model_setup import load_policy
    from trainers.sft import demonstration_traces, require_demonstrations, warm_start

    factory = make_env_factory(env)
    require_demonstrations(factory, "harness sft")  # before loading a model for nothing
    tasks = factory.tasks(split, None)
    model, tokenizer, _ = load_policy(policy, Path(out), device, seed=seed)
    traces = demonstration_traces(factory, tokenizer, tasks, "harness sft")
    losses = warm_start(model, traces, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    typer.echo(f"sft: {steps} steps on {len(traces)} demonstrations, loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved to {out}")


@friendly
def curves_cmd(
    run: str = typer.Argument(..., help="Train run name."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    out: Optional[str] = typer.Option(None, "--out", help="PNG path (default results/runs/<run>/curves.png)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metric names (default: the headline ones)."),
    fmt: str = typer.Option("table", "--format", help="table | csv | markdown | json"),
) -> None:
    """Learning curves of a train run: a PNG plot and a per-step table."""
    from harness import results
    from harness.curves import curves_frame, plot_curves
    from harness.store import Store
    from trainers.config import default_run_dir

    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    frame = curves_frame(Store(db), run, wanted)
    path = plot_curves(frame, Path(out) if out else default_run_dir(run) / "curves.png", run)
    results.render(frame, fmt)
    typer.echo(f"plot: {path}")


@friendly
def methods_list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable: one object per method."),
) -> None:
    """List the training methods: description, paper, what each needs, and its default settings."""
    import json

    from trainers.methods import REQUIREMENTS, method_catalog

    rows = method_catalog()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        needs = ", ".join(row["requires"]) or "-"
        typer.echo(f"{row['method']:<10} arXiv {row['paper']:<11} needs: {needs}")
        typer.echo(f"    {row['description']}")
        defaults = "  ".join(f"{k}={v}" for k, v in row["defaults"].items())
        typer.echo(f"    defaults: {defaults}")
    typer.echo("\nneeds: " + "; ".join(f"{k} = {v}" for k, v in REQUIREMENTS.items()))
    typer.echo("Change a setting with --method-arg key=value (or the named options of harness train).")


@friendly
def train_suite_cmd(
    env: str = typer.Option(SUITE_ENV, "--env", help="Registered env (toy for a CPU-sized comparison)."),
    policy: str = typer.Option("tiny-toy", "--policy", help="Start policy shared by every method."),
    methods: str = typer.Option("all", "--methods", help="Comma-separated methods or NAME=METHOD arms (e.g. sgcd_placebo=sgcd), or `all`."),
    method_arg: Optional[list[str]] = typer.Option(None, "--method-arg", help="METHOD:key=value for one method, or key=value for every method that has it (repeatable)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model for rlad/opd/grpo_kl (toy + tiny-toy: built when omitted)."),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", min=1, help="Supervised steps of the built toy teacher (default 2x --warm-start, at least 400)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Run names are <prefix>-<method> (default suite-<env>-s<seed>)."),
    db: str = typer.Option(DEFAULT_DB, "--db"),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Start policy, teacher, checkpoints, plot (default results/suites/<prefix>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue interrupted runs; finished ones are kept."),
    steps: int = typer.Option(20, "--steps", min=1),
    tasks_per_step: int = typer.Option(8, "--tasks-per-step", min=1),
    group_size: int = typer.Option(8, "--group-size", min=2),
    seed: int = typer.Option(0, "--seed"),
    lr: float = typer.Option(5e-4, "--lr"),
    warmup_steps: int = typer.Option(2, "--warmup-steps", min=0),
    warm_start: int = typer.Option(600, "--warm-start", min=0, help="Supervised steps before RL, done once for all methods."),
    warm_start_lr: float = typer.Option(1e-3, "--warm-start-lr"),
    eval_every: int = typer.Option(5, "--eval-every", min=0),
    eval_tasks: Optional[int] = typer.Option(None, "--eval-tasks", min=1),
    eval_temperature: float = typer.Option(1.0, "--eval-temperature"),
    eval_trials: int = typer.Option(2, "--eval-trials", min=1),
    temperature: float = typer.Option(1.0, "--temperature"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=1),
    micro_batch_tokens: int = typer.Option(4096, "--micro-batch-tokens", min=2),
    summarizer: str = typer.Option("diff", "--summarizer", help="SGCD's summarizer: diff or a litellm model."),
    device: str = typer.Option("auto", "--device"),
    threshold: float = typer.Option(0.5, "--threshold", help="Report the first eval step whose held-out success reached this."),
    fmt: str = typer.Option("table", "--format", help="table | csv | markdown | json (the comparison)."),
) -> None:
    """Train several methods with the same start, seeds and budget, then compare them in one table."""
    from harness.console import err_console
    from harness.cli.suite import run_suite
    from trainers.config import TrainConfig

    prefix = prefix or f"suite-{env}-s{seed}"
    base = TrainConfig(env=env, policy=policy, db=db, seed=seed, steps=steps, tasks_per_step=tasks_per_step,
                       group_size=group_size, lr=lr, warmup_steps=warmup_steps, warm_start=warm_start,
                       warm_start_lr=warm_start_lr, eval_every=eval_every, eval_tasks=eval_tasks,
                       eval_temperature=eval_temperature, eval_trials=eval_trials, temperature=temperature,
                       max_new_tokens=max_new_tokens, micro_batch_tokens=micro_batch_tokens, summarizer=summarizer,
                       device=device, teacher=teacher)
    result = run_suite(base, methods, method_args=list(method_arg or []), prefix=prefix,
                       out_dir=Path(out_dir) if out_dir else Path("results") / "suites" / prefix, resume=resume,
                       threshold=threshold, teacher_steps=teacher_steps, fmt=fmt, echo=typer.echo,
                       note=lambda text: err_console.print(text, highlight=False))
    if result["failed"]:
        raise typer.Exit(1)
