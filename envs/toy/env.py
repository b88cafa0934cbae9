"""``toy``: look up the secret code(s) of one or two items, then answer (see ``envs/toy/tasks.py``).

A deterministic, multi-turn tool-use env small enough for a tiny transformer trained on CPU, used to
test and demonstrate training (warm start from ``demonstration``, then GRPO). It walks the same
code paths as tau-airline, without a user simulator: the task's question is the only user turn.

Protocol:
- ``reset`` returns the system prompt, the ``lookup`` tool schema and the user's question;
- an assistant turn with tool calls gets one ``role=tool`` message per call (matched by
  ``tool_call_id``). An unknown tool, arguments that are not a JSON object, or wrong arguments
  (missing/extra keys, unknown item) answer ``Error: ...`` and count as tool errors;
- a turn without tool calls is the final answer and ends the episode (``agent_stop``); an empty
  one ends it as ``agent_error``;
- every agent turn is a step. After a tool turn, ``tool errors >= max_errors`` ends the episode
  with ``too_many_errors``, else ``steps >= max_steps`` with ``max_steps``.
Scoring (``envs/toy/grading.py``) reads only the stored messages; an episode ended by a limit keeps
its lookup credits and has no answer, so it scores partial credit and never success.

Example: ``harness eval --env toy --split test --agent oracle`` scores 1.0 on every task.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from envs.registry import register_env
from envs.toy import tasks as toy_tasks
from envs.toy.grading import grade
from harness.env_spec import EnvFactory
from harness.errors import ConfigError
from harness.options import option
from harness.types import AgentTurn, Observation, Score, Task, Termination, ToolCall, Usage

__all__ = ["ToyFactory", "ToyOptions", "ToyEnv", "SYSTEM_PROMPT", "TOOL_SCHEMAS", "demonstration", "toy_regrader"]

SYSTEM_PROMPT = "Use lookup to find each code, then answer."

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": toy_tasks.TOOL_NAME,
            "description": "Look up the secret code of an item.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "The item's name."}},
                "required": ["name"],
            },
        },
    }
]


def _lookup(task_data: dict[str, Any], name: str, arguments: str) -> tuple[str, bool]:
    """Run one tool call; returns (content, is_error)."""
    if name != toy_tasks.TOOL_NAME:
        return f"Error: unknown tool '{name}'; the only tool is {toy_tasks.TOOL_NAME}(name)", True
    try:  # ToolCall's parser: the same JSON rules (and messages) as every other env
        args = ToolCall(id="", name=name, arguments=arguments).parsed_arguments()
    except ValueError as exc:
        return f"Error: {exc}", True
    if set(args) != {"name"} or not isinstance(args["name"], str):
        return 'Error: lookup takes exactly one string argument, e.g. {"name": "apple"}', True
    item = args["name"].strip().lower()
    codes = task_data["codes"]
    if item not in codes:
        return f"Error: no item named '{args['name']}'", True
    return codes[item], False


class ToyEnv:
    """One toy episode."""

    def __init__(self, task: Task, max_steps: int, max_errors: int):
        self.task = task
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.messages: list[dict[str, Any]] = []
        self.termination: Termination | None = None
        self.steps = 0
        self.tool_errors = 0
        self.user_usage = Usage()  # no user simulator: stays zero
        self.env_seconds = 0.0

    async def reset(self) -> Observation:
        user = {"role": "user", "content": self.task.data["question"]}
        self.messages = [user]
        return Observation(messages=[user], tools=TOOL_SCHEMAS, system_prompt=SYSTEM_PROMPT)

    async def step(self, turn: AgentTurn) -> Observation:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.messages.append(turn.to_message())
        self.steps += 1
        if not turn.tool_calls:
            has_text = bool(turn.content and turn.content.strip())
            self.termination = Termination.AGENT_STOP if has_text else Termination.AGENT_ERROR
            return Observation(messages=[], done=True)
        started = time.perf_counter()
        results = []
        for call in turn.tool_calls:
            content, error = _lookup(self.task.data, call.name, call.arguments)
            self.tool_errors += int(error)
            results.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
        self.messages.extend(results)
        self.env_seconds += time.perf_counter() - started
        if self.tool_errors >= self.max_errors:
            self.termination = Termination.TOO_MANY_ERRORS
        elif self.steps >= self.max_steps:
            self.termination = Termination.MAX_STEPS
        return Observation(messages=results, done=self.done)

    def finish(self, termination: Termination) -> None:
        if self.termination is None:
            self.termination = termination

    def score(self) -> Score:
        if self.termination is None:
            raise RuntimeError("score() before the episode ended")
        return grade(self.task.data, self.messages, self.termination.value)

    @property
    def done(self) -> bool:
        return self.termination is not None


def demonstration(task: Task) -> list[dict[str, Any]]:
    """The gold conversation in OpenAI format (system, user, one ``lookup`` call per turn with its
    result, final answer), for supervised warm start. It makes the same calls as the ``oracle``
    agent; only the final answer's wording is shorter."""
    data = task.data
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": data["question"]},
    ]
    for i, action in enumerate(data["evaluation_criteria"]["actions"], start=1):
        call_id = f"call_{i}"
        arguments = json.dumps(action["arguments"])
        messages.append({
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": action["name"], "arguments": arguments}}],
        })
        content, _ = _lookup(data, action["name"], arguments)
        messages.append({"role": "tool", "tool_call_id": call_id, "name": action["name"], "content": content})
    messages.append({"role": "assistant",
                     "content": toy_tasks.answer_text(data["evaluation_criteria"]["communicate_info"])})

    return messages


