"""``harness train``: rollout -> credit -> update -> log -> checkpoint -> evaluate, step by step.

Each step takes ``tasks_per_step`` training tasks from the seeded task stream, plays
``group_size`` sibling episodes of each with the current policy (``rollout``), lets the method
turn the groups into token-level advantages (``methods``), updates the policy (``update``), logs
one ``train_steps`` row with conventional metric names, and every ``checkpoint_every`` steps writes
a checkpoint that ``--resume`` continues from exactly (weights, optimizer, schedule, RNG, task
position). Held-out evaluation runs at step 0, every ``eval_every`` steps and at the end.

Under torchrun every rank runs this loop (``trainers.distributed``): all take the same tasks and
each plays its share with the full weights gathered, the update is the one of the union batch,
and rank 0 alone evaluates, writes the database, prints and saves checkpoints (README "Multi-GPU").
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from envs.registry import build_env
from harness.env_spec import Transport
from harness.errors import ConfigError
from harness.policy.local_policy import LocalPolicy, PolicyConfig
from harness.store import Store
from harness.train_store import add_checkpoint, log_train_step
import harness.guidance_store  # noqa: F401,E402  (registers the guidance table: Store() creates it with the rest)
from harness.types import ErrorClass, Group
from trainers import distributed
from trainers.checkpoint import latest_checkpoint, load_trainer_state, restore_optimizer, save_checkpoint, set_rng_state
from trainers.config import TrainConfig, default_run_dir
from trainers.evaluate import evaluate
from trainers.methods import REQUIREMENTS, MethodContext, make_method
from trainers.model_setup import autocast, load_policy, load_teacher, make_optimizer, make_scheduler
from trainers.rollout import collect_groups
from trainers.sft import demonstration_traces, warm_start
from trainers.task_stream import TaskStream
from trainers.tracking import check_tracker, make_tracker
from trainers.update import UpdateSettings, policy_update

__all__ = ["train", "group_metrics"]

def group_metrics(groups: list[Group]) -> dict[str, float]:
    return _metrics_of(*_group_records(groups))


def _group_records(groups: list[Group]) -> tuple[list[str], list[tuple]]:
    """Group labels, and per episode (infra error, reward, success, response tokens, turns,
    truncated): all ``group_metrics`` needs, small enough to pool over ranks."""
    records = []
    for e in (e for g in groups for e in g.episodes):
        if e.error_class is ErrorClass.INFRA:
            records.append((True, None, None, None, None, None))
        else:
            t = e.trace
            records.append((False, e.score.reward, bool(e.score.success), None if t is None else t.response_tokens,
                            None if t is None else len(t.turns), t is not None and bool(t.truncated)))
    return [g.label for g in groups], records


def _metrics_of(labels: list[str], records: list[tuple]) -> dict[str, float]:
    episodes = [r for r in records if not r[0]]
    rewards = [r[1] for r in episodes]
    lengths = [r[3] for r in episodes if r[3] is not None]
    turns = [r[4] for r in episodes if r[4] is not None]
    n = max(len(labels), 1)
    return {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "success/mean": statistics.fmean(1.0 if r[2] else 0.0 for r in episodes) if episodes else 0.0,
        "groups/mixed_frac": labels.count("mixed") / n,
        "groups/all_success_frac": labels.count("all_success") / n,
        "groups/all_fail_frac": labels.count("all_fail") / n,
        "len/response": statistics.fmean(lengths) if lengths else 0.0,
        "len/turns": statistics.fmean(turns) if turns else 0.0,
        "episodes/infra_errors": float(sum(1 for r in records if r[0])),
        "episodes/truncated_frac": sum(1 for r in episodes if r[5]) / max(len(episodes), 1),
    }


def _step_group_metrics(groups: list[Group]) -> dict[str, float]:
    """``group_metrics`` of the step's groups on all ranks together."""
    if not distributed.enabled():
        return group_metrics(groups)
    parts = distributed.all_gather_objects(_group_records(groups))
    return _metrics_of([x for p in parts for x in p[0]], [x for p in parts for x in p[1]])


