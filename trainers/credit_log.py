"""Token-credit recording (``harness train --log-credit-every N``): every N steps, the first
``--log-credit-groups`` groups that trained are stored, one ``token_credit`` row per sibling
(``harness.store.credit``), for the viewer's heatmap.

Per sampled token a row holds the token id, the token as the policy's tokenizer decodes that id
alone (stored now, so the viewer needs no tokenizer and nothing is retokenized), its agent turn,
the final advantage the update uses (``Prepared.advantages``: GRPO's scalar on every token, or the
per-position advantage of a credit method) and the method's own per-token values
(``Prepared.credit``: the multiplier; SGCD's salience and teacher divergences). The episode's
messages and outcome come along, so a recorded group is a sibling group the viewer can show.

Recording reads the prepared batch before the update and writes to the database only: it draws no
random numbers and changes no tensor, so the trained weights are the same with and without it
(tests/test_view_data.py). Under torchrun rank 0 records its own share of the step's groups.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.store import Store, put_token_credit
from harness.types import Group
from trainers.methods import Prepared

__all__ = ["credit_rows", "record_credit"]


def _short(x: float) -> float:
    """7 significant digits (float32's precision, which the update computes in): about half the
    bytes of a full float64 repr in JSON."""
    return float(f"{x:.7g}")


def _per_token(value: Any, positions: list[int]) -> list[float]:
    """A trace's advantage at its sampled positions: a float for all, or a per-position tensor."""
    if isinstance(value, torch.Tensor):
        return [_short(x) for x in value.detach().float().reshape(-1)[positions].tolist()]
    if isinstance(value, (list, tuple)):
        return [_short(float(value[p])) for p in positions]
    return [_short(float(value))] * len(positions)


def credit_rows(groups: list[Group], prepared: Prepared, tokenizer: Any, max_groups: int) -> list[dict[str, Any]]:
    """Rows for the first ``max_groups`` groups with a trained trace: every sibling with a trace."""
    index = {id(trace): i for i, trace in enumerate(prepared.traces)}  # the method trains the episodes' own traces
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    for group in groups:
        if len(taken) == max_groups:
            break
        members = [e for e in group.episodes if e.trace is not None]
        # a task drawn twice in one step (the stream wrapped while resampling) has one group id: keep its first group
        if group.group_id in taken or not any(id(e.trace) in index for e in members):
            continue
        taken.add(group.group_id)
        reference = None
        for episode in members:
            trace, i = episode.trace, index.get(id(episode.trace))
            positions = trace.sampled_positions
            ids = [int(trace.input_ids[p]) for p in positions]
            turns = [t for t, (start, end) in enumerate(trace.turns) for _ in range(start, end)]
            extra = prepared.credit[i] if i is not None and i < len(prepared.credit) else {}
            reference = reference or extra.get("reference")
            rows.append({
                "group_id": group.group_id, "task_id": str(group.task_id), "trial": int(episode.trial),
                "reward": float(episode.score.reward), "success": bool(episode.score.success),
                "trained": i is not None, "messages": episode.messages, "token_ids": ids,
                "tokens": [tokenizer.decode([t]) for t in ids], "turns": turns,
                "advantages": [] if i is None else _per_token(prepared.advantages[i], positions),
                "values": {name: [_short(x) for x in v.detach().float().reshape(-1).tolist()]
                           for name, v in extra.get("values", {}).items()},
                "reference": None})
        for row in rows:  # one reference per group: on every sibling, also the untrained ones
            if row["group_id"] == group.group_id:
                row["reference"] = reference
    return rows


def record_credit(store: Store, run: str, step: int, groups: list[Group], prepared: Prepared, tokenizer: Any,
                  max_groups: int) -> int:
    """Store the step's recorded siblings; returns how many rows were written."""
    rows = credit_rows(groups, prepared, tokenizer, max_groups)
    put_token_credit(store, run, step, rows)
    return len(rows)
