"""How many CPU threads torch may use: one setting, ``HARNESS_THREADS``.

Why: torch's default is one thread per core of the machine, whatever share of it the process
may use. On a shared machine (a login node, a CI runner, ``taskset``) its OpenMP threads then
outnumber the cores they can run on and spin waiting for each other: the toy training command
took 20x longer on a busy 2-core machine, with bit-identical results.

Decisions:

- The default is the number of cores the process may run on (its CPU affinity), never the
  machine's count; under ``torchrun`` it is divided among the local ranks (each rank is a
  process with its own threads).
- ``HARNESS_THREADS=N`` overrides it, but never above the cores available (more threads than
  cores is what makes torch spin); a value that is not a positive integer is a ``ConfigError``.
  Unset, an ``OMP_NUM_THREADS`` the user (or ``torchrun``, which sets 1) gave is honoured the same
  way, since torch would have read it.
- Inter-op threads (torch's pool for ``torch.jit.fork``-style parallel ops, which the harness does
  not use) are set to 1, so no idle pool competes for the cores.
- Applied wherever a local model is loaded (``load_model_and_tokenizer``: train, sft, eval of a
  local policy) and by the test session (``tests/conftest.py``). Subprocesses inherit the
  variable, not the setting, and choose again.
"""

from __future__ import annotations

import os

from harness.errors import ConfigError

__all__ = ["THREADS_VAR", "available_cores", "torch_threads", "apply_torch_threads"]

THREADS_VAR = "HARNESS_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its affinity; the machine's count where the OS has no
    affinity call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def torch_threads(environ: dict[str, str] | None = None) -> int:
    """The intra-op thread count to use (see the module docstring)."""
    environ = os.environ if environ is None else environ
    cores = available_cores()
    raw = environ.get(THREADS_VAR, "").strip()
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if not raw and omp.isdigit() and int(omp) >= 1:
        return min(int(omp), cores)
    if raw:
        try:
            wanted = int(raw)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ConfigError(f"{THREADS_VAR}={raw!r} is not a positive integer; set it to the number of CPU threads "
                              f"torch may use (at most {cores}, the cores available), or unset it for that default")
        return min(wanted, cores)
    local_ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_ranks))


def apply_torch_threads() -> int:
    """Set torch's intra-op threads to ``torch_threads()`` and its inter-op threads to 1; returns
    the count. Safe to call more than once."""
    import torch

    threads = torch_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # torch allows it once, before any inter-op work: already set (or used)
        pass
    return threads
