"""Regenerate the measured numbers that README.md and docs/training.md quote, each by the command
quoted next to it, and print ``README says X, measured Y`` lines.

Run from the repository root:

    .venv/bin/python bench/readme_numbers.py              # the cheap ones (a few minutes on a 2-core CPU)
    .venv/bin/python bench/readme_numbers.py --expensive  # all of them (about half an hour, more under load)
    .venv/bin/python bench/readme_numbers.py --list       # each number and its command, nothing run

Every command runs as a user runs it (``python -m harness.cli ...``, the ``bench/`` scripts) in a
fresh temporary directory with its own database, so nothing in ``results/`` is touched. Numbers
marked ``[timing]`` are wall times or time ratios: they depend on the machine, its load and how
threads are scheduled (``HARNESS_THREADS``), so a difference of tens of percent is not a
regression; the others (success rates, pass^1) are deterministic for a given torch build and
thread count.

Covered: the tour's oracle pass^1 and its `train-suite ... rlcsd` time (README), the toy warm
start's step-0 held-out success and the `harness sft` defaults' held-out success
(docs/training.md); with ``--expensive`` also the toy GRPO command's time and final held-out
success, the whole method suite's time, and the step-time ratios (README). Not covered: the
LM-head memory numbers (``bench/lm_head_memory.py --trl`` builds its own TRL venv from the
network) and the learning check's 0.492 -> 0.958 (``tests/test_train_learning.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
HARNESS = [sys.executable, "-m", "harness.cli"]

TOY_GRPO = ("train --env toy --policy tiny-toy --method grpo --warm-start 600 --lr 5e-4 --steps 20 --eval-every 5 "
            "--eval-temperature 1 --eval-trials 2 --max-new-tokens 40")
FIRST_GRPO = ("train --env toy --policy tiny-toy --method grpo --warm-start 600 --lr 5e-4 --warmup-steps 2 --steps 20 "
              "--eval-every 5 --eval-temperature 1 --eval-trials 2 --max-new-tokens 40 --run first-grpo")


@dataclass
class Workdir:
    """Where one number's commands run: a fresh directory and database."""

    path: Path

    @property
    def db(self) -> str:
        return f"sqlite:///{self.path / 'harness.db'}"

    def harness(self, args: str, db: bool = True) -> str:
        """Run ``harness ARGS --db <this db>`` here (``db=False``: a command without a database);
        its stdout (it must succeed)."""
        return self.run([*HARNESS, *args.split(), *(["--db", self.db] if db else [])])

    def run(self, argv: list[str]) -> str:
        done = subprocess.run(argv, cwd=self.path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def score(self, run: str, key: str = "pass^1") -> float:
        return json.loads(self.harness(f"results show {run} --format json"))[0][key]


@dataclass
class Number:
    where: str
    """The page, then the sentence or table the number is in."""
    says: str
    """The number as the page quotes it."""
    command: str
    """The command that produced it, as the page shows it."""
    measure: Callable[[Workdir], str]
    expensive: bool = False
    timing: bool = False
    """A wall time or time ratio: depends on load and thread scheduling."""


def _timed(work: Callable[[Workdir], object]) -> Callable[[Workdir], str]:
    def measure(w: Workdir) -> str:
        started = time.monotonic()
        work(w)
        return f"{(time.monotonic() - started) / 60:.1f} min"
    return measure


def _oracle(w: Workdir) -> str:
    w.harness("eval --env tau-airline --agent oracle --user scripted --run oracle")
    return f"pass^1 = {w.score('oracle'):.3f}"


def _sft_defaults(w: Workdir) -> str:
    w.harness("sft --env toy --policy tiny-toy --out sft", db=False)
    w.harness("eval --env toy --policy sft --split test --max-new-tokens 40 --run sft-greedy")
    w.harness("eval --env toy --policy sft --split test --temperature 1 --trials 2 --max-new-tokens 40 --run sft-t1")
    return f"{w.score('sft-greedy'):.3f} greedy, {w.score('sft-t1'):.3f} at temperature 1 x 2"


def _warm_start_step0(w: Workdir) -> str:
    w.harness(f"{FIRST_GRPO} --stop-after 1 --quiet")  # step 0 is the warm start's evaluation
    return f"{w.score('first-grpo/eval-step-000000'):.3f}"


def _first_grpo(w: Workdir) -> str:
    w.harness(f"{FIRST_GRPO} --quiet")
    return (f"{w.score('first-grpo/eval-step-000000'):.3f} at step 0, "
            f"{w.score('first-grpo/eval-step-000020'):.3f} at step 20")


def _step_ratios(w: Workdir) -> str:
    out = w.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--method", "all", "--threads", "1",
                 "--repeats", "5"])
    ratios = dict(re.findall(r"^(\w+)\s+[\d.]+\s+([\d.]+)\s+\d+", out, re.M))
    return " ".join(f"{m} {ratios.get(m, '?')}" for m in ("rlsd", "opsd", "sdpo", "rlcsd", "opd", "rlad", "grpo_kl",
                                                           "sgcd"))


def _lm_head_memory(w: Workdir) -> str:
    out = w.run([sys.executable, str(REPO / "bench" / "lm_head_memory.py"), "--lengths", "4096"])
    peaks = dict(re.findall(r"^(full|new)\s+4096\s+\d+\s+(\d+)", out, re.M))
    ratio = re.search(r"memory ratio \(full logits / new\): ([\d.]+)", out)
    return (f"{peaks.get('new', '?')} MiB against {peaks.get('full', '?')} MiB "
            f"(ratio {ratio.group(1) if ratio else '?'})")


