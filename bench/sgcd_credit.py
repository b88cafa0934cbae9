"""Does SGCD's credit come from what the teacher knows? A multi-seed credit benchmark (issue 13).

Run from the repository root (CPU; about half an hour with the defaults on a 2-core machine):

    .venv/bin/python bench/sgcd_credit.py                         # 5 seeds x 4 arms, toy env
    .venv/bin/python bench/sgcd_credit.py --seeds 2 --steps 3     # a quick look

The toy variant (``--start lazy``, default): each seed's start policy is the tiny toy policy
warm-started like tests/test_train_learning.py, 1,000 supervised steps on the oracle's
demonstrations, then 100 on a mix with "lazy" ones (answer at once with a guessed code). It takes
the shortcut about half the time, so success hinges on a few decisive tokens: the first token of
its reply (call the tool, or answer), the item name it copies into the call, and the code it
copies into the answer. ``--start plain`` uses ``--warm-start`` steps on the oracle's
demonstrations only (many seeds then sit near 0 or near 1, which leaves little to compare).

Arms, trained per seed from one shared warm start with the same task stream, budget and held-out
evaluation (``harness train-suite`` arms):

- ``grpo``: GRPO with mixed-group resampling (the paper's comparator);
- ``sgcd``: SGCD with the built-in ``diff`` summarizer, default (calibrated) settings;
- ``sgcd_placebo``: the same, with every reference replaced by neutral text of equal length;
- ``sgcd_oracle``: the same, with a reference naming a successful sibling's exact actions and
  answer (``reference=oracle``: leaks answers on purpose; an upper bound of what a reference holds).

Decisive tokens: the first sampled token of an episode (tool call or answer) and every sampled
token that decodes to an item name or a code. Reported per arm, summed over seeds and steps:

- credit: the share of sampled tokens amplified (W > 1); *precision*, the share of amplified
  tokens that are decisive, against the base rate (the share of all sampled tokens that are
  decisive); recall, the share of decisive tokens amplified; mean W; mean excess divergence;
- learning: held-out success (60 test tasks x 2 samples at temperature 1, fixed seeds) after the
  budget, mean over seeds, and the paired difference to ``grpo`` with a 95% cluster bootstrap
  interval (seeds resampled, then tasks within each seed).

It writes ``table.md`` and ``credit.png`` under ``--out`` (default ``results/bench/sgcd_credit``)
and prints the table. Runs are kept in ``--out``/bench.db: a rerun with the same settings reuses
finished ones (more ``--seeds`` adds seeds); other settings need another ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ARMS = {"grpo": "grpo", "sgcd": "sgcd_probe", "sgcd_placebo": "sgcd_probe", "sgcd_oracle": "sgcd_probe"}
ARM_ARGS = ["grpo:dynamic_sampling=resample", "sgcd_placebo:reference=placebo", "sgcd_oracle:reference=oracle"]
COUNTS = ("credit/tokens", "credit/decisive", "credit/amplified", "credit/amplified_decisive")


def register_probe() -> None:
    """``sgcd_probe``: SGCD that also counts where its credit lands (decisive toy tokens or not)."""
    from envs.toy.tasks import CODES, ITEMS
    from trainers.methods import register_method, settings_builder
    from trainers.methods.sgcd import SGCDMethod, SGCDSettings

    words = set(ITEMS) | set(CODES)

    class ProbeSGCD(SGCDMethod):
        _decisive: dict[int, bool] = {}

        def prepare(self, groups, ctx):
            prepared = super().prepare(groups, ctx)
            counts = dict.fromkeys(COUNTS, 0.0)
            for trace, w in zip(prepared.traces, prepared.extras["weights"]):
                ids = [trace.input_ids[p] for p in trace.sampled_positions]
                decisive = torch.tensor([k == 0 or self._is_decisive(ctx.tokenizer, i) for k, i in enumerate(ids)])
                amplified = w > 1.0 + 1e-6
                counts["credit/tokens"] += len(ids)
                counts["credit/decisive"] += float(decisive.sum())
                counts["credit/amplified"] += float(amplified.sum())
                counts["credit/amplified_decisive"] += float((amplified & decisive).sum())
            prepared.metrics.update(counts)
            return prepared

        def _is_decisive(self, tokenizer, token: int) -> bool:
            if token not in self._decisive:
                self._decisive[token] = tokenizer.decode([token]).strip(' "\'.,;:').lower() in words
            return self._decisive[token]

    register_method("sgcd_probe")(settings_builder("sgcd_probe", ProbeSGCD, SGCDSettings()))


def lazy_start(seed: int, target: Path) -> Path:
    """The start policy of ``--start lazy`` (see the module docstring); reused when present."""
    from envs.toy import CODES, SYSTEM_PROMPT, ToyFactory
    from envs.toy.policy import build_toy_policy
    from envs.toy.tasks import answer_text
    from harness.policy.local_policy import load_model_and_tokenizer
    from trainers.sft import demo_trace, sft_steps

    if (target / "config.json").exists():
        return target
    torch.manual_seed(seed)
    path = build_toy_policy(target.with_name(target.name + "-init"), seed=seed)
    model, tok = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    factory, rng = ToyFactory(), random.Random(seed)
    tasks = factory.tasks("train")
    oracle = [demo_trace(tok, factory.demonstration(t), factory.tool_schemas) for t in tasks]
    lazy = [demo_trace(tok, [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user", "content": t.data["question"]},
                             {"role": "assistant",
                              "content": answer_text([rng.choice(CODES) for _ in t.data["items"]])}],
                       factory.tool_schemas) for t in tasks]
    for chunk in range(5):
        sft_steps(model, oracle, steps=200, lr=1e-3, batch_size=16, seed=seed * 100 + chunk)
    sft_steps(model, oracle + lazy, steps=100, lr=1e-3, batch_size=16, seed=seed * 100 + 10)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def train_seed(args, seed: int, out: Path, db: str) -> None:
    from harness.cli.suite import run_suite
    from trainers.config import TrainConfig

    lazy = args.start == "lazy"
    policy = str(lazy_start(seed, out / f"seed{seed}" / "start-lazy")) if lazy else "tiny-toy"
    base = TrainConfig(env="toy", policy=policy, db=db, seed=seed, steps=args.steps, tasks_per_step=args.tasks,
                       group_size=args.group_size, lr=args.lr, warmup_steps=2,
                       warm_start=0 if lazy else args.warm_start,
                       warm_start_lr=1e-3, eval_every=max(1, args.steps // 2), eval_tasks=args.eval_tasks,
                       eval_temperature=1.0,
                       eval_trials=2, temperature=1.0, max_new_tokens=40, summarizer="diff", device="cpu", quiet=True)
    log = (out / f"seed{seed}.log").open("a")
    echo = lambda text: log.write(text + "\n")  # noqa: E731
    result = run_suite(base, ",".join(f"{a}={m}" for a, m in ARMS.items()), method_args=ARM_ARGS + args.method_arg,
                       prefix=f"s{seed}", out_dir=out / f"seed{seed}", resume=True, threshold=0.5, echo=echo,
                       note=echo)
    log.close()
    if result["failed"]:
        raise SystemExit(f"seed {seed}: {result['failed']}")


def held_out(store, run: str, step: int):
    from harness.results.stats import task_rates
    from harness.results.train_compare import eval_step_run

    return task_rates(store.episodes_df(eval_step_run(run, step)))


def cluster_bootstrap(deltas: list, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean paired difference: resample seeds, then tasks within each seed."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        picked = [deltas[rng.randrange(len(deltas))] for _ in deltas]
        values = [d[rng.randrange(len(d))] for d in picked for _ in d]
        means.append(sum(values) / len(values))
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _pooled(frames: list, key: str, how: str) -> float:
    """Mean (or max) of a logged metric over every step of every seed; nan if never logged (a step
    with no guided group logs no divergence)."""
    values = [float(v) for f in frames if key in f for v in f[key].dropna()]
    if not values:
        return float("nan")
    return max(values) if how == "max" else sum(values) / len(values)


def summarize(args, seeds: list[int], db: str) -> tuple[list[dict], dict]:
    from harness.store import Store, train_steps

    store = Store(db)
    rows, curves = [], {}
    final = {arm: {s: held_out(store, f"s{s}-{arm}", args.steps) for s in seeds} for arm in ARMS}
    start = {s: held_out(store, f"s{s}-grpo", 0) for s in seeds}
    for arm in ARMS:
        steps = {s: train_steps(store, f"s{s}-{arm}") for s in seeds}
        row = {"arm": arm, "start": sum(start[s].mean() for s in seeds) / len(seeds),
               "final": sum(final[arm][s].mean() for s in seeds) / len(seeds),
               "per_seed": [float(final[arm][s].mean()) for s in seeds]}
        if arm != "grpo":
            deltas = [(final[arm][s] - final["grpo"][s]).dropna().tolist() for s in seeds]
            row["delta"] = sum(sum(d) for d in deltas) / sum(len(d) for d in deltas)
            row["ci"] = cluster_bootstrap(deltas)
            frame = [f for f in steps.values()]
            total = {k: sum(float(f[k].sum()) for f in frame if k in f) for k in COUNTS}
            row.update({"amplified": total["credit/amplified"] / max(total["credit/tokens"], 1),
                        "precision": total["credit/amplified_decisive"] / total["credit/amplified"]
                        if total["credit/amplified"] else float("nan"),
                        "base_rate": total["credit/decisive"] / max(total["credit/tokens"], 1),
                        "recall": total["credit/amplified_decisive"] / max(total["credit/decisive"], 1),
                        "amplified_tokens": int(total["credit/amplified"]),
                        "w_mean": _pooled(frame, "sgcd/w_mean", "mean"),
                        "kl_reference": _pooled(frame, "sgcd/kl_reference", "mean"),
                        "kl_excess_max": _pooled(frame, "sgcd/kl_excess_max", "max")})
        rows.append(row)
        curves[arm] = row["per_seed"]
    return rows, curves


def table(rows: list[dict], args, seeds: list[int]) -> str:
    fmt = lambda x, p=3: "-" if x is None or x != x else f"{x:.{p}f}"  # noqa: E731
    start = "the lazy-mix start" if args.start == "lazy" else f"warm start {args.warm_start}"
    lines = [f"SGCD credit benchmark: toy env, {len(seeds)} seeds, {args.steps} steps x {args.tasks} tasks x "
             f"{args.group_size} siblings, lr {args.lr}, {start}; held-out: {args.eval_tasks} test "
             "tasks x 2 samples at temperature 1", "",
             "| arm | held-out success (start -> final) | final - grpo [95% CI] | amplified | precision | base rate | "
             "recall | mean W | mean KL with ref | max excess |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["arm"] == "grpo" else f"{r['delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
        lines.append(f"| {r['arm']} | {fmt(r['start'])} -> {fmt(r['final'])} | {delta} | "
                     f"{fmt(r.get('amplified'), 4)} ({r.get('amplified_tokens', '-')}) | {fmt(r.get('precision'))} | "
                     f"{fmt(r.get('base_rate'))} | {fmt(r.get('recall'))} | {fmt(r.get('w_mean'), 4)} | "
                     f"{fmt(r.get('kl_reference'))} | {fmt(r.get('kl_excess_max'))} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = ["#0072B2", "#D55E00", "#009E73", "#CC79A7"]  # Okabe-Ito: colour-blind safe, distinct
    for k in range(len(seeds)):  # one grey line per seed: the arms are paired within a seed
        left.plot(range(len(rows)), [r["per_seed"][k] for r in rows], color="#BBBBBB", linewidth=0.8, zorder=1)
    for i, (r, c) in enumerate(zip(rows, colors)):
        left.scatter([i] * len(r["per_seed"]), r["per_seed"], color=c, s=16, zorder=2)
        left.scatter([i], [r["final"]], color=c, s=90, marker="D", edgecolor="black", zorder=3)
    left.set_xticks(range(len(rows)), [r["arm"] for r in rows])
    left.set_ylim(0, 1)
    left.set_ylabel("held-out success after the budget")
    left.set_title(f"learning: {len(seeds)} seeds (dots, lines pair a seed), mean (diamond)", fontsize=10)
    sg = [r for r in rows if r["arm"] != "grpo"]
    x = list(range(len(sg)))
    precision = [r["precision"] if r["precision"] == r["precision"] else 0.0 for r in sg]
    right.bar([i - 0.2 for i in x], precision, 0.4, label="decisive share of the amplified tokens", color="#D55E00")
    right.bar([i + 0.2 for i in x], [r["base_rate"] for r in sg], 0.4, label="decisive share of all sampled tokens",
              color="#999999")
    for i, r, p in zip(x, sg, precision):
        right.annotate(f"{r['amplified_tokens']} amplified", (i - 0.2, p), textcoords="offset points", xytext=(0, 4),
                       ha="center", fontsize=8)
    right.set_xticks(x, [r["arm"] for r in sg])
    right.set_ylim(0, 1)
    right.set_title("where the credit lands (W > 1)", fontsize=10)
    right.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--start", choices=["lazy", "plain"], default="lazy", help="the start policy (see above)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5,
                        help="low enough that GRPO does not saturate within the budget")

    parser.add_argument("--warm-start", type=int, default=600)
    parser.add_argument("--eval-tasks", type=int, default=60)
    parser.add_argument("--method-arg", action="append", default=[], help="extra ARM:key=value for the suite")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--out", default="results/bench/sgcd_credit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{out / 'bench.db'}"
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "threads", "out")}
    saved = out / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{out} holds runs made with other settings ({saved}); pick another --out")
    saved.write_text(json.dumps(settings, indent=1))
    register_probe()
    seeds = list(range(args.seeds))
    for seed in seeds:
        t0 = time.perf_counter()
        train_seed(args, seed, out, db)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows, _ = summarize(args, seeds, db)
    text = table(rows, args, seeds)
    (out / "table.md").write_text(text)
    plot(rows, seeds, out / "credit.png")
    print(text)
    print(f"wrote {out / 'table.md'} and {out / 'credit.png'}")


if __name__ == "__main__":
    main()
