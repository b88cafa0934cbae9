"""GRPO update-step cost vs a bare forward+backward of the same packed tokens.

Run from the repository root:

    .venv/bin/python bench/train_step.py                                    # CPU, small random Qwen2, fp32
    .venv/bin/python bench/train_step.py --device cuda --dtype bfloat16    # Qwen2-0.5B-shaped, bf16

A fixed, seeded batch of variable-length multi-turn sequences (about half prompt tokens, mask 0;
the rest sampled, mask 1; groups of G siblings with partial-credit rewards) is packed with
``trainers.packing.pack`` into micro-batches of at most ``--max-tokens`` tokens. On a random-init
Qwen2 model both steps run over all micro-batches (gradient accumulation) and are timed in the
same run, interleaved, after warm-up; medians are printed:

- bare:   forward with the LM head only at the sampled tokens (``logits_to_keep``: what the loss
  needs, issue 20), ``F.cross_entropy`` of those logits (no upcast), backward.
- update: ``trainers.update.policy_forward`` (the head only at the sampled tokens, chunked and
  fused with the log-softmax and the no-grad entropy, ``trainers.lm_head``), DAPO clipped
  surrogate (eps 0.2 / 0.28) with token-mean aggregation over the whole batch's normaliser,
  per-step metrics kept on device, backward.
- full:   the update as it was before issue 20, for comparison only: the head over every
  position of the row, then ``token_logprobs`` over the ``[1, L, V]`` logits.
- optimizer: ``AdamW.step()`` alone.

With ``--method sgcd`` it also times the SGCD step on the same batch, as ``SGCDMethod`` runs it
(issues 6 and 13): the siblings of each group of 8 share their first prompt; the teacher reads it
with a credit reference of ``--reference-tokens`` tokens and again with a content-free control of
the same length (``trainers.teacher.score_shared_prefix``: each group's prefix runs once, its KV
cache serves the 8 continuations), scoring the student's top-K support at each sampled token;
then the calibrated credit (top-K reverse KL with and without the reference, excess over twice
the control, absolute salience with the entropy gate, W = clip(1 + s, 1, 2)), re-packing with
per-token advantages, and the same update. It prints SGCD step / GRPO step (target <= 1.8), and
the same for the old path (one packed teacher pass per sequence with the reference repeated, no
control) for comparison. The summarizer call is not in it (a network call, once per group, cached).

With ``--method M`` for any other registered method (or ``all``) it runs ``bench/method_step.py``:
M's whole step (``prepare`` + ``policy_update``) / GRPO's, on the same batch of real toy episodes.

Targets (issue 5): update / bare <= 1.15 and padding efficiency >= 0.9. On CUDA it also prints
MFU = 6 * N * tokens / time / peak bf16 dense FLOPs of the GPU (N: parameters that do matmuls,
i.e. without the input embedding lookup but with the LM head; attention FLOPs not counted).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.policy.trace import TokenTrace  # noqa: E402
from trainers.advantages import group_advantages  # noqa: E402
from trainers.lm_head import trained_rows  # noqa: E402
from trainers.losses import policy_loss, token_logprobs  # noqa: E402
from trainers.packing import pack  # noqa: E402
from trainers.update import policy_forward  # noqa: E402

MODELS = {  # Qwen2Config kwargs
    "small": dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}
# peak dense bf16 tensor FLOP/s per GPU (vendor datasheets); first matching name wins
PEAK_BF16 = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
             ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12)]
TEMPERATURE = 1.0


def make_batch(n_seqs: int, min_len: int, max_len: int, vocab: int, group: int, seed: int):
    """Seeded multi-turn traces (prompt / response turns, ~half prompt) and group advantages. The
    siblings of a group share their first prompt (the same task), as rollouts do."""
    rng = random.Random(seed)
    traces, opening = [], []
    for i in range(n_seqs):
        n, tr = rng.randint(min_len, max_len), TokenTrace()
        turns = rng.randint(1, 4)
        cuts = sorted(rng.sample(range(1, n), 2 * turns - 1)) if n > 2 * turns else [n // 2]
        bounds = [0, *cuts, n]
        if i % group == 0:
            opening = [rng.randrange(vocab) for _ in range(bounds[1])]
        for k in range(len(bounds) - 1):
            ids = opening if k == 0 else [rng.randrange(vocab) for _ in range(bounds[k + 1] - bounds[k])]
            if k % 2 == 0:
                tr.add_prompt(ids)
            else:
                tr.add_response(ids, [0.0] * len(ids))
        tr.first_prompt_len = len(opening)
        traces.append(tr)
    rewards = torch.tensor([rng.choice([0.0, 0.5, 1.0]) for _ in range(n_seqs)]).view(-1, group)
    return traces, group_advantages(rewards).flatten().tolist()


def matmul_params(model) -> int:
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - emb.numel() + model.config.vocab_size * model.config.hidden_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", choices=sorted(MODELS), help="default: small on CPU, 0.5b on CUDA")
    parser.add_argument("--seqs", type=int, help="sequences in the batch (default 16 CPU, 64 CUDA)")
    parser.add_argument("--min-len", type=int, help="default 16 CPU, 256 CUDA")
    parser.add_argument("--max-len", type=int, help="default 160 CPU, 3072 CUDA")
    parser.add_argument("--max-tokens", type=int, help="micro-batch token budget (default 512 CPU, 8192 CUDA)")
    parser.add_argument("--pad-to-multiple-of", type=int, help="row padding (default 1 CPU, 64 CUDA)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-full", action="store_true", help="skip the full-logits update (the pre-issue-20 path)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="grpo",
                        help="sgcd: also time the SGCD step (teacher pass + credit weights + update); any other "
                             "method (or all): its step / GRPO's step on real toy episodes (bench/method_step.py)")
    parser.add_argument("--reference-tokens", type=int,
                        help="credit-reference length for sgcd (default 48 CPU, 512 CUDA)")
    parser.add_argument("--topk", type=int, default=20, help="student top-K support for sgcd")
    args, rest = parser.parse_known_args()
    if args.method not in ("grpo", "sgcd"):  # the whole-method comparison lives in bench/method_step.py
        from method_step import main as method_main

        method_main(["--methods", args.method, "--seed", str(args.seed), "--repeats", str(args.repeats),
                     "--warmup", str(min(args.warmup, 1)), *rest]
                    + (["--threads", str(args.threads)] if args.threads else []))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    cuda = args.device.startswith("cuda")
    dflt = lambda cpu, gpu: gpu if cuda else cpu  # noqa: E731
    args.model = args.model or dflt("small", "0.5b")
    args.seqs = args.seqs or dflt(16, 64)
    args.min_len, args.max_len = args.min_len or dflt(16, 256), args.max_len or dflt(160, 3072)
    args.max_tokens = args.max_tokens or dflt(512, 8192)
    args.pad_to_multiple_of = args.pad_to_multiple_of or dflt(1, 64)
    args.reference_tokens = args.reference_tokens or dflt(48, 512)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(**MODELS[args.model], max_position_embeddings=max(4096, args.max_len))
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=args.attn, dtype=dtype).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    traces, advantages = make_batch(args.seqs, args.min_len, args.max_len, cfg.vocab_size, 8, args.seed)
    packed = pack(traces, advantages, args.max_tokens, pad_to_multiple_of=args.pad_to_multiple_of,
                  budget_option="--max-tokens")
    mbs = [mb.to(device) for mb in packed.micro_batches]
    norm = packed.loss_norm()
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # behaviour log-probs: current policy + noise, so ratios != 1 and some clip
        for mb in mbs:
            logp = token_logprobs(model(**mb.model_inputs()).logits, mb.input_ids, TEMPERATURE)
            noise = 0.2 * torch.randn(logp.shape, generator=gen).to(device)
            mb.old_logprobs = torch.where(mb.loss_mask > 0, logp + noise, torch.zeros_like(logp))

    rows = [trained_rows(mb.loss_mask) for mb in mbs]

    def bare():
        for mb, at in zip(mbs, rows):
            logits = model(**mb.model_inputs(), logits_to_keep=at).logits
            loss = F.cross_entropy(logits[0], mb.input_ids[0, at + 1], reduction="sum") / packed.real_tokens
            loss.backward()

    def update(full_logits=False):
        metrics = []
        for mb in mbs:
            logp, ent, _ = policy_forward(model, mb, TEMPERATURE, with_entropy=True, full_logits=full_logits)
            loss, m = policy_loss("clip", logp, mb.old_logprobs, mb.advantages, mb.loss_mask,
                                  agg="token-mean", norm=norm, seq_index=mb.seq_index, eps_low=0.2, eps_high=0.28)
            m["entropy"] = (ent * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1)
            metrics.append(m)
            loss.backward()
        return metrics

    def timed(fn):
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    sgcd = (make_sgcd_step(args, model, traces, advantages, cfg.vocab_size, device, update, mbs)
            if args.method == "sgcd" else None)
    steps = {"bare": bare, "update": update, "opt": optimizer.step}
    if sgcd is not None:
        steps["sgcd"], steps["sgcd_old"] = sgcd
    if not args.no_full:
        steps["full"] = lambda: update(full_logits=True)
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.repeats):
        for name, fn in steps.items():
            if name == "opt":  # grads of the preceding step are in place; time the step alone
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - start
            else:
                dt, out = timed(fn)
                if name == "update":
                    metrics = out
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}

    tokens = packed.real_tokens
    loss_tokens = int(norm.num_tokens)
    mean = lambda key: sum(float(m[key]) * float(m["tokens"]) for m in metrics) / max(loss_tokens, 1)  # noqa: E731
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {name}, dtype {args.dtype}, threads {torch.get_num_threads()}, attn {args.attn}")
    print(f"model: {args.model} random-init Qwen2, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"vocab {cfg.vocab_size}")
    print(f"batch: {args.seqs} sequences, {tokens} tokens ({loss_tokens} sampled = "
          f"{loss_tokens / tokens:.0%}), {len(mbs)} micro-batches of <= {args.max_tokens} tokens")
    print(f"padding efficiency: {packed.padding_efficiency:.3f} (target >= 0.9); row fill {packed.fill:.3f}")
    print(f"bare fwd+bwd:  {med['bare'] * 1e3:8.1f} ms   (median of {args.repeats})")
    print(f"update step:   {med['update'] * 1e3:8.1f} ms   {tokens / med['update']:,.0f} tokens/s")
    print(f"optimizer:     {med['opt'] * 1e3:8.1f} ms   (AdamW.step, timed separately)")
    print(f"ratio update / bare: {med['update'] / med['bare']:.3f} (target <= 1.15)")
    if "sgcd" in med:
        print(f"sgcd step:     {med['sgcd'] * 1e3:8.1f} ms   "
              f"(teacher with a {args.reference_tokens}-token reference and "
              f"with a control of equal length, shared prefix per group; top-{args.topk} KL, excess, salience, "
              f"weights, update)")

        print(f"ratio sgcd step / grpo step: {med['sgcd'] / med['update']:.3f} (target <= 1.8)")
        print(f"  old path (one packed pass per sequence, reference repeated, no control) / grpo step: "
              f"{med['sgcd_old'] / med['update']:.3f}")
    if "full" in med:
        print(f"full-logits update (head over every position) / bare: {med['full'] / med['bare']:.3f}")
    print(f"metrics: clip/frac {mean('clip/frac'):.3f}, ratio/mean {mean('ratio/mean'):.3f}, "
          f"ratio/max {max(float(m['ratio/max']) for m in metrics):.2f}, entropy {mean('entropy'):.2f}")
    if cuda:
        peak = next((p for key, p in PEAK_BF16 if key in name), None)
        flops = 6 * matmul_params(model) * tokens
        if peak is None or args.dtype != "bfloat16":
            print(f"MFU: n/a (no bf16 peak known for {name!r} or dtype is not bfloat16); "
                  f"achieved {flops / med['update'] / 1e12:.1f} TFLOP/s")
        else:
            print(f"MFU (update step, 6*N*tokens, peak {peak / 1e12:.0f} TFLOP/s): {flops / med['update'] / peak:.1%}; "
                  f"bare {flops / med['bare'] / peak:.1%}")


def make_sgcd_step(args, model, traces, advantages, vocab, device, update, mbs):
    """The SGCD step as closures (calibrated path, and the old uncalibrated one for comparison):
    teacher scoring + credit weights + repack + the same update."""
    from trainers.credit_weights import SalienceSettings, credit_weights, excess_divergence, salience, topk_reverse_kl
    from trainers.teacher import score_shared_prefix, score_with_teacher

    rng = random.Random(args.seed + 1)
    reference = [rng.randrange(vocab) for _ in range(args.reference_tokens)]
    control = [rng.randrange(vocab) for _ in range(args.reference_tokens)]
    support, student_lp, cut = [], [], []
    for tr in traces:
        n = tr.response_tokens
        support.append(torch.randint(0, vocab, (n, args.topk), generator=torch.Generator().manual_seed(n)))
        student_lp.append(torch.log_softmax(torch.randn(n, args.topk), -1))
        cut.append(torch.cat([torch.full((e - s,), k) for k, (s, e) in enumerate(tr.turns)]))
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, tr in enumerate(traces):
        groups.setdefault(tuple(tr.input_ids[:tr.first_prompt_len]), []).append(j)

    def teacher(note):
        out = [None] * len(traces)
        for opening, members in groups.items():
            prefix = list(opening) + note
            suffixes = [traces[j].input_ids[traces[j].first_prompt_len:] for j in members]
            positions = [[p + len(note) for p in traces[j].sampled_positions] for j in members]
            scores = score_shared_prefix(model, prefix, suffixes, positions, [support[j] for j in members],
                                         temperature=TEMPERATURE, micro_batch_tokens=args.max_tokens)
            for j, sc in zip(members, scores):
                out[j] = sc
        return out

    def finish(weights):
        per_pos = []
        for tr, a, w in zip(traces, advantages, weights):
            adv = torch.zeros(len(tr))
            adv[torch.as_tensor(tr.sampled_positions)] = a * w
            per_pos.append(adv)
        repacked = pack(traces, per_pos, args.max_tokens, pad_to_multiple_of=args.pad_to_multiple_of)
        for mb, new in zip(mbs, repacked.micro_batches):
            mb.advantages = new.advantages.to(device)
        return update()

    def step():
        with_ref, with_ctrl = teacher(reference), teacher(control)
        weights = [None] * len(traces)
        for members in groups.values():
            excess = [excess_divergence(topk_reverse_kl(student_lp[j], with_ref[j].support_logprobs),
                                        topk_reverse_kl(student_lp[j], with_ctrl[j].support_logprobs), 1.0)
                      for j in members]
            s = salience(excess, [with_ref[j].entropy for j in members], [cut[j] for j in members], SalienceSettings())
            for j, x in zip(members, s):
                weights[j] = credit_weights(x, 1.0, 2.0)
        return finish(weights)

    seqs = [tr.input_ids[:tr.first_prompt_len] + reference + tr.input_ids[tr.first_prompt_len:] for tr in traces]
    positions = [[p + len(reference) for p in tr.sampled_positions] for tr in traces]

    def old_step():
        scores = score_with_teacher(model, seqs, positions, support, temperature=TEMPERATURE,
                                    micro_batch_tokens=args.max_tokens + args.reference_tokens)
        weights = []
        for sc, lp, turns in zip(scores, student_lp, cut):
            d = topk_reverse_kl(lp, sc.support_logprobs)
            s = salience([d], [sc.entropy], [turns], SalienceSettings(mode="spike", floor=0.0))[0]
            weights.append(credit_weights(s, 1.0, 2.0))
        return finish(weights)

    return step, old_step


if __name__ == "__main__":
    main()
