"""Step time of every training method / GRPO's step time, on the same batch of real toy episodes.

Run from the repository root (``bench/train_step.py --method M`` dispatches here for any method
other than grpo and sgcd's kernel-level benchmark):

    .venv/bin/python bench/method_step.py --methods all --threads 1
    .venv/bin/python bench/train_step.py --method rlsd

The batch: sibling groups of real toy episodes rolled out once by a random-init tiny toy policy
(a Qwen2 with the toy tokenizer; ``--layers`` x ``--hidden``), with rewards overwritten to
alternate 1 / 0 inside each group so every group is mixed (the methods that only act on mixed
groups then do their full work). One step of a method is what the trainer runs after the
rollout: ``method.prepare`` (teacher passes, summarizer, credit weights) and
``trainers.update.policy_update`` (forward, loss, backward, optimizer step), with the method's
own hooks (forward options, pre-pass, attention implementation). The learning rate is 0, so every
method and every repeat sees the same weights and the same batch. Methods are timed interleaved,
after warm-up; the median is printed with the ratio to GRPO's median from the same run.

A separate teacher (rlad, opd, grpo_kl) is a random-init toy model with ``--teacher-layers`` x
``--teacher-hidden`` (same tokenizer). SGCD uses the built-in diff summarizer (no network).
The rollout itself is not timed: it is the same for every method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build_batch(args, workdir: Path):
    from envs.registry import make_env_factory
    from envs.toy.policy import build_toy_policy
    from harness.policy.local_policy import LocalPolicy, PolicyConfig, load_model_and_tokenizer
    from harness.types import Group, Score
    from trainers.rollout import collect_groups

    path = build_toy_policy(workdir / "policy", seed=args.seed, num_layers=args.layers, hidden_size=args.hidden)
    model, tokenizer = load_model_and_tokenizer(str(path), "cpu", "float32", trainable=True)
    factory = make_env_factory("toy")
    tasks = factory.tasks("train", None)[: args.tasks]
    policy = LocalPolicy(PolicyConfig(path=str(path), temperature=1.0, max_new_tokens=args.max_new_tokens,
                                      max_batch=1 << 20, batch_wait_s=None, record_topk=20),
                         model=model, tokenizer=tokenizer)
    groups = []
    for g in collect_groups(policy, factory, tasks, args.group_size, step=1, seed=args.seed):
        eps = [replace(e, score=Score(reward=float(k % 2 == 0), success=k % 2 == 0)) for k, e in enumerate(g.episodes)]
        groups.append(Group(task_id=g.task_id, group_id=g.group_id, episodes=eps))
    teacher_path = build_toy_policy(workdir / "teacher", seed=args.seed + 1, num_layers=args.teacher_layers,
                                    hidden_size=args.teacher_hidden)
    teacher, _ = load_model_and_tokenizer(str(teacher_path), "cpu", "float32")
    teacher.requires_grad_(False)
    return model, tokenizer, factory, {t.id: t for t in tasks}, groups, teacher


def toy_overrides(name: str, layers: int) -> dict:
    """Settings a tiny model needs: OISD's published layer 6 does not exist in a 4-layer model.
    And DAPO's overlong filter is off here: the untrained toy policy runs out of its short token
    budget on most replies, so the filter would drop nine tenths of the batch and the row would
    time a different (smaller) update than every other method's."""
    from trainers.methods import make_method

    settings = make_method(name).settings
    out = {}
    if "layer" in settings and isinstance(settings["layer"], int) and settings["layer"] >= layers:
        out["layer"] = layers - 1
    if settings.get("overlong_filter"):
        out["overlong_filter"] = False
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma-separated, or all (GRPO is always timed)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--teacher-hidden", type=int, default=192)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from trainers.methods import MethodContext, make_method, method_names
    from trainers.summarizer import make_summarizer
    from trainers.update import UpdateSettings, policy_update

    names = method_names() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    names = ["grpo"] + [m for m in names if m != "grpo"]
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, factory, tasks, groups, teacher = build_batch(args, Path(tmp))
        default_attn = model.config._attn_implementation
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        settings = UpdateSettings(micro_batch_tokens=4096, temperature=1.0, max_new_tokens=args.max_new_tokens)
        methods = {m: make_method(m, **toy_overrides(m, args.layers)) for m in names}

        def step(name: str, index: int) -> tuple[float, int]:
            method = methods[name]
            model.set_attn_implementation(method.attn_implementation or default_attn)
            ctx = MethodContext(model=model, tokenizer=tokenizer, temperature=1.0, micro_batch_tokens=4096,
                                max_new_tokens=args.max_new_tokens, factory=factory, tasks=tasks,
                                summarizer=make_summarizer("diff"), teacher=teacher,
                                privileged=factory.privileged_info, step=index + 1)
            start = time.perf_counter()
            prepared = method.prepare(groups, ctx)
            out = policy_update(model, optimizer, prepared, method, settings, pad_token_id=tokenizer.pad_token_id,
                                seed=index, ctx=ctx) if prepared.traces else {}
            return time.perf_counter() - start, int(out.get("tokens/trained", 0))

        times: dict[str, list[float]] = {m: [] for m in names}
        tokens: dict[str, int] = {}
        for i in range(args.warmup + args.repeats):
            for name in names:
                dt, n = step(name, i)
                if i >= args.warmup:
                    times[name].append(dt)
                    tokens[name] = n
        med = {m: statistics.median(v) for m, v in times.items()}
    episodes = sum(len(g.episodes) for g in groups)
    print(f"batch: {len(groups)} groups x {args.group_size} real toy episodes ({episodes}), "
          f"policy {args.layers} layers x {args.hidden}, teacher {args.teacher_layers} x {args.teacher_hidden}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'method':<10} {'step ms':>9} {'/ grpo':>7} {'tokens trained':>15}   "
          f"(median of {args.repeats}; prepare + update)")

    for name in names:
        print(f"{name:<10} {med[name] * 1e3:9.1f} {med[name] / med['grpo']:7.2f} {tokens[name]:>15}")
    changed = {m: toy_overrides(m, args.layers) for m in names}
    if any(changed.values()):
        print("settings changed for the toy (toy_overrides): "
              + "; ".join(f"{m} " + " ".join(f"{k}={v}" for k, v in c.items()) for m, c in changed.items() if c))


if __name__ == "__main__":
    main()
