"""Method settings, composed from shared blocks (no torch here: the CLI reads them to build flags).

A method's settings dataclass inherits exactly the blocks its code reads, plus its own fields, so
a knob it would ignore is not a field and asking for it is an error (``settings_builder``):

| block             | fields                            | read by                                  |
|-------------------|-----------------------------------|------------------------------------------|
| ``SamplingBlock`` | dynamic_sampling, resample_budget | which groups train (every method)        |
| ``AdvantageBlock``| normalize_std, baseline           | group-relative advantages                |
| ``ClipBlock``     | clip_low, clip_high, dual_clip    | the clipped surrogate                    |
| ``AggregationBlock``| loss_agg                        | how per-token losses become the batch's  |
| ``KLBlock``       | kl_coef, kl_estimator             | the KL-to-reference penalty              |
| ``OverlongBlock`` | overlong_buffer, overlong_filter  | DAPO's overlong handling (GRPO presets)  |

``GRPOSettings`` is the first five (the GRPO family and the credit methods built on it);
``GRPOPresetSettings`` adds ``OverlongBlock`` for the four presets (grpo, dr_grpo, dapo, rloo),
whose ``prepare`` is the only one that reads it. The self-distillation methods (OPSD, SDPO) have
no advantage and no clip: their loss is a KL.
A field's ``flags`` are the named options ``harness train`` keeps for it (``--clip-high`` ...);
every field is also ``--method-arg key=value``.

Where each default comes from (``Method.sources``): ``grpo`` records the source of every block
field; another method names its own fields and the block fields it changes or sources itself, and
``family_sources`` adds one entry for the block fields it keeps at the family's value.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from harness.options import option

__all__ = ["SamplingBlock", "AdvantageBlock", "ClipBlock", "AggregationBlock", "KLBlock", "OverlongBlock",
           "GRPOSettings", "GRPOPresetSettings", "BLOCKS", "FAMILY_DEFAULT", "family_sources", "source_names"]


@dataclass(frozen=True)
class SamplingBlock:
    dynamic_sampling: str = option("off", flags=("--dynamic-sampling",))
    """Zero-variance groups: ``off`` (they train with zero advantage) | ``drop`` (they do not train) |
    ``resample`` (also roll out more tasks until the step has its quota of groups with signal, DAPO)."""
    resample_budget: int = option(3, flags=("--resample-budget",), minimum=0)
    """With ``resample``: at most this many extra rollout rounds per step (so a policy that always
    fails cannot loop forever); groups still without signal after it are dropped."""


@dataclass(frozen=True)
class AdvantageBlock:
    normalize_std: bool = option(True, flags=("--std-normalize/--no-std-normalize",))
    """Divide advantages by the group's reward std (GRPO); off for Dr.GRPO."""
    baseline: str = "mean"
    """``mean`` (GRPO) or ``loo`` (RLOO leave-one-out)."""


@dataclass(frozen=True)
class ClipBlock:
    clip_low: float = option(0.2, flags=("--clip-low",), minimum=0)
    """PPO clip epsilon below 1."""
    clip_high: float = option(0.2, flags=("--clip-high",), minimum=0)
    """PPO clip epsilon above 1 (DAPO clip-higher)."""
    dual_clip: float = option(3.0, minimum=0)
    """Dual-clip c for negative advantages (Ye et al. 2020; verl ``clip_ratio_c``): a token with A < 0
    loses at most -c·A, however far its ratio grew. Acts only off-policy (``--ppo-epochs`` or
    ``--mini-batches`` > 1; on-policy every ratio is 1). 0 = off; otherwise > 1."""


@dataclass(frozen=True)
class AggregationBlock:
    loss_agg: str = option("seq-mean-token-mean", flags=("--loss-agg",))
    """token-mean | seq-mean-token-mean | seq-mean-token-sum-norm."""


@dataclass(frozen=True)
class KLBlock:
    kl_coef: float = option(0.0, flags=("--kl-coef",), minimum=0)
    """Weight of the KL-to-reference penalty (0 = no reference model is loaded)."""
    kl_estimator: str = option("k3+", flags=("--kl-estimator",))
    """k3+ | k1 | k2 | k3. As a loss term k1 has zero expected gradient (no regularisation), k2 gives
    the gradient of KL(π‖π_ref), k3 that of KL(π_ref‖π); k3+ is k3's value with k2's gradient
    (``trainers.losses``)."""


@dataclass(frozen=True)
class OverlongBlock:
    """DAPO's overlong handling (arXiv 2503.14476 §3.4), mapped onto multi-turn episodes: the
    length limit L_max is the per-turn ``--max-new-tokens`` (where the sampler truncates), |y| a
    turn's sampled tokens, and an episode's length reward is that of its longest turn."""

    overlong_buffer: float = option(0.0, minimum=0, maximum=1)
    """Soft overlong punishment (eq. 13): L_cache as a fraction of ``--max-new-tokens``; a turn
    longer than L_max − L_cache adds ((L_max − L_cache) − |y|) / L_cache (down to −1) to the
    episode's reward before advantages. 0 = off; ``dapo``: 0.2 (the paper's 4,096 of 20,480)."""
    overlong_filter: bool = False
    """Overlong filtering: an episode with a truncated turn (it hit ``--max-new-tokens`` before its
    end-of-turn token) counts in its group's baseline but does not train. ``dapo``: on."""


@dataclass(frozen=True)
class GRPOSettings(KLBlock, AggregationBlock, ClipBlock, AdvantageBlock, SamplingBlock):
    """The GRPO family's settings: every block but DAPO's overlong handling (the base of the credit
    methods built on the GRPO pipeline)."""


@dataclass(frozen=True)
class GRPOPresetSettings(OverlongBlock, GRPOSettings):
    """The presets grpo, dr_grpo, dapo and rloo: GRPOSettings and DAPO's overlong handling."""


BLOCKS = (SamplingBlock, AdvantageBlock, ClipBlock, AggregationBlock, KLBlock, OverlongBlock)


FAMILY_DEFAULT = "GRPO family default (sources: see grpo)"


def source_names(sources: dict[str, str]) -> set[str]:
    """The setting names a ``Method.sources`` table covers (a key may group several: ``"a, b"``)."""
    return {name.strip() for key in sources for name in key.split(", ")}


def family_sources(defaults: Any, own: dict[str, str]) -> dict[str, str]:
    """``own`` plus one entry for the block fields of ``defaults`` (a settings instance) that ``own``
    does not name: they keep the GRPO family's value, whose sources ``grpo`` lists. A block field
    whose value differs from the family's must have its own source (ValueError otherwise), so a
    changed default is never labelled the family's."""
    named = source_names(own)
    kept = []
    for block in BLOCKS:
        for f in fields(block):
            if not hasattr(defaults, f.name) or f.name in named or f.name in kept:
                continue
            if f.default is MISSING or getattr(defaults, f.name) != f.default:
                raise ValueError(f"{type(defaults).__name__}.{f.name} differs from the GRPO family's default: "
                                 "name its source in the method's sources")
            kept.append(f.name)
    return {**own, ", ".join(kept): FAMILY_DEFAULT} if kept else dict(own)
