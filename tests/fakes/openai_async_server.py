"""A lean OpenAI-compatible chat server on one asyncio event loop, for throughput benchmarks.

Why a second fake: ``FakeOpenAIServer`` (threads, ``http.server``) is the right tool for tests that
script faults, but it keeps one thread per connection, sleeps in that thread for the reply delay,
and parses each request with the email-header machinery of ``http.server``. At 64 connections
that costs about 0.5 ms of CPU per call plus GIL hand-offs between 64 threads waking at the same
moment, and on a 2-core machine that CPU and that jitter land in the harness's wall time. This
server answers from one event loop: the reply delay is a timer (no thread), and parsing is a
split on the header block, so the measured overhead is the harness's and not the fake's.

Same reply contract as ``FakeOpenAIServer``'s responder (``content``, ``tool_calls``, ``status``,
``delay``, ``raw``); HTTP/1.1 keep-alive with ``Content-Length`` bodies only (what aiohttp, httpx
and the OpenAI SDK send). It runs its loop in a daemon thread, or call ``serve_forever`` in a
process of its own (what the benchmark does, so its CPU is not counted as the harness's).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from fakes.openai_server import Responder, _completion_body

__all__ = ["AsyncFakeOpenAIServer"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class _Connection(asyncio.Protocol):
    def __init__(self, server: "AsyncFakeOpenAIServer"):
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:  # a client may pipeline; take every complete request in the buffer
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self._handle(head[0].split(" ")[1] if " " in head[0] else "/", body)

    def _handle(self, path: str, raw: bytes) -> None:
        if not path.rstrip("/").endswith("/chat/completions"):
            self._send(404, json.dumps({"error": {"message": f"no route {path}"}}).encode())
            return
        request = json.loads(raw or b"{}")
        self.server.calls += 1
        counter = self.server.calls
        reply = self.server.responder(request)
        if "raw" in reply:
            data = reply["raw"].encode() if isinstance(reply["raw"], str) else reply["raw"]
            status = 200
        elif reply.get("status"):
            status = reply["status"]
            data = json.dumps({"error": {"message": reply.get("message", "fake error"), "type": "fake",
                                         "code": status}}).encode()
        else:
            status, data = 200, json.dumps(_completion_body(request, reply, counter)).encode()
        delay = reply.get("delay") or 0
        if delay:
            asyncio.get_running_loop().call_later(delay, self._send, status, data)
        else:
            self._send(status, data)

    def _send(self, status: int, data: bytes) -> None:
        if self.closed or self.transport is None:
            return  # the client gave up (timeout) or was killed
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.transport.write(head + data)  # one write: no Nagle / delayed-ACK stall between parts


class AsyncFakeOpenAIServer:
    def __init__(self, responder: Responder, host: str = "127.0.0.1", port: int = 0):
        self.responder = responder
        self.host, self.port = host, port
        self.calls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        # backlog: hundreds of clients connect at once; a short queue would drop SYNs (1 s retries).
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def serve_forever(self, on_ready: Any = None) -> None:
        """Run in the calling thread until the process ends; ``on_ready(base_url)`` once listening."""

        async def main() -> None:
            await self._open()
            if on_ready is not None:
                on_ready(self.base_url)
            await asyncio.Event().wait()

        asyncio.run(main())

    def start(self) -> "AsyncFakeOpenAIServer":
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._open())
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "AsyncFakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
