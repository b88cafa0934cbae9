"""A pool of AppWorld environment servers, one process per worker, on 127.0.0.1.

AppWorld holds one world per process (and freezes that process's clock), so concurrency means N
server processes on N ports (``../shared/docs/appworld.md`` §7.1). This module starts them from the
side venv's python, waits until each answers ``GET /tasks/<id>``, leases them to episodes one at a
time (each only after it answered ``GET /``), restarts a server that died, did not answer or that
an episode reports as broken, and kills every child it started when it is closed.

The harness never imports ``appworld``: the default command is

    <python> -c "import uvicorn; from appworld.serve.environment import app;
                 uvicorn.run(app, host='127.0.0.1', port=PORT, log_level='warning')"

with ``APPWORLD_ROOT`` set (``appworld serve environment`` would bind 0.0.0.0). ``command`` replaces
it, e.g. ``[sys.executable, "tests/fakes/appworld_server.py", "--port", "{port}", "--root", DIR]``.

Process hygiene:

- every server runs in its own session/process group (``start_new_session=True``) and is stopped
  with ``os.killpg``: SIGTERM, then SIGKILL after ``kill_grace`` seconds; pids are tracked;
- ``close()`` runs from ``with``, ``atexit`` (so also after Ctrl-C / an uncaught exception) and
  from a SIGTERM handler installed on first use in the main thread (it chains to the previous
  handler, then exits with status 143 if that handler was the default);
- on Linux each server also gets ``PR_SET_PDEATHSIG=SIGKILL``, so it dies with the harness even
  when the harness itself is SIGKILLed. All servers are spawned from one long-lived pool thread
  (the death signal follows the *thread* that forked). Without prctl (non-Linux) a SIGKILL of the
  harness leaves its servers running: nothing in-process can run after SIGKILL.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ServerPool", "ServerStartError", "default_server_command", "free_port"]

log = logging.getLogger(__name__)

PROBE_TASK_ID = "harness_probe_1"
_SERVER_CODE = (
    "import uvicorn; from appworld.serve.environment import app; "
    "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')"
)


class ServerStartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_server_command(python: str) -> list[str]:
    """The loopback uvicorn launch of ``appworld.serve.environment:app`` ({port} placeholder)."""
    return [python, "-c", _SERVER_CODE]


def _default_python() -> str:
    from envs.appworld.setup import default_venv_dir

    return str(default_venv_dir() / "bin" / "python")


def _preexec_pdeathsig(parent_pid: int):  # pragma: no cover - runs in the child
    def fn() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != parent_pid:  # parent already gone
            os._exit(1)

    return fn


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    text = data[-n:].decode("utf-8", "replace").strip()
    return text or "(empty log)"


def probe(url: str, timeout: float = 2.0, path: str = f"/tasks/{PROBE_TASK_ID}") -> bool:
    """True when anything answers HTTP at ``url`` + ``path`` (any status counts as up)."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class _Server:
    index: int
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None
    incarnation: int = 0
    restarts: int = 0
    dead: bool = False  # could not be restarted

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# live pools, closed on SIGTERM
_LIVE: "weakref.WeakSet[ServerPool]" = weakref.WeakSet()
_SIGTERM_INSTALLED = False


def _install_sigterm_handler() -> None:
    global _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):  # pragma: no cover - exercised in a subprocess test
        for pool in list(_LIVE):
            with contextlib.suppress(Exception):
                pool.close()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    _SIGTERM_INSTALLED = True


