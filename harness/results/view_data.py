"""What the viewer's sibling-group, training and credit pages show, read from the store as plain
JSON-able dicts (no data frames, no NaN: a missing value is None). Read-only: nothing here writes.

- ``sibling_group``: the siblings of one group side by side (messages, outcome), the first
  message where they diverge, and for SGCD the credit reference the update read, with its cost;
- ``train_curves``: a train run's per-step metrics, grouped for plotting, with its evaluation
  points linked to their eval runs (``<run>/eval-step-NNNNNN``);
- ``token_credit``: the per-token credit ``harness train --log-credit-every`` recorded at a step,
  with the range of each value, ready to colour.

A bad request (an unknown run, a step without recorded credit, an eval run where a train run is
needed) raises ``ConfigError`` with one line that says what exists instead.
"""

from __future__ import annotations

import math
from typing import Any

from harness.errors import ConfigError
from harness.results.train_compare import eval_step_run
from harness.store import Store, credit_steps, get_guidance, token_credit_rows, train_steps

__all__ = ["sibling_group", "train_curves", "token_credit", "first_divergence", "CURVE_PANELS"]

CURVE_PANELS = {
    "reward": ("reward/mean", "reward/std", "success/mean"),
    "held_out": ("eval/success", "eval/reward"),
    "loss": ("loss/policy",),
    "kl": ("kl/ref",),
    "clip": ("clip/frac",),
}
"""The shared panels of a training page and their metrics (those a run logged are shown)."""


def _plain(value: Any) -> Any:
    """A JSON value: NaN and infinities become None, numpy scalars plain numbers."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _train_run(store: Store, run: str, what: str):
    record = store.get_run(run)  # unknown: ConfigError naming the known runs
    if record.kind != "train":
        raise ConfigError(f"run '{run}' is an {record.kind} run; {what} exist for train runs")
    return record


def first_divergence(conversations: list[list[dict[str, Any]]]) -> int | None:
    """The index of the first message where the conversations are not all the same (a missing
    message counts as different), or None when they are identical."""
    if len(conversations) < 2:
        return None
    for i in range(max(len(c) for c in conversations)):
        at = [c[i] if i < len(c) else None for c in conversations]
        if any(m != at[0] for m in at[1:]):
            return i
    return None


def _divergence(siblings: list[dict[str, Any]]) -> dict[str, Any] | None:
    index = first_divergence([s["messages"] for s in siblings])
    if index is None:
        return None
    first = siblings[0]["messages"]
    return {"message_index": index,
            "agent_turn": sum(1 for m in first[:index] if m.get("role") == "assistant")}


def _label(successes: list[bool]) -> str:
    if not successes:
        return "unscored"
    return "all_success" if all(successes) else "mixed" if any(successes) else "all_fail"


def _reference(store: Store, key: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored credit reference a recorded group points at (``guidance`` row), or None."""
    if not key:
        return None
    row = get_guidance(store, [(key["digest"], key["model"], key["prompt_version"])]).get(
        (key["digest"], key["model"], key["prompt_version"]))
    out = {"model": key["model"], "prompt_version": key["prompt_version"], "digest": key["digest"],
           "status": key.get("status"), "text": None, "cost_usd": None, "latency_s": None, "attempts": None,
           "reason": None, "stored": row is not None}
    if row is not None:  # status as stored: ok or fallback (a cache hit reads "cached" at the step)
        out.update({k: _plain(row[k]) for k in ("text", "cost_usd", "latency_s", "attempts", "reason")})
        out["stored_status"] = row["status"]
    return out


def sibling_group(store: Store, run: str, task_id: str, *, step: int | None = None) -> dict[str, Any]:
    """One sibling group: of an eval run played with ``--group-size`` (``step`` None), or of a
    train run's step where credit was recorded (``step`` given; the group of ``task_id`` there).

    ``{"run", "kind", "task_id", "group_id", "step", "label", "siblings": [{"trial", "reward",
    "success", "termination", "error_class", "trained", "messages"}], "divergence":
    {"message_index", "agent_turn"} | None, "reference": {...} | None}``."""
    record = store.get_run(run)
    task_id = str(task_id)
    reference = None
    if record.kind == "train":
        if step is None:
            raise ConfigError(f"run '{run}' is a train run; name the step of the group (steps with recorded "
                              f"credit: {_listed(credit_steps(store, run))})")
        rows = [r for r in _credit_rows_at(store, run, step) if r["task_id"] == task_id]
        if not rows:
            raise ConfigError(f"run '{run}' recorded no group of task '{task_id}' at step {step}; recorded tasks "
                              f"there: {_listed(sorted({r['task_id'] for r in _credit_rows_at(store, run, step)}))}")
        group_id = rows[0]["group_id"]
        siblings = [{"trial": r["trial"], "reward": _plain(r["reward"]), "success": r["success"], "termination": None,
                     "error_class": None, "trained": r["trained"], "messages": r["messages"]}
                    for r in rows if r["group_id"] == group_id]
        reference = _reference(store, next((r["reference"] for r in rows if r["reference"]), None))
    else:
        if step is not None:
            raise ConfigError(f"run '{run}' is an eval run: its groups have no step; leave the step out")
        grouped = store.groups(run, task_id)
        if not grouped:
            raise ConfigError(f"run '{run}' stored no sibling group of task '{task_id}' (groups are played with "
                              "harness eval --group-size)")
        group = grouped[0]
        group_id = group.group_id
        siblings = [{"trial": e.trial, "reward": _plain(e.score.reward), "success": e.score.success,
                     "termination": e.termination.value, "error_class": e.error_class.value, "trained": None,
                     "messages": e.messages} for e in group.episodes]
    return {"run": record.name, "kind": record.kind, "task_id": task_id, "group_id": group_id, "step": step,
            "label": _label([bool(s["success"]) for s in siblings]),
            "siblings": siblings, "divergence": _divergence(siblings), "reference": reference}