def _rollout_step(cfg: TrainConfig, method, policy, factory, stream: TaskStream, step: int) -> tuple[list[Group], int]:
    """The step's groups, and how many extra groups dynamic sampling rolled out.

    Under torchrun every rank takes the same tasks from the stream (which so stays identical) and
    plays only its share of them; counts that decide what happens next are summed over ranks, so
    every rank decides alike and the union of the ranks' groups is the single-process step's."""

    def roll(tasks, seed):
        mine = distributed.my_share(tasks)
        return collect_groups(policy, factory, mine, cfg.group_size, step=step, seed=seed) if mine else []

    groups = roll(stream.take(cfg.tasks_per_step), cfg.seed)
    extra = 0
    # Dynamic sampling (DAPO, SGCD): keep rolling out fresh tasks until the step has its quota of
    # trainable groups (the method's own rule), for at most ``resample_rounds`` rounds.
    for _ in range(method.resample_rounds):
        trainable, total = distributed.all_sum(sum(1 for g in groups if method.keeps(g)), len(groups))
        if trainable >= cfg.tasks_per_step:
            break
        more = roll(stream.take(cfg.tasks_per_step - int(trainable)), cfg.seed + 7919 * (int(total) + 1))
        extra += len(more)
        groups += more
    return groups, int(distributed.all_sum(extra))


def _open_run(store: Store, cfg: TrainConfig, factory, method) -> tuple[str, bool]:
    name = cfg.run or f"train-{cfg.env}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"train": cfg.identity(), "method_settings": method.settings}
    try:
        existing = store.get_run(name)
    except ConfigError:  # no such run yet
        existing = None
    if existing is not None:
        if existing.kind != "train":
            raise ConfigError(f"run '{name}' exists and is an {existing.kind} run; pick another --run")
        if not cfg.resume:
            raise ConfigError(f"run '{name}' exists; pass --resume to continue it, or pick another --run")
        if existing.config.get("train") != json.loads(json.dumps(config["train"])):
            old, new = existing.config.get("train", {}), json.loads(json.dumps(config["train"]))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"run '{name}' was started with different settings ({', '.join(diff)}); "
                              "resume with the same settings (only --steps may grow), or pick another --run")
        store.set_run_status(name, "running")
        return name, True
    if cfg.resume:
        raise ConfigError(f"--resume: no run named '{name}' in {store.url}")
    store.create_run(name=name, kind="train", env=cfg.env, data_version=factory.data_version, split=cfg.train_split,
                     agent="hf", agent_model=cfg.policy, user=None, user_model=None, config=config)
    return name, False


