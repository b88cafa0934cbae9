"""The GRPO family as presets of one method: GRPO, Dr.GRPO, DAPO and RLOO.

All four share rollout, group-relative advantages (``trainers.advantages``) and the clipped
surrogate (``trainers.losses``); they differ only in settings (methods.md §6):

| preset  | advantage            | aggregation              | clip (low, high) | dynamic sampling |
|---------|----------------------|--------------------------|------------------|------------------|
| grpo    | (r - mean) / std     | seq-mean-token-mean      | 0.2, 0.2         | off              |
| dr_grpo | r - mean             | seq-mean-token-sum-norm  | 0.2, 0.2         | off              |
| dapo    | (r - mean) / std     | token-mean               | 0.2, 0.28        | resample         |
| rloo    | r - leave-one-out    | token-mean               | 0.2, 0.2         | off              |

Any setting can be overridden from the command line (``--loss-agg``, ``--clip-high`` ...); the run
records the resolved settings. Infra-failed episodes never train (they are not the policy's doing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from harness.errors import ConfigError
from harness.types import ErrorClass, Group
from trainers.advantages import group_advantages, zero_variance_groups
from trainers.losses import AGGREGATIONS, KL_ESTIMATORS, LossNorm, policy_loss
from trainers.methods import Prepared, register_method, settings_builder
from trainers.packing import MicroBatch

__all__ = ["GRPOSettings", "GRPOMethod", "PRESETS"]

DYNAMIC_SAMPLING = ("off", "drop", "resample")


@dataclass(frozen=True)
class GRPOSettings:
    normalize_std: bool = True
    """Divide advantages by the group's reward std (GRPO); off for Dr.GRPO."""
    baseline: str = "mean"
    """``mean`` (GRPO) or ``loo`` (RLOO leave-one-out)."""
    loss_agg: str = "seq-mean-token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    """Weight of the KL-to-reference penalty (0 = no reference model is loaded)."""
    kl_estimator: str = "k3"
    dynamic_sampling: str = "off"
    """``drop``: zero-variance groups do not train; ``resample``: also roll out more tasks until the
    step has its quota of mixed groups (DAPO); ``off``: they train with zero advantage."""
    resample_budget: int = 3
    """With ``resample``: at most this many extra rollout rounds per step (so a policy that always
    fails cannot loop forever); groups still without signal after it are dropped."""


PRESETS = {
    "grpo": GRPOSettings(),
    "dr_grpo": GRPOSettings(normalize_std=False, loss_agg="seq-mean-token-sum-norm"),
    "dapo": GRPOSettings(loss_agg="token-mean", clip_high=0.28, dynamic_sampling="resample"),
    "rloo": GRPOSettings(normalize_std=False, baseline="loo", loss_agg="token-mean"),
}

PRESET_INFO = {
    "grpo": ("Group-relative PPO: (r - mean)/std advantages, clipped surrogate", "2402.03300"),
    "dr_grpo": ("GRPO without std normalisation or length bias (constant token-sum normaliser)", "2503.20783"),
    "dapo": ("GRPO with clip-higher, token-mean loss and dynamic sampling", "2503.14476"),
    "rloo": ("REINFORCE leave-one-out baseline, token-mean loss", "2402.14740"),
}


class GRPOMethod:
    def __init__(self, name: str, settings: GRPOSettings):
        if settings.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"unknown --loss-agg '{settings.loss_agg}'. Known: {', '.join(AGGREGATIONS)}")
        if settings.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown --kl-estimator '{settings.kl_estimator}'. Known: {', '.join(KL_ESTIMATORS)}")
        if settings.dynamic_sampling not in DYNAMIC_SAMPLING:
            raise ConfigError(f"unknown --dynamic-sampling '{settings.dynamic_sampling}'. Known: {', '.join(DYNAMIC_SAMPLING)}")
        if not (0 <= settings.clip_low < 1) or settings.clip_high < 0:
            raise ConfigError("--clip-low must be in [0, 1) and --clip-high >= 0")
        if settings.resample_budget < 0:
            raise ConfigError("--resample-budget must be >= 0")
        self.name = name
        self.cfg = settings
        self.settings = asdict(settings)

    def loss_constant(self, max_new_tokens: int) -> float | None:
        # Dr.GRPO divides every sequence's token sum by one constant: the generation budget.
        return float(max_new_tokens) if self.cfg.loss_agg == "seq-mean-token-sum-norm" else None

    # -- hooks the loop uses -------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        """Load a frozen reference model (only for a KL penalty)."""
        return bool(self.cfg.kl_coef)

    @property
    def resample_rounds(self) -> int:
        """Extra rollout rounds per step while too few groups are trainable (0 = none)."""
        return self.cfg.resample_budget if self.cfg.dynamic_sampling == "resample" else 0

    sampler_topk = 0
    """Top-K of the sampling distribution the rollout must record (SGCD needs it)."""
    uses_summarizer = False
    """Build a credit-reference summarizer for ``MethodContext.summarizer`` (SGCD)."""
    requires: tuple[str, ...] = ()
    """What the run must provide (``trainers.methods.REQUIREMENTS``), checked before any rollout."""
    forward_options: dict[str, Any] = {}
    """Extra keyword arguments of the training forward (e.g. ``output_hidden_states``)."""
    needs_prepass = False
    """Call ``begin_minibatch`` with no-grad log-probs of every micro-batch before the loss."""
    attn_implementation: str | None = None
    """Attention implementation the policy must run (e.g. ``eager`` to return attention maps);
    the loop switches the loaded policy to it. None = the model's default."""

    @property
    def description(self) -> str:
        return PRESET_INFO[self.name][0]

    @property
    def paper(self) -> str:
        return PRESET_INFO[self.name][1]

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a policy the method cannot train (called once, after loading, before rollouts)."""

    def begin_minibatch(self, packed: Any, logps: list[torch.Tensor], ctx: Any) -> None:
        """Called once per mini-batch when ``needs_prepass`` (the policy does not change inside one)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints (e.g. a teacher snapshot); empty for stateless methods."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def keeps(self, group: Group) -> bool:
        """Whether a group trains under dynamic sampling: it has a reward spread."""
        rewards = [e.score.reward for e in group.scored if e.trace is not None]
        return len(rewards) > 1 and not bool(zero_variance_groups(rewards))

    def scored_groups(self, groups: list[Group]) -> tuple[list[tuple[Group, list, list[float]]], int]:
        """``([(group, scored episodes, advantages)], dropped)`` for the groups that train."""
        kept, dropped = [], 0
        for group in groups:
            scored = [e for e in group.episodes if e.error_class is not ErrorClass.INFRA and e.trace is not None]
            if len(scored) < 2 or (self.cfg.dynamic_sampling != "off" and not self.keeps(group)):
                dropped += 1
                continue
            rewards = torch.tensor([e.score.reward for e in scored], dtype=torch.float32)
            adv = group_advantages(rewards, normalize_std=self.cfg.normalize_std, baseline=self.cfg.baseline)
            kept.append((group, scored, adv.tolist()))
        return kept, dropped

    def prepare(self, groups: list[Group], ctx: Any) -> Prepared:
        kept, dropped = self.scored_groups(groups)
        # an episode that ended before the policy sampled anything (e.g. its first prompt exceeded
        # the context) counts in its group's baseline but has no tokens to train
        pairs = [(e.trace, a) for _, scored, adv in kept for e, a in zip(scored, adv) if e.trace.response_tokens]
        metrics = {"groups/trained": len(kept), "groups/dropped": dropped}
        return Prepared(traces=[t for t, _ in pairs], advantages=[a for _, a in pairs], metrics=metrics)

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg=self.cfg.loss_agg,
                           norm=norm, seq_index=mb.seq_index, ref_logp=ref_logp, kl_coef=self.cfg.kl_coef,
                           kl_kind=self.cfg.kl_estimator, eps_low=self.cfg.clip_low, eps_high=self.cfg.clip_high)


for _name in PRESETS:
    register_method(_name)(settings_builder(_name, GRPOMethod, PRESETS[_name]))
