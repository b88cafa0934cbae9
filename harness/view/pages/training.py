"""A train run's curves: one chart per panel (reward, held-out success, loss, KL, clip fraction,
the method's own metrics), the held-out points linked to their eval runs, and the steps where
token credit was recorded, each linked to its heatmap (``harness.results.view_data.train_curves``
gives the numbers; ``harness.view.charts`` the SVG geometry)."""

from __future__ import annotations

from starlette.requests import Request

from harness.errors import ConfigError
from harness.results.view_data import train_curves
from harness.view.charts import line_chart
from harness.view.core import Context, Page, ViewError

PANEL_TITLES = {"reward": "Training reward and success", "held_out": "Held-out evaluation", "loss": "Policy loss",
                "kl": "KL to the reference policy", "clip": "Clip fraction", "method": "The method's own metrics"}


def load(ctx: Context, request: Request) -> dict:
    record = ctx.run(int(request.path_params["run_id"]))
    try:
        curves = train_curves(ctx.store, record.name)
    except ConfigError as exc:  # an eval run: it has no curves
        raise ViewError(400, f"{exc}; open a train run's training page") from None
    for point in curves["eval_points"]:  # the few stored eval runs, one lookup each
        point["run_id"] = ctx.store.get_run(point["run"]).id if point["stored"] else None
    links = {name: {p["step"]: f"/runs/{p['run_id']}" for p in curves["eval_points"] if p["run_id"] is not None}
             for name in ("eval/success", "eval/reward")}
    charts = [{"panel": panel, "title": PANEL_TITLES.get(panel, panel),
               **line_chart(curves["steps"], {m: curves["metrics"][m] for m in names}, links)}
              for panel, names in curves["panels"].items() if panel != "method"]
    # the method's metrics have unrelated scales (a fraction, a token count): one small chart each
    small = [{"panel": name, "title": name, **line_chart(curves["steps"], {name: curves["metrics"][name]}, small=True)}
             for name in curves["panels"].get("method", [])]
    return {"run": {"id": record.id, "name": record.name, "kind": record.kind}, "curves": curves, "charts": charts,
            "method_charts": small}


PAGE = Page(path="/runs/{run_id:int}/training", template="training.html", load=load, name="training")
