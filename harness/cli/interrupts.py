"""How a run that stops early tells the user what to do next: the exact command that resumes it.

``harness eval`` resumes with the same command and the same ``--run``; ``harness train`` with the
same command plus ``--resume``. The command is rebuilt from this process's arguments, with the
run's name added when it was generated and ``--force-new`` dropped (it would delete the run).
"""

from __future__ import annotations

import shlex
import sys

__all__ = ["resume_command"]

_RUN_FLAGS = ("--run", "--run-name")


def resume_command(run: str, *, extra: tuple[str, ...] = (), argv: list[str] | None = None) -> str:
    """``harness <the same arguments>`` naming ``run``, plus ``extra`` flags not already there."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a != "--force-new"]
    named = any(a in _RUN_FLAGS or a.startswith(tuple(f + "=" for f in _RUN_FLAGS)) for a in args)
    if not named:
        args += ["--run", run]
    args += [flag for flag in extra if flag not in args]
    return shlex.join(["harness", *args])
