"""Two runs side by side: the summaries and paired statistics ``harness results compare``
computes, and every task with both runs' trials, the tasks where they disagree first."""

from __future__ import annotations

import json

from starlette.requests import Request

from harness.errors import ConfigError
from harness.results import compare_table
from harness.store.browse import task_outcomes
from harness.view.core import Context, Page, Params, ViewError


def load(ctx: Context, request: Request) -> dict:
    ids = Params(request).ids("run")
    if len(ids) != 2 or ids[0] == ids[1]:
        raise ViewError(400, "compare takes two different runs: /compare?run=ID&run=ID (pick two on the runs page)")
    records = [ctx.run(i) for i in ids]
    try:
        summary, per_task = compare_table(ctx.store, [r.id for r in records], ctx.env_metrics)
    except ConfigError as exc:
        raise ViewError(400, str(exc)) from None
    trials = [{t["task_id"]: t["trials"] for t in task_outcomes(ctx.store, r.id)} for r in records]
    first, second = (str(r.id) for r in records)
    summary.columns = [str(c) for c in summary.columns]
    per_task.columns = [str(c) for c in per_task.columns]
    tasks = [{"task_id": task_id, "rates": [row[first], row[second]], "delta": row["delta"],
              "differs": bool(row["differs"]), "trials": [trials[0].get(task_id, []), trials[1].get(task_id, [])]}
             for task_id, row in per_task.iterrows()]
    tasks.sort(key=lambda t: not t["differs"])  # stable: disagreements first, each part in task order
    rows = json.loads(summary.reset_index().to_json(orient="records"))
    paired = [{"metric": r["metric"].split("/", 2)[2], "value": r[second]} for r in rows
              if r["metric"].startswith("paired/")]
    summary_rows = [{"metric": r["metric"], "values": [r[first], r[second]]} for r in rows
                    if not r["metric"].startswith("paired/")]
    return {"runs": [{**r.__dict__} for r in records], "summary": summary_rows, "paired": paired,
            "tasks": tasks, "disagreements": sum(t["differs"] for t in tasks)}


PAGE = Page(path="/compare", template="compare.html", load=load, name="compare")
