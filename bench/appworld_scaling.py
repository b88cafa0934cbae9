"""AppWorld server-pool scaling: the same synthetic episodes with 1, 2 and 4 servers.

Run from the repository root:

    .venv/bin/python bench/appworld_scaling.py [--episodes 16] [--sizes 1,2,4] [--fake]

Engine: the real AppWorld engine on the Tier B synthetic world (tests/appworld_world.py, built into
a temp dir) when the side venv exists (``$HARNESS_APPWORLD_VENV`` or ``<repo>/.venv-appworld``);
otherwise, or with ``--fake``, the Tier A stdlib fake (tests/fakes/appworld_server.py) through
``ServerPool(command=...)``. One episode = ``/initialize`` -> ``/execute`` (a correct scripted
solution: log in, list notes, ``complete_task``) -> ``/task_completed`` -> ``/evaluate``
(``suppress_errors``) -> ``/close``, over raw HTTP, with a unique experiment name per episode.
Server start-up is not timed; each configuration gets one warm-up episode per server first.

The ceiling. Each AppWorld server is a separate Python interpreter that does its work (SQLite in
memory, IPython execution of the agent's code, evaluation) on one core under its own GIL; the
client side only waits on sockets. So episodes/s grows with the number of servers until the servers
use all the cores: on a 2-core machine the CPU-bound ceiling is about 2.0x at 2 servers, and 4
servers share the same 2 cores (more servers only help when an episode waits on something other
than CPU, such as an LLM call in a real run). Measured speed-ups can pass 2.0x because a single
server also sits idle between requests (waiting on this client's synchronous HTTP round trips and
on file writes), time a second server fills. What keeps it below 2.0x: the client process and
the kernel need some CPU too, ``/initialize`` writes and ``/evaluate`` reads files, and the two
cores are not always free (the target on the 2-core CI machine is >= 1.7x at 2 servers). In a real
run the servers sit idle while the model thinks, so the number of servers should follow the number
of episodes in flight, not the number of cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from envs.appworld.server_pool import ServerPool  # noqa: E402

FAKE_SOLUTIONS = {
    "fake001_1": (
        "pw = [p for p in apis.supervisor.show_account_passwords() "
        "if p['account_name'] == 'simple_note'][0]['password']\n"
        "tok = apis.simple_note.login(username=apis.supervisor.show_profile()['email'], "
        "password=pw)['access_token']\n"
        "apis.supervisor.complete_task(answer=len(apis.simple_note.search_notes(access_token=tok)))"
    ),
}


def post(url: str, path: str, body: dict) -> object:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["output"]


def episode(url: str, task_id: str, code: str, experiment: str) -> bool:
    post(url, "/initialize", {"task_id": task_id, "experiment_name": experiment})
    post(url, "/execute", {"task_id": task_id, "code": code})
    post(url, "/task_completed", {"task_id": task_id})
    tracker = post(url, "/evaluate", {"task_id": task_id, "suppress_errors": True})
    post(url, "/close", {"task_id": task_id})
    return bool(tracker["success"])


async def run_config(pool: ServerPool, jobs: list[tuple[str, str]], tag: str) -> tuple[float, int]:
    counter = iter(range(10**9))

    async def one(task_id: str, code: str) -> bool:
        url = await pool.acquire()
        ok = False
        try:
            res = await asyncio.to_thread(episode, url, task_id, code, f"bench-{tag}-{next(counter)}")
            ok = True
            return res
        finally:
            pool.release(url, healthy=ok)

    # warm-up: one episode per server (imports, first DB loads)
    await asyncio.gather(*(one(*jobs[0]) for _ in range(pool.size)))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(t, c) for t, c in jobs))
    return time.perf_counter() - t0, sum(results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=16, help="episodes per configuration")
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--fake", action="store_true", help="use the Tier A fake server")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    venv = Path(os.environ.get("HARNESS_APPWORLD_VENV") or REPO / ".venv-appworld")
    real = not args.fake and (venv / "bin" / "appworld").exists()
    tmp = Path(tempfile.mkdtemp(prefix="appworld-bench-"))
    env: dict[str, str] = {}
    if real:
        import appworld_world as world

        penv = dict(os.environ, APPWORLD_CACHE=str(tmp / ".cache"))
        penv.pop("PYTHONPATH", None)
        subprocess.run([str(venv / "bin" / "python"), str(REPO / "tests" / "appworld_world.py"),
                        "--root", str(tmp)], env=penv, check=True, capture_output=True)
        solutions = world.CORRECT_SOLUTIONS
        pool_kw = dict(python=str(venv / "bin" / "python"), appworld_root=str(tmp))
        env = {"APPWORLD_CACHE": str(tmp / ".cache")}
        engine = f"real AppWorld 0.1.3.post1 (synthetic world, {venv})"
    else:
        solutions = FAKE_SOLUTIONS
        pool_kw = dict(command=[sys.executable, str(REPO / "tests" / "fakes" / "appworld_server.py"),
                                "--port", "{port}", "--root", str(tmp)])
        engine = "Tier A fake server (stdlib)"
    items = list(solutions.items())
    jobs = [items[i % len(items)] for i in range(args.episodes)]

    print(f"engine: {engine}; {os.cpu_count()} CPUs; {args.episodes} episodes per configuration")
    base = None
    for size in sizes:
        with ServerPool(size, startup_timeout=180, env=env, **pool_kw) as pool:
            elapsed, ok = asyncio.run(run_config(pool, jobs, f"s{size}"))
        rate = args.episodes / elapsed
        base = base or rate
        print(f"servers={size}: {args.episodes} episodes in {elapsed:6.2f}s = {rate:6.2f} episodes/s, "
              f"speed-up {rate / base:4.2f}x, {ok}/{args.episodes} succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
