"""``TrainConfig``: every setting of ``harness train``, one field each, documented here once.

The CLI maps its options onto this dataclass; the resolved config (method settings included) is
stored on the run, and ``--resume`` refuses a config that differs in anything but ``steps`` (so a
run can be extended) and the transport-like fields listed in ``RESUMABLE_CHANGES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pathlib import Path

__all__ = ["TrainConfig", "RESUMABLE_CHANGES", "default_run_dir"]

# micro_batch_tokens and gradient_checkpointing change memory, not the math (aggregation is exact
# under micro-batching), so a run that ran out of memory can resume with smaller micro-batches.
RESUMABLE_CHANGES = ("steps", "resume", "stop_after", "quiet", "tracker", "db", "out_dir", "eval_every", "checkpoint_every",
                     "summarizer_api_base", "micro_batch_tokens", "gradient_checkpointing")




def default_run_dir(run: str) -> Path:
    """Checkpoints and plots of a run when ``--out-dir`` is not given (eval-point runs contain a
    ``/``, which is not a directory here)."""
    return Path("results") / "runs" / run.replace("/", "_")


@dataclass
class TrainConfig:
    env: str
    policy: str
    """HF model id or local directory to start from (``tiny-toy`` builds the tiny test model)."""
    method: str = "grpo"
    method_overrides: dict[str, Any] = field(default_factory=dict)
    """Settings given explicitly on the command line (``--loss-agg`` ...), applied over the preset."""
    run: str | None = None
    db: str = "sqlite:///results/harness.db"
    out_dir: str | None = None
    """Where checkpoints and plots go; default ``results/runs/<run>``."""
    seed: int = 0
    steps: int = 20
    tasks_per_step: int = 8
    group_size: int = 8
    train_split: str = "train"
    eval_split: str | None = None
    """Held-out split; default ``test`` (``dev`` for appworld, whose test splits are for reporting)."""
    eval_every: int = 10
    """Evaluate (greedy, one trial per task) every N steps, at step 0 and at the end; 0 = never."""
    eval_tasks: int | None = None
    """Evaluate on the first N tasks of the split only (default: all)."""
    eval_temperature: float = 0.0
    """0 = greedy (one deterministic answer per task); > 0 measures the sampling policy's success
    rate, with ``eval_trials`` samples per task drawn from seeds that do not change with the step."""
    eval_trials: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 128
    lr: float = 1e-6
    lr_schedule: str = "constant"
    """``constant`` | ``cosine`` | ``linear`` (decay to 0 at ``steps``), after ``warmup_steps``."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 4096
    warm_start: int = 0
    """Supervised steps on the env's demonstrations (train split) before RL; 0 = none."""
    warm_start_lr: float = 1e-3
    """Supervised learning rate (rounds of 200 steps, fresh AdamW each; see ``sft.warm_start``)."""
    warm_start_batch: int = 16
    checkpoint_every: int = 10
    resume: bool = False
    stop_after: int | None = None
    """Leave after this many steps in this invocation (with a checkpoint), e.g. to fit a job's
    time limit; ``--resume`` continues. The run's schedule still spans ``steps``."""
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    device: str = "auto"
    tracker: str = "none"
    """``none`` | ``tensorboard`` | ``wandb`` (the database always gets every metric)."""
    quiet: bool = False
    env_options: dict[str, Any] = field(default_factory=dict)
    """The env's own settings (fields of its ``EnvFactory.Options``: τ user simulator, data
    version, AppWorld servers ...) as given; plain values, so they can be stored and compared on
    resume (fields the env marks ``volatile`` may change)."""
    teacher: str | None = None
    """Separate teacher model (HF id or directory) for methods that need one (rlad, opd, grpo_kl);
    it must share the policy's tokenizer."""
    summarizer: str = "diff"
    """SGCD's credit-reference writer: ``diff`` (built-in, structural, no LLM) or a litellm model."""
    summarizer_api_base: str | None = None
    """OpenAI-compatible endpoint for the summarizer model (vLLM, a proxy)."""

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the stored one."""
        from envs.registry import env_class
        from harness.options import is_volatile

        options = env_class(self.env).Options
        out = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}
        out["env_options"] = {k: v for k, v in self.env_options.items() if not is_volatile(options, k)}
        return out

    def __post_init__(self) -> None:
        if self.eval_split is None:  # the env's held-out split (left open for an env not registered)
            from envs.registry import env_names

            if self.env in env_names():
                from envs.registry import env_class

                self.eval_split = env_class(self.env).heldout_split
