"""The toy training command on an idle core vs on a core shared with a busy loop.

Run from the repository root:

    .venv/bin/python bench/busy_cpu.py           # a shortened toy command (a few percent of the work)
    .venv/bin/python bench/busy_cpu.py --full    # the README's toy command as written

Why: on a shared machine torch's default threads (one per core of the machine) spun against
each other and other jobs, and the toy command took 25 minutes instead of 67 s (issue 21). The
harness now chooses the thread count from the cores the process may use (``harness/threads.py``).

What it measures, in one run, each case in a fresh results directory:

- ``idle``: the command as a user runs it (every core it is allowed);
- ``pinned``: pinned to core 0 (``taskset -c 0``), nothing else started on that core;
- ``busy``: pinned to core 0, with a busy loop (a Python ``while True``) pinned to core 0 as well.

It prints the wall times, busy / idle (the target: at most 3) and busy / pinned (a fair share of
one core is half of it, so about 2). Other jobs on the machine slow every case alike; run it on a
quiet machine for the README's numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

README_COMMAND = ["train", "--env", "toy", "--policy", "tiny-toy", "--method", "grpo", "--warm-start", "600",
                  "--lr", "5e-4", "--warmup-steps", "2", "--steps", "20", "--eval-every", "5",
                  "--eval-temperature", "1", "--eval-trials", "2", "--max-new-tokens", "40"]
# The same phases (warm start, held-out evaluation, GRPO steps) with less of each.
SHORT_CHANGES = {"--warm-start": "50", "--steps": "1", "--eval-every": "1", "--eval-tasks": "5"}


def toy_command(full: bool) -> list[str]:
    args = list(README_COMMAND)
    if not full:
        for flag, value in SHORT_CHANGES.items():
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
    return args


def timed_run(args: list[str], core: int | None, label: str) -> float:
    """Wall seconds of ``harness <args>`` (pinned to ``core`` unless None), in a fresh directory."""
    work = Path(tempfile.mkdtemp(prefix=f"busy-cpu-{label}-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("OMP_NUM_THREADS", "HARNESS_THREADS"):  # the harness's own choice is what is measured
        env.pop(var, None)
    pin = ["taskset", "-c", str(core)] if core is not None else []
    command = [*pin, sys.executable, "-m", "harness.cli", *args,
               "--run", f"bench-{label}", "--db", f"sqlite:///{work}/h.db", "--out-dir", str(work / "run")]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{label} run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the README's toy command, not the shortened one")
    parser.add_argument("--core", type=int, default=0, help="the core both runs (and the busy loop) use")
    args = parser.parse_args()
    if shutil.which("taskset") is None:
        sys.exit("needs taskset (util-linux)")
    command = toy_command(args.full)
    print(f"command: harness {' '.join(command)}", flush=True)
    idle = timed_run(command, None, "idle")
    print(f"idle    {idle:8.1f} s", flush=True)
    pinned = timed_run(command, args.core, "pinned")
    print(f"pinned  {pinned:8.1f} s", flush=True)
    spinner = subprocess.Popen(["taskset", "-c", str(args.core), sys.executable, "-c", "while True: pass"])
    try:
        busy = timed_run(command, args.core, "busy")
    finally:
        spinner.kill()
        spinner.wait()
    print(f"busy    {busy:8.1f} s", flush=True)
    print(f"busy / idle = {busy / idle:.2f} (target <= 3); busy / pinned = {busy / pinned:.2f}")


if __name__ == "__main__":
    main()
