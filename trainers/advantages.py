"""Group-relative advantages for the GRPO family (GRPO, Dr.GRPO, RLOO baseline, DAPO filtering).

What: a task's G sibling episodes form a group; each episode's scalar reward becomes an advantage
relative to its siblings, which the trainer then broadcasts to every sampled token of the episode.

- GRPO (DeepSeekMath, arXiv 2402.03300, outcome supervision): ``A_i = (r_i - mean(r)) / (std(r) + eps)``.
- Dr.GRPO (arXiv 2503.20783): ``A_i = r_i - mean(r)``; no std division (it is a difficulty bias).
- RLOO (leave-one-out baseline, Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740):
  ``A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(r))``.
- DAPO dynamic sampling (arXiv 2503.14476): groups whose rewards are all equal carry no
  group-relative signal; ``zero_variance_groups`` flags them so the loop can drop or resample them.
  The test is on the std, not on "all 0 / all 1", so partial-credit rewards are handled.
- DAPO soft overlong punishment (eq. 13): ``overlong_penalty`` is added to the reward of a
  response whose length enters the last ``L_cache`` tokens before the limit ``L_max``.

Std convention: **population std** (divide by G, ``unbiased=False``). With it the normalised
advantages of a non-degenerate group have mean 0 and mean square exactly 1 for every G, and the std
is that of the same empirical distribution whose mean is the baseline. ``torch.std``'s default
(sample std, divide by G-1) — which several public trainers use — gives advantages smaller by
sqrt((G-1)/G) (0.71 at G=2, 0.97 at G=16): a uniform rescaling, equivalent to a learning-rate
change. Pass ``unbiased=True`` to reproduce that convention.

All functions work on the last dimension, so ``rewards`` may be ``[G]`` (one group) or
``[num_groups, G]``. Tests: ``.venv/bin/python -m pytest tests/test_grpo_math.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BASELINES", "group_advantages", "group_std", "overlong_penalty", "zero_variance_groups"]

BASELINES = ("mean", "loo")


def _as_tensor(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if r.dim() == 0 or r.shape[-1] == 0:
        raise ValueError(f"rewards must have a non-empty group dimension, got shape {tuple(r.shape)}")
    return r


def group_std(rewards: torch.Tensor | Sequence[float], *, unbiased: bool = False) -> torch.Tensor:
    """Std of each group's rewards (population std unless ``unbiased``; see the module docstring)."""
    r = _as_tensor(rewards)
    if unbiased and r.shape[-1] < 2:
        return torch.zeros_like(r[..., 0])
    return r.std(dim=-1, correction=1 if unbiased else 0)


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    *,
    normalize_std: bool = True,
    baseline: str = "mean",
    eps: float = 1e-6,
    unbiased: bool = False,
) -> torch.Tensor:
    """Advantages of the episodes of one group (or of each group, last dimension = G).

    ``normalize_std=True, baseline="mean"`` is GRPO; ``normalize_std=False`` is Dr.GRPO;
    ``baseline="loo"`` is the RLOO leave-one-out baseline (needs G >= 2). A zero-variance group
    gets all-zero advantages under every option.
    """
    r = _as_tensor(rewards)
    group = r.shape[-1]
    mean = r.mean(dim=-1, keepdim=True)
    if baseline == "mean":
        adv = r - mean
    elif baseline == "loo":
        if group < 2:
            raise ValueError("the leave-one-out (RLOO) baseline needs at least 2 episodes per group")
        # r_i - (sum(r) - r_i) / (G - 1)  ==  G / (G - 1) * (r_i - mean(r))
        adv = (r - mean) * (group / (group - 1))
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if normalize_std:
        adv = adv / (group_std(r, unbiased=unbiased).unsqueeze(-1) + eps)
    return adv


def zero_variance_groups(rewards: torch.Tensor | Sequence[float], *, tol: float = 1e-8) -> torch.Tensor:
    """True for each group whose rewards are all equal (std <= tol): no group-relative signal.

    For DAPO dynamic sampling (drop or resample these groups) and the ``groups/mixed_frac`` metric
    (``1 - flags.float().mean()``). Std-based, so partial-credit rewards such as [0.5, 0.5, 0.5]
    are flagged and [0, 0.5, 0.5] is not.
    """
    return group_std(rewards) <= tol


def overlong_penalty(length: int, max_length: float, cache: float) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), a reward term:
    0 while ``length`` <= L_max − L_cache, then falling linearly, ((L_max − L_cache) − |y|) / L_cache,
    to −1 at L_max, and −1 beyond (``max_length`` = L_max, ``cache`` = L_cache > 0)."""
    if cache <= 0:
        raise ValueError(f"the overlong buffer L_cache must be > 0, got {cache}")
    free = max_length - cache
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache
    return -1.0
