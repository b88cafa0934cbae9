"""The runs page: every run, eval and train, one page at a time, filtered and sorted by the
run's own columns (so a page never aggregates more than its own runs' episodes)."""

from __future__ import annotations

from starlette.requests import Request

from harness.errors import ConfigError
from harness.store.browse import RUN_SORTS, runs_page
from harness.view.core import Context, Page, Params, ViewError

PAGE_SIZE_MAX = 500


def load(ctx: Context, request: Request) -> dict:
    q = Params(request)
    filters = {"kind": q.choice("kind", ("", "eval", "train"), ""),
               "env": q.text("env"), "status": q.text("status"), "search": q.text("q")}
    sort = q.choice("sort", RUN_SORTS, "id")
    order = q.choice("order", ("desc", "asc"), "desc")
    limit = q.integer("limit", 50, 1, PAGE_SIZE_MAX)
    offset = q.integer("offset", 0, 0, 10**9)
    try:
        total, runs = runs_page(ctx.store, **filters, sort=sort, descending=order == "desc", limit=limit,
                                offset=offset)
    except ConfigError as exc:
        raise ViewError(400, str(exc)) from None
    for run in runs:
        run["method"] = _method(run["config"])
    return {"total": total, "offset": offset, "limit": limit, "sort": sort, "order": order, "filters": filters,
            "sorts": list(RUN_SORTS), "runs": runs}


def _method(config: dict) -> str | None:
    """A train run's method (its config's ``train`` settings keep it); None for an eval run."""
    train = config.get("train") if isinstance(config, dict) else None
    return train.get("method") if isinstance(train, dict) else None


PAGE = Page(path="/runs", template="runs.html", load=load, name="runs")
