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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from envs.registry import build_env, env_class, env_settings, training_settings
from harness.decoding import Decoding
from harness.env_spec import Transport
from harness.errors import ConfigError, HarnessError
from harness.options import check_ranges, is_volatile
from harness.policy.engine import check_rollout_engine, check_rollout_servers
from harness.policy.local_policy import LocalPolicy, PolicyConfig, check_model_path
from harness.redact import redact_data
from harness.store import Store, add_checkpoint, checkpoints, log_train_step
from harness.store.core import check_run_name
from harness.store.owners import RunLease, claim_run
from harness.types import ErrorClass, Group
from trainers import distributed
from trainers.checkpoint import (
    load_trainer_state,
    recorded_checkpoint,
    restore_optimizer,
    save_checkpoint,
    set_rng_state,
)
from trainers.config import TrainConfig, default_run_dir
from trainers.credit_log import record_credit
from trainers.evaluate import check_eval_points, eval_run_name, evaluate, unsaved_weights
from trainers.methods import REQUIREMENTS, MethodContext, make_method
from trainers.model_setup import (
    TINY_TOY,
    autocast,
    check_lora,
    check_lr_schedule,
    load_policy,
    load_teacher,
    make_optimizer,
    make_scheduler,
)
from trainers.ownership import check_checkpoint_owner, check_new_run_dir, check_resumed_run_dir, claim_run_dir
from trainers.rollout import collect_groups
from trainers.sft import demonstration_traces, require_demonstrations, warm_start
from trainers.task_stream import TaskStream
from trainers.tracking import check_tracker, make_tracker
from trainers.update import UpdateSettings, policy_update

__all__ = ["train", "StopControl", "group_metrics"]

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


def _rollout_step(cfg: TrainConfig, method, policy, factory, stream: TaskStream, step: int,
                  progress: Callable[[str], None] | None = None) -> tuple[list[Group], int]:
    """The step's groups, and how many extra groups dynamic sampling rolled out. ``progress``: as
    ``evaluate``'s, for this rank's episodes.

    Under torchrun every rank takes the same tasks from the stream (which so stays identical) and
    plays only its share of them; counts that decide what happens next are summed over ranks, so
    every rank decides alike and the union of the ranks' groups is the single-process step's."""

    def roll(tasks, seed):
        mine = distributed.my_share(tasks)
        total = len(mine) * cfg.group_size

        def report(done: int, elapsed: float) -> None:
            progress(f"rollout of step {step}: {done}/{total} episodes ({elapsed:.0f} s)")

        return collect_groups(policy, factory, mine, cfg.group_size, step=step, seed=seed,
                              report=report if progress is not None else None) if mine else []

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


def _open_run(store: Store, cfg: TrainConfig, factory, method,
              echo: Callable[[str], None] = print) -> tuple[str, bool, str | None, RunLease]:
    """Find the run to resume (and its last recorded checkpoint) or create a new one, and claim it
    (``harness.store.owners``: one live process trains a run) and its directory
    (``trainers.ownership``). Everything is refused before the run row is written or changed."""
    name = cfg.run or f"train-{cfg.env}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = _run_dir(cfg, name)
    # as the store keeps it; "rollout" records what sampled the run as it started (the engine may
    # change on resume, so it is not part of the settings a resume must match)
    config = redact_data({"train": cfg.identity(), "method_settings": method.settings,
                          "rollout": {"engine": cfg.rollout_engine, "tis_cap": cfg.effective_tis_cap}})
    try:
        existing = store.get_run(name)
    except ConfigError:  # no such run yet
        existing = None
    if existing is not None and existing.kind != "train":
        raise ConfigError(f"run '{name}' exists and is an {existing.kind} run; pick another --run")
    check_run_name(name, room=len(eval_run_name("", 0)))  # its evaluation points are <name>/eval-step-N
    check_eval_points(store, name)  # its evaluation points would replace them
    if existing is not None:
        if not cfg.resume:
            raise ConfigError(f"run '{name}' exists; pass --resume to continue it, or pick another --run")
        _check_same_settings(existing, json.loads(json.dumps(config)), name, echo)
        check_resumed_run_dir(out, existing, store.url)
        last = recorded_checkpoint(checkpoints(store, name), out, name)
        lease = claim_run(store, name)  # refused while another live process trains it
        store.set_run_status(name, "running")
        claim_run_dir(out, existing, store.url)
        return name, True, None if last is None else str(last), lease
    if cfg.resume:
        raise ConfigError(f"--resume: no run named '{name}' in {store.url}")
    check_new_run_dir(out, name)
    record = store.create_run(name=name, kind="train", env=cfg.env, data_version=factory.data_version,
                              split=cfg.train_split, agent="hf", agent_model=cfg.policy, user=None, user_model=None,
                              config=config)
    lease = claim_run(store, name)
    claim_run_dir(out, record, store.url)
    return name, False, None, lease