def _learning_check(w: Workdir) -> str:
    out = w.run([sys.executable, "-m", "pytest", "-q", "-s", str(REPO / "tests" / "test_train_learning.py"),
                 "-p", "no:cacheprovider"])
    found = re.search(r"held-out success: (warm start [\d.]+, GRPO [\d.]+, lr=0 [\d.]+)", out)
    return found.group(1) if found else "?"


def _busy_cpu(w: Workdir) -> str:
    out = w.run([sys.executable, str(REPO / "bench" / "busy_cpu.py"), "--full"])
    found = re.search(r"busy / idle = ([\d.]+)", out)
    return f"busy / idle {found.group(1)}" if found else "?"


NUMBERS = [
    Number("README.md, tour: the gold replay", "pass^1 = 1.000",
           "harness eval --env tau-airline --agent oracle --user scripted --run oracle",
           _oracle),
    Number("README.md, tour: train-suite rlcsd", "~1 min CPU",
           "harness train-suite --env toy --methods rlcsd --steps 2 --warm-start 0 --eval-every 0 --prefix tour-rlcsd",
           _timed(lambda w: w.harness("train-suite --env toy --methods rlcsd --steps 2 --warm-start 0 --eval-every 0 "
                                      "--prefix tour-rlcsd")), timing=True),
    Number("docs/training.md, a first run: the warm start's held-out success", "0.450",
           FIRST_GRPO.replace("train", "harness train", 1) + " (step 0; here with --stop-after 1)", _warm_start_step0),
    Number("docs/training.md, harness sft with its defaults, then harness eval on the test split",
           "0.800 greedy, 0.483 at temperature 1 x 2",
           "harness sft --env toy --policy tiny-toy --out sft; harness eval --env toy --policy sft --split test "
           "--max-new-tokens 40 [--temperature 1 --trials 2]", _sft_defaults),
    Number("README.md, tour: the toy GRPO command", "~2 min CPU", "harness " + TOY_GRPO + " --run toy-grpo",
           _timed(lambda w: w.harness(f"{TOY_GRPO} --run toy-grpo --quiet")), expensive=True, timing=True),
    Number("docs/training.md, a first run: held-out success at step 0 and after 20 GRPO steps",
           "0.450 at step 0, 0.492 at step 20", "harness " + FIRST_GRPO, _first_grpo, expensive=True),
    Number("README.md, the whole method suite, shortened", "11 min",
           "harness train-suite --env toy --prefix tour-all --steps 10 --tasks-per-step 4 --eval-every 5 "
           "--eval-tasks 30",
           _timed(lambda w: w.harness("train-suite --env toy --prefix tour-all --steps 10 --tasks-per-step 4 "
                                      "--eval-every 5 --eval-tasks 30")), expensive=True, timing=True),
    Number("README.md, step / GRPO step after prefix sharing",
           "rlsd 1.20 opsd 1.16 sdpo 1.36 rlcsd 1.65 opd 1.31 rlad 1.31 grpo_kl 1.30 sgcd 1.87",
           "python bench/train_step.py --method all --threads 1 --repeats 5", _step_ratios,
           expensive=True, timing=True),
    Number("README.md, memory at real vocabulary sizes: peak update memory, 4,096-token row",
           "786 MiB against 4,771 MiB (ratio 6.07)", "python bench/lm_head_memory.py --trl (here without --trl)",
           _lm_head_memory, expensive=True),
    Number("docs/training.md, the learning check: held-out success", "warm start 0.475, GRPO 0.958, lr=0 0.475",
           "python -m pytest -s tests/test_train_learning.py", _learning_check, expensive=True),
    Number("docs/training.md, threads: the README's toy command pinned beside a busy loop",
           "busy / idle 0.33 and 0.53 (shortened command)", "python bench/busy_cpu.py --full", _busy_cpu,
           expensive=True, timing=True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expensive", action="store_true", help="also the numbers that take many minutes")
    parser.add_argument("--list", action="store_true", help="print each number and its command; run nothing")
    parser.add_argument("--only", metavar="TEXT", help="only the numbers whose description contains TEXT "
                                                       "(e.g. 'toy GRPO'; expensive ones included)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from harness.threads import torch_threads

    setting = os.environ.get("HARNESS_THREADS", "unset")
    print(f"torch threads per command: {torch_threads()} (HARNESS_THREADS={setting}; the success rates "
          "depend on it too, through the order of floating-point sums)")
    failed = 0
    chosen = [n for n in NUMBERS if args.only is None or args.only.lower() in n.where.lower()]
    for n in chosen:
        page, _, place = n.where.partition(", ")
        tag = f"{place}{' [timing]' if n.timing else ''}: {page} says"
        if args.list or (n.expensive and not args.expensive and args.only is None):
            skipped = "" if args.list else " (not run: --expensive)"
            print(f"{tag} {n.says}{skipped}\n    {n.command}")
            continue
        with tempfile.TemporaryDirectory(prefix="readme-numbers-") as tmp:
            try:
                measured = n.measure(Workdir(Path(tmp)))
            except RuntimeError as exc:
                failed += 1
                measured = f"FAILED ({exc})"
        print(f"{tag} {n.says}, measured {measured}\n    {n.command}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
