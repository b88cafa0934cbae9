"""The tiny toy policy and sibling groups of its real toy episodes, for credit-assignment tests.

An untrained tiny toy policy almost never succeeds, so its groups carry no learning signal. The
method tests (SGCD, RLSD, RLAD, OISD, TGC ...) are about credit math that sees rewards only
through the group advantages, so they overwrite each group's rewards to alternate 1 / 0
(success / failure): every group is mixed and every method does its full work.

Also here: building and loading the tiny toy policy (the default seed-0 one is built once per
session, the ``tiny_toy_dir`` fixture of conftest.py) and one real ``policy_update`` that
records the gradients it steps with.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from harness.env_spec import EnvFactory
from harness.types import Group, Score

_AFTER_BUILD: dict[Path, torch.Tensor] = {}
"""The global torch RNG state right after each ``build_tiny_toy`` (see ``load_tiny_toy``)."""


def alternate_rewards(groups: list[Group]) -> list[Group]:
    """The same groups with episode k scored reward 1 (success) when k is even, else 0."""
    return [Group(task_id=g.task_id, group_id=g.group_id,
                  episodes=[replace(e, score=Score(reward=float(k % 2 == 0), success=k % 2 == 0))
                            for k, e in enumerate(g.episodes)])
            for g in groups]


def build_tiny_toy(tmp_path_factory, name: str = "policy", *, seed: int = 0, **sizes) -> Path:
    """``build_toy_policy`` into a fresh ``<name>N/tiny`` temp folder. The build is a pure function
    of ``seed`` and ``sizes`` (it seeds torch itself), and so is the torch RNG state it leaves,
    which is remembered for ``load_tiny_toy``."""
    from envs.toy.policy import build_toy_policy

    path = build_toy_policy(tmp_path_factory.mktemp(name) / "tiny", seed=seed, **sizes)
    _AFTER_BUILD[Path(path)] = torch.get_rng_state()
    return path


def load_tiny_toy(path: Path):
    """(model, tokenizer) of a ``build_tiny_toy`` policy, a fresh copy on CPU in fp32, loaded with
    the global torch RNG where the build left it: what a test sees is the same whether it built
    the policy just now or shares a session-built one."""
    from harness.policy.local_policy import load_model_and_tokenizer

    torch.set_rng_state(_AFTER_BUILD[Path(path)])
    return load_model_and_tokenizer(str(path), "cpu", "float32")


def toy_rollouts(path: Path, n_tasks: int, *, model=None, tokenizer=None, group_size: int = 4,
                 max_new_tokens: int = 24, temperature: float = 1.0, record_topk: int = 0, seed: int = 0,
                 rewards=alternate_rewards) -> SimpleNamespace:
    """Groups of ``group_size`` real toy episodes for each of the first ``n_tasks`` train tasks,
    sampled by the policy at ``path`` (``model``/``tokenizer`` when given, else ``load_tiny_toy``),
    with their rewards rewritten by ``rewards`` (None: as played). Returns model, tokenizer,
    factory, tasks ({id: task}) and groups."""
    from envs.registry import make_env_factory
    from harness.policy.local_policy import LocalPolicy, PolicyConfig
    from trainers.rollout import collect_groups

    if model is None:
        model, tokenizer = load_tiny_toy(path)
    factory = make_env_factory("toy")
    tasks = factory.tasks("train", None)[:n_tasks]
    policy = LocalPolicy(PolicyConfig(path=str(path), temperature=temperature, max_new_tokens=max_new_tokens,
                                      max_batch=64, batch_wait_s=None, record_topk=record_topk),
                         model=model, tokenizer=tokenizer)
    groups = collect_groups(policy, factory, tasks, group_size, step=1, seed=seed)
    return SimpleNamespace(model=model, tokenizer=tokenizer, factory=factory, tasks={t.id: t for t in tasks},
                           groups=rewards(groups) if rewards is not None else groups)


def update_capturing_grads(model, method, prepared, settings, *, pad_token_id: int, lr: float = 0.1,
                           copy_model: bool = True, ctx=None, seed: int = 3):
    """One real ``policy_update`` with SGD(``lr``) on a deep copy of ``model`` (on ``model`` itself
    when not ``copy_model``): (metrics, each parameter's gradient just before the optimizer step,
    the weights after it)."""
    from trainers.update import policy_update

    m = copy.deepcopy(model) if copy_model else model
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    grads, step = {}, opt.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        return step(*a, **k)

    opt.step = capture
    metrics = policy_update(m, opt, prepared, method, settings, pad_token_id=pad_token_id, seed=seed, ctx=ctx)
    return metrics, grads, {n: p.detach().clone() for n, p in m.named_parameters()}


class BareFactory(EnvFactory):
    """An env with the toy's tasks and none of the optional hooks (no privileged information)."""

    def __init__(self):
        from envs.toy.env import ToyFactory

        self._toy = ToyFactory()

    def tasks(self, split, task_ids=None):
        return self._toy.tasks(split, task_ids)
