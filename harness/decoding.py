"""How a run's agent chose its replies: greedy, or sampled at a temperature, and how many samples
per task. The same checkpoint scores differently greedy and sampled (issue 21 measured 0.733
against 0.400), so every eval run states its decoding, ``harness eval`` and training's held-out
evaluation alike, and ``results compare`` refuses to set different decodings side by side unless
told to (``--allow-different-decoding``).

A run's decoding is read from its stored settings: the ``decoding`` block eval runs record now, or,
for runs stored before it, the ``temperature`` and ``trials`` both kinds of eval run always stored;
a train run's is that of its held-out evaluation (``--eval-temperature``, ``--eval-trials``).
Agents that do not sample (the oracle replays the gold actions) have no decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Decoding", "run_decoding", "check_one_decoding", "NOT_SAMPLING_AGENTS"]

NOT_SAMPLING_AGENTS = ("oracle",)


@dataclass(frozen=True)
class Decoding:
    temperature: float
    """0: greedy (the most likely token each time)."""
    samples: int
    """Episodes per task (``--trials`` / ``--eval-trials``)."""

    @property
    def sampling(self) -> str:
        """What decides the scores' meaning: ``greedy`` or ``temperature T``."""
        return "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"

    def __str__(self) -> str:
        return f"{self.sampling}, {self.samples} sample{'s' if self.samples != 1 else ''} per task"

    def stored(self) -> dict[str, Any]:
        """The block a run's config keeps under ``decoding``."""
        return {"sampling": self.sampling, "temperature": self.temperature, "samples": self.samples}


def run_decoding(record: Any) -> Decoding | None:
    """The decoding of a stored run's scores: an eval run's agent, or a train run's held-out
    evaluation (``--eval-temperature``, ``--eval-trials``); None for an agent that does not sample."""
    cfg = record.config or {}
    if record.kind == "train":
        train = cfg.get("train") or {}
        return Decoding(float(train.get("eval_temperature") or 0.0), int(train.get("eval_trials") or 1))
    if record.agent in NOT_SAMPLING_AGENTS:
        return None
    block = cfg.get("decoding") if isinstance(cfg.get("decoding"), dict) else {}
    temperature = block.get("temperature", cfg.get("temperature", 0.0))
    samples = block.get("samples", cfg.get("trials", 1))
    return Decoding(float(temperature or 0.0), int(samples or 1))


def check_one_decoding(records: list[Any]) -> str | None:
    """None when the runs that sample all decode alike (greedy, or one temperature), else a message
    naming each run's decoding. The sample count may differ: pass^k already shows it, and pass^1 is
    the same quantity estimated from more or fewer samples."""
    decodings = {r.name: run_decoding(r) for r in records}
    kinds = {d.sampling for d in decodings.values() if d is not None}
    if len(kinds) <= 1:
        return None
    described = "; ".join(f"{name}: {d}" for name, d in decodings.items() if d is not None)
    return f"these runs decode differently ({described}), so their scores measure different policies"
