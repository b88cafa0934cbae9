"""The system prompts the OFFICIAL τ² agent and user simulator build, as JSON on stdout.

Run with the reference venv's python (it imports ``tau2``; our package never does):

    .venv-tau2/bin/python tests/differential/tau2_prompts.py POLICY GUIDELINES TASKS

``POLICY``, ``GUIDELINES`` and ``TASKS`` are the pinned files of one data version (policy.md,
simulation_guidelines.md, tasks.json). The official classes read the guidelines from their own
package data (the τ² release's file), so the module's path to it is pointed at ``GUIDELINES``: the
prompt is then what the official code builds around the pinned τ³ (or τ²) text.

Output: ``{"agent": LLMAgent(...).system_prompt, "users": {task id: UserSimulator(...).system_prompt}}``,
each built as ``tau2 run`` builds them (the agent from the domain policy; the user, without tools as
airline users have none, from ``str(task.user_scenario)``).
"""

from __future__ import annotations

import json
import sys
import warnings

from loguru import logger

logger.remove()
warnings.simplefilter("ignore")

import tau2.user.user_simulator as official_user  # noqa: E402
from tau2.agent.llm_agent import LLMAgent  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402


def main(policy_path: str, guidelines_path: str, tasks_path: str) -> None:
    official_user.GLOBAL_USER_SIM_GUIDELINES_PATH = guidelines_path
    with open(policy_path) as fh:  # as the official airline environment reads it
        policy = fh.read()
    agent = LLMAgent(tools=[], domain_policy=policy, llm="unused")
    with open(tasks_path) as fh:
        tasks = [Task.model_validate(t) for t in json.load(fh)]
    users = {str(task.id): official_user.UserSimulator(tools=None, instructions=str(task.user_scenario),
                                                       llm="unused").system_prompt
             for task in tasks}
    json.dump({"agent": agent.system_prompt, "users": users}, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:4])
