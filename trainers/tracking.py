"""Optional experiment trackers (``--tracker tensorboard|wandb``). The database always gets every
metric; a tracker is a mirror for people who live in those tools. A missing package is a clear
error before the run starts."""

from __future__ import annotations

from typing import Any

from harness.errors import ConfigError
from harness.redact import redact_data

__all__ = ["make_tracker", "check_tracker"]


class _NoTracker:
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tracker tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(logdir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run: str | None = None, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--tracker wandb needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        self.run = wandb.init(name=run, config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_tracker(name: str) -> None:
    """Fail now (before a run is created) when the tracker is unknown or its package is missing."""
    if name == "none":
        return
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("--tracker tensorboard needs the tensorboard package: pip install tensorboard") from None
        return
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--tracker wandb needs the wandb package: pip install wandb") from None
        return
    raise ConfigError(f"unknown --tracker '{name}'. Known: none, tensorboard, wandb")


def make_tracker(name: str, logdir: str = "results/tensorboard", run: str | None = None, config: dict | None = None):
    """The tracker for a run: tensorboard event files under ``logdir`` (the run's directory),
    or a wandb run named after the harness run (wandb's own settings, e.g. WANDB_PROJECT and
    WANDB_MODE=offline, apply)."""
    if name == "none":
        return _NoTracker()
    if name == "tensorboard":
        return _TensorBoard(logdir)
    if name == "wandb":
        return _WandB(run, redact_data(config))  # wandb uploads it: no --db password, no credentialed URL
    raise ConfigError(f"unknown --tracker '{name}'. Known: none, tensorboard, wandb")
