"""A scriptable OpenAI-compatible chat server on 127.0.0.1 for tests.

The harness talks to it through the real litellm client (model ``openai/<name>`` with
``api_base=server.base_url``), so every layer above HTTP is the production code path.

Replies are decided by a ``responder(request_body) -> dict`` callable. A reply dict may hold:
- ``content``: assistant text;
- ``tool_calls``: list of ``{"name": str, "arguments": str | dict, "id": optional str}``;
- ``status``: an HTTP error status to return instead (e.g. 429, 500), with ``message``;
- ``delay``: seconds to sleep before answering (for client timeouts);
- ``raw``: a raw response body (bytes or str), sent as-is with status 200 (malformed JSON), as
  ``content_type`` (default ``application/json``; e.g. ``text/html`` for a proxy's error page);
- ``headers``: extra response headers (e.g. ``{"Retry-After": "1"}`` with a 429);
- ``trickle``: seconds between bytes: the server sends the status line and headers, then one
  byte of an endless body every ``trickle`` seconds until the client hangs up (a stalled
  provider that never trips a client's per-read timeout).
``ScriptedResponder`` serves per-model queues of replies in order.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from fakes.http_json import WideServer, send_json

Responder = Callable[[dict[str, Any]], dict[str, Any]]


class ScriptedResponder:
    """Per-model FIFO queues of replies. A request for a model whose queue is empty gets HTTP 400
    with a message naming the model, so a test with a short script fails loudly."""

    def __init__(self, script: dict[str, list[dict[str, Any]]] | None = None):
        self.queues: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()
        for model, replies in (script or {}).items():
            self.extend(model, replies)

    def extend(self, model: str, replies: list[dict[str, Any]]) -> None:
        with self.lock:
            self.queues[model].extend(replies)

    def remaining(self, model: str) -> int:
        return len(self.queues[model])

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        model = request.get("model", "")
        with self.lock:
            if not self.queues[model]:
                return {"status": 400, "message": f"fake server: script for model '{model}' is exhausted"}
            return self.queues[model].popleft()


def _completion_body(request: dict[str, Any], reply: dict[str, Any], counter: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    calls = reply.get("tool_calls") or []
    if calls:
        message["tool_calls"] = [
            {
                "id": c.get("id") or f"call_{counter}_{i}",
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"]),
                },
            }
            for i, c in enumerate(calls)
        ]
    prompt_chars = sum(len(str(m.get("content") or "")) for m in request.get("messages", []))
    completion_chars = len(reply.get("content") or "") + sum(len(str(c.get("arguments"))) for c in calls)
    usage = reply.get("usage") or {
        "prompt_tokens": max(1, prompt_chars // 4),
        "completion_tokens": max(1, completion_chars // 4),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"chatcmpl-fake-{counter}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}
        ],
        "usage": usage,
    }


class FakeOpenAIServer:
    def __init__(self, responder: Responder, api_key: str | None = None):
        """``api_key``: answer every request whose ``Authorization`` is not ``Bearer <api_key>``
        with HTTP 401, as a vLLM server started with ``--api-key`` does (counted in ``unauthorized``)."""
        self.responder = responder
        self.api_key = api_key
        self.unauthorized = 0
        self.requests: list[dict[str, Any]] = []
        self._counter = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK
            # adds ~40 ms to every response and would swamp any latency measurement.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    with server._lock:
                        server.unauthorized += 1
                    self._send(401, {"error": "Unauthorized"})
                    return
                with server._lock:
                    server.requests.append(body)
                    server._counter += 1
                    counter = server._counter
                reply = server.responder(body)
                if reply.get("delay"):
                    time.sleep(reply["delay"])
                if reply.get("trickle"):
                    self._trickle(reply["trickle"])
                elif "raw" in reply:
                    raw = reply["raw"].encode() if isinstance(reply["raw"], str) else reply["raw"]
                    send_json(self, 200, raw, content_type=reply.get("content_type", "application/json"))
                elif reply.get("status"):
                    err = {"error": {"message": reply.get("message", "fake error"), "type": "fake",
                                     "code": reply["status"]}}
                    self._send(reply["status"], err, reply.get("headers"))
                else:
                    self._send(200, _completion_body(body, reply, counter), reply.get("headers"))

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                send_json(self, status, json.dumps(payload).encode(), headers)

            def _trickle(self, interval: float) -> None:
                # A body announced as 1 MB that arrives one space at a time: valid JSON whitespace,
                # so only a deadline on the whole reply ends the wait.
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(1 << 20))
                    self.end_headers()
                    self.wfile.flush()
                    for _ in range(1 << 20):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should
                self.close_connection = True

        self.httpd = WideServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("model") == model]

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
