"""Checkpoints that resume exactly: model, tokenizer, optimizer, LR schedule, RNG states, data
position and step, written atomically.

Layout: ``<run dir>/checkpoints/step-000040/`` holds the model (``save_pretrained``, so the
directory is itself a loadable policy: ``harness eval --policy <dir>``) and ``trainer_state.pt``.
A checkpoint is written to ``step-000040.tmp`` and renamed when complete, so a run killed while
saving never leaves a half checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_trainer_state", "rng_state", "set_rng_state"]

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` under ``root`` and return its directory."""
    final = Path(root) / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(), **extra}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``.tmp`` leftovers are ignored)."""
    done = sorted(p for p in Path(root).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE_FILE).exists())
    return done[-1] if done else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    # Our own file (optimizer tensors, numpy RNG state, plain dicts): not a weights_only payload.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
