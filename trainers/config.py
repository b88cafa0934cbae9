"""``TrainConfig``: every setting of ``harness train``, one field each, documented here once.

The CLI maps its options onto this dataclass; the resolved config (method settings included) is
stored on the run, and ``--resume`` refuses a config that differs in anything but ``steps`` (so a
run can be extended) and the transport-like fields listed in ``RESUMABLE_CHANGES``.
"""

from __future__ import annotations

import math
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.defaults import DB_URL, RESULTS_DIR
from harness.errors import ConfigError
from harness.options import option

__all__ = ["TrainConfig", "RESUMABLE_CHANGES", "DEFAULT_TIS_CAP", "default_run_dir", "run_dir_name"]

# micro_batch_tokens and gradient_checkpointing change memory, not the math (aggregation is exact
# under micro-batching), so a run that ran out of memory can resume with smaller micro-batches.
# Credit recording only reads what the update uses (trainers.credit_log). The rollout engine
# changes where samples are drawn, not the objective (hf: mu = pi_old; otherwise TIS recomputes pi_old), and
# runs started before engines existed stored none; so do the servers it samples from. ``tis_cap`` is
# not listed: an explicit cap is part of the objective; left at its default (None, stored so) it
# follows the engine.
RESUMABLE_CHANGES = ("steps", "resume", "stop_after", "quiet", "tracker", "db", "out_dir", "eval_every",
                     "checkpoint_every", "summarizer_api_base", "micro_batch_tokens", "gradient_checkpointing",
                     "log_credit_every", "log_credit_groups", "rollout_engine", "rollout_url", "rollout_replicas",
                     "rollout_gpus", "rollout_gpu_memory")

DEFAULT_TIS_CAP = 2.0
"""The truncated-importance-sampling cap C with ``--rollout-engine vllm`` when ``--tis-cap`` is not
given (verl's ``tis_imp_ratio_cap`` examples use 2; docs/rollout-engines.md)."""

_PLAIN = frozenset(string.ascii_letters + string.digits + "-_.")
_MAX_COMPONENT = 255  # bytes in one path component on common filesystems


def run_dir_name(run: str) -> str:
    """The directory name of run ``run``: ASCII letters, digits, ``-``, ``_`` and ``.`` stay as
    they are, every other character (``%`` and ``/`` included) becomes ``%XX`` per UTF-8 byte, and
    the names ``.`` and ``..`` are escaped whole. Percent-decoding gives the name back, so two run
    names never share a directory (``col/x`` -> ``col%2Fx``, ``col_x`` -> ``col_x``)."""
    if not run:
        raise ConfigError("a run name cannot be empty")
    if run in (".", ".."):
        return "%2E" * len(run)
    name = "".join(c if c in _PLAIN else "".join(f"%{b:02X}" for b in c.encode()) for c in run)
    if len(name) > _MAX_COMPONENT:
        raise ConfigError(f"run name '{run[:40]}...' is too long for a directory name; pass --out-dir DIR")
    return name


def default_run_dir(run: str) -> Path:
    """Checkpoints and plots of a run when ``--out-dir`` is not given: ``results/runs/<name>`` with
    the name escaped by ``run_dir_name`` (one directory per run name, whatever it contains)."""
    return Path(RESULTS_DIR) / "runs" / run_dir_name(run)


