"""Variants of ``FakeOpenAIServer`` for the robustness tests (the original is left untouched).

``WideFakeServer``: a listen backlog of 1024 (socketserver's default is 5; harmless if the base
server already sets a larger one). With dozens of episodes opening connections at once, a backlog
of 5 drops SYNs; the kernel retransmits them after 1 s, so with a short ``--timeout`` the client
times out on requests the server never saw (spurious retries, even infra errors, that have nothing
to do with the code under test). Connection resets from clients that were killed or gave up are
not printed as server errors.

``HeaderRecordingServer``: also records the HTTP headers of every request (for the secrets test:
proves the API key really reached the provider, so grepping our outputs for it means something).
"""

from __future__ import annotations

import sys
from typing import Any

from fakes.openai_server import FakeOpenAIServer, Responder

BACKLOG = 1024


class WideFakeServer(FakeOpenAIServer):
    def __init__(self, responder: Responder):
        super().__init__(responder)
        self.httpd.socket.listen(BACKLOG)  # Linux: listen() again resizes the accept queue
        default_handle_error = self.httpd.handle_error

        def handle_error(request: Any, client_address: Any) -> None:
            # A client that was killed or gave up mid-request is expected here; anything else
            # (e.g. a bug in a responder) is still printed.
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                default_handle_error(request, client_address)

        self.httpd.handle_error = handle_error


class HeaderRecordingServer(WideFakeServer):
    def __init__(self, responder: Responder):
        super().__init__(responder)
        self.headers: list[dict[str, str]] = []
        """One dict per POST, header names lower-cased."""
        server = self
        base = self.httpd.RequestHandlerClass

        class RecordingHandler(base):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                with server._lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                super().do_POST()

        self.httpd.RequestHandlerClass = RecordingHandler

    def header_values(self, name: str) -> list[Any]:
        return [h.get(name.lower()) for h in self.headers]