class ServerPool:
    """N AppWorld environment servers on 127.0.0.1, leased one episode at a time.

    ``start()`` returns the base URLs; ``await acquire()`` leases a free server that answers
    ``GET /`` right then (waits while all are busy); ``release(url, healthy=True)`` hands it back.
    ``healthy=False`` (or a server whose process died, or one that did not answer when leased)
    kills it and restarts it in the background (same port if possible, else a fresh one); it
    becomes available again once it answers. ``close()`` kills everything.
    """

    def __init__(
        self,
        size: int,
        python: Optional[str] = None,
        appworld_root: Optional[str] = None,
        command: Optional[Sequence[str]] = None,
        startup_timeout: float = 120.0,
        log_dir: Optional[str] = None,
        *,
        env: Optional[dict[str, str]] = None,
        kill_grace: float = 5.0,
        max_restart_attempts: int = 3,
        lease_probe_timeout: float = 10.0,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.startup_timeout = startup_timeout
        self.kill_grace = kill_grace
        self.max_restart_attempts = max_restart_attempts
        self.lease_probe_timeout = lease_probe_timeout
        if command is None:
            command = default_server_command(python or _default_python())
        self.command = list(command)
        self.appworld_root = appworld_root or os.environ.get("APPWORLD_ROOT")
        self.extra_env = dict(env or {})
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="appworld-pool-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._servers = [_Server(index=i) for i in range(size)]
        self._by_url: dict[str, _Server] = {}
        self._free: collections.deque[str] = collections.deque()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = (
            collections.deque())
        self._leased: set[str] = set()
        self._lock = threading.RLock()
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="appworld-spawn")
        self._restarter = concurrent.futures.ThreadPoolExecutor(
            max(1, size), thread_name_prefix="appworld-restart")
        self._started = False
        self._closed = False
        self.restart_count = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ServerPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "ServerPool":
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self._servers if not s.dead]

    @property
    def pids(self) -> list[int]:
        """Pids of the server processes currently alive (or not yet reaped)."""
        with self._lock:
            return [s.proc.pid for s in self._servers if s.proc is not None and s.proc.poll() is None]

    def start(self) -> list[str]:
        """Start every server, wait until all answer; returns their base URLs."""
        if self._closed:
            raise RuntimeError("pool is closed")
        if self._started:
            return self.urls
        self._started = True
        _LIVE.add(self)
        atexit.register(self.close)
        _install_sigterm_handler()
        try:
            for s in self._servers:
                self._spawn(s, port=None)
            deadline = time.monotonic() + self.startup_timeout
            for s in self._servers:
                self._wait_ready(s, deadline, retry_port=True)
        except BaseException:
            self.close()
            raise
        with self._lock:
            for s in self._servers:
                self._by_url[s.url] = s
                self._free.append(s.url)
        return self.urls

    def close(self) -> None:
        """Terminate, then kill, every server process group; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_exc, fut, RuntimeError("server pool closed"))
        self._restarter.shutdown(wait=False, cancel_futures=True)
        procs = [s.proc for s in self._servers if s.proc is not None]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            _signal_group(p, signal.SIGKILL)  # also any grandchildren left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._spawner.shutdown(wait=False, cancel_futures=True)
        _LIVE.discard(self)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # ------------------------------------------------------------------ leasing
    async def acquire(self) -> str:
        """Lease a free server (exclusive) that answers right now; waits while all are busy or
        restarting.

        A process that looks alive can still be gone for practical purposes: one killed a moment ago
        keeps its port open until the kernel has run its exit, which on a loaded machine takes a
        while, and a hung one never answers. So every lease ends with ``GET /``; a server that does
        not answer within ``lease_probe_timeout`` is restarted in the background, never handed out.
        """
        loop = asyncio.get_running_loop()
        while True:
            url = await self._lease()
            try:
                answers = await loop.run_in_executor(None, probe, url, self.lease_probe_timeout, "/")
            except BaseException:  # cancelled while probing: hand it back as it was
                self.release(url)
                raise
            if answers:
                return url
            self._retire(url, "did not answer when leased")

    async def _lease(self) -> str:
        """Take a free server (skipping any whose process has exited), or wait for one."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise RuntimeError("server pool closed")
            if not self._started:
                raise RuntimeError("server pool not started")
            while self._free:
                url = self._free.popleft()
                server = self._by_url.get(url)
                if server is not None and server.proc is not None and server.proc.poll() is not None:
                    # Died while idle: never hand it out; restart it in the background instead.
                    self._by_url.pop(url, None)
                    log.warning("AppWorld server %s died while idle; restarting it", url)
                    self._restarter.submit(self._restart_and_return, server)
                    continue
                self._leased.add(url)
                return url
            if not any(not s.dead for s in self._servers):
                raise RuntimeError("no AppWorld server left alive in the pool")
            fut: asyncio.Future = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((loop, fut))
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._leased.discard(fut.result())
                    self._make_available(fut.result())
            raise

    def release(self, url: str, healthy: bool = True) -> None:
        """Hand a leased server back. ``healthy=False`` or a dead process: restart it first."""
        with self._lock:
            if url not in self._leased:
                raise ValueError(f"{url} is not leased from this pool")
            server = self._by_url.get(url)
            alive = server is not None and server.proc is not None and server.proc.poll() is None
            if healthy and alive and not self._closed:
                self._leased.discard(url)
                self._make_available(url)
                return
            self._retire(url, "reported broken" if alive else "died")

    def restart(self, url: str) -> str:
        """Synchronously kill and restart the (not leased) server at ``url``; returns its new URL."""
        with self._lock:
            server = self._by_url.pop(url, None)
            if server is None:
                raise ValueError(f"unknown server {url}")
            with contextlib.suppress(ValueError):
                self._free.remove(url)
        self._restart(server)
        with self._lock:
            self._by_url[server.url] = server
            self._make_available(server.url)
        return server.url

    # ------------------------------------------------------------------ internals
    def _retire(self, url: str, why: str) -> None:
        """Take a leased server out of service and restart it in the background; it becomes
        available again (under its possibly new URL) once it answers."""
        with self._lock:
            self._leased.discard(url)
            server = self._by_url.pop(url, None)
            if self._closed or server is None:
                return
            log.warning("AppWorld server %s %s; restarting it", url, why)
            # submitted under the lock: close() cannot shut the restarter down in between
            self._restarter.submit(self._restart_and_return, server)

    def _make_available(self, url: str) -> None:
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                if fut.done():
                    continue
                self._leased.add(url)
                try:
                    loop.call_soon_threadsafe(_set_result, fut, url, self, loop)
                except RuntimeError:  # loop closed
                    self._leased.discard(url)
                    continue
                return
            self._free.append(url)

    def _restart_and_return(self, server: _Server) -> None:
        try:
            self._restart(server)
        except Exception as exc:  # noqa: BLE001 - logged, slot marked dead
            if self._closed:  # close() stopped the new process mid-start: not a failure
                log.debug("restart of AppWorld server %d cut short by close(): %s", server.index, exc)
                return
            log.error("could not restart AppWorld server %d: %s", server.index, exc)
            with self._lock:
                server.dead = True
                if not any(not s.dead for s in self._servers):
                    waiters = list(self._waiters)
                    self._waiters.clear()
                    for loop, fut in waiters:
                        with contextlib.suppress(RuntimeError):
                            loop.call_soon_threadsafe(
                                _set_exc, fut, RuntimeError(f"no AppWorld server left: {exc}"))
            return
        with self._lock:
            if self._closed:
                return
            self._by_url[server.url] = server
            self._make_available(server.url)

    def _restart(self, server: _Server) -> None:
        if self._closed:
            raise RuntimeError("pool is closed")
        self._kill(server)
        self.restart_count += 1
        server.restarts += 1
        last: Optional[Exception] = None
        for attempt in range(self.max_restart_attempts):
            port = server.port if attempt == 0 else None  # same port first, then a fresh one
            self._spawn(server, port=port)
            try:
                self._wait_ready(server, time.monotonic() + self.startup_timeout, retry_port=False)
                return
            except ServerStartError as exc:
                last = exc
                self._kill(server)
                if self._closed:
                    break
        raise last or RuntimeError("restart failed")

    def _spawn(self, server: _Server, port: Optional[int]) -> None:
        server.port = port or free_port()
        server.incarnation += 1
        server.log_path = self.log_dir / f"server-{server.index}-{server.incarnation}.log"
        argv = [a.replace("{port}", str(server.port)) for a in self.command]
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the side venv must not see the harness tree
        if self.appworld_root:
            env["APPWORLD_ROOT"] = str(self.appworld_root)
        env.update(self.extra_env)
        cwd = self.appworld_root if self.appworld_root and os.path.isdir(self.appworld_root) else None

        def popen() -> subprocess.Popen:
            with open(server.log_path, "ab") as logf:
                kwargs = dict(stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                              env=env, cwd=cwd, start_new_session=True, close_fds=True)
                if sys.platform.startswith("linux"):
                    kwargs["preexec_fn"] = _preexec_pdeathsig(os.getpid())
                return subprocess.Popen(argv, **kwargs)

        proc = self._spawner.submit(popen).result()
        with self._lock:
            server.proc = proc
            if self._closed:  # raced with close(): do not leave it behind
                _signal_group(proc, signal.SIGKILL)
                raise RuntimeError("pool is closed")

    def _wait_ready(self, server: _Server, deadline: float, retry_port: bool) -> None:
        assert server.proc is not None
        for attempt in range(3):
            while True:
                if server.proc.poll() is not None:
                    break
                if probe(server.url, timeout=1.0):
                    return
                if time.monotonic() > deadline:
                    self._kill(server)
                    raise ServerStartError(
                        f"AppWorld server {server.index} ({' '.join(self.command[:2])} ...) did not "
                        f"answer on {server.url} within {self.startup_timeout:.0f}s; log "
                        f"{server.log_path}:\n{_tail(server.log_path)}")
                time.sleep(0.1)
            # the process exited: maybe the port was taken between free_port() and bind
            log_text = _tail(server.log_path)
            if retry_port and attempt < 2 and "address already in use" in log_text.lower():
                self._spawn(server, port=None)
                continue
            raise ServerStartError(
                f"AppWorld server {server.index} exited with status {server.proc.returncode} "
                f"before answering on {server.url}; log {server.log_path}:\n{log_text}")

    def _kill(self, server: _Server) -> None:
        p = server.proc
        if p is None:
            return
        _signal_group(p, signal.SIGTERM)
        try:
            p.wait(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the process group the server leads (its own session); fall back to the pid."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)


def _set_result(fut: asyncio.Future, url: str, pool: ServerPool, loop) -> None:
    if fut.done():  # cancelled meanwhile: give the server to the next waiter
        with pool._lock:
            pool._leased.discard(url)
            pool._make_available(url)
        return
    fut.set_result(url)


def _set_exc(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
