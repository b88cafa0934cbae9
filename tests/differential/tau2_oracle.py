"""Oracle driver: the OFFICIAL τ² airline engine behind a JSON-lines pipe.

Run with the reference venv's python (it imports ``tau2``; our package never does):

    /tmp/venvs/tau2ref/bin/python tests/differential/tau2_oracle.py

Each stdin line is one JSON request; each reply is one JSON line on stdout. Requests:

- ``{"op": "reset"}``: fresh airline environment (DB validated from a cached copy of the file).
- ``{"op": "call", "name": ..., "arguments": {...}}`` -> ``{"content", "error"}`` via
  ``Environment.get_response``, on the running environment.
- ``{"op": "hash"}`` -> ``{"hash"}``: ``get_db_hash()`` of the running environment.
- ``{"op": "records", "keys": [[table, key], ...]}`` -> ``{"records": [canonical JSON or null]}``.
- ``{"op": "dump_order"}`` -> sha256 of the *unsorted* JSON of ``model_dump()`` (checks key order).
- ``{"op": "schemas"}`` -> the official OpenAI tool schemas.
- ``{"op": "grade", "task", "calls", "final", "termination"}`` -> plays the calls as an assistant
  trajectory on a fresh env, appends ``final`` as an assistant text message, and scores it with the
  official ``evaluate_simulation`` (EvaluationType.ALL); also returns the per-gold-action matches
  (``action_checks``), the tool contents and the gold DB hash (fresh env + task actions, errors
  swallowed; cached per task).
- ``{"op": "bench", "tasks"}`` -> seconds per episode for: build env, replay the gold actions as a
  trajectory, evaluate like the official evaluator; timed here so pipe overhead is excluded.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
import warnings

from loguru import logger

logger.remove()  # the official package logs every tool call; keep the pipe quiet
# Unvalidated assignments (e.g. a string bag count) make pydantic warn on every dump.
warnings.simplefilter("ignore")

from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage  # noqa: E402
from tau2.data_model.simulation import SimulationRun, TerminationReason  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402
from tau2.domains.airline.data_model import FlightDB  # noqa: E402
from tau2.domains.airline.environment import get_environment  # noqa: E402
from tau2.domains.airline.utils import AIRLINE_DB_PATH  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402

GREETING = "Hi! How can I help you today?"
with open(AIRLINE_DB_PATH) as fh:
    RAW_DB = json.load(fh)


def fresh_env():
    # Equivalent to get_environment() (which re-reads the same file) but skips the JSON parse.
    return get_environment(db=FlightDB.model_validate(RAW_DB))


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def trajectory(env, calls, final):
    """Assistant tool calls (one per message) with their tool results, then a final text."""
    messages = [AssistantMessage(role="assistant", content=GREETING),
                UserMessage(role="user", content="I need help with my booking.")]
    contents = []
    for i, call in enumerate(calls):
        tool_call = ToolCall(id=f"call_{i}", name=call["name"], arguments=call["arguments"])
        messages.append(AssistantMessage(role="assistant", content=None, tool_calls=[tool_call]))
        reply = env.get_response(tool_call)
        messages.append(reply)
        contents.append({"content": reply.content, "error": reply.error})
    if final is not None:
        messages.append(AssistantMessage(role="assistant", content=final))
    return messages, contents


def simulation(task_id, messages, termination):
    return SimulationRun(id="oracle", task_id=task_id, start_time="", end_time="", duration=0.0,
                         termination_reason=TerminationReason(termination), messages=messages)


GOLD_HASHES: dict[str, str] = {}


def gold_hash(task: Task) -> str:
    key = task.model_dump_json()
    if key not in GOLD_HASHES:
        GOLD_HASHES[key] = _replay_gold(task)
    return GOLD_HASHES[key]


def _replay_gold(task: Task) -> str:
    env = fresh_env()
    for action in task.evaluation_criteria.actions or []:
        try:
            env.make_tool_call(tool_name=action.name, requestor=action.requestor, **action.arguments)
        except Exception:  # noqa: BLE001 - the official evaluator swallows gold-action errors
            pass
    return env.get_db_hash()


def grade(req):
    task = Task.model_validate(req["task"])
    env = fresh_env()
    messages, contents = trajectory(env, req["calls"], req.get("final"))
    info = evaluate_simulation(simulation(task.id, messages, req.get("termination", "user_stop")),
                               task, EvaluationType.ALL, solo_mode=False, domain="airline")
    return {"reward": info.reward, "db_match": info.db_check.db_match if info.db_check else None,
            "actions": [check.action_match for check in info.action_checks or []],
            "contents": contents, "gold_hash": gold_hash(task)}


def bench(req):
    tasks = [Task.model_validate(t) for t in req["tasks"]]
    rewards = []
    started = time.perf_counter()
    for task in tasks:
        env = get_environment()  # as the official runner does: loads the DB file
        calls = [{"name": a.name, "arguments": a.arguments} for a in task.evaluation_criteria.actions or []]
        final = " ".join(task.evaluation_criteria.communicate_info or []) or "Done."
        messages, _ = trajectory(env, calls, final)
        info = evaluate_simulation(simulation(task.id, messages, "user_stop"), task, EvaluationType.ALL,
                                   solo_mode=False, domain="airline")
        rewards.append(info.reward)
    return {"seconds": time.perf_counter() - started, "rewards": rewards}


def main():
    env = fresh_env()
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "reset":
                env = fresh_env()
                out = {}
            elif op == "call":
                reply = env.get_response(ToolCall(id="x", name=req["name"], arguments=req["arguments"]))
                out = {"content": reply.content, "error": reply.error}
            elif op == "hash":
                out = {"hash": env.get_db_hash()}
            elif op == "records":
                tables = {t: getattr(env.tools.db, t) for t in ("flights", "users", "reservations")}
                out = {"records": [canonical(tables[t][k].model_dump()) if k in tables[t] else None
                                   for t, k in req["keys"]]}
            elif op == "dump_order":
                text = json.dumps(env.tools.db.model_dump(), default=str)
                out = {"sha256": hashlib.sha256(text.encode()).hexdigest()}
            elif op == "schemas":
                out = {"schemas": [t.openai_schema for t in env.get_tools()]}
            elif op == "grade":
                out = grade(req)
            elif op == "bench":
                out = bench(req)
            else:
                out = {"fatal": f"unknown op {op}"}
        except Exception:  # noqa: BLE001 - report driver bugs to the test instead of dying
            out = {"fatal": traceback.format_exc()}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
