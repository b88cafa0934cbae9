"""Peak memory and step time of one policy-update step: the LM head over every position of a
packed row (the path before issue 20) against the head only at the sampled tokens, in chunks
(``trainers.lm_head``), on a 151,936-token vocabulary.

Run from the repository root:

    .venv/bin/python bench/lm_head_memory.py                          # CPU: rows of 4k, 8k, 16k tokens
    .venv/bin/python bench/lm_head_memory.py --lengths 4096 --device cuda
    .venv/bin/python bench/lm_head_memory.py --trl                    # also TRL's log-prob path (own venv)
    .venv/bin/python bench/lm_head_memory.py --sweep                  # what the peak grows with (see below)

The model is a random-init Qwen2 with Qwen2.5's vocabulary (151,936, tied embeddings) and a small
backbone (``--hidden`` x ``--layers``) so that it runs on a CPU: the head then dominates, which
is the point. Each row is one packed micro-batch of back-to-back traces shaped like tau-airline
trajectories: a long first prompt (policy + tool schemas), then turns of user / tool text in the
prompt and short sampled agent replies. ``--sampled-fraction`` (default 0.15) is an estimate, not a
measurement (no stored tau-airline run here): a first prompt of about 3.5k tokens (wiki.md's 6,155
characters + 14 tool schemas), then about 12 turns of ~40-token user messages and ~250-token tool
results, and ~90 sampled tokens per agent turn: about 1.1k sampled of about 7.6k tokens.

One step = ``trainers.update.policy_forward`` (forward, log-probs + entropy of the sampled tokens),
the clipped surrogate over the whole row's normaliser, backward. Each (path, length) runs in its
own process, warm-up step first, then ``--repeats`` timed steps; peak memory is the process's
resident-set peak during the timed steps minus its resident set before them, sampled every 2 ms
from /proc (CPU: tracemalloc does not see torch's allocations), or ``torch.cuda.max_memory_allocated``
minus the allocation before the step on CUDA. The last line is ``memory ratio (full logits / new): X``
at the longest row both paths ran.

``--trl``: TRL is not a project dependency. The benchmark makes its own venv (``--trl-venv``),
which sees this interpreter's torch and transformers through a .pth file (same kernels, no second
torch download) and ``pip install trl`` into it, then times TRL's GRPO log-prob path on the same
model and tokens, the way TRL 1.16's ``GRPOTrainer`` runs it: the model patched with
``trl.trainer.utils.add_fused_lm_head`` (log-probs and entropy, as the trainer asks), each trace a
row of [left-padded prompt | right-padded completion] (TRL's layout: one prompt, one completion; a
multi-turn trace's first sampled token splits it, so its later user / tool turns sit in the
completion under mask 0), labels only on the completion
(``_get_per_token_logps_and_entropies``), the same clipped loss, backward. The trainer object
itself (generation, reward functions, accelerate) is not built.

``--sweep``: separates the two things a row's size can mean. (a) trained tokens fixed
(``--sweep-trained``, default 256), total tokens 2k, 4k, 8k, 16k; (b) total tokens fixed
(``--sweep-total``, default 4,096), trained tokens 256, 512, 1,024, 2,048. (a)'s point at 4,096
is (b)'s at 256. Each point is one trace (a prompt, then 64-token sampled replies spread evenly
through it), in its own process like the rows above. The new path runs at every point, the
full-logits path only up to ``--full-max`` total tokens (default 4,096 in sweep mode: its logits
grow by 4 bytes x 151,936 per token). For each sweep and path it prints a least-squares slope in
MiB per 1k tokens and the slopes between neighbouring points (the head's chunk fills up at
``chunk_rows`` trained rows, so (b) need not be a straight line), and then whether the new
path's growth in (a) is the size of tokens x hidden (less than one float32 vocabulary row, 0.58
MiB, per token) against the full path's tokens x V.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936
MiB = 1 << 20


def build_row(length: int, sampled_fraction: float, seed: int):
    """Traces of 7,600 tokens (the last one shorter) filling one packed row of ``length``: a first
    prompt, then turns of a sampled 90-token reply and 290 prompt tokens (user message + tool
    result); the first prompt takes what the turns leave."""
    import random

    from harness.policy.trace import TokenTrace

    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    reply, turn_prompt = 90, 290
    traces, left = [], length
    while left > 4 * reply:
        n = min(left, 7600)
        replies = max(1, round(n * sampled_fraction / reply))
        gap = min(turn_prompt, (n - replies * reply) // (replies + 1))
        tr = TokenTrace()
        tr.add_prompt(draw(n - replies * reply - (replies - 1) * gap))
        for k in range(replies):
            if k:
                tr.add_prompt(draw(gap))
            tr.add_response(draw(reply), [0.0] * reply)
        traces.append(tr)
        left -= len(tr)
    return traces


def sweep_row(total: int, trained: int):
    """One trace of ``total`` tokens of which ``trained`` are sampled: a prompt, then 64-token
    replies (the last one shorter) with equal prompt gaps between them, the last at the end."""
    import random

    from harness.policy.trace import TokenTrace

    rng = random.Random(total * 7 + trained)
    draw = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    replies = [64] * (trained // 64) + ([trained % 64] if trained % 64 else [])
    gap = (total - trained) // (len(replies) + 1)
    tr = TokenTrace()
    tr.add_prompt(draw(total - trained - gap * (len(replies) - 1)))
    for k, n in enumerate(replies):
        if k:
            tr.add_prompt(draw(gap))
        tr.add_response(draw(n), [0.0] * n)
    return [tr]


class PeakRSS:
    """Resident-set peak of this process while running, sampled from /proc/self/statm."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self.now()
        self.running = False

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def __enter__(self):
        self.base = self.peak = self.now()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.now())


