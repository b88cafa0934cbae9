"""Deterministic, concurrency-safe responders for the fake OpenAI server that play whole
τ-airline conversations from the *content* of each request (no FIFO queues), so hundreds of
interleaved episodes can share one server.

``TauPolicy`` plays both sides:

- **user model**: finds the task from the scenario in its system prompt (every instruction field
  of the task, whitespace-normalised, must appear there), opens with ``[case <id>] <reason for
  call>``, and answers ``###STOP###`` once the agent's final message (it carries ``FINAL_MARK``)
  is in the conversation;
- **agent model**: finds the task from the ``[case <id>]`` tag of the user's opening line, counts
  the tool results so far and returns the next gold action as a tool call (with a deterministic
  call id), then one final text with every ``communicate_info`` string (like the oracle agent).

``sabotage(task_id, seed) -> bool`` picks episodes where the agent, instead of its final message,
sends one message of ``SABOTAGE_CALLS`` look-ups of a reservation that does not exist: ten tool
errors end the episode as ``too_many_errors`` (reward 0) under the default ``--max-errors``, a
task failure for the official runner too (an empty message would be replayed and end as an
infrastructure error). So per-episode rewards are a mix of 1 and 0 that a test can predict with
``expected_reward``. The per-trial seed comes from the request's ``seed``.

``FaultInjector`` wraps a responder and injects HTTP 429 / 500, over-long delays (client timeouts)
and malformed bodies, decided deterministically from the request body and a per-body attempt
counter, at most ``max_per_kind`` times per kind and ``max_per_body`` times in all per identical
body, so a client that retries at least ``max_per_body`` times always gets through.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

STOP = "###STOP###"
SABOTAGE_CALLS = 10
"""Failing tool calls in a sabotaged final message: the default --max-errors."""
FINAL_MARK = "All done with your request."
CASE_TAG = re.compile(r"\[case ([^\]\s]+)\]")
_INSTRUCTION_FIELDS = ("reason_for_call", "known_info", "unknown_info", "task_instructions")

Responder = Callable[[dict[str, Any]], dict[str, Any]]


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def load_airline_tasks(data_version: str = "tau3", data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    root = Path(data_dir or os.environ["HARNESS_DATA_DIR"])
    path = root / data_version / "data" / "tau2" / "domains" / "airline" / "tasks.json"
    return json.loads(path.read_text())


def default_sabotage(task_id: str, seed: int | None) -> bool:
    """About one episode in five fails on purpose (deterministic in task id and trial seed)."""
    return zlib.crc32(f"{task_id}:{seed}".encode()) % 5 == 0


def never(task_id: str, seed: int | None) -> bool:
    return False


class TauPolicy:
    def __init__(
        self,
        agent_model: str = "fake-agent",
        user_model: str = "fake-user",
        data_version: str = "tau3",
        data_dir: str | os.PathLike | None = None,
        sabotage: Callable[[str, int | None], bool] = default_sabotage,
    ):
        self.agent_model = agent_model
        self.user_model = user_model
        self.sabotage = sabotage
        self.tasks = {str(t["id"]): t for t in load_airline_tasks(data_version, data_dir)}
        # Every non-empty scenario field, normalised; a task matches a prompt containing all of them.
        self._fingerprints: dict[str, list[str]] = {}
        for tid, task in self.tasks.items():
            scenario = task.get("user_scenario") or {}
            instr = scenario.get("instructions")
            parts = [scenario.get("persona")]
            if isinstance(instr, dict):
                parts += [instr.get(k) for k in _INSTRUCTION_FIELDS]
            else:
                parts.append(instr)
            self._fingerprints[tid] = [_norm(p) for p in parts if p]
        self._by_prompt: dict[str, str] = {}
        self._lock = threading.Lock()
        self.calls: Counter = Counter()
        """Replies given, per model."""
        self.openings: Counter = Counter()
        """Opening lines said, per task id (= episodes started past the user's first turn)."""

    # -- task identification ---------------------------------------------------------------------
    def task_for_user_prompt(self, system_prompt: str) -> str:
        with self._lock:
            cached = self._by_prompt.get(system_prompt)
        if cached is not None:
            return cached
        text = _norm(system_prompt)
        matches = [tid for tid, parts in self._fingerprints.items() if parts and all(p in text for p in parts)]
        if not matches:
            raise LookupError("no τ task's scenario found in the user system prompt")
        # One task's fields can be a subset of another's: the most specific match wins.
        best = max(matches, key=lambda tid: sum(len(p) for p in self._fingerprints[tid]))
        with self._lock:
            self._by_prompt[system_prompt] = best
        return best

    @staticmethod
    def task_for_agent_messages(messages: list[dict[str, Any]]) -> str:
        for m in messages:
            if m.get("role") == "user":
                found = CASE_TAG.search(str(m.get("content") or ""))
                if found:
                    return found.group(1)
                break
        raise LookupError("the user's opening line carries no [case <id>] tag")

    # -- what the policy will do ------------------------------------------------------------------
    def actions(self, task_id: str) -> list[dict[str, Any]]:
        return list((self.tasks[task_id].get("evaluation_criteria") or {}).get("actions") or [])

    def final_text(self, task_id: str) -> str:
        info = [str(s) for s in (self.tasks[task_id].get("evaluation_criteria") or {}).get("communicate_info") or []]
        text = FINAL_MARK
        if info:
            text += " For your information: " + "; ".join(info) + "."
        return text

    def opening_line(self, task_id: str) -> str:
        instr = (self.tasks[task_id].get("user_scenario") or {}).get("instructions")
        reason = instr.get("reason_for_call") if isinstance(instr, dict) else instr
        return f"[case {task_id}] " + _norm(reason or "Hello, I need help.")

    def expected_reward(self, task_id: str, seed: int | None) -> float:
        return 0.0 if self.sabotage(str(task_id), seed) else 1.0

    # -- the responder -------------------------------------------------------------------------
    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        try:
            if model == self.user_model:
                reply = self._user(body)
            elif model == self.agent_model:
                reply = self._agent(body)
            else:
                return {"status": 400, "message": f"tau policy: unknown model {model!r}"}
        except LookupError as exc:
            return {"status": 400, "message": f"tau policy: {exc}"}
        with self._lock:
            self.calls[model] += 1
        return reply

    def _user(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        tid = self.task_for_user_prompt(system)
        # The user model plays 'assistant'; the agent's texts come in as 'user' turns.
        if not any(m.get("role") == "assistant" for m in messages):
            with self._lock:
                self.openings[tid] += 1
            return {"content": self.opening_line(tid)}
        if any(m.get("role") == "user" and FINAL_MARK in str(m.get("content") or "") for m in messages):
            return {"content": STOP}
        return {"content": "Please go on."}

    def _agent(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        tid = self.task_for_agent_messages(messages)
        actions = self.actions(tid)
        done = sum(1 for m in messages if m.get("role") == "tool")
        if done < len(actions):
            action = actions[done]
            return {"tool_calls": [{"id": f"call_{tid}_{done}", "name": action["name"],
                                    "arguments": action.get("arguments") or {}}]}
        if any(m.get("role") == "assistant" and FINAL_MARK in str(m.get("content") or "") for m in messages):
            return {"content": "Is there anything else I can help you with?"}
        if self.sabotage(tid, body.get("seed")):
            return {"tool_calls": [{"id": f"call_{tid}_x{i}", "name": "get_reservation_details",
                                    "arguments": {"reservation_id": "NOSUCH"}} for i in range(SABOTAGE_CALLS)]}
        return {"content": self.final_text(tid)}


class Delayed:
    """Adds ``delay`` seconds to every reply of ``inner`` (slow provider)."""

    def __init__(self, inner: Responder, delay: float):
        self.inner, self.delay = inner, delay

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**self.inner(body), "delay": self.delay}


class Switchable:
    """Answers every request with ``outage`` (default HTTP 500) while ``down`` is true."""

    def __init__(self, inner: Responder, down: bool = False, outage: dict[str, Any] | None = None):
        self.inner, self.down = inner, down
        self.outage = outage or {"status": 500, "message": "fake provider outage"}
        self.failed = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            with self._lock:
                self.failed += 1
            return dict(self.outage)
        return self.inner(body)


def body_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class FaultInjector:
    """Deterministic provider faults around ``inner``.

    For the n-th arrival of an identical request body, a number u in [0, 1) is drawn from
    sha256(seed, body, n); u falls into [0, p429) -> HTTP 429, then p500 -> HTTP 500, then
    p_timeout -> the real reply after ``timeout_delay`` seconds (longer than the client timeout),
    then p_malformed -> a 200 with a body that is not JSON; else the request goes through. A kind
    already injected ``max_per_kind`` times for this body, or a body that already got
    ``max_per_body`` faults, goes through.
    """

    KINDS = ("429", "500", "timeout", "malformed")

    def __init__(
        self,
        inner: Responder,
        seed: int = 0,
        p429: float = 0.0,
        p500: float = 0.0,
        p_timeout: float = 0.0,
        p_malformed: float = 0.0,
        timeout_delay: float = 2.0,
        max_per_kind: int = 1,
        max_per_body: int = 2,
    ):
        if p429 + p500 + p_timeout + p_malformed > 1.0:
            raise ValueError("fault probabilities add up to more than 1")
        self.inner = inner
        self.seed = seed
        self.thresholds = list(zip(self.KINDS, (p429, p500, p_timeout, p_malformed)))
        self.timeout_delay = timeout_delay
        self.max_per_kind = max_per_kind
        self.max_per_body = max_per_body
        self.injected: Counter = Counter()
        self.attempts: Counter = Counter()
        self._per_body: dict[str, Counter] = defaultdict(Counter)
        self._lock = threading.Lock()

    def decide(self, key: str, attempt: int) -> str | None:
        digest = hashlib.sha256(f"{self.seed}:{key}:{attempt}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for kind, p in self.thresholds:
            edge += p
            if u < edge:
                return kind
        return None

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        key = body_key(body)
        with self._lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
            kind = self.decide(key, attempt)
            seen = self._per_body[key]
            if kind is not None and (seen[kind] >= self.max_per_kind or sum(seen.values()) >= self.max_per_body):
                kind = None
            if kind is not None:
                seen[kind] += 1
                self.injected[kind] += 1
        if kind == "429":
            return {"status": 429, "message": "fake rate limit"}
        if kind == "500":
            return {"status": 500, "message": "fake internal error"}
        if kind == "malformed":
            return {"raw": "{not json"}
        reply = self.inner(body)
        if kind == "timeout":
            return {**reply, "delay": self.timeout_delay}
        return reply

    @property
    def distinct_bodies(self) -> set[str]:
        with self._lock:
            return set(self.attempts)
