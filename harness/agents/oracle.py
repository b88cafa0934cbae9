"""The ``oracle`` agent: replays the task's gold actions, then reports and ends.

It proves the env, grader and runner agree: with a scripted user it must score 1.0 on every task.
Each gold action is issued as its own tool-call turn (the τ² protocol allows one message or one
tool call per turn). After the last action it sends one message that contains every string the
task expects to be communicated, so the COMMUNICATE check can pass too.
"""

from __future__ import annotations

import json
from typing import Any

from harness.agents.base import AgentSpec, register_agent
from harness.types import AgentTurn, Task, ToolCall


class OracleAgent:
    def __init__(self, task: Task):
        criteria = task.data.get("evaluation_criteria") or {}
        self.actions = list(criteria.get("actions") or [])
        self.communicate = [str(s) for s in criteria.get("communicate_info") or []]
        self.position = 0
        self.reported = False

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> AgentTurn:
        if self.position < len(self.actions):
            action = self.actions[self.position]
            self.position += 1
            call = ToolCall(
                id=f"oracle_{self.position}",
                name=action["name"],
                arguments=json.dumps(action.get("arguments") or {}),
            )
            return AgentTurn(tool_calls=[call])
        if not self.reported:
            self.reported = True
            text = "All done with your request."
            if self.communicate:
                text += " For your information: " + "; ".join(self.communicate) + "."
            return AgentTurn(content=text)
        # The user did not stop after the report: keep the conversation polite and short.
        return AgentTurn(content="Is there anything else I can help you with?")


@register_agent("oracle")
def oracle_agent_spec(**_: Any) -> AgentSpec:
    return AgentSpec(name="oracle", build=lambda task, seed: OracleAgent(task))