def _listed(items: list[Any]) -> str:
    return ", ".join(str(i) for i in items[:20]) + (", ..." if len(items) > 20 else "") if items else "none"


def _credit_rows_at(store: Store, run: str, step: int) -> list[dict[str, Any]]:
    rows = token_credit_rows(store, run, step)
    if not rows:
        raise ConfigError(f"run '{run}' recorded no token credit at step {step}; steps with recorded credit: "
                          f"{_listed(credit_steps(store, run))} (harness train --log-credit-every N records them)")
    return rows


def train_curves(store: Store, run: str) -> dict[str, Any]:
    """A train run's curves: ``{"run", "method", "steps": [..], "metrics": {name: [value per step]},
    "panels": {panel: [metric names]}, "eval_points": [{"step", "run", "success", "reward",
    "stored"}], "credit_steps": [..]}``. ``panels`` holds the shared panels (``CURVE_PANELS``) and
    ``method``: the method's own metrics (``<method>/...``, e.g. ``sgcd/w_mean``)."""
    record = _train_run(store, run, "curves")
    frame = train_steps(store, run)
    steps = [int(s) for s in frame["step"]]
    metrics = {name: [_plain(v) for v in frame[name]] for name in frame.columns if name != "step"}
    method = str((record.config.get("train") or {}).get("method", ""))
    panels = {panel: [m for m in names if m in metrics] for panel, names in CURVE_PANELS.items()}
    panels["method"] = sorted(m for m in metrics if method and m.startswith(method + "/"))
    known = set(store.run_names(prefix=f"{run}/"))  # its eval points only, not every run's record
    success = metrics.get("eval/success", [None] * len(steps))
    reward = metrics.get("eval/reward", [None] * len(steps))
    evals = [{"step": step, "run": eval_step_run(run, step), "stored": eval_step_run(run, step) in known,
              "success": success[i], "reward": reward[i]}
             for i, step in enumerate(steps) if success[i] is not None]
    return {"run": record.name, "method": method, "status": record.status, "steps": steps, "metrics": metrics,
            "panels": {k: v for k, v in panels.items() if v}, "eval_points": evals,
            "credit_steps": credit_steps(store, run)}


def token_credit(store: Store, run: str, step: int, *, group_id: str | None = None) -> dict[str, Any]:
    """The credit recorded at ``step`` (of one group, or all): ``{"run", "step", "method", "fields",
    "ranges": {field: [min, max]}, "groups": [{"group_id", "task_id", "reference", "siblings":
    [{"trial", "reward", "success", "trained", "tokens": [{"id", "text", "turn", "advantage",
    <method values>}]}]}]}``. ``fields``: what each token carries besides id, text and turn;
    ``ranges``: each field's extent over the step, for one colour scale across siblings."""
    record = _train_run(store, run, "token credit records")
    rows = _credit_rows_at(store, run, step)
    if group_id is not None:
        rows = [r for r in rows if r["group_id"] == group_id]
        if not rows:
            known = sorted({r["group_id"] for r in _credit_rows_at(store, run, step)})
            raise ConfigError(f"run '{run}' recorded no group '{group_id}' at step {step}; recorded there: "
                              f"{_listed(known)}")
    names = sorted({name for r in rows for name in r["values"]})
    fields = ["advantage", *names]
    groups: dict[str, dict[str, Any]] = {}
    extent: dict[str, list[float]] = {}
    for r in rows:
        group = groups.setdefault(r["group_id"], {"group_id": r["group_id"], "task_id": r["task_id"],
                                                  "reference": None, "siblings": []})
        if r["reference"] and group["reference"] is None:
            group["reference"] = _reference(store, r["reference"])
        tokens = []
        for j, (token_id, text, turn) in enumerate(zip(r["token_ids"], r["tokens"], r["turns"])):
            token = {"id": token_id, "text": text, "turn": turn,
                     "advantage": r["advantages"][j] if j < len(r["advantages"]) else None}
            for name in names:
                values = r["values"].get(name) or []
                token[name] = values[j] if j < len(values) else None
            for name in fields:
                if token[name] is not None:
                    low, high = extent.setdefault(name, [token[name], token[name]])
                    extent[name] = [min(low, token[name]), max(high, token[name])]
            tokens.append(token)
        group["siblings"].append({"trial": r["trial"], "reward": _plain(r["reward"]), "success": r["success"],
                                  "trained": r["trained"], "tokens": tokens})
    method = str((record.config.get("train") or {}).get("method", ""))
    return {"run": record.name, "step": step, "method": method, "fields": fields, "ranges": extent,
            "groups": list(groups.values())}
