"""Line charts as server-rendered SVG geometry, for the training page: each series a polyline and a
marker per point whose ``<title>`` is its hover text, eval points as links. Plain numbers in,
plain numbers out; the template draws them, so every label is escaped like any other value.

Why not a JavaScript plotting library: the viewer fetches nothing from the internet and ships no
third-party code, and a run's curves are a few hundred points, which the browser draws as SVG
directly; ``<title>`` gives the hover values and ``<a>`` the links without a script.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["WIDTH", "HEIGHT", "MAX_MARKERS", "line_chart"]

WIDTH, HEIGHT = 560, 190
SMALL = (300, 120)
"""A small chart's width and height (one metric each, many side by side)."""
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 10, 24
MAX_MARKERS = 400
"""Markers (hover targets) per series at most: a longer run marks every k-th step (the line still
goes through every point), so a 10,000-step run's page stays light."""
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ticks(low: float, high: float) -> list[float]:
    return [low, (low + high) / 2, high] if high > low else [low]


def line_chart(steps: list[int], series: dict[str, list[Any]], links: dict[str, dict[int, str]] | None = None,
               *, small: bool = False) -> dict[str, Any]:
    """The geometry of one panel: ``{"width", "height", "series": [{"name", "colour", "path":
    "x,y x,y ..." per unbroken stretch, "points": [{"step", "value", "x", "y", "href"}]}],
    "x_ticks", "y_ticks": [{"value", "at"}], "empty"}``. ``links``: per series, step -> URL
    (the point becomes a link). ``small``: the ``SMALL`` size instead of ``WIDTH`` x ``HEIGHT``."""
    width, height = SMALL if small else (WIDTH, HEIGHT)
    values = [v for vs in series.values() for v in map(_number, vs) if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high == low:  # a flat line sits mid-panel
        low, high = low - 0.5, high + 0.5
    first, last = (min(steps), max(steps)) if steps else (0, 1)
    span = max(last - first, 1)

    def x(step: int) -> float:
        return round(LEFT + (step - first) / span * (width - LEFT - RIGHT), 1)

    def y(value: float) -> float:
        return round(TOP + (high - value) / (high - low) * (height - TOP - BOTTOM), 1)

    drawn = []
    for i, (name, column) in enumerate(series.items()):
        marked = [(s, v) for s, v in zip(steps, map(_number, column)) if v is not None]
        stride = max(1, math.ceil(len(marked) / MAX_MARKERS))
        href = (links or {}).get(name, {})
        paths, stretch = [], []
        for s, v in zip(steps, map(_number, column)):
            if v is None:  # a step that did not log this metric breaks the line
                if stretch:
                    paths.append(" ".join(stretch))
                stretch = []
            else:
                stretch.append(f"{x(s)},{y(v)}")
        if stretch:
            paths.append(" ".join(stretch))
        points = [{"step": s, "value": v, "x": x(s), "y": y(v), "href": href.get(s)}
                  for k, (s, v) in enumerate(marked) if k % stride == 0 or s in href]
        drawn.append({"name": name, "colour": COLOURS[i % len(COLOURS)], "paths": paths, "points": points})
    return {"width": width, "height": height, "left": LEFT, "bottom": height - BOTTOM, "right": width - RIGHT,
            "series": drawn, "empty": not values,
            "x_ticks": [{"value": s, "at": x(s)} for s in sorted({first, last})],
            "y_ticks": [{"value": v, "at": y(v)} for v in _ticks(low, high)]}
