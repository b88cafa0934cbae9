"""Live progress of an eval run: a rich progress bar, JSON log lines, or nothing.

Counts shown while the run goes: episodes done / total, running pass rate (over graded
episodes), cost so far, agent-side and infra error counts, ETA. ``--log-format json`` prints one
JSON object per line to stderr instead (``run_start``, one ``episode`` per finished episode,
``run_end``), which cluster log collectors can parse.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from harness.redact import redact
from harness.types import EpisodeResult, ErrorClass

__all__ = ["RunProgress"]


class RunProgress:
    def __init__(self, run: str, total: int, log_format: str = "rich", quiet: bool = False):
        self.run = run
        self.total = total
        self.log_format = log_format
        self.quiet = quiet
        self.done = self.success = self.infra = self.agent_errors = 0
        self.cost = 0.0
        self.started = time.monotonic()
        self._progress: Progress | None = None
        if log_format == "rich" and not quiet:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._bar = self._progress.add_task("episodes", total=total)

    def __enter__(self) -> "RunProgress":
        if self._progress is not None:
            self._progress.start()
        self._json({"event": "run_start", "total": self.total})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._json({"event": "run_end", **self.counts()})

    @property
    def pass_rate(self) -> float:
        graded = self.done - self.infra
        return self.success / graded if graded else 0.0

    def counts(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "pass_rate": round(self.pass_rate, 4),
                "cost": round(self.cost, 6), "agent_errors": self.agent_errors, "infra_errors": self.infra,
                "elapsed_s": round(time.monotonic() - self.started, 2)}

    def update(self, result: EpisodeResult) -> None:
        self.done += 1
        self.success += int(result.score.success)
        self.infra += int(result.error_class is ErrorClass.INFRA)
        self.agent_errors += int(result.error_class is ErrorClass.AGENT)
        self.cost += result.agent_usage.cost + result.user_usage.cost
        if self._progress is not None:
            self._progress.update(self._bar, advance=1, description=(
                f"pass {self.pass_rate:.3f} | ${self.cost:.4f} | agent err {self.agent_errors} "
                f"| infra err {self.infra}"))

        self._json({"event": "episode", "task_id": result.task_id, "trial": result.trial,
                    "reward": result.score.reward, "termination": result.termination.value,
                    "error_class": result.error_class.value, "error": result.error,
                    "cost": round(result.agent_usage.cost + result.user_usage.cost, 6),
                    "wall_s": round(result.wall_seconds, 3), **{f"run_{k}": v for k, v in self.counts().items()}})

    def _json(self, payload: dict[str, Any]) -> None:
        if self.log_format == "json" and not self.quiet:
            sys.stderr.write(redact(json.dumps({"run": self.run, **payload})) + "\n")
            sys.stderr.flush()
