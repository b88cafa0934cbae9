"""The GRPO family as presets of one method: GRPO, Dr.GRPO, DAPO and RLOO.

All four share rollout, group-relative advantages (``trainers.advantages``) and the clipped
surrogate (``trainers.losses``); they differ only in settings (methods.md §6):

| preset  | advantage            | aggregation              | clip (low, high) | dynamic sampling | overlong       |
|---------|----------------------|--------------------------|------------------|------------------|----------------|
| grpo    | (r - mean) / std     | seq-mean-token-mean      | 0.2, 0.2         | off              | off            |
| dr_grpo | r - mean             | seq-mean-token-sum-norm  | 0.2, 0.2         | off              | off            |
| dapo    | (r - mean) / std     | token-mean               | 0.2, 0.28        | resample         | 0.2 + filter   |
| rloo    | r - leave-one-out    | token-mean               | 0.2, 0.2         | off              | off            |

DAPO's overlong handling (``OverlongBlock``): the soft punishment adds its length reward
(``trainers.advantages.overlong_penalty``, L_max = ``--max-new-tokens``, L_cache = 0.2 · L_max)
for the episode's longest turn to the reward before the group advantages; the filter keeps an
episode with a truncated turn in its group's baseline and out of the loss. Dynamic sampling
still judges a group by its unshaped rewards (DAPO filters on accuracy).

Any setting can be overridden from the command line (``--loss-agg``, ``--clip-high`` ...); the run
records the resolved settings. Infra-failed episodes never train (they are not the policy's doing).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import ConfigError
from harness.types import ErrorClass, Group
from trainers.advantages import group_advantages, overlong_penalty, zero_variance_groups
from trainers.losses import AGGREGATIONS, KL_ESTIMATORS, LossNorm, policy_loss
from trainers.method_settings import (
    AdvantageBlock,
    AggregationBlock,
    ClipBlock,
    GRPOPresetSettings,
    GRPOSettings,
    KLBlock,
    OverlongBlock,
    SamplingBlock,
    family_sources,
)
from trainers.methods import Prepared, register_method, settings_builder
from trainers.methods.base import Method
from trainers.packing import MicroBatch
from trainers.token_credit import modulated_advantage

__all__ = ["GRPOSettings", "GRPOMethod", "PRESETS"]  # GRPOSettings: re-exported from trainers.method_settings

DYNAMIC_SAMPLING = ("off", "drop", "resample")


PRESETS = {
    "grpo": GRPOPresetSettings(),
    "dr_grpo": GRPOPresetSettings(normalize_std=False, loss_agg="seq-mean-token-sum-norm"),
    "dapo": GRPOPresetSettings(loss_agg="token-mean", clip_high=0.28, dynamic_sampling="resample",
                               overlong_buffer=0.2, overlong_filter=True),
    "rloo": GRPOPresetSettings(normalize_std=False, baseline="loo", loss_agg="token-mean"),
}

PRESET_INFO = {
    "grpo": ("Group-relative PPO: (r - mean)/std advantages, clipped surrogate", "2402.03300"),
    "dr_grpo": ("GRPO without std normalisation or length bias (constant token-sum normaliser)", "2503.20783"),
    "dapo": ("GRPO with clip-higher, token-mean loss, dynamic sampling and overlong punishment/filtering",
             "2503.14476"),
    "rloo": ("REINFORCE leave-one-out baseline, token-mean loss", "2402.14740"),
}

PRESET_CODE = {
    "grpo": "none public (deepseek-ai/DeepSeek-Math holds the models and evaluation code, no RL trainer)",
    "dr_grpo": "sail-sg/understand-r1-zero (train_zero_math.py, on sail-sg/oat)",
    "dapo": "volcengine/verl recipe/dapo (linked from BytedTsinghua-SIA/DAPO)",
    "rloo": "none found (TRL's RLOOTrainer and verl's rloo estimator are implementations by others)",
}

# Where each preset's defaults come from (``harness methods list``). ``grpo`` sources every block
# field; the other presets name what they change or source themselves, the rest is grpo's.
_OVERLONG_OFF = "off: DAPO's overlong handling (2503.14476 §3.4), not part of this method"
PRESET_SOURCES = {
    "grpo": {
        "dynamic_sampling": "paper: every group trains (off)",
        "resample_budget": "ours: at most 3 extra rollout rounds per step (read only with dynamic_sampling=resample)",
        "normalize_std, baseline": "paper §4.1, outcome supervision: A = (r - mean(r)) / std(r)",
        "clip_low, clip_high": "PPO's epsilon 0.2 (arXiv 1707.06347); the GRPO paper states no value",
        "dual_clip": "ours: dual-clip c = 3 (arXiv 1912.09729; verl clip_ratio_c=3.0), acts only off-policy",
        "loss_agg": "paper eq. 3: (1/G) sum_i (1/|o_i|) sum_t = seq-mean-token-mean",
        "kl_coef": "differs: paper §4.2 uses KL coefficient 0.04; ours 0 = no reference model (--kl-coef)",
        "kl_estimator": "ours: k3+ = the paper's k3 value (eq. 4) with k2's gradient (docs/decisions.md)",
        "overlong_buffer, overlong_filter": _OVERLONG_OFF,
    },
    "dr_grpo": {
        "normalize_std, baseline": "paper and official train_zero_math.py: A = r - mean(r), no std division",
        "loss_agg": "official train_zero_math.py: token sum / generate_max_length (here --max-new-tokens)",
        "clip_low, clip_high": "official code: sail-sg/oat PPOArgs cliprange=0.2",
        "kl_coef": "official examples/qwen2.5-math-7b.sh (--beta 0)",
        "overlong_buffer, overlong_filter": _OVERLONG_OFF,
    },
    "dapo": {
        "clip_low, clip_high": "paper §3.1 and recipe (clip_ratio_low=0.2, clip_ratio_high=0.28)",
        "dynamic_sampling": "paper §3.2 and recipe (filter_groups.enable=True, metric=acc)",
        "resample_budget": "ours: 3 extra rounds, then drop (recipe: up to max_num_gen_batches=10 batches of 3x)",
        "loss_agg": "paper §3.3 and recipe (token-mean)",
        "overlong_buffer": "paper §3.4 and recipe: L_cache 4096 of L_max 20480 (overlong_buffer.len=4096)",
        "overlong_filter": "differs: paper's ablation; recipe README: the best runs had no overlong filtering",
        "normalize_std, baseline": "paper: A = (R - mean) / std, as GRPO",
        "kl_coef": "paper drops the KL term; recipe kl_coef=0.0, kl_loss_coef=0.0",
        "dual_clip": "recipe config clip_ratio_c=3.0",
    },
    "rloo": {
        "baseline": "paper §2.3: the mean reward of the other k-1 samples",
        "normalize_std": "paper: no std normalisation",
        "loss_agg": "differs: paper §2.2 takes the whole completion as one action (a token sum); ours token-mean",
        "clip_low, clip_high": "paper drops PPO's clip; ours 0.2 acts only off-policy (--ppo-epochs, --mini-batches)",
        "kl_coef": "differs: the paper's reward is KL-shaped (beta not recorded here); ours 0, no reference",
        "overlong_buffer, overlong_filter": _OVERLONG_OFF,
    },
}


class GRPOMethod(Method):
    """The GRPO family, and the base of the credit methods built on its pipeline: group-relative
    advantages over the groups that train, the clipped surrogate, an optional KL to a reference.
    A subclass whose settings lack a block (``trainers.method_settings``) does not read it."""

    def __init__(self, name: str, settings: Any):
        if isinstance(settings, AggregationBlock) and settings.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"unknown --loss-agg '{settings.loss_agg}'. Known: {', '.join(AGGREGATIONS)}")
        if isinstance(settings, KLBlock) and settings.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown --kl-estimator '{settings.kl_estimator}'. Known: {', '.join(KL_ESTIMATORS)}")
        if isinstance(settings, SamplingBlock):
            if settings.dynamic_sampling not in DYNAMIC_SAMPLING:
                raise ConfigError(f"unknown --dynamic-sampling '{settings.dynamic_sampling}'. "
                                  f"Known: {', '.join(DYNAMIC_SAMPLING)}")
            if settings.resample_budget < 0:
                raise ConfigError("--resample-budget must be >= 0")
        if isinstance(settings, ClipBlock) and (not (0 <= settings.clip_low < 1) or settings.clip_high < 0):
            raise ConfigError("--clip-low must be in [0, 1) and --clip-high >= 0")
        if isinstance(settings, ClipBlock) and settings.dual_clip and not settings.dual_clip > 1:
            raise ConfigError(f"dual_clip must be 0 (off) or > 1, got {settings.dual_clip}")
        if isinstance(settings, AdvantageBlock) and settings.baseline not in ("mean", "loo"):
            raise ConfigError(f"unknown advantage baseline '{settings.baseline}'. Known: mean, loo")
        super().__init__(name, settings)
        self.credit_notes: dict[Any, dict[str, Any]] = {}
        """What ``token_multipliers`` notes for credit recording (``_credit_record``); reset every step."""

    def loss_constant(self, max_new_tokens: int) -> float | None:
        # Dr.GRPO divides every sequence's token sum by one constant: the generation budget.
        return float(max_new_tokens) if self.cfg.loss_agg == "seq-mean-token-sum-norm" else None

    @property
    def needs_reference(self) -> bool:
        return isinstance(self.cfg, KLBlock) and bool(self.cfg.kl_coef)

    @property
    def resample_rounds(self) -> int:
        return self.cfg.resample_budget if self.cfg.dynamic_sampling == "resample" else 0

    # a subclass registered under another name (a plugin's GRPO variant) sets its own class attributes
    # One class, several registered names (presets): the name picks the description, paper, code
    # and sources from these tables (a subclass with presets of its own sets its own tables).
    preset_settings: dict[str, Any] = PRESETS
    preset_info: dict[str, tuple[str, str]] = PRESET_INFO
    preset_code: dict[str, str] = PRESET_CODE
    preset_sources: dict[str, dict[str, str]] = PRESET_SOURCES

    @property
    def description(self) -> str:
        return self.preset_info.get(self.name, ("", ""))[0]

    @property
    def paper(self) -> str:
        return self.preset_info.get(self.name, ("", ""))[1]

    @property
    def code(self) -> str:  # type: ignore[override]
        return self.preset_code.get(self.name, "")

    @property
    def sources(self) -> dict[str, str]:  # type: ignore[override]
        own = self.preset_sources.get(self.name)
        return family_sources(self.preset_settings[self.name], own) if own is not None else {}

    def keeps(self, group: Group) -> bool:
        """Whether a group trains under dynamic sampling: it has a reward spread."""
        rewards = [e.score.reward for e in group.scored if e.trace is not None]
        return len(rewards) > 1 and not bool(zero_variance_groups(rewards))

    def scored_groups(self, groups: list[Group], ctx: Any = None) -> tuple[list[tuple[Group, list, list[float]]], int]:
        """``([(group, scored episodes, advantages)], dropped)`` for the groups that train (rewards
        shaped by DAPO's overlong punishment where the settings ask for it; ``ctx`` gives its L_max)."""
        kept, dropped = [], 0
        max_len = self._overlong_limit(ctx)
        for group in groups:
            scored = [e for e in group.episodes if e.error_class is not ErrorClass.INFRA and e.trace is not None]
            if len(scored) < 2 or (self.cfg.dynamic_sampling != "off" and not self.keeps(group)):
                dropped += 1
                continue
            rewards = torch.tensor([e.score.reward for e in scored], dtype=torch.float32)
            if max_len is not None:
                rewards = rewards + torch.tensor([self._length_reward(e.trace, max_len) for e in scored])
            # a method without the advantage block does not train on advantages; GRPO's are computed
            if isinstance(self.cfg, AdvantageBlock):
                adv = group_advantages(rewards, normalize_std=self.cfg.normalize_std, baseline=self.cfg.baseline)
            else:
                adv = group_advantages(rewards)
            kept.append((group, scored, adv.tolist()))
        return kept, dropped

    def _overlong_limit(self, ctx: Any) -> int | None:
        """L_max of the soft overlong punishment (the per-turn token limit), or None when it is off."""
        if not isinstance(self.cfg, OverlongBlock) or not self.cfg.overlong_buffer:
            return None
        limit = getattr(ctx, "max_new_tokens", None)
        if not limit:
            raise ConfigError(f"{self.name}: the overlong punishment needs the per-turn token limit "
                              "(MethodContext.max_new_tokens, from --max-new-tokens)")
        return int(limit)

    def _length_reward(self, trace: Any, max_len: int) -> float:
        """DAPO eq. 13 for the episode's longest turn (|y| = that turn's sampled tokens)."""
        longest = max((end - start for start, end in trace.turns), default=0)
        return overlong_penalty(longest, max_len, self.cfg.overlong_buffer * max_len)

    def trains(self, trace: Any) -> bool:
        """Whether a scored episode's trace goes into the loss: it sampled something (an episode that
        ended before, e.g. its first prompt exceeded the context, still counts in its group's baseline)
        and, under DAPO's overlong filtering, no turn of it was truncated."""
        if not trace.response_tokens:
            return False
        return not (isinstance(self.cfg, OverlongBlock) and self.cfg.overlong_filter and trace.truncated)

    def token_multipliers(self, kept: list[tuple[Group, list, list[float]]], ctx: Any,
                          metrics: dict[str, float]) -> dict[tuple[int, int], torch.Tensor]:
        """Per-token advantage multipliers m_t >= 0 (``trainers.token_credit``: Â_t = A · sg[m_t]),
        keyed by (index in ``kept``, index among that group's scored episodes), ``[response_tokens]``
        each. A trajectory without one keeps GRPO's scalar credit. Called every step, also with no
        groups (a method may keep state on a step grid). Credit methods override this; GRPO has none.
        A method may note its own per-token values of (g, k) in ``self.credit_notes[(g, k)]`` and
        its group g's credit reference in ``self.credit_notes[g]``, for credit recording only."""
        return {}

    def prepare(self, groups: list[Group], ctx: Any) -> Prepared:
        kept, dropped = self.scored_groups(groups, ctx)
        metrics: dict[str, float] = {"groups/trained": len(kept), "groups/dropped": dropped}
        self.credit_notes: dict[Any, dict[str, Any]] = {}
        multipliers = self.token_multipliers(kept, ctx, metrics)
        traces, advantages, group_of, credit = [], [], [], []
        for g, (_, scored, adv) in enumerate(kept):
            for k, (episode, a) in enumerate(zip(scored, adv)):
                if self.trains(episode.trace):  # sampled something, and not filtered as overlong
                    traces.append(episode.trace)
                    advantages.append(modulated_advantage(episode.trace, a, multipliers.get((g, k))))
                    group_of.append(g)
                    credit.append(self._credit_record(g, k, multipliers.get((g, k))))
        episodes = [e for _, scored, _ in kept for e in scored]
        max_len = self._overlong_limit(ctx)
        if max_len is not None and episodes:
            length_rewards = [self._length_reward(e.trace, max_len) for e in episodes]
            metrics["overlong/punished_frac"] = sum(r < 0 for r in length_rewards) / len(episodes)
            metrics["overlong/penalty_mean"] = sum(length_rewards) / len(episodes)
        if isinstance(self.cfg, OverlongBlock) and self.cfg.overlong_filter:
            metrics["overlong/filtered"] = float(sum(e.trace.truncated and e.trace.response_tokens > 0
                                                     for e in episodes))
        return Prepared(traces=traces, advantages=advantages, metrics=metrics, groups=group_of, credit=credit)

    def _credit_record(self, g: int, k: int, multiplier: torch.Tensor | None) -> dict[str, Any]:
        """What credit recording keeps of trace (g, k) beside its advantage: the multiplier and what
        ``token_multipliers`` noted in ``credit_notes`` (per-token values under (g, k), the group's
        credit reference under g)."""
        values = {} if multiplier is None else {"multiplier": multiplier}
        values.update(self.credit_notes.get((g, k), {}))
        return {"values": values, "reference": self.credit_notes.get(g)}

    def loss(self, mb: MicroBatch, logp: torch.Tensor, norm: LossNorm, ctx: Any,
             ref_logp: torch.Tensor | None = None, outputs: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask, agg=self.cfg.loss_agg,
                           norm=norm, seq_index=mb.seq_index, ref_logp=ref_logp, kl_coef=self.cfg.kl_coef,
                           kl_kind=self.cfg.kl_estimator, eps_low=self.cfg.clip_low, eps_high=self.cfg.clip_high,
                           dual_clip=self.cfg.dual_clip)


for _name in PRESETS:
    register_method(_name)(settings_builder(_name, GRPOMethod, PRESETS[_name]))
