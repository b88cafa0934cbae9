"""`harness view` on a big database: the run list and a run page, timed.

Run from the repository root:

    .venv/bin/python bench/view_speed.py [--runs 100] [--tasks 50] [--trials 20] [--db PATH] [--repeat 5]

Fills a SQLite file (a temporary one unless ``--db`` names one that already holds the runs)
through the store's own API (``Store.create_run`` and ``Store.add_episodes``, synthetic episodes
of a short conversation each: 100 runs x 50 tasks x 20 trials = 100,000 episodes by default), then
opens it read-only as ``harness view`` does and asks the app (in process, through Starlette's
test client, so HTTP parsing is left out but routing, queries and templates are in) for:

- ``/runs``: the first page of the run list (50 runs, each with its episode count, pass^1, cost);
- ``/runs/ID``: one run's page (the summary ``harness results show`` computes over its 1,000
  episodes, and its first 100 tasks with per-trial links);
- their ``/api`` twins.

Each request is made ``--repeat`` times after one warm-up; the median is printed in ms against the
500 ms target (issue 18). Nothing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.store import Store  # noqa: E402
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage  # noqa: E402

TARGET_MS = 500.0


def synthetic_episode(rng: random.Random, task: int, trial: int) -> EpisodeResult:
    success = rng.random() < 0.6
    infra = rng.random() < 0.01
    messages = [
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": f"I want to change reservation R{task:04d}. " * 4},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function",
             "function": {"name": "get_reservation_details", "arguments": f'{{"reservation_id": "R{task:04d}"}}'}}]},
        {"role": "tool", "tool_call_id": "c0", "name": "get_reservation_details", "content": '{"flights": []} ' * 20},
        {"role": "assistant", "content": "Done." if success else "I could not do that."},
        {"role": "user", "content": "###STOP###"},
    ]
    return EpisodeResult(
        task_id=str(task), trial=trial, seed=rng.randrange(10**6), messages=messages,
        termination=Termination.INFRASTRUCTURE_ERROR if infra else Termination.USER_STOP,
        score=Score(reward=1.0 if success else 0.0, success=success, breakdown={"db_match": success}),
        error_class=ErrorClass.INFRA if infra else ErrorClass.NONE,
        agent_usage=Usage(prompt_tokens=2000, completion_tokens=150, cost=0.004, calls=3, llm_seconds=2.0),
        user_usage=Usage(prompt_tokens=800, completion_tokens=40, cost=0.001, calls=2, llm_seconds=0.8),
        wall_seconds=3.5, env_seconds=0.1)


def fill(url: str, runs: int, tasks: int, trials: int) -> None:
    store = Store(url)
    rng = random.Random(0)
    started = time.perf_counter()
    for r in range(runs):
        name = f"bench-{r:04d}"
        store.create_run(name, "eval", "tau-airline", "tau3", "base", "litellm", f"openai/model-{r % 7}",
                         "llm", "openai/gpt-4.1", {"trials": trials})
        batch = [synthetic_episode(rng, task, trial) for task in range(tasks) for trial in range(trials)]
        store.add_episodes(name, batch)
        store.set_run_status(name, "finished")
    store.close()
    print(f"filled {runs} runs x {tasks} tasks x {trials} trials = {runs * tasks * trials:,} episodes "
          f"in {time.perf_counter() - started:.0f} s", flush=True)


def timed(client, path: str, repeat: int) -> float:
    response = client.get(path)  # warm-up (and a check that the page serves)
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        client.get(path)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--db", help="SQLite file to fill (or reuse, when it already holds the runs)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from starlette.testclient import TestClient

    from envs.registry import run_metrics, task_metrics
    from harness.view import Context, create_app

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "view-bench.db"
        url = f"sqlite:///{path}"
        if not path.exists():
            fill(url, args.runs, args.tasks, args.trials)
        print(f"database {path}: {os.path.getsize(path) / 2**20:.0f} MiB", flush=True)
        store = Store(url, read_only=True)
        app = create_app(Context(store=store, env_metrics=run_metrics, task_metrics=task_metrics))
        with TestClient(app) as client:
            run_id = client.get("/api/runs?limit=1").json()["runs"][0]["id"]
            for label, path_ in (("run list  /runs", "/runs"), ("run list  /api/runs", "/api/runs"),
                                 (f"run page  /runs/{run_id}", f"/runs/{run_id}"),
                                 (f"run page  /api/runs/{run_id}", f"/api/runs/{run_id}")):
                ms = timed(client, path_, args.repeat)
                verdict = "within" if ms <= TARGET_MS else "OVER"
                print(f"{label:<28} {ms:8.1f} ms  ({verdict} the {TARGET_MS:.0f} ms target)", flush=True)
        store.close()


if __name__ == "__main__":
    main()
