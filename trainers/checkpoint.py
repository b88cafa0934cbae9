"""Checkpoints that resume exactly: model, tokenizer, optimizer, LR schedule, RNG states, data
position and step, written atomically.

Layout: ``<run dir>/checkpoints/step-000040/`` holds the model (``save_pretrained``, so the
directory is itself a loadable policy: ``harness eval --policy <dir>``) and ``trainer_state.pt``.
Under torchrun (``trainers.distributed``) rank 0 writes the gathered full model and optimizer
state, the optimizer's keyed by parameter name (``optimizer_format: by_name``);
``restore_optimizer`` loads either layout at any world size.
A checkpoint is written to ``step-000040.tmp`` and renamed when complete, then recorded in the
run's ``checkpoints`` rows; ``--resume`` reads those rows (``recorded_checkpoint``), so a run
killed while saving never resumes from a half checkpoint, and a directory another run (or a hand)
put there is never taken for the run's own. The trainer state names its run (``run``), checked on
resume before anything loads.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError

__all__ = ["save_checkpoint", "CheckpointWriteError", "recorded_checkpoint", "load_trainer_state",
           "restore_optimizer", "rng_state", "set_rng_state"]

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
                    scheduler: Any, extra: dict[str, Any], *, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` and return its directory. ``model_state`` /
    ``optimizer_state``: full state dicts gathered from a sharded model (``distributed.full_state``)
    to write instead of ``model``'s and ``optimizer``'s own."""
    final = Path(root) / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, **({"state_dict": model_state} if model_state is not None else {}))
        tokenizer.save_pretrained(tmp)
        optim = ({"optimizer": optimizer.state_dict()} if optimizer_state is None
                 else {"optimizer": optimizer_state, "optimizer_format": "by_name"})
        torch.save({"step": step, **optim,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), **extra}, tmp / STATE_FILE)
    except Exception as exc:  # torch and safetensors report a failed write as their own errors
        # A half-written step-N.tmp is never resumed from, but left behind it would hold the
        # space that the next attempt needs.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} to {tmp.parent}: {_write_failure(exc, tmp.parent)}; the run's "
            "earlier checkpoints are intact: free space and resume with --resume") from exc
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


class CheckpointWriteError(HarnessError):
    """A checkpoint could not be written (full disk, quota, permissions): the run fails with the
    cause in one line; resuming continues from the newest complete checkpoint."""

    exit_code = 1


def _write_failure(exc: BaseException, where: Path) -> str:
    """The cause in words: the OS error when there is one (torch and safetensors wrap it)."""
    code = next((err.errno for err in (exc, exc.__cause__, exc.__context__)
                 if isinstance(err, OSError) and err.errno is not None), None)
    if code is None:  # safetensors (Rust) and torch put the OS error in their message
        found = re.search(r"(?:os error|errno)\s*(\d+)", str(exc), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    if code is not None:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < 64 * 1024 * 1024:
        return f"no space left on the device ({free // 1024} KiB free; {' '.join(str(exc).split())[:200]})"
    return " ".join(str(exc).split())[:300]


def recorded_checkpoint(rows: list[tuple[int, str]], run_dir: Path, run: str) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest of the run's own ``checkpoints`` rows
    (``rows``: (step, path) in step order), never whatever else lies in the directory. A recorded
    path that no longer exists is looked for under ``run_dir/checkpoints`` by its name (the run
    directory moved, or a relative path from another working directory); one found in neither
    place is refused rather than silently replaced by a fresh start. None: no checkpoint yet."""
    from harness.errors import ConfigError

    if not rows:
        return None
    step, recorded = rows[-1]
    for path in (Path(recorded), Path(run_dir) / "checkpoints" / Path(recorded).name):
        if (path / STATE_FILE).is_file():
            return path
    raise ConfigError(f"run '{run}': its last checkpoint (step {step}, recorded at {recorded}) is missing, also "
                      f"under {Path(run_dir) / 'checkpoints'}; restore it, or pass the --out-dir that holds it")


def load_trainer_state(path: Path) -> dict[str, Any]:
    # Our own file (optimizer tensors, numpy RNG state, plain dicts): not a weights_only payload.
    from trainers import distributed

    # Under torchrun every rank reads the full optimizer state: memory-mapped, the ranks share one
    # copy in the page cache instead of holding N copies in RAM.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False, mmap=distributed.enabled())


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state. A single-process checkpoint into a single process:
    ``load_state_dict`` as always. Otherwise (a name-keyed state from a torchrun run, or any state
    into a sharded model) through ``set_optimizer_state_dict`` with the full state, which shards
    it for this world size: resume does not need the world size the checkpoint was written at."""
    from trainers import distributed

    saved = state["optimizer"]
    if state.get("optimizer_format", "by_index") == "by_index":
        if not distributed.enabled():
            optimizer.load_state_dict(saved)
            return
        # make_optimizer's order: the trainable parameters in model.parameters() order
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        saved = {"state": {names[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
