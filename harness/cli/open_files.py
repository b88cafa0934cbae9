"""Fit ``--concurrency`` to the process's open-file limit.

Each episode in flight holds a few file descriptors at once: the agent's and the user simulator's
HTTP connections, an env server's connection (AppWorld), plus what a lazy import or the results
database opens meanwhile. Past the limit (``ulimit -n``, often 1024, sometimes 256) sockets, files
and even imports fail with "too many open files", and every episode that hits it is an infra
error. So before a run starts: raise the soft limit as far as the run needs (never past the hard
limit), and if that is not enough, play fewer episodes at a time and say so in one warning line.
"""

from __future__ import annotations

import os

try:
    import resource
except ImportError:  # Windows: no such limit to fit
    resource = None

__all__ = ["FDS_PER_EPISODE", "FDS_RESERVED", "fit_concurrency"]

FDS_PER_EPISODE = 3
"""Descriptors one episode in flight may hold: agent and user connections, an env server's."""
FDS_RESERVED = 64
"""Headroom for everything else: the database and its journal, logs, lazy imports, the runtime."""


def fit_concurrency(concurrency: int) -> tuple[int, str | None]:
    """(episodes to play at a time, the warning to print or None). Raises the soft limit when the
    hard limit allows what ``concurrency`` needs."""
    if resource is None:
        return concurrency, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    base = _open_now() + FDS_RESERVED
    needed = base + FDS_PER_EPISODE * concurrency
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return concurrency, None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):  # e.g. macOS caps below the reported hard limit
        pass
    if needed <= soft:
        return concurrency, None
    fits = max(1, (soft - base) // FDS_PER_EPISODE)
    return fits, (f"warning: --concurrency {concurrency} needs about {needed} open files but this process may "
                  f"open {soft} (ulimit -n; hard limit {hard}); playing {fits} episodes at a time instead. "
                  "Raise the limit (ulimit -n) to run more.")


def _open_now() -> int:
    """Descriptors this process holds now (Linux and macOS list them; elsewhere a guess)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return 16
