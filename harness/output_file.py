"""Writing a user-named output file (``--out PATH``) without ever destroying what is there.

- A new path or an existing regular file is written atomically: into ``<name>.part`` beside it,
  then renamed over it, so a crash leaves the old file or the new one, never half of one. A
  symbolic link is followed: its target is replaced, the link stays.
- Anything else that exists (a FIFO, ``/dev/stdout``, a character device) is written *through*:
  opened and written in place, never replaced by a regular file.
- A directory is refused with one line, ``-`` means standard output.
- Any ``OSError`` (no permission, a full disk, a missing parent that cannot be made) becomes one
  ``ConfigError`` line naming the path and the cause; the ``.part`` file is removed.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable

from harness.errors import ConfigError

__all__ = ["STDOUT", "write_output"]

STDOUT = "-"


def write_output(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(path)`` so that its file ends up at ``out`` under the rules above; returns
    ``Path(out)`` (``Path("-")`` for standard output)."""
    if str(out) == STDOUT:
        with tempfile.TemporaryDirectory(prefix="harness-out-") as tmpdir:
            tmp = Path(tmpdir) / "out"
            _guard(out, lambda: write(tmp))
            sys.stdout.flush()
            with tmp.open("rb") as fh:
                shutil.copyfileobj(fh, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return Path(STDOUT)
    path = Path(os.path.realpath(out))  # a link's target is what gets replaced
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ConfigError(f"--out {out} is a directory; give a file path (or - for standard output)")
    if mode is not None and not stat.S_ISREG(mode):  # a FIFO, a device: write through, never replace
        _guard(out, lambda: write(path))
        return Path(out)
    _guard(out, lambda: path.parent.mkdir(parents=True, exist_ok=True))
    tmp = path.with_name(path.name + ".part")
    try:
        _guard(out, lambda: write(tmp))
        _guard(out, lambda: tmp.replace(path))
    finally:
        tmp.unlink(missing_ok=True)
    return Path(out)


def _guard(out: str | Path, action: Callable[[], object]) -> None:
    try:
        action()
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