@dataclass
class TrainConfig:
    """Every setting of ``harness train`` (the command's options are generated from these fields)."""

    env: str = option(flags=("--env",))
    """Registered env: toy, tau-airline, appworld, ..."""
    policy: str = option(flags=("--policy",))
    """HF model id or local directory to train; ``tiny-toy`` builds a tiny from-scratch model."""
    method: str = "grpo"
    """Training method; ``harness methods list`` shows them all and their settings."""
    method_overrides: dict[str, Any] = option(default_factory=dict, cli=False)
    """Method settings given explicitly (``--method-arg key=value``, ``--clip-high`` ...), over its defaults."""
    teacher: str | None = None
    """Separate teacher model (HF id or directory, same tokenizer as the policy) for methods that
    need one (rlad, opd, grpo_kl)."""
    run: str | None = option(None, flags=("--run", "--run-name"))
    """Run name (default train-<env>-<method>-<time>); under torchrun spell it --run-name (torchrun
    reads --run as its own --run-path)."""
    resume: bool = False
    """Continue run --run from its latest checkpoint."""
    stop_after: int | None = option(None, minimum=1)
    """Leave after this many steps in this invocation (with a checkpoint), e.g. to fit a job's
    time limit; ``--resume`` continues. The run's schedule still spans ``steps``."""
    db: str = DB_URL
    """SQLAlchemy URL of the results database."""
    out_dir: str | None = None
    """Checkpoints and plots (default results/runs/<run>, characters other than letters, digits,
    ``-``, ``_`` and ``.`` written as ``%XX``)."""
    steps: int = option(20, minimum=1)
    """Policy-update steps."""
    tasks_per_step: int = option(8, minimum=1)
    """Training tasks per step."""
    group_size: int = option(8, minimum=2)
    """Sibling episodes per task (G)."""
    seed: int = 0
    """Seeds the task stream, the rollouts and the initial weights of a built policy."""
    train_split: str = "train"
    """The split the task stream draws from."""
    eval_split: str | None = None
    """Held-out split; default: the env's (test; dev for appworld, whose test splits are for reporting)."""
    eval_every: int = option(10, minimum=0)
    """Evaluate every N steps, at step 0 and at the end; 0 = never."""
    eval_tasks: int | None = option(None, minimum=1)
    """Evaluate on the first N tasks of the held-out split only (default: all)."""
    eval_temperature: float = option(0.0, minimum=0)
    """0 = greedy (one deterministic answer per task); > 0 measures the sampling policy's success
    rate, with ``eval_trials`` samples per task drawn from seeds that do not change with the step."""
    eval_trials: int = option(1, minimum=1)
    """Samples per held-out task (fixed seeds)."""
    temperature: float = 1.0
    """Rollout sampling temperature (> 0: siblings must differ)."""
    max_new_tokens: int = option(128, minimum=1)
    """Tokens per agent turn (the default suits a 7B model; the toy's turns need ~40)."""
    lr: float = option(1e-6, minimum=0)
    """Learning rate (the default suits a 7B model; the toy needs ~5e-4)."""
    lr_schedule: str = "constant"
    """``constant`` | ``cosine`` | ``linear`` (decay to 0 at ``steps``), after ``warmup_steps``."""
    warmup_steps: int = option(0, minimum=0)
    """Linear learning-rate warm-up steps."""
    weight_decay: float = option(0.0, minimum=0)
    """AdamW weight decay."""
    grad_clip: float = option(1.0, minimum=0)
    """Clip the gradient's global norm to this (0 = no clipping)."""
    ppo_epochs: int = option(1, minimum=1)
    """Passes over each step's batch."""
    mini_batches: int = option(1, minimum=1)
    """Optimizer steps per epoch."""
    micro_batch_tokens: int = option(4096, minimum=2)
    """Token budget of one packed micro-batch (memory, not math: aggregation is exact)."""
    warm_start: int = option(0, minimum=0)
    """Supervised steps on the env's demonstrations (train split) before RL; 0 = none."""
    warm_start_lr: float = option(1e-3, minimum=0)
    """Supervised learning rate (rounds of 200 steps, fresh AdamW each; see ``sft.warm_start``)."""
    warm_start_batch: int = option(16, minimum=1)
    """Demonstrations per supervised step."""
    checkpoint_every: int = option(10, minimum=1)
    """Save a checkpoint every N steps (and at the end)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    lora_rank: int = option(0, minimum=0)
    """Train LoRA adapters of this rank (needs peft); 0 = full fine-tuning."""
    device: str = "auto"
    """auto | cpu | cuda[:N]."""
    rollout_engine: str = "hf"
    """What samples the rollouts and held-out evaluations: ``hf`` (the batched KV-cache sampler over
    the trained model) or ``vllm`` (vLLM servers, synced after every step; docs/rollout-engines.md)."""
    tis_cap: float | None = None
    """Truncated importance sampling between the rollout engine's sampling log-probs μ and the
    trainer's recomputed π_old: each sampled token's policy-gradient term is weighted by
    min(π_old/μ, C). C > 1, or 0 = off; default: 2 with ``--rollout-engine vllm``, off with ``hf``
    (where μ = π_old). Stored as given, so a run left at the default follows its engine on resume."""
    rollout_url: list[str] | None = option(None, flags=("--rollout-url",))
    """vllm: a running vLLM server (repeatable), started with VLLM_SERVER_DEV_MODE=1 and
    --logprobs-mode processed_logprobs; its weights are replaced by the trainer's."""
    rollout_replicas: int = option(0, minimum=0)
    """vllm: start this many `vllm serve` replicas (default: one per --rollout-gpus GPU)."""
    rollout_gpus: str | None = None
    """vllm: GPU ids the started replicas share out equally, e.g. 1,2,3 (keep the trainer's GPU out)."""
    rollout_gpu_memory: float | None = None
    """vllm: the fraction of a GPU's memory vLLM takes: started replicas' --gpu-memory-utilization
    (default vLLM's 0.9), or, with no servers named, vLLM in the training process (default 0.5)."""
    tracker: str = "none"
    """``none`` | ``tensorboard`` | ``wandb`` (the database always gets every metric)."""
    quiet: bool = False
    """No per-step lines."""
    log_credit_every: int = option(0, minimum=0)
    """Record the per-token credit of a few groups every N steps (``token_credit`` table, for
    ``harness view``); 0 = off."""
    log_credit_groups: int = option(2, minimum=1)
    """Groups recorded per recorded step (every sibling of each)."""
    env_options: dict[str, Any] = option(default_factory=dict, cli=False)
    """The env's own settings (fields of its ``EnvFactory.Options``: τ user simulator, data
    version, AppWorld servers ...) as given; plain values, so they can be stored and compared on
    resume (fields the env marks ``volatile`` may change)."""
    summarizer: str = "diff"
    """SGCD credit-reference writer: diff (built-in, no LLM) or a litellm model."""
    summarizer_api_base: str | None = None
    """OpenAI-compatible endpoint of the summarizer model (vLLM, a proxy)."""

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the stored one."""
        from envs.registry import env_class
        from harness.options import is_volatile

        options = env_class(self.env).Options
        out = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}
        out["env_options"] = {k: v for k, v in self.env_options.items() if not is_volatile(options, k)}
        return out

    @property
    def effective_tis_cap(self) -> float:
        """The TIS cap this run trains with (0 = off): ``tis_cap`` when given, else the engine's default."""
        if self.tis_cap is not None:
            return float(self.tis_cap)
        return DEFAULT_TIS_CAP if self.rollout_engine == "vllm" else 0.0

    def __post_init__(self) -> None:
        # checked here, where `harness train` and `train-suite` build the config: before anything runs
        if self.tis_cap is not None and not math.isfinite(self.tis_cap):
            raise ConfigError(f"--tis-cap must be a finite number, got {self.tis_cap}")
        if self.tis_cap is not None and not (self.tis_cap == 0 or self.tis_cap > 1):
            raise ConfigError(f"--tis-cap must be 0 (off) or a number greater than 1 (the cap C of the importance "
                              f"weight min(pi_old/mu, C)), got {self.tis_cap:g}")
        if self.eval_split is None:  # the env's held-out split (left open for an env not registered)
            from envs.registry import env_names

            if self.env in env_names():
                from envs.registry import env_class

                self.eval_split = env_class(self.env).heldout_split
