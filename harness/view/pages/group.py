"""A sibling group: the siblings of one task side by side (an eval run played with
``--group-size``, or a training step where ``--log-credit-every`` recorded the group), their
outcomes, the first message where they diverge highlighted, and for SGCD the stored credit
reference with the model that wrote it and its cost (``harness.results.view_data.sibling_group``).

The messages before the divergence are the same in every sibling, so the page shows them once,
collapsed, and the siblings' columns start at the first message that differs (siblings that
never differ are shown whole)."""

from __future__ import annotations

from starlette.requests import Request

from harness.errors import ConfigError
from harness.results.view_data import sibling_group
from harness.view.core import Context, Page, Params, ViewError
from harness.view.pages.episode import turns


def load(ctx: Context, request: Request) -> dict:
    q = Params(request)
    record = ctx.run(int(request.path_params["run_id"]))
    task_id = q.text("task")
    if task_id is None:
        raise ViewError(400, "name the group's task: ?task=ID (the run page links each task's group)")
    step = q.integer("step", -1, 0, 10**9)
    try:
        group = sibling_group(ctx.store, record.name, task_id, step=None if step < 0 else step)
    except ConfigError as exc:
        # the run exists (checked above): what is missing is its group, or the request mixes kinds
        missing = "recorded no" in str(exc) or "stored no" in str(exc)
        raise ViewError(404 if missing else 400, str(exc)) from None
    at = group["divergence"]["message_index"] if group["divergence"] else None
    for sibling in group["siblings"]:
        sibling["turns"] = turns(sibling["messages"])
    shared = at or 0  # identical siblings (or one) are shown whole, each in its column
    return {"run": {"id": record.id, "name": record.name, "kind": record.kind}, "group": group, "shared": shared}


PAGE = Page(path="/runs/{run_id:int}/group", template="group.html", load=load, name="group")
