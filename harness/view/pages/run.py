"""A run's page.

An eval run: the summary ``harness results show`` prints (its decoding, pass^k with its confidence
interval, terminations, error classes, tokens, cost, the env's own rows) and its tasks with
per-trial outcomes, filtered to failed-only or all-failed and paged.

A train run has no episodes of its own, so it gets what ``results show`` prints for a train run
instead (``train_show_table``: method, settings, held-out decoding, final held-out success with its
95% CI, best, train reward, losses, wall time), its held-out evaluation points (each linked to its
eval run, with its success and 95% CI), the steps with recorded token credit and the sibling groups
recorded there, each linked to its page."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from harness.results import show_table
from harness.results.metrics import summarize
from harness.results.train_compare import train_show_table
from harness.results.view_data import train_curves
from harness.store.browse import recorded_groups, task_outcomes
from harness.view.core import Context, Page, Params, plain


def load(ctx: Context, request: Request) -> dict:
    q = Params(request)
    only = q.choice("only", ("all", "failed", "all_failed"), "all")
    limit = q.integer("limit", 100, 1, 1000)
    offset = q.integer("offset", 0, 0, 10**9)
    record = ctx.run(int(request.path_params["run_id"]))
    run = {**record.__dict__, "config": record.config}
    if record.kind == "train":
        return {"run": run, **_train(ctx, record)}
    summary = show_table(ctx.store, record.id, ctx.env_metrics).iloc[0].to_dict()
    tasks = task_outcomes(ctx.store, record.id, only)
    env_tasks = ctx.task_metrics(ctx.store, record) if ctx.task_metrics is not None else None
    return {"run": run, "summary": summary,
            "tasks_total": len(tasks), "only": only, "offset": offset, "limit": limit,
            "tasks": tasks[offset:offset + limit],
            "env_tasks": json.loads(env_tasks.reset_index().to_json(orient="records")) if env_tasks is not None
            else None}


def _train(ctx: Context, record) -> dict[str, Any]:
    summary = plain(train_show_table(ctx.store, record.name).iloc[0].to_dict())
    curves = train_curves(ctx.store, record.name)
    points = []
    for point in curves["eval_points"]:  # a few eval runs; each CI is the one `results show` gives it
        stats = summarize(ctx.store.episodes_df(point["run"])) if point["stored"] else {}
        points.append({**point, "run_id": ctx.store.get_run(point["run"]).id if point["stored"] else None,
                       "ci95_low": stats.get("pass^1/ci95_low"), "ci95_high": stats.get("pass^1/ci95_high")})
    return {"summary": summary, "method": summary.get("method"), "eval_points": plain(points),
            "credit_steps": curves["credit_steps"], "groups": recorded_groups(ctx.store, record.id)}


PAGE = Page(path="/runs/{run_id:int}", template="run.html", load=load, name="run")
