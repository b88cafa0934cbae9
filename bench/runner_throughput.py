r"""Episode-runner throughput against a fake OpenAI-compatible server with fixed latency.

Run from the repository root (about 15 minutes with the defaults; concurrency 1 dominates):

    HARNESS_DATA_DIR=../shared/data/tau .venv/bin/python bench/runner_throughput.py
    .venv/bin/python bench/runner_throughput.py --episodes 448 --latency 0.2 --concurrency 1 16 64 \
        --clients litellm direct
    .venv/bin/python bench/runner_throughput.py --clients direct --concurrency 16 64 --repeat 3   # quick: skip C = 1

What runs: E tau-airline episodes (the 50 tasks, repeated as trials, cut at E), each a real
conversation through our env, user simulator, grader and SQLite store (group commit, as
``harness eval`` writes): user opening line, one agent tool call, one agent answer, user
``###STOP###`` (4 LLM calls). The episodes run on the event loop ``harness eval`` uses (uvloop when
installed, ``--loop`` to choose).

The fake server runs in its own process, so its CPU is never counted as the harness's, and answers
every call after exactly L seconds. By default it is the lean one (``tests/fakes/
openai_async_server.py``: one asyncio loop, the delay is a timer); ``--server threaded`` uses the
tests' ``http.server`` fake (a thread per connection, about 0.5 ms of CPU per call and GIL hand-offs
between 64 threads waking at once, which on a 2-core machine competes with the harness).

What it prints, per client (``litellm``, the default; ``direct``, the lean OpenAI-compatible
transport) and concurrency C:
- wall / ideal, where ideal = total LLM calls x L / C (what a zero-overhead harness would take);
- harness CPU ms per LLM call: CPU time of this process (all its threads) / LLM calls —
  everything the harness does per call: client, env, grading, store writes;
- server CPU ms per LLM call (the fake's own process; reported, not counted);
- commits: store transactions (fewer than episodes: group commit).
Targets from the issue: wall/ideal <= 1.15 at C = 64, overhead <= 2 ms per call.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HARNESS_DATA_DIR", str(REPO.parent / "shared" / "data" / "tau"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _responder_factory(latency: float):
    def respond(request: dict) -> dict:
        messages = request.get("messages", [])
        last = messages[-1] if messages else {}
        if request.get("model") == "bench-user":
            # The user model sees agent text as 'user' turns: opening first, then stop.
            said = sum(1 for m in messages if m.get("role") == "assistant")
            return {"content": "I need help with my reservation." if said == 0 else "###STOP###", "delay": latency}
        if last.get("role") == "tool":
            return {"content": "Here are your details.", "delay": latency}
        return {"tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}], "delay": latency}

    return respond


def _serve(latency: float, kind: str, conn) -> None:
    """The fake server's process: serves until killed; answers ``"cpu"`` on ``conn`` with its own
    CPU seconds so far (reported next to the harness's, never added to it)."""
    import threading

    def answer_cpu_queries() -> None:
        while True:
            conn.recv()
            conn.send(time.process_time())

    threading.Thread(target=answer_cpu_queries, daemon=True).start()
    if kind == "threaded":
        from fakes.openai_server import FakeOpenAIServer

        server = FakeOpenAIServer(_responder_factory(latency))
        server.start()
        conn.send(server.base_url)
        while True:
            time.sleep(3600)
    from fakes.openai_async_server import AsyncFakeOpenAIServer

    AsyncFakeOpenAIServer(_responder_factory(latency)).serve_forever(on_ready=conn.send)


def _measure(base_url: str, client: str, concurrency: int, episodes: int, latency: float, server_cpu,
             loop: str = "auto") -> dict:
    from envs.tau.env import TauAirlineFactory
    from envs.tau.user_sim import make_user_spec
    from harness.agents import make_agent_spec
    from harness.episode_runner import EpisodeJob, run_episodes, run_loop, trial_seeds
    from harness.store import EpisodeWriter, Store

    user = make_user_spec("litellm", model="openai/bench-user", api_base=base_url, client=client)
    factory = TauAirlineFactory(data_version="tau3", user=user)
    agent = make_agent_spec("litellm", model="openai/bench-agent", api_base=base_url, client=client)
    tasks = factory.tasks("base")
    trials = -(-episodes // len(tasks))
    seeds = trial_seeds(300, trials)
    jobs = [EpisodeJob(task=t, trial=k, seed=seeds[k]) for k in range(trials) for t in tasks][:episodes]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/bench.db")
        name = f"bench-{client}-{concurrency}"
        store.create_run(name=name, kind="eval", env="tau-airline", data_version="tau3", split="base",
                         agent="litellm", agent_model="openai/bench-agent", user="litellm",
                         user_model="openai/bench-user", config={})
        stats = {"calls": 0, "success": 0, "groups": 0}

        async def play() -> None:
            writer = EpisodeWriter(store, name)  # group commit, as harness eval does

            async def on_result(result) -> None:
                await writer.add(result)
                stats["calls"] += len(result.llm_calls)
                stats["success"] += int(result.error_class.value == "none")

            await run_episodes(factory, agent, jobs, concurrency, on_result)
            stats["groups"] = writer.groups

        server0 = server_cpu()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        run_loop(play(), loop)  # the event loop harness eval uses (uvloop when installed)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        server = server_cpu() - server0
        stored = len(store.episodes_df(name))
        store.close()
    ideal = stats["calls"] * latency / concurrency
    calls = max(1, stats["calls"])
    return {"client": client, "concurrency": concurrency, "episodes": len(jobs), "calls": stats["calls"],
            "clean": stats["success"], "stored": stored, "groups": stats["groups"], "wall_s": wall,
            "ideal_s": ideal, "ratio": wall / ideal, "cpu_ms_per_call": 1000 * cpu / calls,
            "server_ms_per_call": 1000 * server / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 448 = 7 x 64 = 28 x 16: full waves at every concurrency, so the tail of a partial last wave
    # does not inflate wall/ideal (with 400 episodes a perfect harness would already show 1.12).
    parser.add_argument("--episodes", type=int, default=448)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per LLM call at the server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--clients", nargs="+", default=["litellm", "direct"])
    parser.add_argument("--server", choices=["lean", "threaded"], default="lean",
                        help="lean: one asyncio loop, timers for the latency (default); threaded: the "
                             "tests' http.server fake, a thread per connection (costs the machine more CPU)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="event loop of the harness side: auto = uvloop when installed, as harness eval does")
    parser.add_argument("--repeat", type=int, default=1, help="measure every configuration this many times")
    args = parser.parse_args()
    from harness.episode_runner import loop_name

    here, there = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(args.latency, args.server, there), daemon=True)
    server.start()
    if not here.poll(60):
        raise SystemExit("the fake server did not start within 60 s")
    base_url = here.recv()

    def server_cpu() -> float:
        here.send("cpu")
        return here.recv()

    print(f"{args.server} fake server at {base_url}, latency {args.latency * 1000:.0f} ms per call, "
          f"{args.episodes} episodes, event loop: {loop_name(args.loop)}")
    print(f"{'client':8} {'conc':>5} {'episodes':>8} {'calls':>6} {'wall s':>8} {'ideal s':>8} {'wall/ideal':>10} "
          f"{'cpu ms/call':>11} {'server ms/call':>14} {'commits':>7}")
    try:
        for _ in range(args.repeat):
            for client in args.clients:
                for conc in args.concurrency:
                    r = _measure(base_url, client, conc, args.episodes, args.latency, server_cpu, args.loop)
                    flag = ("" if r["clean"] == r["episodes"]
                            else f"  ({r['episodes'] - r['clean']} episodes not clean!)")
                    if r["stored"] != r["episodes"]:
                        flag += f"  ({r['stored']} of {r['episodes']} stored!)"
                    print(f"{r['client']:8} {r['concurrency']:>5} {r['episodes']:>8} {r['calls']:>6} "
                          f"{r['wall_s']:>8.2f} {r['ideal_s']:>8.2f} {r['ratio']:>10.3f} {r['cpu_ms_per_call']:>11.2f} "

                          f"{r['server_ms_per_call']:>14.2f} {r['groups']:>7}{flag}", flush=True)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
