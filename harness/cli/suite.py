"""``harness train-suite``: train several methods under one budget and compare them in one table.

Every method starts from the same weights, sees the same task stream (same ``--seed``), rolls out
the same number of tasks x siblings per step for the same number of steps, and is evaluated on
the same held-out tasks with the same seeds. Then ``harness results compare`` prints one table:
held-out success at the end, the first eval step that reached ``--threshold``, busy time and the
tokens each method sampled and trained (methods with dynamic sampling roll out more, and show it).

Shared preparation, done once and reused by every method (and by a rerun):

- ``--warm-start N``: one supervised warm start on the env's demonstrations, saved under
  ``<out>/start``; every method trains from it (instead of repeating the same warm start).
- Methods that need a separate teacher (``requires`` has ``teacher_model``) get ``--teacher``; with
  the ``tiny-toy`` policy and no ``--teacher``, the suite builds one (on the env's demonstrations): the same
  tiny architecture (same tokenizer, another seed) given ``2 N`` supervised steps (at least 400;
  ``--teacher-steps``), under ``<out>/teacher``: a better-trained policy, not a bigger one (a
  larger toy model took about 9x longer to warm-start on this CPU; any ``--teacher`` works).
- Toy policies have 2 layers; OISD's published layer (6) does not exist there, so on a policy with
  fewer layers the suite reads the last-but-one layer, and says so.

An entry of ``--methods`` may name an *arm*: ``NAME=METHOD`` trains METHOD as run
``<prefix>-NAME``, with its own ``--method-arg NAME:key=value`` settings, so a method can run beside
its own ablation. SGCD's control arm, for example:

    harness train-suite --env toy --methods grpo,sgcd,sgcd_placebo=sgcd --method-arg sgcd_placebo:reference=placebo

Runs are named ``<prefix>-<arm>`` (the arm of a plain method is its name). A finished run is not trained again;
``--resume`` continues interrupted ones. A method that fails is reported and the others still run and are compared.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from envs.registry import SUITE_ENV
from harness.defaults import RESULTS_DIR
from harness.errors import ConfigError
from harness.options import option
from harness.redact import redact

__all__ = ["SUITE_METHODS", "run_suite", "split_method_args"]

SUITE_METHODS = ("grpo", "dr_grpo", "dapo", "rloo", "sgcd", "rlcsd", "rlsd", "rlad", "oisd", "gspo", "tgc", "opsd",
                 "sdpo", "opd", "grpo_kl")
"""``--methods all``: every method in the suite, in table order (GRPO first, as the baseline)."""


def split_method_args(pairs: list[str], arms: dict[str, str] | list[str]) -> dict[str, list[str]]:
    """``ARM:key=value`` strings -> ``{arm: [key=value, ...]}`` (a bare ``key=value`` applies to
    every selected arm whose method has that setting). ``arms``: arm -> method (a list means
    every arm is its method)."""
    from trainers.methods import make_method

    arms = {a: a for a in arms} if isinstance(arms, list) else arms
    out: dict[str, list[str]] = {a: [] for a in arms}
    for pair in pairs:
        head, _, rest = pair.partition(":")
        if rest and "=" not in head:
            if head not in out:
                raise ConfigError(f"--method-arg {pair}: method '{head}' is not in --methods ({', '.join(arms)})")
            out[head].append(rest)
            continue
        key = pair.split("=", 1)[0].strip().replace("-", "_")
        takers = [a for a, m in arms.items() if key in make_method(m).settings]
        if not takers:
            raise ConfigError(f"--method-arg {pair}: no selected method has a setting '{key}'")
        for a in takers:
            out[a].append(pair)
    return out


_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _resolve_methods(spec: str) -> dict[str, str]:
    """``--methods`` -> {arm: method}, in order (``all``: every suite method, GRPO first)."""
    from trainers.methods import method_names

    known = method_names()
    if spec.strip() == "all":
        return {m: m for m in [m for m in SUITE_METHODS if m in known] + [m for m in known if m not in SUITE_METHODS]}
    arms: dict[str, str] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        arm, _, method = entry.partition("=")
        arm, method = arm.strip(), (method.strip() or arm.strip())
        if method not in known:
            raise ConfigError(f"unknown method(s) {method}. Known: {', '.join(known)}")
        if not _ARM_NAME.match(arm):
            raise ConfigError(f"--methods: arm name '{arm}' must be letters, digits, '_', '.' or '-'")
        if arm in arms:
            raise ConfigError("--methods needs distinct method names (or 'all')")
        arms[arm] = method
    if not arms:
        raise ConfigError("--methods needs distinct method names (or 'all')")
    return arms


def _supervised(env: str, policy: str, target: Path, steps: int, lr: float, seed: int, device: str,
                sizes: dict[str, int] | None = None, control: Any = None) -> Path:
    """Warm-start ``policy`` (or a fresh tiny toy model of ``sizes``) on the env's train
    demonstrations and save it to ``target``; reused when ``target`` already holds a model."""
    if (target / "config.json").exists():
        return target
    from envs.registry import make_env_factory
    from trainers.model_setup import load_policy
    from trainers.sft import demonstration_traces, require_demonstrations, warm_start

    factory = make_env_factory(env)
    require_demonstrations(factory, "--warm-start")  # before building or loading a model for nothing
    if sizes is not None:  # a fresh tiny toy model (its own seed), not ``policy``
        from envs.toy.policy import build_toy_policy

        policy = str(build_toy_policy(target.with_name(target.name + "-init"), seed=seed, **sizes))
    model, tokenizer, _ = load_policy(policy, target.parent, device, seed=seed)
    traces = demonstration_traces(factory, tokenizer, factory.tasks("train", None), "--warm-start")
    # A signal stops it at once (KeyboardInterrupt): only a finished model is saved, so --resume redoes it.
    warm_start(model, traces, steps=steps, lr=lr, batch_size=16, seed=seed,
               stop=None if control is None else lambda: control.reason is not None)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def _layers(policy: str) -> int | None:
    try:
        cfg = json.loads((Path(policy) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("num_hidden_layers")


def run_suite(base, methods_spec: str, *, method_args: list[str], prefix: str, out_dir: Path, resume: bool,
              threshold: float, teacher_steps: int | None = None, fmt: str = "table",
              echo: Callable[[str], None] = print, note: Callable[[str], None] = print,
              control: Any = None) -> dict[str, Any]:
    """Train every method of ``methods_spec`` with ``base`` (a ``TrainConfig``; its method, run,
    out_dir and resume are replaced per method) and print the comparison. ``control`` (a
    ``trainers.loop.StopControl``): a stop it requests ends the current arm at a step boundary, with
    a checkpoint, and the suite returns at once with ``interrupted`` set (no comparison)."""
    from harness.results.train_compare import compare_train_runs
    from harness.store import Store
    from trainers.loop import train
    from trainers.methods import make_method, parse_method_args
    from trainers.model_setup import TINY_TOY

    arms = _resolve_methods(methods_spec)
    per_arm = split_method_args(method_args, arms)
    overrides = {a: parse_method_args(m, per_arm[a]) for a, m in arms.items()}  # every typo caught before training
    needs_teacher = [a for a, m in arms.items() if "teacher_model" in make_method(m, **overrides[a]).requires]
    out_dir.mkdir(parents=True, exist_ok=True)

    policy = base.policy
    if base.warm_start:
        policy = str(_supervised(base.env, base.policy, out_dir / "start", base.warm_start, base.warm_start_lr,
                                 base.seed, base.device, control=control))
        echo(f"start policy (warm start, {base.warm_start} supervised steps): {policy}")
    teacher = base.teacher
    if needs_teacher and not teacher:
        if base.policy != TINY_TOY:  # a tiny-toy teacher only fits a tiny-toy policy's tokenizer
            raise ConfigError(f"{', '.join(needs_teacher)} need --teacher PATH (a model with the policy's tokenizer)")
        steps = teacher_steps or 2 * max(base.warm_start, 200)
        teacher = str(_supervised(base.env, TINY_TOY, out_dir / "teacher", steps, base.warm_start_lr, base.seed + 1,
                                  base.device, sizes={}, control=control))
        echo(f"teacher for {', '.join(needs_teacher)}: {teacher} (tiny toy model, seed {base.seed + 1}, "
             f"{steps} supervised steps)")
    layers = _layers(policy) if policy != TINY_TOY else 2
    default_layer = make_method("oisd").settings.get("layer")
    for arm in (a for a, m in arms.items() if m == "oisd" and "layer" not in overrides[a]):
        if layers is not None and isinstance(default_layer, int) and default_layer >= layers:
            overrides[arm]["layer"] = max(layers - 1, 1)
            echo(f"{arm}: the policy has {layers} layers; reading layer {overrides[arm]['layer']} "
                 f"(published default {default_layer}); set --method-arg {arm}:layer=N to change")

    store = Store(base.db)
    runs, failed, times = [], {}, {}
    for arm, method in arms.items():
        run = f"{prefix}-{arm}"
        status = _status(store, run)
        if status == "finished":
            echo(f"== {arm}: run {run} already finished; kept")
            runs.append(run)
            continue
        cfg = replace(base, method=method, method_overrides=overrides[arm], run=run, policy=policy, warm_start=0,
                      teacher=teacher if arm in needs_teacher else None, out_dir=str(out_dir / arm),
                      resume=status is not None and resume)
        if status is not None and not resume:
            raise ConfigError(f"run {run} exists ({status}); pass --resume to continue it, or pick another --prefix")
        echo(f"== {arm} ({run})" if arm == method else f"== {arm}: {method} ({run})")
        t0 = time.perf_counter()
        try:
            summary = train(cfg, echo=echo, control=control)
        except (ConfigError, RuntimeError, ValueError) as exc:  # report, and let the other methods run
            failed[arm] = redact(f"{type(exc).__name__}: {exc}")
            echo(f"!! {arm} failed: {failed[arm]}")
            continue
        if summary["interrupted"]:
            return {"runs": runs, "failed": failed, "seconds": times, "teacher": teacher, "policy": policy,
                    "interrupted": f"{summary['interrupted']} during {arm} (run {run}, after step {summary['step']})"}
        times[arm] = time.perf_counter() - t0
        runs.append(run)
    if len(runs) >= 2:
        echo("")
        compare_train_runs(store, runs, fmt, out=str(out_dir / "compare.png"), threshold=threshold, echo=echo,
                           note=note)
    elif runs:
        echo(f"only {runs[0]} finished; nothing to compare")
    if failed:
        echo("failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
    return {"runs": runs, "failed": failed, "seconds": times, "teacher": teacher, "policy": policy,
            "interrupted": None}


def _status(store, run: str) -> str | None:
    try:
        return store.get_run(run).status
    except ConfigError:
        return None


SHARED_TRAIN_SETTINGS = ("env", "policy", "teacher", "db", "seed", "steps", "tasks_per_step", "group_size", "lr",
                         "warmup_steps", "warm_start", "warm_start_lr", "eval_every", "eval_tasks", "eval_temperature",
                         "eval_trials", "temperature", "max_new_tokens", "micro_batch_tokens", "summarizer", "device",
                         "tis_cap", "rollout_engine", "rollout_url", "rollout_replicas", "rollout_gpus",
                         "rollout_gpu_memory")
"""``TrainConfig`` fields the suite takes as options (their docs and types come from ``TrainConfig``)."""

SUITE_DEFAULTS = {"env": SUITE_ENV, "policy": "tiny-toy", "lr": 5e-4, "warmup_steps": 2, "warm_start": 600,
                  "eval_every": 5, "eval_temperature": 1.0, "eval_trials": 2, "max_new_tokens": 40,
                  "summarizer": "diff"}
"""Where the suite's defaults differ from ``harness train``'s: a CPU-sized toy comparison."""


@dataclass
class SuiteOptions:
    """Settings of ``harness train-suite`` beyond the shared training settings (``SHARED_TRAIN_SETTINGS``)."""

    methods: str = "all"
    """Comma-separated methods or NAME=METHOD arms (e.g. sgcd_placebo=sgcd), or `all`."""
    method_arg: list[str] | None = option(None, flags=("--method-arg",))
    """METHOD:key=value for one method (or arm), or key=value for every method that has it (repeatable)."""
    teacher_steps: int | None = option(None, minimum=1)
    """Supervised steps of the built toy teacher (default 2x --warm-start, at least 400)."""
    prefix: str | None = None
    """Run names are <prefix>-<method> (default suite-<env>-s<seed>)."""
    out_dir: str | None = None
    """Start policy, teacher, checkpoints, plot (default results/suites/<prefix>)."""
    resume: bool = False
    """Continue interrupted runs; finished ones are kept."""
    threshold: float = 0.5
    """Report the first eval step whose held-out success reached this."""
    fmt: str = option("table", flags=("--format",))
    """table | csv | markdown | json (the comparison)."""


def train_suite_command():
    from harness.cli.options import command, dataclass_params
    from harness.console import friendly
    from trainers.config import TrainConfig

    doc = "Train several methods with the same start, seeds and budget, then compare them in one table."
    skip = tuple(f.name for f in fields(TrainConfig) if f.name not in SHARED_TRAIN_SETTINGS)
    params = dataclass_params(TrainConfig, skip=skip, defaults=SUITE_DEFAULTS) + dataclass_params(SuiteOptions)

    def body(**values):
        shared = {k: values.pop(k) for k in SHARED_TRAIN_SETTINGS}
        run_suite_command(TrainConfig(**shared), SuiteOptions(**values))

    return friendly(command("train-suite", doc, params, body))


def run_suite_command(base, o: SuiteOptions) -> None:
    """``base``: the shared ``TrainConfig`` every arm starts from."""
    import typer

    from harness.cli.interrupts import exit_code, graceful_stop, resume_command
    from harness.console import err_console
    from trainers.loop import StopControl

    prefix = o.prefix or f"suite-{base.env}-s{base.seed}"
    control = StopControl()

    def say(line: str) -> None:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    def resume() -> str:  # the suite's command: --prefix names its runs (the default one is dated by seed only)
        return resume_command(prefix, extra=("--resume",), name_flags=("--prefix",))

    def request(name: str) -> None:
        control.reason = name

    with graceful_stop(request):  # Ctrl-C / SIGTERM: the current arm stops at a step boundary
        try:
            result = run_suite(base, o.methods, method_args=list(o.method_arg or []), prefix=prefix,
                               out_dir=Path(o.out_dir) if o.out_dir else Path(RESULTS_DIR) / "suites" / prefix,
                               resume=o.resume, threshold=o.threshold, teacher_steps=o.teacher_steps, fmt=o.fmt,
                               echo=typer.echo, note=lambda text: err_console.print(text, highlight=False),
                               control=control)
        except KeyboardInterrupt:  # a second signal (or one during the warm start): stopped at once
            say(f"interrupted: train-suite {prefix} stopped at once by {control.reason or 'Ctrl-C'}; finished "
                f"arms are kept and a stopped one continues from its last checkpoint; resume with: {resume()}")
            raise typer.Exit(exit_code()) from None
    if result["interrupted"]:
        say(f"interrupted: train-suite {prefix} stopped by {result['interrupted']}; resume with: {resume()}")
        raise typer.Exit(exit_code())
    if result["failed"]:
        raise typer.Exit(1)
