"""ServerPool lifecycle against the Tier A fake server (tests/fakes/appworld_server.py, stdlib only):
start, readiness, leasing, restart of a killed server, no orphans after close / SIGTERM / SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from envs.appworld.server_pool import ServerPool, ServerStartError, probe

REPO = Path(__file__).resolve().parents[1]
FAKE = str(REPO / "tests" / "fakes" / "appworld_server.py")


def fake_command(root: Path) -> list[str]:
    return [sys.executable, FAKE, "--port", "{port}", "--root", str(root)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); count it as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_dead(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.05)
    return left


def get_task(url: str, task_id: str = "fake001_1") -> dict:
    with urllib.request.urlopen(f"{url}/tasks/{task_id}", timeout=5) as r:
        return json.loads(r.read())


def test_start_acquire_release_restart_close(tmp_path):
    pool = ServerPool(2, command=fake_command(tmp_path), startup_timeout=30)
    with pool:
        urls = pool.urls
        assert len(urls) == 2 and len(set(urls)) == 2
        assert all(u.startswith("http://127.0.0.1:") for u in urls)
        assert all(probe(u) for u in urls)
        pids = pool.pids
        assert len(pids) == 2

        async def scenario():
            a = await pool.acquire()
            b = await pool.acquire()
            assert {a, b} == set(urls)
            # all busy: a third acquire waits until a release
            third = asyncio.create_task(pool.acquire())
            await asyncio.sleep(0.05)
            assert not third.done()
            pool.release(a)
            assert await asyncio.wait_for(third, 2) == a
            with pytest.raises(ValueError):
                pool.release("http://127.0.0.1:1")
            # kill b's process: the release restarts it, and it serves again
            victim = list(pool.pids)
            os.kill(pool._by_url[b].proc.pid, signal.SIGKILL)
            time.sleep(0.1)
            pool.release(b, healthy=True)  # dead process is detected even when reported healthy
            c = await asyncio.wait_for(pool.acquire(), 30)
            assert pool.restart_count == 1
            assert "output" in get_task(c)
            pool.release(c)
            pool.release(a, healthy=False)  # an episode reports a broken server
            d = await asyncio.wait_for(pool.acquire(), 30)
            e = await asyncio.wait_for(pool.acquire(), 30)
            assert pool.restart_count == 2
            for u in (d, e):
                get_task(u)
            pool.release(d)
            pool.release(e)
            return victim

        first_pids = asyncio.run(scenario())
        all_pids = set(first_pids) | set(pool.pids)
        assert len(pool.pids) == 2
    assert pool.pids == []
    assert wait_dead(all_pids) == []


def test_a_server_that_does_not_answer_is_never_leased(tmp_path):
    # A server SIGKILLed a moment ago is still a live process with its port open until the kernel
    # has run its exit, which on a loaded machine takes a while (the fault test's idle server was
    # handed out in that window). A stopped server is the same from outside, and stays so: the
    # pool must notice that it does not answer, restart it and lease the replacement.
    pool = ServerPool(1, command=fake_command(tmp_path), startup_timeout=30, kill_grace=1.0,
                      lease_probe_timeout=1.0)
    with pool:
        (stopped,) = pool.pids
        os.kill(stopped, signal.SIGSTOP)
        url = asyncio.run(asyncio.wait_for(pool.acquire(), 60))
        assert "output" in get_task(url)
        assert pool.restart_count == 1 and stopped not in pool.pids
        pool.release(url)
    assert wait_dead([stopped]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_servers_outlive_the_threads_that_start_and_restart_them(tmp_path):
    # PR_SET_PDEATHSIG fires when the *thread* that forked the server exits. Callers start and
    # restart from short-lived threads (``async with`` runs start() in the default executor, restarts
    # run on the restarter's threads); the servers must not die with those threads.
    def in_a_thread(fn, *args):
        t = threading.Thread(target=fn, args=args)
        t.start()
        t.join()

    pool = ServerPool(1, command=fake_command(tmp_path), startup_timeout=30, kill_grace=1.0)
    try:
        in_a_thread(pool.start)
        (first,) = pool.pids
        time.sleep(0.5)  # a death signal would have landed by now
        assert alive(first) and probe(pool.urls[0])
        in_a_thread(pool.restart, pool.urls[0])
        (second,) = pool.pids
        time.sleep(0.5)
        assert second != first and alive(second) and probe(pool.urls[0])
    finally:
        pool.close()
    assert wait_dead([first, second]) == []


def test_get_task_over_pool(tmp_path):
    with ServerPool(1, command=fake_command(tmp_path), startup_timeout=30) as pool:
        body = get_task(pool.urls[0])
        assert "output" in body


def test_server_that_never_starts_reports_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: cannot import appworld'); sys.exit(3)"]
    pool = ServerPool(1, command=cmd, startup_timeout=10)
    with pytest.raises(ServerStartError, match="boom: cannot import appworld"):
        pool.start()
    assert pool.pids == []


def test_server_that_hangs_times_out(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('still loading', flush=True); time.sleep(60)"]
    pool = ServerPool(1, command=cmd, startup_timeout=1.0, kill_grace=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="still loading"):
        pool.start()
    assert time.monotonic() - t0 < 10
    assert pool.pids == []


_CHILD = textwrap.dedent("""
    import json, signal, sys, time
    # Ctrl-C as in a terminal: a test run launched in the background of a non-interactive shell
    # starts with SIGINT ignored, and that would be inherited here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {repo!r})
    from envs.appworld.server_pool import ServerPool
    pool = ServerPool(2, command={cmd!r}, startup_timeout=30)
    pool.start()
    print(json.dumps(pool.pids), flush=True)
    sys.stdin.readline()  # the test checks the servers are alive before the holder goes on
    {tail}
""")


def _spawn_holder(tmp_path, tail: str) -> tuple[subprocess.Popen, list[int]]:
    code = _CHILD.format(repo=str(REPO), cmd=fake_command(tmp_path), tail=tail)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "holder process did not start its pool"
    pids = json.loads(line)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc, pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_no_orphans_on_sigterm_and_ctrl_c(tmp_path, sig):
    proc, pids = _spawn_holder(tmp_path, "time.sleep(60)")
    proc.send_signal(sig)
    proc.wait(timeout=20)
    assert wait_dead(pids) == []


def test_no_orphans_on_uncaught_exception(tmp_path):
    proc, pids = _spawn_holder(tmp_path, "raise RuntimeError('crash')")
    proc.wait(timeout=20)
    assert proc.returncode != 0
    assert wait_dead(pids) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_no_orphans_on_sigkill_linux(tmp_path):
    # SIGKILL runs no handler; on Linux the servers carry PR_SET_PDEATHSIG and die with the parent.
    proc, pids = _spawn_holder(tmp_path, "time.sleep(60)")
    proc.kill()
    proc.wait(timeout=10)
    assert wait_dead(pids) == []
