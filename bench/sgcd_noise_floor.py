"""SGCD's numerical noise floor: how far the teacher pass drifts from the sampler with nothing to know.

Run from the repository root:

    .venv/bin/python bench/sgcd_noise_floor.py                      # CPU, fp32 (the baseline)
    .venv/bin/python bench/sgcd_noise_floor.py --device cuda        # CUDA: bf16 autocast, as training runs

The student's distribution p comes from the sampler (its recorded top-K at every sampled token,
KV-cached incremental decoding, bf16 autocast on CUDA). The teacher q is the same weights reading
the same tokens with no reference, the way SGCD's passes run: the shared-prefix pass
(``trainers.teacher.score_in_context``, what ``control=empty`` computes) and, for comparison, the
packed whole-sequence pass (``score_with_teacher``). Exact arithmetic would give KL(p^K || q^K) = 0
on every token; what is left is rounding. Printed per pass: quantiles of the per-token KL (nats),
and the share of tokens above SGCD's default ``kl_floor`` (and above a tenth of it). The floor
must sit above the tail of this noise, or numerical noise alone earns credit.

The policy is the toy policy (``--layers`` x ``--hidden``), warm-started ``--warm-start`` steps on
the toy demonstrations so its distributions are peaked like a trained model's (a random-init
model's near-uniform distributions hide rounding), or any local model with ``--policy DIR`` on
the toy env's chat format. Rollouts: ``--tasks`` train tasks x ``--group-size`` siblings at
temperature 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", help="a local model directory (default: a toy policy built here)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--warm-start", type=int, default=400)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from envs.registry import make_env_factory
    from envs.toy.policy import build_toy_policy
    from harness.policy.local_policy import LocalPolicy, PolicyConfig, load_model_and_tokenizer
    from trainers.credit_weights import topk_reverse_kl
    from trainers.methods import make_method
    from trainers.rollout import collect_groups
    from trainers.sft import demonstration_traces, warm_start
    from trainers.teacher import score_in_context, score_with_teacher

    device = torch.device(args.device)
    factory = make_env_factory("toy")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.policy or str(build_toy_policy(Path(tmp) / "policy", seed=args.seed, num_layers=args.layers,
                                                   hidden_size=args.hidden))
        model, tokenizer = load_model_and_tokenizer(path, str(device), "float32", trainable=True)
        t0 = time.perf_counter()
        if args.warm_start and not args.policy:
            traces = demonstration_traces(factory, tokenizer, factory.tasks("train", None), "warm start")
            warm_start(model, traces, steps=args.warm_start, lr=1e-3, batch_size=16, seed=args.seed)
        tasks = factory.tasks("train", None)[: args.tasks]
        policy = LocalPolicy(PolicyConfig(path=path, temperature=1.0, max_new_tokens=40, max_batch=1 << 16,
                                          batch_wait_s=None, record_topk=args.topk), model=model, tokenizer=tokenizer)
        groups = collect_groups(policy, factory, tasks, args.group_size, step=1, seed=args.seed)
        traces = [e.trace for g in groups for e in g.episodes if e.trace.response_tokens]
        setup_s = time.perf_counter() - t0
        support = [t.student_topk()[0] for t in traces]
        student = [t.student_topk()[1] for t in traces]
        pad = tokenizer.pad_token_id or 0
        shared = score_in_context(model, tokenizer, traces, [None] * len(traces), support, temperature=1.0,
                                  micro_batch_tokens=8192, pad_token_id=pad).scores
        packed = score_with_teacher(model, [list(t.input_ids) for t in traces], [t.sampled_positions for t in traces],
                                    support, temperature=1.0, micro_batch_tokens=8192, pad_token_id=pad)
    floor = make_method("sgcd").settings["kl_floor"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    n = sum(t.response_tokens for t in traces)
    print(f"device: {name}, {dtype}; "
          f"policy: {'--policy ' + args.policy if args.policy else f'toy {args.layers}x{args.hidden}'}"
          f" ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"warm start {args.warm_start if not args.policy else 0})")

    print(f"tokens: {n} sampled in {len(traces)} episodes (top-{args.topk}); setup {setup_s:.0f} s")
    print(f"teacher = student, no reference: KL(p^K || q^K) per sampled token, nats; kl_floor default = {floor}")
    print(f"{'pass':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'p99.9':>10}{'max':>10}"
          f"{'>floor':>9}{'>floor/10':>11}")
    for label, scores in (("shared prefix (SGCD)", shared), ("packed whole sequence", packed)):
        d = torch.cat([topk_reverse_kl(s, sc.support_logprobs) for s, sc in zip(student, scores)])
        q = d.quantile(torch.tensor([0.5, 0.9, 0.99, 0.999])).tolist()
        print(f"{label:<22}{d.mean():>10.2e}" + "".join(f"{x:>10.2e}" for x in q) + f"{d.max():>10.2e}"
              f"{(d > floor).float().mean():>9.4f}{(d > floor / 10).float().mean():>11.4f}")


if __name__ == "__main__":
    main()
