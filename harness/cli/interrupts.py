"""Stopping a run from outside (Ctrl-C, SIGTERM from a scheduler or ``kill``), and what the user
is told: the exact command that resumes it.

- ``harness eval``: SIGTERM is handled as Ctrl-C (``forward_sigterm``): the episodes in flight are
  cancelled, the finished ones are all stored, the run is marked ``interrupted``.
- ``harness train``: the first SIGINT or SIGTERM asks the loop to stop at the end of the current
  step, with a checkpoint of it (``graceful_stop``); a second one stops at once (checkpoints are
  atomic, so never a half-written one). A warm start has no step boundary: the first signal ends
  it at once (``trainers.sft.sft_steps``' ``stop``). ``harness train-suite`` does the same for the arm it is
  training and then stops (``--resume`` keeps finished arms and continues the stopped one).

Either way the command prints one line with the same command to resume (``harness eval`` with the
same ``--run``, ``harness train`` with ``--resume``) and exits with 128 + the signal's number
(130 for Ctrl-C, 143 for SIGTERM), as shells report a process stopped by that signal.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from harness.redact import redact

__all__ = ["resume_command", "forward_sigterm", "graceful_stop", "received_signal", "signal_name", "exit_code"]

_RUN_FLAGS = ("--run", "--run-name")
_received: list[int] = []


def resume_command(run: str, *, extra: tuple[str, ...] = (), argv: list[str] | None = None,
                   name_flags: tuple[str, ...] = _RUN_FLAGS) -> str:
    """``harness <the same arguments>`` naming ``run`` (with the first of ``name_flags`` unless one
    is there already), plus ``extra`` flags not already there. ``--force-new`` is dropped: it would
    delete the run instead of resuming it."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a != "--force-new"]
    named = any(a in name_flags or a.startswith(tuple(f + "=" for f in name_flags)) for a in args)
    if not named:
        args += [name_flags[0], run]
    args += [flag for flag in extra if flag not in args]
    return redact(shlex.join(["harness", *args]))


def received_signal() -> int:
    """The signal that stopped the run: the last one received by a handler here, else SIGINT
    (a KeyboardInterrupt nobody forwarded is Ctrl-C)."""
    return _received[-1] if _received else signal.SIGINT


def signal_name(signum: int | None = None) -> str:
    signum = received_signal() if signum is None else signum
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_code(signum: int | None = None) -> int:
    return 128 + int(received_signal() if signum is None else signum)


@contextlib.contextmanager
def _handlers(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    _received.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def forward_sigterm() -> contextlib.AbstractContextManager[None]:
    """SIGTERM does what Ctrl-C does at that moment: under asyncio's runner it cancels the main
    task (the runner's SIGINT handler), elsewhere it raises ``KeyboardInterrupt``."""

    def forward(signum: int, frame: Any) -> None:
        _received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    return _handlers({signal.SIGTERM: forward})


def graceful_stop(request: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
    """The first SIGINT or SIGTERM calls ``request(name of the signal)`` (the training loop stops
    after the current step); a second one raises ``KeyboardInterrupt`` at once."""

    def handle(signum: int, frame: Any) -> None:
        _received.append(signum)
        if len(_received) > 1:
            raise KeyboardInterrupt
        request(signal_name(signum))

    return _handlers({signal.SIGINT: handle, signal.SIGTERM: handle})