def train(cfg: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (run name, paths, final metrics)."""
    if cfg.group_size < 2:
        raise ConfigError("--group-size must be at least 2 (group-relative advantages need siblings)")
    if cfg.temperature <= 0:
        raise ConfigError("--temperature must be > 0 for training rollouts (siblings must differ)")
    method = make_method(cfg.method, **cfg.method_overrides)
    factory = build_env(cfg.env, cfg.env_options, Transport())
    check_requirements(cfg, method, factory)
    dist_on = distributed.setup(cfg.device)  # under torchrun: join the process group (README "Multi-GPU")
    device_opt, main = distributed.device_option(cfg.device), distributed.is_main()
    if not main:
        echo = lambda _line: None  # noqa: E731  (rank 0 speaks for the run)
    train_tasks = factory.tasks(cfg.train_split, None)
    tasks_by_id = {t.id: t for t in train_tasks}
    eval_tasks = factory.tasks(cfg.eval_split, None)[: cfg.eval_tasks] if cfg.eval_every else []
    summarizer = _make_summarizer(cfg) if method.uses_summarizer else None
    check_tracker(cfg.tracker)  # fails before any row is written if the package is missing
    with distributed.main_first():  # rank 0 creates a new database file and its tables alone (no race)
        store = Store(cfg.db)
    run, resuming = distributed.broadcast_object(_open_run(store, cfg, factory, method) if main else None)
    out = Path(cfg.out_dir) if cfg.out_dir else default_run_dir(run)
    ckpt_root = out / "checkpoints"
    tracker = make_tracker(cfg.tracker if main else "none", logdir=str(out / "tensorboard"), run=run,
                           config=asdict(cfg))
    last = distributed.broadcast_object(latest_checkpoint(ckpt_root) if resuming and main else None)
    pool = factory.managed_servers()
    try:
        if pool is not None:
            pool.start()  # managed AppWorld servers, up for the whole run
        model, tokenizer, init_path = load_policy(str(last) if last else cfg.policy, out, device_opt, seed=cfg.seed,
                                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                                  lora_rank=0 if last and cfg.lora_rank else cfg.lora_rank)
        if method.attn_implementation:
            model.set_attn_implementation(method.attn_implementation)
        method.check_model(model)  # e.g. OISD's layer exists: refused before any rollout
        distributed.shard(model)  # FSDP2 under torchrun; before the optimizer sees the parameters
        device = next(model.parameters()).device
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
        stream = TaskStream(train_tasks, cfg.seed)
        start = 0
        if last is not None:
            state = load_trainer_state(last)
            restore_optimizer(model, optimizer, state)
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            stream.position, start = state["data_position"], state["step"]
            echo(f"resuming {run} from {last} (step {start})")
        if last is not None and state.get("method_state"):
            method.load_state_dict(state["method_state"])
        teacher = (load_teacher(cfg.teacher, tokenizer, out, device_opt, seed=cfg.seed)
                   if "teacher_model" in method.requires else None)
        privileged = factory.privileged_info if factory.provides("privileged_info") else None
        ref_model = None
        if method.needs_reference:
            ref_model, _, _ = load_policy(cfg.policy, out, device_opt, seed=cfg.seed)
            ref_model.requires_grad_(False)
        sampler = LocalPolicy(PolicyConfig(path=init_path, temperature=cfg.temperature,
                                           max_new_tokens=cfg.max_new_tokens, max_batch=1 << 20, batch_wait_s=None,
                                           record_topk=method.sampler_topk),
                              model=model, tokenizer=tokenizer)
        settings = UpdateSettings(ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
                                  micro_batch_tokens=cfg.micro_batch_tokens, grad_clip=cfg.grad_clip,
                                  temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)

        def checkpoint(step: int) -> None:
            model_state, optim_state = distributed.full_state(model, optimizer)  # gathered to rank 0 (torchrun)
            if main:
                path = save_checkpoint(ckpt_root, step, model, tokenizer, optimizer, scheduler,
                                       {"data_position": stream.position, "run": run,
                                        "method_state": method.state_dict()},
                                       model_state=model_state, optimizer_state=optim_state)
                add_checkpoint(store, run, step, str(path))
            distributed.barrier()

        def evaluate_now(step: int) -> dict[str, float]:
            distributed.gather_weights(model)
            result = evaluate(sampler, factory, eval_tasks, store, run, step, cfg.eval_split, cfg.eval_temperature,
                              cfg.eval_trials) if main else {}  # rank 0 evaluates; the others wait
            distributed.release_weights(model)
            distributed.barrier()
            return result

        if last is None:  # a fresh run: warm start, baseline evaluation, step-0 checkpoint
            metrics: dict[str, Any] = {}
            if cfg.warm_start:
                traces = demonstration_traces(factory, tokenizer, train_tasks, "--warm-start")
                losses = warm_start(model, traces, steps=cfg.warm_start, lr=cfg.warm_start_lr,
                                    batch_size=cfg.warm_start_batch, seed=cfg.seed)
                metrics["sft/loss"] = losses[-1]
                echo(f"warm start: {cfg.warm_start} supervised steps, final loss {losses[-1]:.4f}")
            if eval_tasks:
                metrics.update(evaluate_now(0))
            if main:
                log_train_step(store, run, 0, metrics)
            tracker.log(0, metrics)
            if metrics:
                echo(_line(0, metrics))
            checkpoint(0)

        last_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
        for step in range(start + 1, last_step + 1):
            t0 = time.perf_counter()
            distributed.gather_weights(model)  # torchrun: full weights on every rank for rollout and prepare
            groups, resampled = _rollout_step(cfg, method, sampler, factory, stream, step)
            t_rollout = time.perf_counter() - t0
            metrics = _step_group_metrics(groups)
            metrics["groups/resampled"] = float(resampled)
            ctx = MethodContext(model=model, tokenizer=tokenizer, temperature=cfg.temperature,
                                micro_batch_tokens=cfg.micro_batch_tokens, store=store, run=run, step=step,
                                factory=factory, tasks=tasks_by_id, summarizer=summarizer, teacher=teacher,
                                privileged=privileged)
            t_prepare = time.perf_counter()
            with autocast(device):
                # every rank prepares, also with no groups: a method may use collectives in it
                # (SGCD's normalize_weights averages W over all ranks' tokens)
                prepared = method.prepare(groups, ctx)
            distributed.release_weights(model)
            metrics.update(distributed.merge_metrics(prepared.metrics))
            metrics["time/prepare"] = time.perf_counter() - t_prepare
            t1 = time.perf_counter()
            if distributed.all_sum(len(prepared.traces)):  # every rank joins the update if any has traces
                with autocast(device):
                    metrics.update(policy_update(model, optimizer, prepared, method, settings,
                                                 pad_token_id=tokenizer.pad_token_id, seed=cfg.seed * 1_000_003 + step,
                                                 ctx=ctx, ref_model=ref_model))
            t_update = time.perf_counter() - t1
            metrics["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            sampled = distributed.all_sum(sum(len(e.trace) for g in groups for e in g.episodes if e.trace is not None))
            # the step waits for the slowest rank
            t_rollout, metrics["time/prepare"], t_update = distributed.all_max(t_rollout, metrics["time/prepare"],
                                                                               t_update)
            busy = t_rollout + metrics["time/prepare"] + t_update
            metrics.update({"time/rollout": t_rollout, "time/update": t_update, "tokens/rollout": float(sampled),
                            "perf/tokens_per_s": (sampled + metrics.get("tokens/trained", 0)) / max(busy, 1e-9)})
            if eval_tasks and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics.update(evaluate_now(step))
            if main:
                log_train_step(store, run, step, metrics)
            tracker.log(step, metrics)
            if not cfg.quiet:
                echo(_line(step, metrics))
            if step % cfg.checkpoint_every == 0 or step == last_step:
                checkpoint(step)
        if main:
            store.set_run_status(run, "finished" if last_step == cfg.steps else "interrupted")
    except BaseException:
        if main:
            store.set_run_status(run, "interrupted")
        raise
    finally:
        tracker.close()
        if pool is not None:
            pool.close()
    if dist_on:
        distributed.teardown()
    return {"run": run, "out_dir": str(out), "checkpoint": str(latest_checkpoint(ckpt_root)),
            "db": cfg.db, "finished": last_step == cfg.steps}


def check_requirements(cfg: TrainConfig, method, factory) -> None:
    """Refuse, before any model loads or episode runs, a method whose needs the run cannot meet."""
    missing = []
    for need in method.requires:
        if need == "teacher_model" and not cfg.teacher:
            missing.append(REQUIREMENTS[need])
        elif need == "privileged_info" and not factory.provides("privileged_info"):
            missing.append(f"{REQUIREMENTS[need]}; env '{cfg.env}' provides none")
    if missing:
        raise ConfigError(f"method {cfg.method} needs " + " and ".join(missing))


def _make_summarizer(cfg: TrainConfig):
    """The credit-reference summarizer: ``diff`` offline, else a litellm model (key checked now)."""
    from trainers.summarizer import make_summarizer

    return make_summarizer(cfg.summarizer, api_base=cfg.summarizer_api_base)


def _line(step: int, m: dict[str, Any]) -> str:
    keys = ("reward/mean", "groups/mixed_frac", "loss/policy", "clip/frac", "entropy", "eval/success", "sft/loss",
            "sgcd/w_mean", "sgcd/amplified_frac", "sgcd/kl_reference", "sgcd/kl_control", "time/rollout",
            "time/update")
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m and isinstance(m[k], (int, float))]
    return f"step {step:>4}  " + "  ".join(parts)
