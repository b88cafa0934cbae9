"""``HeaderRecordingServer``: a ``FakeOpenAIServer`` that also records the HTTP headers of every
request (for the secrets test: proves the API key really reached the provider, so grepping our
outputs for it means something)."""

from __future__ import annotations

from typing import Any

from fakes.openai_server import FakeOpenAIServer, Responder


class HeaderRecordingServer(FakeOpenAIServer):
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
