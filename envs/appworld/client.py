"""Async HTTP client for one ``appworld serve environment`` server (appworld.md §7.1).

Every call is a POST with a JSON body and every reply is ``{"output": ...}``. The harness never
imports ``appworld``; this is the whole interface.

Errors (both are ``harness.errors.InfraError``, so the episode runner records ``infra_error``,
excludes the episode from scores and a resumed run plays it again):
- ``ServerGone``: connection refused/reset, or no reply within the per-call timeout (the server
  died or hung);
- ``ServerError``: the server answered with an HTTP error (upstream answers 500 for a wrong
  ``task_id`` or an unknown task; ``/evaluate`` without ``suppress_errors`` too, which is why
  ``evaluate`` always sends it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from harness.errors import InfraError

__all__ = ["AppWorldClient", "AppWorldError", "ServerGone", "ServerError"]


class AppWorldError(InfraError):
    """An AppWorld server could not do what was asked (infrastructure, not the agent's fault)."""


class ServerGone(AppWorldError):
    """The server is unreachable or stopped answering; it should be restarted."""


class ServerError(AppWorldError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class AppWorldClient:
    """One server, one world at a time. ``timeout`` bounds every call except ``execute``, which
    gets ``execute_timeout`` (set it above the world's own ``timeout_seconds``, so the server's
    "Execution timed out" answer arrives before the client gives up)."""

    def __init__(self, base_url: str, timeout: float = 60.0, execute_timeout: float = 130.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.execute_timeout = execute_timeout
        self.task_id: str | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        url = self.base_url + path
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with self._session.post(url, json=body, timeout=limit) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ServerError(f"AppWorld server {url} answered HTTP {resp.status}: {text[:500]}", resp.status)
                try:
                    payload = await resp.json(content_type=None)
                except ValueError:
                    raise ServerError(f"AppWorld server {url} sent a body that is not JSON: {text[:200]}",
                                      resp.status) from None

        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
            raise ServerGone(f"AppWorld server {self.base_url} is gone ({path}): {type(exc).__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise ServerGone(f"AppWorld server {self.base_url} did not answer {path} within "
                             f"{timeout or self.timeout:g} s") from None
        if not isinstance(payload, dict) or "output" not in payload:
            raise ServerError(f"AppWorld server {url} reply has no 'output': {text[:200]}", 200)
        return payload["output"]

    async def initialize(self, task_id: str, **options: Any) -> dict[str, Any]:
        """Open a world for ``task_id`` (options: ``experiment_name``, ``max_interactions``,
        ``timeout_seconds``, ``random_seed``, ...). Returns ``{task_id, instruction, supervisor,
        datetime}``."""
        out = await self._post("/initialize", {"task_id": task_id, **options})
        self.task_id = task_id
        return out

    async def execute(self, code: str) -> str:
        return str(await self._post("/execute", {"task_id": self.task_id, "code": code}, self.execute_timeout))

    async def task_completed(self) -> bool:
        return bool(await self._post("/task_completed", {"task_id": self.task_id}))

    async def evaluate(self) -> dict[str, Any]:
        """The test tracker ``{success, difficulty, num_tests, passes, failures}`` (always with
        ``suppress_errors``, so a failing task is a result, not an HTTP 500)."""
        return await self._post("/evaluate", {"task_id": self.task_id, "suppress_errors": True, "report": False})

    async def close(self) -> None:
        """Close the world (best effort) and the HTTP session."""
        try:
            if self.task_id is not None:
                await self._post("/close", {"task_id": self.task_id})
        finally:
            self.task_id = None
            await self.aclose_session()

    async def aclose_session(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
