"""``harness view``: the local web viewer of a results database (``harness.view``).

Decisions:

- The database is opened read-only (``Store(read_only=True)``): the viewer never creates,
  migrates or writes it, and a read-only file serves as well as a writable one.
- It binds to 127.0.0.1 unless told otherwise; any address that is not loopback needs
  ``--allow-remote`` (the pages show prompts, tool results and costs to whoever can connect) and
  prints a warning. Without the flag: one line, exit 2.
- The socket is bound here, before uvicorn starts, so ``--port 0`` (any free port) prints the
  real URL and a port in use is one line, not a traceback.
"""

from __future__ import annotations

import ipaddress
import socket

import typer

from harness.console import err_console, friendly
from harness.defaults import DB_URL
from harness.errors import ConfigError

__all__ = ["view_command", "is_loopback", "bind_socket"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address this machine can bind ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                          "(--port 0 takes any free one)") from None
    sock.listen(128)
    return sock


@friendly
def view_command(
    db: str = typer.Option(DB_URL, "--db", help="SQLAlchemy URL of the results database (opened read-only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless --allow-remote)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on, 0 to 65535 (0: any free port)."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Allow a --host other than loopback: anyone who can reach it sees "
                                           "every stored conversation."),
) -> None:
    """Serve a local web page of the stored runs (runs, a run, an episode, compare). Read-only."""
    import uvicorn

    from envs.registry import run_metrics, task_metrics
    from harness.store import Store
    from harness.view import Context, create_app

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535 (0: any free port), got {port}")
    if not is_loopback(host):
        if not allow_remote:
            raise ConfigError(f"--host {host} is not loopback: anyone who can reach it would see every stored "
                              "conversation; add --allow-remote to serve it anyway, or drop --host")
        err_console.print(f"warning: serving on {host}, reachable from other machines; the viewer has no login",
                          highlight=False)
    store = Store(db, read_only=True)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"harness view: http://{shown}:{bound_port}/  (database {store.url}, read-only; Ctrl-C stops)",
               err=False)
    app = create_app(Context(store=store, env_metrics=run_metrics, task_metrics=task_metrics))
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()
