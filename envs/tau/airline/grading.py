"""The official τ²/τ³ airline reward, computed with our engine.

Mirrors the official ``evaluate_simulation`` with ``EvaluationType.ALL``:

- reward 0 unless the episode ended with ``user_stop`` or ``agent_stop``;
- reward 1 when a task has no evaluation criteria;
- ``DB``: replay every assistant tool call of the trajectory, in order, on a fresh DB; replay the
  task's gold ``actions`` on another fresh DB (their errors are ignored); the component is 1 when
  the two DBs are equal. A task whose ``actions`` and ``env_assertions`` are both absent counts
  as a match without replay;
- ``COMMUNICATE``: each ``communicate_info`` string, lower-cased, must occur in the lower-cased,
  comma-stripped text of some assistant message with non-blank text;
- ``ACTION``: each gold action must match some trajectory tool call (same name, equal arguments
  restricted to ``compare_args``, or to the call's own argument names when that is absent). Like
  the official ``action_checks``, the per-action verdicts are computed for every task with gold
  actions and stored as ``breakdown["actions"]`` (action id -> matched), whatever the basis: they
  give the partial action reward (matched / expected) that ``results show`` reports;
- the reward is the product of the components named in ``reward_basis`` (default
  ``["DB", "COMMUNICATE"]``, which τ² task files rely on). ``NL_ASSERTION`` needs an LLM judge and
  ``ENV_ASSERTION`` needs official env functions; no airline task uses them, so they raise.

Only assistant tool calls whose arguments decode to a JSON object are replayed: the environment
never ran the others. A call to a tool that does not exist replays as a no-op (tau2-bench 1.0.1;
before it, such a call could abort the replay and end the task as an infrastructure error). Gold
actions requested by the user side are skipped (the airline domain has no user tools, so
officially they fail and are ignored).
"""

from __future__ import annotations

import json
from typing import Any

from envs.tau.airline import tools
from envs.tau.airline.db import AirlineBase, AirlineState
from harness.types import Score, is_success

__all__ = ["DEFAULT_REWARD_BASIS", "UnsupportedRewardBasis", "grade", "replay_gold", "replay_trajectory",
           "communicate_checks"]

DEFAULT_REWARD_BASIS = ("DB", "COMMUNICATE")
_FINISHED = ("user_stop", "agent_stop")
_KNOWN_TOOLS = frozenset(tools.TOOL_NAMES)


class UnsupportedRewardBasis(NotImplementedError):
    """The task asks for a reward component this engine does not compute."""


def _tool_calls(messages: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(call id, tool name, arguments) of every assistant tool call that reached the env."""
    calls = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            raw = function.get("arguments")
            if isinstance(raw, dict):
                arguments = raw
            elif raw in ("", None):  # the env runs an empty argument string as {}
                arguments = {}
            else:
                try:
                    arguments = json.loads(raw)
                except (TypeError, ValueError):
                    continue
                if not isinstance(arguments, dict):
                    continue
            calls.append((call.get("id", ""), function.get("name", ""), arguments))
    return calls


def replay_trajectory(messages: list[dict[str, Any]], base: AirlineBase) -> tuple[AirlineState, list[str]]:
    """Fresh state + every executed tool call of the trajectory. Also returns the ids of calls whose
    recorded tool result differs from the replay (the official evaluator would reject those)."""
    recorded = {m.get("tool_call_id"): m.get("content") for m in messages if m.get("role") == "tool"}
    state = AirlineState(base)
    mismatched = []
    for call_id, name, arguments in _tool_calls(messages):
        if name not in _KNOWN_TOOLS:
            # Official 1.0.1 (``Environment.set_state``): a hallucinated tool name is skipped
            # without comparing its recorded reply; live, it changed nothing.
            continue
        outcome = tools.execute(state, name, arguments)
        if call_id in recorded and recorded[call_id] != outcome.content:
            mismatched.append(call_id)
    return state, mismatched


def replay_gold(task: dict[str, Any], base: AirlineBase) -> AirlineState:
    """Fresh state + the task's gold actions (errors ignored, as officially)."""
    state = AirlineState(base)
    for action in (task.get("evaluation_criteria") or {}).get("actions") or []:
        if action.get("requestor", "assistant") == "assistant":
            tools.execute(state, action["name"], dict(action.get("arguments") or {}))
    return state


def communicate_checks(info: list[str], messages: list[dict[str, Any]]) -> dict[str, bool]:
    """For each required string: was it said in some assistant text message?"""
    texts = [
        m["content"].lower().replace(",", "")
        for m in messages
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip()
    ]
    return {item: any(item.lower() in text for text in texts) for item in info}


def _action_matches(action: dict[str, Any], calls: list[tuple[str, str, dict[str, Any]]]) -> bool:
    expected = action.get("arguments") or {}
    for _, name, arguments in calls:
        if name != action["name"]:
            continue
        keys = action.get("compare_args")
        keys = arguments.keys() if keys is None else keys
        if not keys or ({k: v for k, v in arguments.items() if k in keys}
                        == {k: v for k, v in expected.items() if k in keys}):
            return True
    return False


def _premature(termination: str) -> str:
    return f"Simulation terminated prematurely. Termination reason: {termination}"


def grade(task: dict[str, Any], messages: list[dict[str, Any]], termination: str, base: AirlineBase) -> Score:
    """Score one finished episode exactly as the official evaluator would."""
    termination = str(getattr(termination, "value", termination))
    finished = termination in _FINISHED
    criteria = task.get("evaluation_criteria")
    if criteria is None:
        reward = 1.0 if finished else 0.0
        note = "No evaluation criteria" if finished else _premature(termination)
        return Score(reward, finished, {"db_match": None, "communicate": {}, "reward_basis": None, "note": note})
    basis = list(criteria.get("reward_basis") or DEFAULT_REWARD_BASIS)
    unsupported = sorted(set(basis) & {"NL_ASSERTION", "ENV_ASSERTION"})
    if unsupported:
        raise UnsupportedRewardBasis(
            f"task {task.get('id')}: reward basis {unsupported} is not supported by the airline "
            f"engine (NL_ASSERTION needs an LLM judge; no airline task uses it)")

    notes = []
    if criteria.get("actions") is None and criteria.get("env_assertions") is None:
        db_match = True
    else:
        predicted, mismatched = replay_trajectory(messages, base)
        db_match = predicted.digest() == replay_gold(task, base).digest()
        if mismatched:
            notes.append(f"replayed tool results differ from the recorded ones for calls {mismatched}")
    communicate = communicate_checks(criteria.get("communicate_info") or [], messages)

    reward = 1.0
    if "DB" in basis:
        reward *= float(db_match)
    if "COMMUNICATE" in basis:
        reward *= float(all(communicate.values()))
    breakdown: dict[str, Any] = {"db_match": db_match, "communicate": communicate, "reward_basis": basis}
    calls = _tool_calls(messages)
    actions = {a.get("action_id") or f"{i}:{a['name']}": _action_matches(a, calls)
               for i, a in enumerate(criteria.get("actions") or [])}
    breakdown["actions"] = actions
    if "ACTION" in basis:
        reward *= float(all(actions.values()))
    if not finished:
        # The diagnostics above are still reported, but the reward is 0 as officially.
        reward = 0.0
        notes.insert(0, _premature(termination))
    breakdown["note"] = "; ".join(notes) or None
    return Score(reward=reward, success=is_success(reward), breakdown=breakdown)