def _check_same_settings(existing, config: dict[str, Any], name: str, echo: Callable[[str], None]) -> None:
    """A resumed run trains as it started. The training settings must match (``--method-arg``
    overrides aside), and so must the method's effective settings, defaults included: a default
    changed by a newer harness is refused, with the ``--method-arg`` that continues the run as it
    started. Settings the run's harness did not have yet take their defaults, and the resume says so."""
    old, new = dict(existing.config.get("train", {})), dict(config["train"])
    old.pop("method_overrides", None)
    new.pop("method_overrides", None)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"run '{name}' was started with different settings ({', '.join(diff)}); "
                          "resume with the same settings (only --steps may grow), or pick another --run")
    was, now = existing.config.get("method_settings") or {}, config["method_settings"]
    changed = sorted(k for k in set(was) & set(now) if was[k] != now[k])
    if changed:
        pins = " ".join(f"--method-arg {k}={json.dumps(was[k]) if not isinstance(was[k], str) else was[k]}"
                        for k in changed)
        raise ConfigError(f"run '{name}' was started with other method settings ("
                          + ", ".join(f"{k}: {was[k]!r} then, {now[k]!r} now" for k in changed)
                          + f"); resume it as it started with {pins}, or pick another --run")
    added = sorted(set(now) - set(was))
    if added:
        echo(f"note: run '{name}' was started by a harness without the method settings "
             f"{', '.join(added)}; they take their values now: "
             + ", ".join(f"{k}={now[k]!r}" for k in added))


def _run_dir(cfg: TrainConfig, run: str) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else default_run_dir(run)


@dataclass
class _Session:
    """Everything one training run holds while it runs (``train`` = setup, steps, finish)."""

    cfg: TrainConfig
    echo: Callable[[str], None]
    method: Any
    factory: Any
    main: bool
    dist_on: bool
    device_opt: str
    store: Store
    run: str
    out: Path
    tracker: Any
    last: Path | None
    """The checkpoint to resume from: the run's newest recorded one (None: a fresh run)."""
    saved: Path | None = None
    """The newest checkpoint this invocation wrote."""
    resuming: bool = False
    """The run row existed before this invocation."""
    logged: bool = False
    """A train step (step 0 included) was logged in this invocation."""
    done: int = 0
    """The last step completed (by this invocation or the one it resumes)."""
    checkpointed: int = -1
    """The step of the newest checkpoint."""
    train_tasks: list = field(default_factory=list)
    eval_tasks: list = field(default_factory=list)
    summarizer: Any = None
    pool: Any = None
    model: Any = None
    tokenizer: Any = None
    optimizer: Any = None
    scheduler: Any = None
    stream: Any = None
    start: int = 0
    teacher: Any = None
    privileged: Any = None
    ref_model: Any = None
    sampler: Any = None
    control: StopControl | None = None
    """How a signal asks this run to stop (``train``'s ``control``)."""
    settings: Any = None
    lease: RunLease | None = None
    """Rank 0's claim on the run (released when ``train`` returns or raises)."""

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def last_step(self) -> int:
        cfg = self.cfg
        return cfg.steps if cfg.stop_after is None else min(cfg.steps, self.start + cfg.stop_after)


@dataclass
class StopControl:
    """How a caller stops a run from outside (the CLI's SIGINT/SIGTERM handler): setting ``reason``
    (e.g. ``"SIGTERM"``) makes the loop stop at the end of the current step, with a checkpoint of
    it, and mark the run ``interrupted``. ``run`` holds the run's name once it is known."""

    reason: str | None = None
    run: str | None = None


