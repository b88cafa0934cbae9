"""The method contract: one base class, every hook with its default and what it is for.

A method turns sibling groups into a batch (``prepare``) and a micro-batch into its share of the
loss (``loss``); rollout, packing, update, checkpointing and logging are shared. Everything else
is an optional hook the training loop reads, listed here once. A new method is one file that
subclasses ``Method`` (or ``GRPOMethod``, for credit methods on the GRPO pipeline) with a settings
dataclass composed from ``trainers.method_settings`` blocks, and one ``register_method`` line.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from harness.types import Group

__all__ = ["Method"]


class Method:
    """Base of every training method (the defaults describe a method that needs nothing extra)."""

    name: str = ""
    """Registered name (``grpo``, ``sgcd`` ...)."""
    description: str = ""
    """One line for ``harness methods list``."""
    paper: str = ""
    """arXiv id of the source."""
    code: str = ""
    """The official code (``owner/repo`` on GitHub), or what is known of it ("none found", "none
    public: announced as ..."). Every built-in method records it; empty (a plugin that does not)
    prints "not recorded yet"."""
    sources: dict[str, str] = {}
    """Where each default comes from, for ``harness methods list``: setting name (or a group,
    ``"a, b"``) -> its source (``paper §3 (value)``, ``official code: file (name=value)``, ``ours:
    why``; ``differs: ...`` where the default departs from its source). Every default setting is
    named (tests/test_train_suite.py checks the built-in methods); ``family_sources``
    (``trainers.method_settings``) adds one entry for the shared block fields kept at the GRPO
    family's value. One class serving several names makes these properties of the name."""
    requires: tuple[str, ...] = ()
    """What the run must provide (``trainers.methods.REQUIREMENTS``: ``teacher_model``,
    ``privileged_info``, ``summarizer``), checked before any model loads or episode runs."""
    sampler_topk: int = 0
    """Top-K of the sampling distribution the rollout must record (SGCD compares it with a teacher)."""
    uses_summarizer: bool = False
    """Build a credit-reference summarizer for ``MethodContext.summarizer`` (SGCD)."""
    forward_options: dict[str, Any] = {}
    """Extra keyword arguments of the training forward (e.g. ``output_hidden_states``)."""
    full_logits: bool = False
    """The loss reads ``outputs.logits`` over the whole packed row (the model's own outputs), so the
    training forward runs the LM head at every position. Off (the default), the head runs only at
    the rows that carry loss (``trainers.lm_head``): ``loss`` gets ``logp`` there and a
    ``PolicyOutputs`` whose ``head`` gives log-probs of other ids / logits at those rows."""
    whole_groups: bool = False
    """Keep each sibling group inside one mini-batch when ``--mini-batches`` > 1 (a per-token
    transform that reads siblings: TGC's weight exchange, RLCSD's contrast). Needs ``Prepared.groups``."""
    needs_prepass: bool = False
    """Call ``begin_minibatch`` with no-grad log-probs of every micro-batch before its loss."""
    attn_implementation: str | None = None
    """Attention implementation the policy must run (e.g. ``eager`` to return attention maps)."""

    def __init__(self, name: str, settings: Any):
        self.name = name
        self.cfg = settings
        self.settings: dict[str, Any] = asdict(settings)
        """The resolved settings, stored on the run."""

    # -- what the loop reads ------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        """Load a frozen reference model (for a KL-to-reference penalty)."""
        return False

    @property
    def resample_rounds(self) -> int:
        """Extra rollout rounds per step while too few groups are trainable (0 = none)."""
        return 0

    def keeps(self, group: Group) -> bool:
        """Whether a group trains under dynamic sampling."""
        return True

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a policy the method cannot train (called once, after loading, before rollouts)."""

    def prepare(self, groups: list[Group], ctx: Any) -> Any:
        """``Prepared``: which traces train, with what token-level advantages and extra per-token
        fields. Called on every rank every step (also with no groups): it may use collectives."""
        raise NotImplementedError

    def loss(self, mb: Any, logp: torch.Tensor, norm: Any, ctx: Any, ref_logp: torch.Tensor | None = None,
             outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """This micro-batch's share of the batch loss (``trainers.losses`` has the shared pieces)."""
        raise NotImplementedError

    def loss_constant(self, max_new_tokens: int) -> float | None:
        """A constant loss normaliser (Dr.GRPO's generation budget), or None."""
        return None

    def begin_minibatch(self, packed: Any, logps: list[torch.Tensor], ctx: Any) -> None:
        """Called once per mini-batch when ``needs_prepass`` (the policy does not change inside one)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (e.g. a teacher snapshot); empty for stateless methods."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` on ``--resume``."""