@dataclass
class ToyOptions:
    data_version: str = option(toy_tasks.DATA_VERSION, flags=("--data-version",))
    """Task generator version (only the current one exists)."""
    max_steps: int = option(6, flags=("--max-steps",), minimum=1)
    """Agent turns before an episode is cut."""
    max_errors: int = option(3, flags=("--max-errors",), minimum=1)
    """Tool errors before an episode is cut."""


@register_env("toy")
class ToyFactory(EnvFactory):
    """Generates the toy tasks once and creates one ``ToyEnv`` per episode."""

    Options = ToyOptions
    default_split = "test"
    """Eval's default split (train is for training)."""

    def __init__(self, data_version: str = toy_tasks.DATA_VERSION, max_steps: int = 6, max_errors: int = 3):
        if data_version != toy_tasks.DATA_VERSION:
            raise ConfigError(f"toy data version must be {toy_tasks.DATA_VERSION}, got '{data_version}'")
        self.data_version = data_version
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.tool_schemas = TOOL_SCHEMAS
        self.system_prompt = SYSTEM_PROMPT
        self._splits: dict[str, list[dict[str, Any]]] = {}

    def _raw(self, split: str) -> list[dict[str, Any]]:
        if split not in toy_tasks.SPLITS:
            raise ConfigError(f"unknown split '{split}' of toy; valid splits: {', '.join(toy_tasks.SPLITS)}")
        if split not in self._splits:
            self._splits[split] = toy_tasks.generate_split(split)
        return self._splits[split]

    def tasks(self, split: str | None = None, task_ids: list[str] | None = None) -> list[Task]:
        split = split or self.default_split
        raw = self._raw(split)
        if task_ids:
            unknown = [t for t in task_ids if not (t.isdigit() and int(t) < len(raw) and str(int(t)) == t)]
            if unknown:
                raise ConfigError(
                    f"unknown task id(s) {', '.join(unknown)} in split '{split}' of toy "
                    f"({self.data_version}); valid ids: 0..{len(raw) - 1} ({len(raw)} tasks)"
                )
            raw = [raw[int(t)] for t in task_ids]
        return [
            Task(env=self.name, id=t["id"], split=split, instruction=t["question"], data=t, version=self.data_version)
            for t in raw
        ]

    def create(self, task: Task, seed: int) -> ToyEnv:
        return ToyEnv(task, self.max_steps, self.max_errors)

    def demonstration(self, task: Task) -> list[dict[str, Any]]:
        return demonstration(task)

    def redaction_literals(self, task: Task) -> list[str]:
        """Answer literals the SGCD summarizer must never see or write: the asked items' codes
        (what the final answer must name). Item names stay: they are in the question."""
        data = task.data
        codes = list(data["evaluation_criteria"]["communicate_info"])
        codes += [data["codes"][item] for item in data["items"] if item in data["codes"]]
        return list(dict.fromkeys(str(c) for c in codes))

    def privileged_info(self, task: Task) -> str:
        """The task's answer, for teachers that see privileged information (RLSD, OPSD): the final
        answer the grader expects. Never shown to the acting policy."""
        return toy_tasks.answer_text(task.data["evaluation_criteria"]["communicate_info"])

    def describe(self) -> dict[str, Any]:
        return {"data_version": self.data_version, "max_steps": self.max_steps, "max_errors": self.max_errors}

    @classmethod
    def regrader(cls, run: Any):
        return toy_regrader(run)


def toy_regrader(record: Any):
    """``harness.rescore`` hook: ``(task_id, messages, termination) -> Score`` for a stored toy run
    (``record`` is its ``RunRecord``; only its ``split`` is read)."""
    by_id = {t["id"]: t for t in toy_tasks.generate_split(getattr(record, "split", None) or "test")}

    def regrade(task_id: str, messages: list[dict[str, Any]], termination: str) -> Score:
        return grade(by_id[task_id], messages, termination)

    return regrade
