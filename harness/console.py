"""The command-line error contract, shared by every command module (the CLI's and an env's own
commands): a ``HarnessError`` becomes one line on stderr and exit status 2 (no traceback);
anything else keeps its traceback (a bug)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from harness.errors import HarnessError
from harness.redact import redact

__all__ = ["friendly", "err_console"]

err_console = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HarnessError as exc:
            # escaped: a message quoting a provider's error may hold brackets that look like markup
            err_console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
