"""``harness train-suite``: train several methods under one budget and compare them in one table.

Every method starts from the same weights, sees the same task stream (same ``--seed``), rolls out
the same number of tasks x siblings per step for the same number of steps, and is evaluated on
the same held-out tasks with the same seeds. Then ``harness results compare`` prints one table:
held-out success at the end, the first eval step that reached ``--threshold``, busy time and the
tokens each method sampled and trained (methods with dynamic sampling roll out more, and show it).

Shared preparation, done once and reused by every method (and by a rerun):

- ``--warm-start N``: one supervised warm start on the env's demonstrations, saved under
  ``<out>/start``; every method trains from it (instead of repeating the same warm start).
- Methods that need a separate teacher (``requires`` has ``teacher_model``) get ``--teacher``; on
  the toy env with the ``tiny-toy`` policy and no ``--teacher``, the suite builds one: the same
  tiny architecture (same tokenizer, another seed) given ``2 N`` supervised steps (at least 400;
  ``--teacher-steps``), under ``<out>/teacher``: a better-trained policy, not a bigger one (a
  larger toy model took about 9x longer to warm-start on this CPU; any ``--teacher`` works).
- Toy policies have 2 layers; OISD's published layer (6) does not exist there, so on a policy with
  fewer layers the suite reads the last-but-one layer, and says so.

Runs are named ``<prefix>-<method>``. A finished run is not trained again; ``--resume`` continues
interrupted ones. A method that fails is reported and the others still run and are compared.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError

__all__ = ["SUITE_METHODS", "run_suite", "split_method_args"]

SUITE_METHODS = ("grpo", "dr_grpo", "dapo", "rloo", "sgcd", "rlsd", "rlad", "oisd", "gspo", "tgc", "opsd", "sdpo",
                 "opd", "grpo_kl")
"""``--methods all``: every method in the suite, in table order (GRPO first, as the baseline)."""


def split_method_args(pairs: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``METHOD:key=value`` strings -> ``{method: [key=value, ...]}`` (a bare ``key=value`` applies to
    every selected method that has that setting)."""
    from trainers.methods import make_method

    out: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs:
        head, _, rest = pair.partition(":")
        if rest and "=" not in head:
            if head not in out:
                raise ConfigError(f"--method-arg {pair}: method '{head}' is not in --methods ({', '.join(methods)})")
            out[head].append(rest)
            continue
        key = pair.split("=", 1)[0].strip().replace("-", "_")
        takers = [m for m in methods if key in make_method(m).settings]
        if not takers:
            raise ConfigError(f"--method-arg {pair}: no selected method has a setting '{key}'")
        for m in takers:
            out[m].append(pair)
    return out


def _resolve_methods(spec: str) -> list[str]:
    from trainers.methods import method_names

    known = method_names()
    if spec.strip() == "all":
        return [m for m in SUITE_METHODS if m in known] + [m for m in known if m not in SUITE_METHODS]
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}. Known: {', '.join(known)}")
    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError("--methods needs distinct method names (or 'all')")
    return methods


def _supervised(env: str, policy: str, target: Path, steps: int, lr: float, seed: int, device: str,
                sizes: dict[str, int] | None = None) -> Path:
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
        from harness.policy.tiny_model import build_toy_policy

        policy = str(build_toy_policy(target.with_name(target.name + "-init"), seed=seed, **sizes))
    model, tokenizer, _ = load_policy(policy, target.parent, device, seed=seed)
    traces = demonstration_traces(factory, tokenizer, factory.tasks("train", None), "--warm-start")
    warm_start(model, traces, steps=steps, lr=lr, batch_size=16, seed=seed)
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
              threshold: float, teacher_steps: int | None = None, fmt: str = "table", echo: Callable[[str], None] = print,
              note: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every method of ``methods_spec`` with ``base`` (a ``TrainConfig``; its method, run,
    out_dir and resume are replaced per method) and print the comparison."""
    from harness.store import Store
    from harness.train_compare import compare_train_runs
    from trainers.loop import train
    from trainers.methods import make_method, parse_method_args
    from trainers.model_setup import TINY_TOY

    methods = _resolve_methods(methods_spec)
    per_method = split_method_args(method_args, methods)
    overrides = {m: parse_method_args(m, per_method[m]) for m in methods}  # every typo caught before training
    needs_teacher = [m for m in methods if "teacher_model" in make_method(m, **overrides[m]).requires]
    out_dir.mkdir(parents=True, exist_ok=True)

    policy = base.policy
    if base.warm_start:
        policy = str(_supervised(base.env, base.policy, out_dir / "start", base.warm_start, base.warm_start_lr,
                                 base.seed, base.device))
        echo(f"start policy (warm start, {base.warm_start} supervised steps): {policy}")
    teacher = base.teacher
    if needs_teacher and not teacher:
        if not (base.env == "toy" and base.policy == TINY_TOY):
            raise ConfigError(f"{', '.join(needs_teacher)} need --teacher PATH (a model with the policy's tokenizer)")
        steps = teacher_steps or 2 * max(base.warm_start, 200)
        teacher = str(_supervised(base.env, TINY_TOY, out_dir / "teacher", steps, base.warm_start_lr, base.seed + 1,
                                  base.device, sizes={}))
        echo(f"teacher for {', '.join(needs_teacher)}: {teacher} (tiny toy model, seed {base.seed + 1}, "
             f"{steps} supervised steps)")
    layers = _layers(policy) if policy != TINY_TOY else 2
    if "oisd" in methods and "layer" not in overrides["oisd"] and layers is not None:
        default_layer = make_method("oisd").settings.get("layer")
        if isinstance(default_layer, int) and default_layer >= layers:
            overrides["oisd"]["layer"] = max(layers - 1, 1)
            echo(f"oisd: the policy has {layers} layers; reading layer {overrides['oisd']['layer']} "
                 f"(published default {default_layer}); set --method-arg oisd:layer=N to change")

    store = Store(base.db)
    runs, failed, times = [], {}, {}
    for method in methods:
        run = f"{prefix}-{method}"
        status = _status(store, run)
        if status == "finished":
            echo(f"== {method}: run {run} already finished; kept")
            runs.append(run)
            continue
        cfg = replace(base, method=method, method_overrides=overrides[method], run=run, policy=policy, warm_start=0,
                      teacher=teacher if method in needs_teacher else None, out_dir=str(out_dir / method),
                      resume=status is not None and resume)
        if status is not None and not resume:
            raise ConfigError(f"run {run} exists ({status}); pass --resume to continue it, or pick another --prefix")
        echo(f"== {method} ({run})")
        t0 = time.perf_counter()
        try:
            train(cfg, echo=echo)
        except (ConfigError, RuntimeError, ValueError) as exc:  # report, and let the other methods run
            failed[method] = f"{type(exc).__name__}: {exc}"
            echo(f"!! {method} failed: {failed[method]}")
            continue
        times[method] = time.perf_counter() - t0
        runs.append(run)
    if len(runs) >= 2:
        echo("")
        compare_train_runs(store, runs, fmt, out=str(out_dir / "compare.png"), threshold=threshold, echo=echo, note=note)
    elif runs:
        echo(f"only {runs[0]} finished; nothing to compare")
    if failed:
        echo("failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
    return {"runs": runs, "failed": failed, "seconds": times, "teacher": teacher, "policy": policy}


def _status(store, run: str) -> str | None:
    try:
        return store.get_run(run).status
    except ConfigError:
        return None
