"""What the test fake servers share: writing one JSON reply, and a threading server that copes
with many simultaneous clients and with clients that give up mid-request."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def send_json(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
    """Send ``data`` (a JSON body unless ``content_type`` says otherwise) with ``status`` and any
    extra ``headers``; a client that already left is not an error."""
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up (timeout tests) or was killed


class WideServer(ThreadingHTTPServer):
    # Hundreds of episodes connect at once: the default listen backlog of 5 would drop SYNs (the
    # kernel retries after 1 s) and turn a throughput or timeout test into a retry test.
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that was killed or gave up mid-request is expected; anything else (a bug in a
        # responder) is still printed.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)
