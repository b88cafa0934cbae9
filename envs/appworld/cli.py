"""``harness appworld ...``: provision AppWorld as a side service.

    harness appworld setup [--venv DIR] [--root DIR] [--from DIR]

The env's own commands (``AppWorldFactory.cli``): the CLI mounts them under the env's name.
Errors are printed the way every command prints them (one line, exit status 2).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from harness.console import err_console as _err
from harness.console import friendly

__all__ = ["appworld_app"]

appworld_app = typer.Typer(no_args_is_help=True,
                           help="AppWorld side service: its own venv, data, servers.")
_out = Console()


@appworld_app.command("setup")
@friendly
def setup(
    venv: Optional[str] = typer.Option(
        None, "--venv", help="Side venv for appworld (default $HARNESS_APPWORLD_VENV, the repository's "
                             ".venv-appworld from scripts/setup.sh, or <user cache>/harness/appworld-venv)."),
    root: Optional[str] = typer.Option(
        None, "--root", help="APPWORLD_ROOT that will hold data/ (default $APPWORLD_ROOT or "
                             "<user cache>/harness/appworld-root)."),
    from_dir: Optional[str] = typer.Option(
        None, "--from", help="Copy an existing AppWorld data tree (DIR/data or DIR) instead of "
                             "downloading it (offline machines)."),
) -> None:
    """Create the AppWorld venv (appworld==0.1.3.post1), run `appworld install`, get the data."""
    from envs.appworld.setup import setup_appworld

    report = setup_appworld(venv, root, from_dir, log=lambda m: _err.print(f"[dim]{m}[/]"))
    for line in report.lines():
        _out.print(line, highlight=False, soft_wrap=True)