def make_model(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, max_position_embeddings=max(32768, args.length))
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").to(args.device).train()


def harness_step(args, model, traces):
    import torch

    from trainers.losses import policy_loss
    from trainers.packing import pack
    from trainers.update import policy_forward

    packed = pack(traces, [1.0] * len(traces), args.length, budget_option="--lengths")
    (mb,) = [mb.to(args.device) for mb in packed.micro_batches]
    norm = packed.loss_norm()
    mb.old_logprobs = torch.zeros_like(mb.loss_mask)

    def step():
        logp, ent, _ = policy_forward(model, mb, 1.0, with_entropy=True, full_logits=args.path == "full")
        loss, _ = policy_loss("clip", logp, logp.detach(), mb.advantages, mb.loss_mask, agg="token-mean",
                              norm=norm, seq_index=mb.seq_index)
        loss.backward()
        del logp, ent, loss
    return step, int(mb.loss_mask.sum()), packed.real_tokens


def trl_step(args, model, traces):
    """TRL's GRPO log-prob path (see the module docstring) on the same traces."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    # what GRPOTrainer.__init__ does to the policy (TRL 1.16): a fused, tiled LM head + log-softmax
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    split = [tr.mask.index(1) for tr in traces]  # TRL's one prompt, one completion per row
    width_p, width_c = max(split), max(len(tr) - s for tr, s in zip(traces, split))
    rows = len(traces)
    ids = torch.zeros((rows, width_p + width_c), dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((rows, width_c))
    for r, (tr, s) in enumerate(zip(traces, split)):  # prompts left-padded, completions right-padded
        ids[r, width_p - s:width_p] = torch.tensor(tr.input_ids[:s])
        ids[r, width_p:width_p + len(tr) - s] = torch.tensor(tr.input_ids[s:])
        attn[r, width_p - s:width_p + len(tr) - s] = 1
        cmask[r, :len(tr) - s] = torch.tensor(tr.mask[s:], dtype=torch.float32)
    ids, attn, cmask = ids.to(args.device), attn.to(args.device), cmask.to(args.device)
    # GRPOTrainer._get_per_token_logps_and_entropies: labels only on the completion
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :-width_c] = -100

    def step():
        out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        logp = out.log_probs[:, -width_c:]
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.minimum(ratio, torch.clamp(ratio, 0.8, 1.2))
        loss = (per_token * cmask).sum() / cmask.sum()
        loss.backward()
        del out, logp, loss
    return step, int(cmask.sum()), int(attn.sum())


def child(args) -> None:
    """One (path, length) measurement; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args)
    traces = sweep_row(args.length, args.trained) if args.trained else build_row(args.length, args.sampled_fraction,
                                                                                  args.seed)
    step, sampled, tokens = (trl_step if args.path == "trl" else harness_step)(args, model, traces)
    cuda = args.device.startswith("cuda")
    step()  # warm-up
    model.zero_grad(set_to_none=False)  # gradients exist (as in training) before the measured steps
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else rss.peak - rss.base
    print(json.dumps({"path": args.path, "length": args.length, "tokens": tokens, "sampled": sampled,
                      "peak_mib": peak / MiB, "step_s": sorted(times)[len(times) // 2]}))


def trl_python(venv_dir: Path) -> Path:
    """A venv with trl that uses this interpreter's torch and transformers (made once)."""
    python = venv_dir / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    print(f"installing trl into {venv_dir} (once) ...", flush=True)
    venv.create(venv_dir, with_pip=True)
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "harness-base.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "trl"], check=True)
    return python


def run(python, args, path: str, length: int, trained: int = 0) -> dict | None:
    cmd = [str(python), __file__, "--child", "--path", path, "--length", str(length), "--device", args.device,
           "--trained", str(trained),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--repeats", str(args.repeats),
           "--sampled-fraction", str(args.sampled_fraction), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if got.returncode != 0:
        tail = (got.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {path} at {length} tokens{f' ({trained} trained)' if trained else ''} failed: {tail}", flush=True)
        return None
    return json.loads(got.stdout.strip().splitlines()[-1])


def slope(points: list[dict], x: str) -> float | None:
    """Least-squares slope of peak MiB per 1k of ``points[i][x]`` (None under two points)."""
    if len({p[x] for p in points}) < 2:
        return None
    xs, ys = [p[x] / 1000 for p in points], [p["peak_mib"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def sweep(args) -> None:
    """(a) total tokens grow at fixed trained tokens; (b) trained tokens grow at fixed total."""
    full_max = args.full_max if args.full_max_given else 4096
    plans = {"a": [(n, args.sweep_trained) for n in (2048, 4096, 8192, 16384)],
             "b": [(args.sweep_total, t) for t in (256, 512, 1024, 2048)]}
    print(f"model: random-init Qwen2, vocab {VOCAB:,} (tied), hidden {args.hidden}, {args.layers} layers, "
          f"fp32, {args.device}; one trace per row; full logits up to {full_max} tokens")
    print(f"{'sweep':<5} {'path':<5} {'row tokens':>10} {'trained':>8} {'peak MiB':>9} {'step s':>7}")
    done: dict[tuple[str, int, int], dict] = {}
    for name, plan in plans.items():
        for total, trained in plan:
            for path in ["new"] + (["full"] if total <= full_max else []):
                key = (path, total, trained)
                got = done.get(key) or run(sys.executable, args, path, total, trained)
                if got is None:
                    continue
                done[key] = got
                print(f"{name:<5} {path:<5} {got['tokens']:>10} {got['sampled']:>8} {got['peak_mib']:>9.0f} "
                      f"{got['step_s']:>7.2f}", flush=True)
    report_sweep(args, plans, done)


def report_sweep(args, plans: dict[str, list[tuple[int, int]]], done: dict[tuple[str, int, int], dict]) -> None:
    """Slopes of each sweep and path (fitted, and between neighbouring points), then the verdict."""
    slopes: dict[tuple[str, str], float | None] = {}
    for name, plan, x, what in (("a", plans["a"], "tokens", "total"), ("b", plans["b"], "sampled", "trained")):
        for path in ("new", "full"):
            points = [done[path, n, t] for n, t in plan if (path, n, t) in done]
            slopes[name, path] = got = slope(points, x)
            if got is None:
                continue
            # the head's chunk fills up at chunk_rows trained rows, so growth need not be a straight line
            steps = ", ".join(f"{slope([p, q], x):.0f}" for p, q in zip(points, points[1:]))
            print(f"slope ({name}) {path}: {got:.1f} MiB per 1k {what} tokens "
                  f"({len(points)} points, {what} {points[0][x]}-{points[-1][x]}; between neighbours: {steps})")
    row_v = 4 * VOCAB / MiB * 1000  # one float32 vocabulary row per token, in MiB per 1k tokens
    row_h = 4 * args.hidden / MiB * 1000
    new, full = slopes["a", "new"], slopes["a", "full"]
    if new is None:
        print("growth with total tokens: n/a (the new path ran at fewer than two lengths)")
        return
    verdict = "yes" if new < row_v else "no"
    print(f"growth with total tokens (a): new {new:.1f} MiB per 1k tokens = {new / row_h:.0f} float32 hidden "
          f"vectors ({args.hidden}) per token, {new / row_v:.3f} vocabulary rows; full "
          + (f"{full:.1f} = {full / row_v:.2f} vocabulary rows ({VOCAB:,}) per token; " if full is not None else
             "n/a; ")
          + f"new path grows as tokens x hidden, not tokens x V: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384", help="packed row lengths, comma-separated")
    parser.add_argument("--full-max", type=int,
                        help="longest row for the full-logits path (its logits alone are 4 bytes x tokens x 151,936); "
                             "default 16384, 4096 with --sweep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--sampled-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl", action="store_true", help="also TRL's GRPO log-prob path (installs trl in --trl-venv)")
    parser.add_argument("--trl-venv", default=str(Path.home() / ".cache" / "harness-bench" / "trl-venv"))
    parser.add_argument("--sweep", action="store_true",
                        help="(a) fixed trained tokens, growing total; (b) fixed total, growing trained (docstring)")
    parser.add_argument("--sweep-trained", type=int, default=256, help="trained tokens of sweep (a)")
    parser.add_argument("--sweep-total", type=int, default=4096, help="total tokens of sweep (b)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trained", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["full", "new", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=4096, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.full_max_given = args.full_max is not None
    args.full_max = args.full_max if args.full_max_given else 16384
    if args.child:
        sys.path.insert(0, str(REPO))
        child(args)
        return
    if args.sweep:
        if not 0 < args.sweep_trained < 2048 or args.sweep_total <= 2048:
            print("--sweep-trained takes 1-2047 (the shortest row is 2,048 tokens) and --sweep-total more than "
                  "2,048 (the most trained tokens)", file=sys.stderr)
            sys.exit(2)
        sweep(args)
        return
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        print(f"--lengths takes whole numbers separated by commas, got {args.lengths!r}", file=sys.stderr)
        sys.exit(2)
    trl = trl_python(Path(args.trl_venv)) if args.trl else None
    print(f"model: random-init Qwen2, vocab {VOCAB:,} (tied), hidden {args.hidden}, {args.layers} layers, "
          f"fp32, {args.device}; sampled fraction {args.sampled_fraction} (estimate, see docstring)")
    print(f"{'path':<6} {'row tokens':>10} {'sampled':>8} {'peak MiB':>9} {'step s':>7}")
    results: dict[tuple[str, int], dict] = {}
    for length in lengths:
        paths = ["new"] + (["full"] if length <= args.full_max else []) + (["trl"] if trl else [])
        for path in paths:
            got = run(trl if path == "trl" else sys.executable, args, path, length)
            if got is None:
                continue
            results[path, length] = got
            print(f"{path:<6} {got['tokens']:>10} {got['sampled']:>8} {got['peak_mib']:>9.0f} {got['step_s']:>7.2f}",
                  flush=True)
    for n in lengths:
        if ("trl", n) in results and ("new", n) in results:
            trl_run, new = results["trl", n], results["new", n]
            print(f"at {n} tokens: TRL / new: memory {trl_run['peak_mib'] / new['peak_mib']:.2f}, "
                  f"step time {trl_run['step_s'] / new['step_s']:.2f}")
    both = [n for n in lengths if ("full", n) in results and ("new", n) in results]
    if not both:
        print("memory ratio (full logits / new): n/a (no length ran both paths)")
        return
    n = max(both)
    print(f"step time ratio (full logits / new) at {n} tokens: "
          f"{results['full', n]['step_s'] / results['new', n]['step_s']:.2f}")
    print(f"memory ratio (full logits / new): {results['full', n]['peak_mib'] / results['new', n]['peak_mib']:.2f}"
          f" (at {n} tokens)")


if __name__ == "__main__":
    main()
