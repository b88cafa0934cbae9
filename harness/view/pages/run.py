"""A run's page: the summary ``harness results show`` prints (pass^k with its confidence interval,
terminations, error classes, tokens, cost, the env's own rows) and its tasks with per-trial
outcomes, filtered to failed-only or all-failed and paged."""

from __future__ import annotations

import json

from starlette.requests import Request

from harness.results import show_table
from harness.store.browse import task_outcomes
from harness.view.core import Context, Page, Params


def load(ctx: Context, request: Request) -> dict:
    q = Params(request)
    only = q.choice("only", ("all", "failed", "all_failed"), "all")
    limit = q.integer("limit", 100, 1, 1000)
    offset = q.integer("offset", 0, 0, 10**9)
    record = ctx.run(int(request.path_params["run_id"]))
    summary = show_table(ctx.store, record.id, ctx.env_metrics).iloc[0].to_dict()
    tasks = task_outcomes(ctx.store, record.id, only)
    env_tasks = ctx.task_metrics(ctx.store, record) if ctx.task_metrics is not None else None
    return {"run": {**record.__dict__, "config": record.config}, "summary": summary,
            "tasks_total": len(tasks), "only": only, "offset": offset, "limit": limit,
            "tasks": tasks[offset:offset + limit],
            "env_tasks": json.loads(env_tasks.reset_index().to_json(orient="records")) if env_tasks is not None
            else None}


PAGE = Page(path="/runs/{run_id:int}", template="run.html", load=load, name="run")
