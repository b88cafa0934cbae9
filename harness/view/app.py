"""The viewer's Starlette app: each page (``harness.view.pages``) as HTML and as JSON, the local
static files, and errors as one clear message (JSON under ``/api``, a small page elsewhere), never
a traceback: 400 and 404 for requests it cannot serve, 503 with the store's one line when the
database fails under it, 500 (traceback in the server's terminal only) for a bug.

Why server-rendered Jinja2 templates and no JavaScript: the pages are tables, links and forms
(filters, sorting, two check boxes to compare), which HTML does alone; autoescaping then covers
every value the models wrote in one place, and there is no front-end build or asset to fetch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from harness.errors import HarnessError
from harness.results.metrics import format_for
from harness.view.core import Context, Page, ViewError, plain
from harness.view.pages import PAGES

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
log = logging.getLogger("harness.view")


def _metric(value: Any, name: str = "") -> str:
    """A summary value as ``harness results show`` prints it (the metric's declared format)."""
    value = plain(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_for(name).format(value)
    return str(value)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["metric"] = _metric
    env.filters["pretty"] = lambda v: v if isinstance(v, str) else json.dumps(plain(v), indent=2, ensure_ascii=False)
    return env


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/api"


def _error(request: Request, status: int, message: str, templates: Environment) -> Response:
    if _is_api(request):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    html = templates.get_template("error.html").render(status=status, message=message)
    return HTMLResponse(html, status_code=status)


def create_app(ctx: Context) -> Starlette:
    """The app serving ``ctx.store`` (opened read-only by the caller)."""
    templates = _templates()

    def endpoints(page: Page):
        def as_json(request: Request) -> Response:
            return JSONResponse(plain(page.load(ctx, request)))

        def as_html(request: Request) -> Response:
            data = page.load(ctx, request)
            return HTMLResponse(templates.get_template(page.template).render(request=request, page=page.name, **data))

        return as_json, as_html

    routes: list[Any] = [Route("/", lambda request: RedirectResponse("/runs"))]
    for page in PAGES:
        as_json, as_html = endpoints(page)
        routes += [Route("/api" + page.path, as_json, name=f"api-{page.name}"),
                   Route(page.path, as_html, name=page.name)]
    routes.append(Mount("/static", StaticFiles(directory=HERE / "static"), name="static"))

    async def view_error(request: Request, exc: ViewError) -> Response:
        return _error(request, exc.status, exc.message, templates)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no page at {request.url.path}; start at /runs",
                   405: f"{request.method} is not served here; the viewer only reads (GET)"}
        return _error(request, exc.status_code, message.get(exc.status_code, str(exc.detail)), templates)

    async def harness_error(request: Request, exc: HarnessError) -> Response:
        # The database failed under us (damaged, unreachable, locked): its one line, on both sides.
        log.error("error serving %s: %s", request.url.path, exc)
        return _error(request, 503, str(exc), templates)

    async def crash(request: Request, exc: Exception) -> Response:
        # A bug or a storage failure: logged in full on the server's terminal, one line to the browser.
        log.error("error serving %s", request.url.path, exc_info=exc)
        return _error(request, 500, f"the viewer failed to serve this page ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); see the terminal running "
                                    "harness view", templates)

    return Starlette(routes=routes, exception_handlers={ViewError: view_error, HTTPException: http_error,
                                                        HarnessError: harness_error, Exception: crash})
