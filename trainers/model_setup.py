"""Load the policy to train and build its optimizer and LR schedule.

- ``tiny-toy`` as ``--policy`` builds the tiny from-scratch model of ``harness.policy.tiny_model``
  (no model hub needed; this is what CI and the README's first command train).
- Weights stay float32 (master weights); on CUDA the forward passes run under bf16 autocast.
- ``--lora-rank R`` wraps the model with peft LoRA adapters on every linear layer (needs
  ``pip install peft``); ``--gradient-checkpointing`` trades compute for activation memory.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError
from harness.policy.local_policy import load_model_and_tokenizer

__all__ = ["load_policy", "load_teacher", "check_same_tokenizer", "check_lora", "check_lr_schedule", "make_optimizer",
           "make_scheduler", "autocast", "TINY_TOY", "LR_SCHEDULES"]

TINY_TOY = "tiny-toy"
LR_SCHEDULES = ("constant", "cosine", "linear")


def load_policy(path: str, out_dir: Path, device: str, *, seed: int, gradient_checkpointing: bool = False,
                lora_rank: int = 0):
    """(model, tokenizer, resolved path). ``tiny-toy`` is built once under ``out_dir/init``."""
    if path == TINY_TOY:
        from envs.toy.policy import build_toy_policy
        from trainers import distributed

        target = out_dir / "init-tiny-toy"
        with distributed.main_first():  # torchrun: rank 0 builds it, the other ranks then read it
            if not (target / "config.json").exists():
                build_toy_policy(target, seed=seed)
        path = str(target.resolve())  # absolute: LoRA adapters record it as their base model
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype="float32", trainable=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = True  # generation still uses the KV cache
    if lora_rank:
        check_lora()
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, tokenizer, path


def check_same_tokenizer(student: Any, teacher: Any, teacher_path: str) -> None:
    """A teacher scores the student's token ids, so both must map ids to the same strings. Raises a
    ConfigError naming the first difference (vocabulary size, a token, or a special token)."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        if len(sv) != len(tv):
            what = f"vocabulary sizes differ ({len(sv)} vs {len(tv)})"
        else:
            token = next(t for t in sorted(set(sv) ^ set(tv)) or sorted(k for k in sv if sv[k] != tv.get(k)))
            what = f"token {token!r} has id {sv.get(token)} for the policy and {tv.get(token)} for the teacher"
        raise ConfigError(f"--teacher {teacher_path} does not share the policy's tokenizer: {what}. "
                          "A teacher scores the policy's token ids, so it must use the same tokenizer")
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            raise ConfigError(f"--teacher {teacher_path} does not share the policy's tokenizer: {name} is "
                              f"{getattr(student, name, None)!r} for the policy and "
                              f"{getattr(teacher, name, None)!r} for the teacher")



def load_teacher(path: str, student_tokenizer: Any, out_dir: Path, device: str, *, seed: int):
    """A frozen teacher model (eval mode, no grad) that shares the student's tokenizer."""
    model, tokenizer, _ = load_policy(path, out_dir, device, seed=seed)
    check_same_tokenizer(student_tokenizer, tokenizer, path)
    model.requires_grad_(False)
    model.eval()
    return model


def autocast(device: torch.device):
    """bf16 autocast on CUDA (float32 master weights); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def check_lora() -> None:
    """``--lora-rank`` needs peft: refused before any row or model (``ConfigError``)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("--lora-rank needs peft: pip install peft (or pip install -e '.[lora]')") from None


def check_lr_schedule(schedule: str) -> None:
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown --lr-schedule '{schedule}'. Known: {', '.join(LR_SCHEDULES)}")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int):
    check_lr_schedule(schedule)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

