"""Re-grade an exported results file with the OFFICIAL τ² package.

Run with the reference venv's python (it imports ``tau2``; our package never does):

    .venv-tau2/bin/python tests/differential/tau2_regrade.py results.json

Loads the file with the official loader (``Results.load``: a file it rejects fails here), re-grades
every simulation with ``evaluate_simulation(..., EvaluationType.ALL, ...)`` exactly as
``tau2 evaluate-trajs`` does, computes the official metrics on the re-graded results, and prints
one JSON document on stdout:

    {"simulations": [{"id", "task_id", "trial", "stored_reward", "reward"}, ...],
     "metrics": {"avg_reward", "pass_hat_ks"}, "num_tasks": N}
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from loguru import logger

logger.remove()  # the official package logs every tool call
warnings.simplefilter("ignore")

from tau2.data_model.simulation import Results  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402
from tau2.metrics.agent_metrics import compute_metrics  # noqa: E402


def main(path: str) -> None:
    results = Results.load(Path(path))
    solo = (results.info.agent_info.implementation == "llm_agent_solo"
            and results.info.user_info.implementation == "dummy_user")
    domain = results.info.environment_info.domain_name
    tasks = {task.id: task for task in results.tasks}
    rows = []
    for sim in results.simulations:
        stored = sim.reward_info.reward if sim.reward_info is not None else None
        info = evaluate_simulation(simulation=sim, task=tasks[sim.task_id], evaluation_type=EvaluationType.ALL,
                                   solo_mode=solo, domain=domain)
        sim.reward_info = info
        rows.append({"id": sim.id, "task_id": sim.task_id, "trial": sim.trial, "stored_reward": stored,
                     "reward": info.reward})
    metrics = compute_metrics(results)
    json.dump({"simulations": rows, "num_tasks": len(results.tasks),
               "metrics": {"avg_reward": float(metrics.avg_reward),
                           "pass_hat_ks": {str(k): float(v) for k, v in metrics.pass_hat_ks.items()}}},
              sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tau2_regrade.py RESULTS_JSON")
    main(sys.argv[1])
