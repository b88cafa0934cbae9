"""The policy as its own teacher: live, frozen at the start, re-synced every k steps, or an EMA.

Self-teacher methods (RLSD §2, OPSD / SDPO §6.6 of methods.md) score the student's tokens with
the *same network* reading a privileged prompt. Which weights that network carries is a choice
of each paper:

- ``current``: the live policy (SDPO's formula: the current model with a stop-gradient). No copy.
- ``initial``: the policy as it was at the first training step, frozen for the whole run (OPSD).
- ``sync``: a snapshot re-synced to the policy every ``sync_every`` steps and frozen in between
  (RLSD: every 10 steps). ``sync_every=1`` is the live policy and copies nothing.
- ``ema``: an exponential moving average of the policy, θ_T ← (1 − β)·θ_T + β·θ once per
  training step, starting from the first step's policy (SDPO's official code, lasgroup/SDPO:
  ``teacher_regularization=ema``, ``teacher_update_rate`` β = 0.05). The average is taken when
  the next step begins, before its teacher scores, with the weights the previous step's update
  left: the same sequence of teachers as averaging right after each update. It is kept in the
  parameters' own dtype (as the reference does with its parameters).

How the snapshot is kept: only the *trainable* parameters are copied (frozen ones never change:
with LoRA that is the whole base model, so the snapshot costs the adapters only), as detached
clones on the parameters' own device. The teacher forward runs the live module with those
tensors substituted through ``torch.func.functional_call``, so there is no second model object
and the live parameters are never written. The substituted tensors are not leaves that require
grad, so autocast's per-region weight cache (keyed on parameters) never serves a cast of the
live weights to the teacher or the reverse.

The snapshot and the step it was taken at go through ``state_dict`` / ``load_state_dict`` (the
method's state in checkpoints), so ``--resume`` continues with the very same teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

from harness.errors import ConfigError

__all__ = ["TEACHER_MODES", "PolicySnapshot"]

TEACHER_MODES = ("current", "initial", "sync", "ema")


class _SnapshotView(torch.nn.Module):
    """The live module, called with the snapshot's tensors in place of its trainable parameters."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = model
        self._snapshot = params
        self.training = model.training  # eval()/train() callers restore this, so mirror the live mode

    @property
    def config(self) -> Any:
        """The live model's config (the teacher passes read its attention implementation)."""
        return getattr(self.inner, "config", None)

    @property
    def caches_prefix(self) -> bool:
        """Continues from a KV cache exactly when the live module does (``trainers.teacher``)."""
        from trainers.teacher import caches_a_prefix
        return caches_a_prefix(self.inner)

    def get_output_embeddings(self) -> Any:
        """The live model's head module: ``trainers.lm_head`` reads its weight while this view's
        forward runs, so it sees the snapshot's weight, as the forward does."""
        get = getattr(self.inner, "get_output_embeddings", None)
        return get() if get is not None else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self._snapshot, args, kwargs, strict=False, tie_weights=True)


class PolicySnapshot:
    """Which weights the self-teacher runs with at a given training step (see the module docstring)."""

    def __init__(self, mode: str, sync_every: int = 1, rate: float = 0.05):
        if mode not in TEACHER_MODES:
            raise ConfigError(f"unknown teacher '{mode}'. Known: {', '.join(TEACHER_MODES)}")
        if sync_every < 1:
            raise ConfigError("sync_every must be >= 1 (1 = the live policy)")
        if not 0 < rate <= 1:
            raise ConfigError(f"the EMA teacher's rate must be in (0, 1], got {rate}")
        self.mode = mode
        self.sync_every = sync_every
        self.rate = rate
        self.params: dict[str, torch.Tensor] | None = None
        self.synced_at: int | None = None

    @property
    def live(self) -> bool:
        """The teacher is the current policy itself (nothing is copied)."""
        return self.mode == "current" or (self.mode == "sync" and self.sync_every == 1)

    def due(self, step: int) -> bool:
        """Whether the snapshot must be (re)taken before scoring at ``step``."""
        if self.live:
            return False
        if self.params is None or self.synced_at is None:
            return True
        if self.mode == "ema":
            return step > self.synced_at  # once per step
        return self.mode == "sync" and step - self.synced_at >= self.sync_every

    @torch.no_grad()
    def sync(self, model: torch.nn.Module, step: int) -> None:
        """Copy the policy's trainable parameters now (``ema``: after the first, average them in at
        the rate); they stay fixed until the next sync."""
        if _is_sharded(model):
            # FSDP2 puts its own (un)sharded tensors back on the modules around every forward, which
            # would silently replace the substituted snapshot: refuse rather than run the wrong teacher
            raise ConfigError("a frozen or synced self-teacher is not supported on a sharded (torchrun/FSDP) "
                              "model yet; use the live policy as teacher (teacher=current, or sync_every=1)")
        if self.mode == "ema" and self.params is not None:
            self._check_names(model)
            for name, p in _trainable(model):
                self.params[name] = self.params[name].to(device=p.device, dtype=p.dtype).lerp_(p.detach(), self.rate)
        else:
            self.params = {name: p.detach().clone() for name, p in _trainable(model)}
        self.synced_at = int(step)

    def refresh(self, model: torch.nn.Module, step: int) -> None:
        """Take the snapshot if it is due. Methods call this at every step, teacher needed or not,
        so syncs fall on a fixed grid (steps 1, 1 + k, 1 + 2k ...) and ``initial`` is the policy of
        the first step even when that step had nothing to distil."""
        if self.due(step):
            self.sync(model, step)

    def teacher(self, model: torch.nn.Module, step: int) -> torch.nn.Module:
        """A module to score with at ``step`` (no-grad use only): ``model`` itself when the teacher
        is live, else ``model`` running on the snapshot's weights (taken first if due)."""
        if self.live:
            return model
        self.refresh(model, step)
        assert self.params is not None
        live = self._check_names(model)
        for name, p in live.items():  # a checkpoint loads on CPU; move once to where the policy lives
            snap = self.params[name]
            if snap.device != p.device or snap.dtype != p.dtype:
                self.params[name] = snap.to(device=p.device, dtype=p.dtype)
        return _SnapshotView(model, self.params)

    def _check_names(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        live = dict(_trainable(model))
        if self.params is not None and set(live) != set(self.params):
            raise ConfigError("the teacher snapshot does not match the policy's trainable parameters (was the "
                              "run resumed with a different model or LoRA setting?)")
        return live

    def state_dict(self) -> dict[str, Any]:
        params = None if self.params is None else {n: t.detach().cpu().clone() for n, t in self.params.items()}
        return {"mode": self.mode, "sync_every": self.sync_every, "rate": self.rate, "synced_at": self.synced_at,
                "params": params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("mode") != self.mode or state.get("sync_every") != self.sync_every:
            raise ConfigError(f"the checkpoint's teacher ({state.get('mode')}, sync_every={state.get('sync_every')}) "
                              f"differs from this run's ({self.mode}, sync_every={self.sync_every})")
        if self.mode == "ema" and state.get("rate") != self.rate:
            raise ConfigError(f"the checkpoint's EMA teacher has rate {state.get('rate')} and this run {self.rate}; "
                              f"resume with --method-arg ema_rate={state.get('rate')}")
        self.params = None if state.get("params") is None else dict(state["params"])
        self.synced_at = state.get("synced_at")


def _is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model either
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
