"""The credit heatmap of one recorded training step: every sampled token of each recorded group's
siblings, coloured by the value picked (the final token advantage by default; for credit methods
also their per-token values, e.g. SGCD's weight W, salience and teacher divergence), each value
of the token on hover. Tokens are the text the policy's tokenizer decoded for each sampled id
when it was recorded (``trainers.credit_log``): nothing is retokenized here.

The colour scale is diverging (blue below the centre, white at it, red above; 21 steps, ColorBrewer
RdBu's ends): centred on 0 for the advantage and the other values (a token pushed down vs up), on
1 for the multiplier W (1: the group advantage unchanged), and symmetric around the centre over
the step's largest distance from it, so every sibling on the page shares one scale."""

from __future__ import annotations

from starlette.requests import Request

from harness.errors import ConfigError
from harness.results.view_data import token_credit
from harness.view.core import Context, Page, Params, ViewError

BINS = 10
"""Colour steps on each side of the centre (the CSS classes ``n1..n10`` and ``p0..p10``)."""
CENTRES = {"multiplier": 1.0}
"""Each field's neutral value where it is not 0."""


def load(ctx: Context, request: Request) -> dict:
    q = Params(request)
    record = ctx.run(int(request.path_params["run_id"]))
    step = int(request.path_params["step"])
    group_id = q.text("group")
    try:
        data = token_credit(ctx.store, record.name, step, group_id=group_id)
    except ConfigError as exc:
        raise ViewError(404 if "recorded no" in str(exc) else 400, str(exc)) from None
    colour = q.choice("color", tuple(data["fields"]), "advantage")
    limit = q.integer("limit", 4, 1, 50)
    offset = q.integer("offset", 0, 0, 10**9)
    centre = CENTRES.get(colour, 0.0)
    low, high = data["ranges"].get(colour, [centre, centre])
    extent = max(abs(high - centre), abs(low - centre)) or 1.0
    groups = data.pop("groups")
    return {**data, "run": {"id": record.id, "name": record.name}, "color": colour, "group": group_id,
            "scale": {"centre": centre, "extent": extent, "bins": BINS},
            "groups_total": len(groups), "offset": offset, "limit": limit, "groups": groups[offset:offset + limit]}


PAGE = Page(path="/runs/{run_id:int}/credit/{step:int}", template="credit.html", load=load, name="credit")
