"""GRPO learns: after a warm start, it raises held-out toy success by a clear margin; the same run
with learning rate 0 does not improve.

Set-up (all seeded, CPU, fp32):
- the tiny toy policy is warm-started by supervised steps on a mix of two behaviours, as when
  demonstrations come from an imperfect agent: the oracle's (look the item up, copy the code from
  the tool result) and a lazy one (answer at once with a guessed code, no tool call). The
  warm-started policy takes either path about half the time;
- GRPO then plays 8 siblings per task. Looking up earns far more reward than guessing, so
  group-relative advantages should move the policy to the tool-using behaviour within a few steps;
- held-out success is the sampling policy's success rate on the 60 test tasks (temperature 1,
  2 fixed-seed samples per task; the same seeds at every evaluation, so the comparison is paired).

What this proves beyond "loss goes down": rewards flow through groups to token advantages, the
update moves the policy in the rewarded direction, and the improvement generalises to held-out
tasks; the lr=0 control shows the evaluation itself does not drift.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from toy_groups import load_tiny_toy  # noqa: E402

from envs.toy import CODES, SYSTEM_PROMPT, ToyFactory  # noqa: E402
from envs.toy.tasks import answer_text  # noqa: E402
from harness.store import Store, train_steps  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.loop import train  # noqa: E402
from trainers.sft import demo_trace, sft_steps  # noqa: E402

MARGIN = 0.15
"""GRPO must add at least 15 points of held-out success (9 of 60 tasks) over the warm start."""


def _lazy_demo(task, rng: random.Random) -> list[dict]:
    guessed = [rng.choice(CODES) for _ in task.data["items"]]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.data["question"]},
            {"role": "assistant", "content": answer_text(guessed)}]


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory, tiny_toy_dir) -> Path:
    out = shutil.copytree(tiny_toy_dir, tmp_path_factory.mktemp("warm") / "policy")  # the warm start is saved here
    model, tok = load_tiny_toy(tiny_toy_dir)
    factory = ToyFactory()
    rng = random.Random(0)
    tasks = factory.tasks("train")
    oracle = [demo_trace(tok, factory.demonstration(t), factory.tool_schemas) for t in tasks]
    lazy = [demo_trace(tok, _lazy_demo(t, rng), factory.tool_schemas) for t in tasks]
    # Stage 1: the oracle's behaviour (tool calls, copying) in 5 rounds of 200 steps, a fresh
    # optimizer each round. Stage 2: a short round on oracle + lazy demonstrations, which makes
    # the lazy shortcut a frequent choice without unlearning how to copy.
    for chunk in range(5):
        sft_steps(model, oracle, steps=200, lr=1e-3, batch_size=16, seed=chunk)
    sft_steps(model, oracle + lazy, steps=100, lr=1e-3, batch_size=16, seed=10)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run(tmp_path: Path, policy: Path, name: str, lr: float, tasks_per_step: int = 8,
         group_size: int = 8) -> dict[int, float]:
    cfg = TrainConfig(env="toy", policy=str(policy), run=name, db=f"sqlite:///{tmp_path}/h.db",
                      out_dir=str(tmp_path / name), steps=10, tasks_per_step=tasks_per_step, group_size=group_size,
                      eval_every=10,
                      eval_temperature=1.0, eval_trials=2, lr=lr, warmup_steps=2, max_new_tokens=40,
                      checkpoint_every=100, seed=0, quiet=True)
    train(cfg, echo=lambda _: None)
    frame = train_steps(Store(cfg.db), name)
    evals = frame.dropna(subset=["eval/success"]) if "eval/success" in frame else frame.iloc[0:0]
    return dict(zip(evals["step"], evals["eval/success"]))


# The one test whose work is long by design (1,100 supervised steps, then 10 GRPO steps and the
# lr=0 control: about 250 s with one thread at load 6-9 on a 2-core machine): its own bound, 4x
# that, so a loaded CI runner does not hit the suite's 300 s default mid warm start. Its steps
# are fixed (no loop until success), so the bound is a guard against a hang, not a budget.
@pytest.mark.timeout(1200)
def test_grpo_raises_held_out_success_and_lr_zero_does_not(tmp_path, warm_policy):
    learned = _run(tmp_path, warm_policy, "grpo", lr=5e-4)
    # lr=0 leaves the weights as they are whatever the batch, so the control plays the smallest one
    # (1 task x 2 siblings): the same 10 steps through the loop at an eighth of the rollouts.
    control = _run(tmp_path, warm_policy, "control", lr=0.0, tasks_per_step=1, group_size=2)
    start = learned[0]
    assert control[0] == start, "both runs start from the same warm-started weights and eval seeds"
    print(f"held-out success: warm start {start:.3f}, GRPO {learned[10]:.3f}, lr=0 {control[10]:.3f}")
    assert 0.05 <= start <= 0.8, f"the warm start should leave room to improve (got {start:.3f})"
    assert learned[10] >= start + MARGIN, f"GRPO: {start:.3f} -> {learned[10]:.3f}, wanted +{MARGIN}"
    assert control[10] == start, f"lr=0 changed held-out success: {start:.3f} -> {control[10]:.3f}"
