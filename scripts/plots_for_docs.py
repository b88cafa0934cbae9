"""Render each kind of result plot to PNG for docs/training.md, from runs made by real commands.

    .venv/bin/python scripts/plots_for_docs.py [--out docs/images] [--work results/docs-plots]

Runs, as a user would, one small `harness train-suite` on the toy env (every method, one shared
warm start, a few steps, held-out evaluation with 2 fixed-seed samples per task), then draws:

- plot-curves.png: `harness results curves docs-grpo` (one run's learning curves);
- plot-compare.png: `harness results compare docs-grpo docs-sgcd` (two runs overlaid);
- plot-suite.png: the suite's own comparison of all its runs (`<out-dir>/compare.png`).

--work keeps the database and the suite's models; the suite keeps finished runs and a saved warm
start on a rerun, so a second call with the same --work redraws the plots without training again.
Took 11 minutes on a 2-core CPU that other jobs shared, with OMP_NUM_THREADS=1 (without it, the
warm start alone had not finished after 18 minutes there).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "docs"
# Minutes on a laptop CPU, yet curves and intervals that mean something: the default warm start (600
# supervised steps; 300 leave held-out success at 0) and 30 held-out tasks x 2 samples per evaluation.
SUITE = ["--env", "toy", "--methods", "all", "--steps", "6", "--tasks-per-step", "4", "--group-size", "4",
         "--eval-every", "2", "--eval-tasks", "30", "--eval-trials", "2", "--prefix", PREFIX]


def harness(*args: str) -> None:
    print("$ harness " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "harness.cli", *args], check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"), help="where the PNGs go")
    parser.add_argument("--work", help="directory for the database and models, kept (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        db = f"sqlite:///{work / 'plots.db'}"
        harness("train-suite", *SUITE, "--db", db, "--out-dir", str(work / "suite"))
        shutil.copyfile(work / "suite" / "compare.png", out / "plot-suite.png")
        harness("results", "curves", f"{PREFIX}-grpo", "--db", db, "--out", str(out / "plot-curves.png"))
        harness("results", "compare", f"{PREFIX}-grpo", f"{PREFIX}-sgcd", "--db", db,
                "--out", str(out / "plot-compare.png"))
    for name in ("plot-curves.png", "plot-compare.png", "plot-suite.png"):
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
