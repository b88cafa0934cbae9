"""Does SGCD's credit depend on what the teacher knows? Before and after calibration (issue 13).

Run from the repository root (CPU, about 2 minutes):

    .venv/bin/python bench/sgcd_calibration.py

On the same sibling groups, SGCD's ``prepare`` is run with five teacher contexts, each with the
uncalibrated reconstruction (the robust z-score ``spike`` salience of the raw divergence with the
entropy gate, no control, no floor: what SGCD did before issue 13) and with the default
calibrated settings (excess over twice a content-free control, 0.05-nat floor):

- ``summary``: the built-in diff summarizer's credit reference (cut per section to 512 tokens);
- ``placebo``: neutral text of the reference's token length;
- ``none``: no reference at all (teacher = student: float noise only);
- ``oracle``: a successful sibling's actions and answer verbatim;
- ``summary, shifted``: the reference, with the teacher's scores read one position off (a bug).

Two policies: the tests' fixture (the untrained tiny toy policy, groups with alternating rewards,
as in tests/test_sgcd.py) and the same policy after 600 supervised warm-start steps (its own
rollouts, real mixed groups). Printed per context: mean divergence with the reference (nats), the
share of sampled tokens amplified (W > 1) and the mean W, before and after.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

UNCALIBRATED = dict(control="off", kl_floor=0.0, control_margin=0.0, salience="spike", entropy_kappa=2.0)


def groups_for(warm: int, workdir: Path):
    from toy_groups import alternate_rewards

    from envs.registry import make_env_factory
    from envs.toy.policy import build_toy_policy
    from harness.policy.local_policy import LocalPolicy, PolicyConfig, load_model_and_tokenizer
    from trainers.rollout import collect_groups
    from trainers.sft import demonstration_traces, warm_start

    torch.manual_seed(0)
    path = build_toy_policy(workdir / f"policy{warm}", seed=0)
    model, tokenizer = load_model_and_tokenizer(str(path), "cpu", "float32")
    factory = make_env_factory("toy")
    if warm:
        warm_start(model, demonstration_traces(factory, tokenizer, factory.tasks("train", None), "warm start"),
                   steps=warm, lr=1e-3, batch_size=16, seed=0)
    tasks = factory.tasks("train", None)[: 3 if not warm else 12]
    policy = LocalPolicy(PolicyConfig(path=str(path), temperature=1.0, max_new_tokens=24 if not warm else 40,
                                      max_batch=256, batch_wait_s=None, record_topk=8 if not warm else 20),
                         model=model, tokenizer=tokenizer)
    groups = collect_groups(policy, factory, tasks, 4 if not warm else 8, step=1, seed=0)
    groups = alternate_rewards(groups) if not warm else [g for g in groups if g.label == "mixed"]
    return model, tokenizer, factory, {t.id: t for t in tasks}, groups, (8 if not warm else 20)


class shifted:
    """Read the teacher's scores one position late (the scoring-alignment bug)."""

    def __enter__(self):
        import trainers.teacher as teacher

        self.teacher, self.original = teacher, teacher.score_shared_prefix

        def late(model, prefix, suffixes, positions, *a, **k):
            ends = [len(prefix) + len(s) - 1 for s in suffixes]
            moved = [[min(p + 1, end) for p in pos] for pos, end in zip(positions, ends)]
            return self.original(model, prefix, suffixes, moved, *a, **k)

        teacher.score_shared_prefix = late

    def __exit__(self, *exc):
        self.teacher.score_shared_prefix = self.original


def main() -> None:
    from trainers.methods import MethodContext, make_method
    from trainers.summarizer import make_summarizer

    torch.set_num_threads(1)
    contexts = [("summary", "summary", False), ("placebo", "placebo", False), ("none", "none", False),
                ("oracle", "oracle", False), ("summary, shifted", "summary", True)]
    with tempfile.TemporaryDirectory() as tmp:
        for warm, label in ((0, "tests' fixture: untrained tiny toy policy"),
                            (600, "tiny toy policy, 600 warm-start steps")):
            model, tokenizer, factory, tasks, groups, topk = groups_for(warm, Path(tmp))
            ctx = MethodContext(model=model, tokenizer=tokenizer, temperature=1.0, micro_batch_tokens=4096,
                                factory=factory, tasks=tasks, summarizer=make_summarizer("diff"))
            n = sum(e.trace.response_tokens for g in groups for e in g.episodes)
            print(f"\n{label}: {len(groups)} mixed groups, {n} sampled tokens")
            print(f"{'teacher context':<20}{'mean KL (nats)':>15}   {'amplified':>10}{'mean W':>8}   "
                  f"{'amplified':>10}{'mean W':>8}")
            print(f"{'':<20}{'':>15}   {'-- uncalibrated --':>18}   {'--- calibrated ---':>18}")
            for name, reference, shift in contexts:
                row = []
                for settings in (UNCALIBRATED, {}):
                    method = make_method("sgcd", topk=topk, reference=reference, **settings)
                    if shift:
                        with shifted():
                            m = method.prepare(groups, ctx).metrics
                    else:
                        m = method.prepare(groups, ctx).metrics
                    row.append(m)
                print(f"{name:<20}{row[1]['sgcd/kl_reference']:>15.2e}   {row[0]['sgcd/amplified_frac']:>10.1%}"
                      f"{row[0]['sgcd/w_mean']:>8.3f}   {row[1]['sgcd/amplified_frac']:>10.2%}"
                      f"{row[1]['sgcd/w_mean']:>8.4f}")



if __name__ == "__main__":
    main()