def train(cfg: TrainConfig, echo: Callable[[str], None] = print, control: StopControl | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (run name, paths, final metrics, and
    ``interrupted``: why it stopped early at a step boundary, or None)."""
    s = _setup(cfg, echo)
    if control is not None:
        control.run = s.run
    s.control = control
    stopped: str | None = None
    try:
        s.pool = s.factory.managed_servers()
        if s.pool is not None:
            s.pool.start()  # managed AppWorld servers, up for the whole run
        _load(s)
        if s.eval_tasks:  # greedy and sampled scores of one policy differ: say which this is
            s.echo(f"held-out evaluation every {cfg.eval_every} steps: {len(s.eval_tasks)} {cfg.eval_split} tasks, "
                   f"{Decoding(cfg.eval_temperature, cfg.eval_trials)} (--eval-temperature, --eval-trials)")
        if s.last is None:
            _step_zero(s)
        for step in range(s.start + 1, s.last_step + 1):
            if _stop_requested(control):  # asked during the step before (or the setup): stop here
                stopped = control.reason or "a signal on another rank"
                if s.checkpointed != s.done:
                    _checkpoint(s, s.done)  # the end of the last step is where --resume starts
                break
            _step(s, step)
            s.done = step
        if s.main:
            if stopped:
                s.store.set_run_status(s.run, "interrupted", f"stopped by {stopped} after step {s.done}")
            elif s.last_step == cfg.steps:
                s.store.set_run_status(s.run, "finished")
            else:
                s.store.set_run_status(s.run, "interrupted", f"--stop-after {cfg.stop_after}: continue with --resume")
    except BaseException as exc:
        if s.main:
            if isinstance(exc, HarnessError) and not s.resuming and not s.logged:
                # A setting refused before the first step (a model that does not fit the method, a
                # teacher with another tokenizer): the fresh run holds nothing, so it does not stay
                # behind to block its name.
                s.store.delete_run(s.run)
            elif isinstance(exc, KeyboardInterrupt):
                why = control.reason if control is not None and control.reason else "Ctrl-C"
                where = (f"during step {s.done + 1}; --resume continues from step {s.checkpointed}"
                         if s.checkpointed >= 0 else "before its first checkpoint; --resume starts it afresh")
                s.store.set_run_status(s.run, "interrupted", f"stopped at once by {why} {where}")
            else:
                s.store.set_run_status(s.run, "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        raise
    finally:
        s.tracker.close()
        if s.sampler is not None:
            s.sampler.engine.close()  # stops the rollout servers it started
        if s.pool is not None:
            s.pool.close()
        if s.lease is not None:
            s.lease.release()
    if s.dist_on:
        distributed.teardown()
    return {"run": s.run, "out_dir": str(s.out), "checkpoint": str(s.saved or s.last),
            "db": cfg.db, "finished": s.last_step == cfg.steps and not stopped, "interrupted": stopped,
            "step": s.done}


def _stop_requested(control: StopControl | None) -> bool:
    """Whether to stop now; under torchrun every rank agrees (one rank's signal stops them all)."""
    if control is None:
        return False
    return bool(distributed.all_sum(1.0 if control.reason else 0.0))


def _setup(cfg: TrainConfig, echo: Callable[[str], None]) -> _Session:
    """Everything that can be refused is checked before a model loads: settings, the method's needs,
    the env and its tasks, the tracker; then the run row is opened (or found, to resume)."""
    check_ranges(cfg, "harness train")
    if cfg.group_size < 2:
        raise ConfigError("--group-size must be at least 2 (group-relative advantages need siblings)")
    if cfg.temperature <= 0:
        raise ConfigError("--temperature must be > 0 for training rollouts (siblings must differ)")
    method = make_method(cfg.method, **cfg.method_overrides)
    factory = build_env(cfg.env, training_settings(cfg.env, cfg.env_options), Transport())
    check_requirements(cfg, method, factory)
    check_settings(cfg, factory)  # the policy and teacher paths among them: before the run row and its directory
    dist_on = distributed.setup(cfg.device)  # under torchrun: join the process group (README "Multi-GPU")
    if cfg.rollout_engine == "vllm" and dist_on:
        raise ConfigError("--rollout-engine vllm under torchrun is not built yet (every rank would sync its own "
                          "vLLM); train in one process and give the rollouts their GPUs with --rollout-gpus")
    device_opt, main = distributed.device_option(cfg.device), distributed.is_main()
    if not main:
        echo = lambda _line: None  # noqa: E731  (rank 0 speaks for the run)
    train_tasks = factory.tasks(cfg.train_split, None)
    eval_tasks = factory.tasks(cfg.eval_split, None)[: cfg.eval_tasks] if cfg.eval_every else []
    summarizer = _make_summarizer(cfg) if method.uses_summarizer else None
    check_tracker(cfg.tracker)  # fails before any row is written if the package is missing
    with distributed.main_first():  # rank 0 creates a new database file and its tables alone (no race)
        store = Store(cfg.db)
    *opened, lease = _open_run(store, cfg, factory, method, echo) if main else (None, None)
    run, resuming, last = distributed.broadcast_object(opened if main else None)
    out = _run_dir(cfg, run)
    try:
        tracker = make_tracker(cfg.tracker if main else "none", logdir=str(out / "tensorboard"), run=run,
                               config=asdict(cfg))
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return _Session(cfg=cfg, echo=echo, method=method, factory=factory, main=main, dist_on=dist_on,
                    device_opt=device_opt, store=store, run=run, out=out, tracker=tracker,
                    last=None if last is None else Path(last), resuming=resuming,
                    train_tasks=train_tasks, eval_tasks=eval_tasks, summarizer=summarizer, lease=lease)


def _load(s: _Session) -> None:
    """The policy (from the last checkpoint when resuming), optimizer, schedule, task stream,
    teacher, reference model and rollout sampler."""
    cfg, method, last = s.cfg, s.method, s.last
    state = load_trainer_state(last) if last is not None else None
    if state is not None:
        check_checkpoint_owner(state, last, s.run)  # before any model loads
    s.model, s.tokenizer, init_path = load_policy(str(last) if last else cfg.policy, s.out, s.device_opt, seed=cfg.seed,
                                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                                  lora_rank=0 if last and cfg.lora_rank else cfg.lora_rank)
    if method.attn_implementation:
        s.model.set_attn_implementation(method.attn_implementation)
    method.check_model(s.model)  # e.g. OISD's layer exists: refused before any rollout
    distributed.shard(s.model)  # FSDP2 under torchrun; before the optimizer sees the parameters
    s.optimizer = make_optimizer(s.model, cfg.lr, cfg.weight_decay)
    s.scheduler = make_scheduler(s.optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    s.stream = TaskStream(s.train_tasks, cfg.seed)
    if state is not None:
        restore_optimizer(s.model, s.optimizer, state)
        s.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        s.stream.position, s.start = state["data_position"], state["step"]
        s.done = s.checkpointed = s.start
        s.echo(f"resuming {s.run} from {last} (step {s.start})")
        if state.get("method_state"):
            method.load_state_dict(state["method_state"])
    s.teacher = (load_teacher(cfg.teacher, s.tokenizer, s.out, s.device_opt, seed=cfg.seed)
                 if "teacher_model" in method.requires else None)
    s.privileged = s.factory.privileged_info if s.factory.provides("privileged_info") else None
    if method.needs_reference:
        s.ref_model, _, _ = load_policy(cfg.policy, s.out, s.device_opt, seed=cfg.seed)
        s.ref_model.requires_grad_(False)
    s.sampler = LocalPolicy(PolicyConfig(path=init_path, temperature=cfg.temperature,
                                         max_new_tokens=cfg.max_new_tokens, max_batch=1 << 20, batch_wait_s=None,
                                         record_topk=method.sampler_topk, rollout_engine=cfg.rollout_engine,
                                         rollout_urls=cfg.rollout_url, rollout_replicas=cfg.rollout_replicas,
                                         rollout_gpus=cfg.rollout_gpus, rollout_gpu_memory=cfg.rollout_gpu_memory,
                                         rollout_log_dir=str(s.out / "rollout-servers"), trained=True),
                            model=s.model, tokenizer=s.tokenizer)
    if state is not None:
        # The servers start from the policy's files, or serve other weights (--rollout-url): a
        # resumed run gives them its checkpoint's before any rollout (a fresh one: ``_step_zero``).
        _sync_weights(s, s.start)
    s.settings = UpdateSettings(ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
                                micro_batch_tokens=cfg.micro_batch_tokens, grad_clip=cfg.grad_clip,
                                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                tis_cap=cfg.effective_tis_cap)
    if s.settings.tis_cap:
        s.echo(f"off-policy correction: pi_old recomputed, truncated importance sampling with cap "
               f"{s.settings.tis_cap:g} (--tis-cap; 0 = off)")


def _sync_weights(s: _Session, step: int) -> float | None:
    """Give a rollout engine with its own copy of the weights (vLLM servers, or vLLM in this
    process) the trainer's current ones, labelled ``step``; the seconds it took (None: the engine
    samples with the trained model itself)."""
    engine = s.sampler.engine
    if not engine.syncs_weights:
        return None
    started = time.perf_counter()
    engine.sync_weights(s.model, step, s.out / "weight-sync")
    return time.perf_counter() - started


def _checkpoint(s: _Session, step: int) -> None:
    model_state, optim_state = distributed.full_state(s.model, s.optimizer)  # gathered to rank 0 (torchrun)
    if s.main:
        path = save_checkpoint(s.ckpt_root, step, s.model, s.tokenizer, s.optimizer, s.scheduler,
                               {"data_position": s.stream.position, "run": s.run,
                                "method_state": s.method.state_dict()},
                               model_state=model_state, optimizer_state=optim_state)
        add_checkpoint(s.store, s.run, step, str(path.resolve()))  # absolute: resume from any working directory
    s.saved = s.ckpt_root / f"step-{step:06d}"
    s.checkpointed = step
    distributed.barrier()


def _checkpoints_at(s: _Session, step: int) -> bool:
    """Whether the run writes a checkpoint at the end of ``step`` (step 0 always: the baseline)."""
    return step == 0 or step % s.cfg.checkpoint_every == 0 or step == s.last_step


def _evaluate(s: _Session, step: int) -> dict[str, float]:
    cfg = s.cfg
    # The evaluation runs before the step's checkpoint is written, so it names the directory that
    # checkpoint takes (absolute, as the checkpoints table records it).
    weights = (str((s.ckpt_root / f"step-{step:06d}").resolve()) if _checkpoints_at(s, step)
               else unsaved_weights(s.run, step))
    options = asdict(env_settings(cfg.env, training_settings(cfg.env, cfg.env_options)))
    fixed = {k: v for k, v in options.items() if not is_volatile(env_class(cfg.env).Options, k)}
    distributed.gather_weights(s.model)
    # rank 0 evaluates; the others wait
    result = evaluate(s.sampler, s.factory, s.eval_tasks, s.store, s.run, step, cfg.eval_split, cfg.eval_temperature,
                      cfg.eval_trials, weights=weights, env_settings=redact_data(fixed),
                      progress=_progress(s)) if s.main else {}
    distributed.release_weights(s.model)
    distributed.barrier()
    return result


def _log(s: _Session, step: int, metrics: dict[str, Any], always_echo: bool = False) -> None:
    if s.main:
        log_train_step(s.store, s.run, step, metrics)
    s.logged = True
    s.tracker.log(step, metrics)
    if metrics and (always_echo or not s.cfg.quiet):
        s.echo(_line(step, metrics))


def _progress(s: _Session) -> Callable[[str], None] | None:
    """Where a long phase reports how far it got: stderr (stdout keeps the step lines), rank 0,
    unless ``--quiet``."""
    if not s.main or s.cfg.quiet:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)


def _step_zero(s: _Session) -> None:
    """A fresh run: warm start, baseline evaluation, step-0 checkpoint."""
    cfg = s.cfg
    metrics: dict[str, Any] = {}
    if cfg.warm_start:
        traces = demonstration_traces(s.factory, s.tokenizer, s.train_tasks, "--warm-start")
        losses = warm_start(s.model, traces, steps=cfg.warm_start, lr=cfg.warm_start_lr,
                            batch_size=cfg.warm_start_batch, seed=cfg.seed, progress=_progress(s),
                            stop=lambda: _stop_requested(s.control))  # no step boundary to wait for
        metrics["sft/loss"] = losses[-1]
        s.echo(f"warm start: {cfg.warm_start} supervised steps, final loss {losses[-1]:.4f}")
    _sync_weights(s, 0)  # the weights the run starts from (warm-started), whatever the servers loaded
    if s.eval_tasks:
        metrics.update(_evaluate(s, 0))
    _log(s, 0, metrics, always_echo=True)
    _checkpoint(s, 0)


def _step(s: _Session, step: int) -> None:
    """One step: rollout (with dynamic sampling), the method's prepare, the update, held-out
    evaluation when due, logging and checkpointing."""
    cfg, method, model = s.cfg, s.method, s.model
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    distributed.gather_weights(model)  # torchrun: full weights on every rank for rollout and prepare
    groups, resampled = _rollout_step(cfg, method, s.sampler, s.factory, s.stream, step, _progress(s))
    t_rollout = time.perf_counter() - t0
    s.sampler.engine.before_update()  # vLLM in this process sleeps: the trainer's passes get its GPU memory
    metrics = _step_group_metrics(groups)
    metrics["groups/resampled"] = float(resampled)
    ctx = MethodContext(model=model, tokenizer=s.tokenizer, temperature=cfg.temperature,
                        micro_batch_tokens=cfg.micro_batch_tokens, max_new_tokens=cfg.max_new_tokens,
                        store=s.store, run=s.run, step=step, factory=s.factory,
                        tasks={t.id: t for t in s.train_tasks}, summarizer=s.summarizer,
                        teacher=s.teacher, privileged=s.privileged)
    t_prepare = time.perf_counter()
    with autocast(device):
        # every rank prepares, also with no groups: a method may use collectives in it
        # (SGCD's normalize_weights averages W over all ranks' tokens)
        prepared = method.prepare(groups, ctx)
    distributed.release_weights(model)
    metrics.update(distributed.merge_metrics(prepared.metrics))
    metrics["time/prepare"] = time.perf_counter() - t_prepare
    if s.main and cfg.log_credit_every and step % cfg.log_credit_every == 0:
        # read before the update, which leaves ``prepared`` as it is (trainers.credit_log)
        record_credit(s.store, s.run, step, groups, prepared, s.tokenizer, cfg.log_credit_groups)
    t1 = time.perf_counter()
    if distributed.all_sum(len(prepared.traces)):  # every rank joins the update if any has traces
        with autocast(device):
            metrics.update(policy_update(model, s.optimizer, prepared, method, s.settings,
                                         pad_token_id=s.tokenizer.pad_token_id, seed=cfg.seed * 1_000_003 + step,
                                         ctx=ctx, ref_model=s.ref_model))
    t_update = time.perf_counter() - t1
    metrics["lr"] = s.scheduler.get_last_lr()[0]
    s.scheduler.step()
    weight_sync = _sync_weights(s, step)  # before the next rollouts (and this step's evaluation)
    if weight_sync is not None:
        metrics["time/weight_sync"] = weight_sync
    sampled = distributed.all_sum(sum(len(e.trace) for g in groups for e in g.episodes if e.trace is not None))
    # the step waits for the slowest rank
    t_rollout, metrics["time/prepare"], t_update = distributed.all_max(t_rollout, metrics["time/prepare"], t_update)
    busy = t_rollout + metrics["time/prepare"] + t_update
    metrics.update({"time/rollout": t_rollout, "time/update": t_update, "tokens/rollout": float(sampled),
                    "perf/tokens_per_s": (sampled + metrics.get("tokens/trained", 0)) / max(busy, 1e-9)})
    if s.eval_tasks and (step % cfg.eval_every == 0 or step == cfg.steps):
        metrics.update(_evaluate(s, step))
    _log(s, step, metrics)
    if _checkpoints_at(s, step):
        _checkpoint(s, step)


def check_settings(cfg: TrainConfig, factory) -> None:
    """Settings that used to be checked only once the run row existed (a ``ConfigError`` there left
    a run that blocked its name): the LR schedule, LoRA's package, the warm start's
    demonstrations, the policy and teacher directories."""
    check_lr_schedule(cfg.lr_schedule)
    check_rollout_engine(cfg.rollout_engine)
    check_rollout_servers(cfg.rollout_engine, cfg.rollout_url, cfg.rollout_replicas, cfg.rollout_gpus,
                          cfg.rollout_gpu_memory)
    if cfg.lora_rank:
        check_lora()
    if cfg.warm_start:
        require_demonstrations(factory, "--warm-start")
    if cfg.policy != TINY_TOY:
        check_model_path(cfg.policy)
    if cfg.teacher and cfg.teacher != TINY_TOY:
        check_model_path(cfg.teacher, "--teacher")


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
            "time/update", "time/weight_sync")
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m and isinstance(m[k], (int, float))]
    return f"step {step:>4}  " + "  ".join(parts)
