"""``tau-airline``: the τ²/τ³ airline domain, played with the official half-duplex protocol.

Protocol (mirrors the official τ² orchestrator, so step and error limits hit at the same points):
- the agent's fixed greeting "Hi! How can I help you today?" opens the conversation, then the user
  simulator speaks;
- every routed message is one step: a user reply, an agent message, and the environment's answer
  to one agent message (all of its tool calls together);
- an agent message with tool calls goes to the environment (text alongside tool calls is kept in
  the trajectory but not shown to the user); a text-only message goes to the user; an empty
  message (no tool calls, no text or only whitespace) voids the attempt, and the runner plays the
  episode again from the start up to ``--max-retries`` times, then stores it as an infrastructure
  error, as the official 1.x runner does (``empty_reply=retry``, the default); with
  ``empty_reply=agent-error`` it ends the episode as ``agent_error``, reward 0;
- after each step that does not hand over to the environment: ``steps >= max_steps`` ends with
  ``max_steps`` and ``tool errors >= max_errors`` with ``too_many_errors`` — checked even when the
  user just stopped, as the official loop does;
- the user ends the episode with ``###STOP###``, ``###TRANSFER###`` or ``###OUT-OF-SCOPE###``.

Deliberate addition: a tool call whose arguments are not a JSON object (the official agent would
crash on it) comes back to the agent as an ``Error: ...`` tool message and counts as a tool error.

Scoring replays the stored trajectory on a fresh DB (``grading.grade``), exactly as the official
evaluator does, so a stored episode can be re-graded without its live env.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from envs.registry import register_env
from envs.tau import agent_prompt as tau_prompt
from envs.tau import data as tau_data
from envs.tau import standard
from envs.tau.airline import grading, tools
from envs.tau.airline.db import AirlineState, load_base
from envs.tau.standard import check_grader, default_grader
from envs.tau.user_sim import UserSpec, is_stop, make_user_spec
from harness.env_spec import EnvFactory, Regrade, Transport
from harness.errors import ConfigError, DataMissingError, ReplayEpisode
from harness.options import option
from harness.types import AgentTurn, Observation, Score, Task, Termination, Usage

__all__ = ["TauAirlineFactory", "TauOptions", "TauAirlineEnv", "GREETING", "agent_system_prompt"]

GREETING = "Hi! How can I help you today?"
EMPTY_REPLY = ("retry", "agent-error")
"""What an empty agent message does (``TauOptions.empty_reply``)."""


def agent_system_prompt(policy: str, instruction: str = tau_prompt.OUR_INSTRUCTION) -> str:
    """The agent's system prompt around ``policy`` (``envs.tau.agent_prompt``; default: our wording)."""
    return tau_prompt.system_prompt(policy, instruction)


class TauAirlineEnv:
    def __init__(
        self, factory: "TauAirlineFactory", task: Task, user: Any, max_steps: int, max_errors: int
    ):
        self.factory = factory
        self.task = task
        self.user = user
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.state = AirlineState(factory.base)
        self.messages: list[dict[str, Any]] = []
        self.termination: Termination | None = None
        self.steps = 0
        self.tool_errors = 0
        self.user_usage = Usage()
        self.env_seconds = 0.0

    # -- protocol ---------------------------------------------------------------------------
    async def reset(self) -> Observation:
        greeting = {"role": "assistant", "content": GREETING}
        self.messages = [greeting]
        user_msg = await self._user_turn()
        self._check_limits()
        return Observation(
            messages=[greeting, user_msg],
            done=self.done,
            tools=self.factory.tool_schemas,
            system_prompt=self.factory.system_prompt,
        )

    async def step(self, turn: AgentTurn) -> Observation:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        msg = turn.to_message()
        self.messages.append(msg)
        self.steps += 1
        has_text = bool(turn.content and turn.content.strip())
        if not turn.tool_calls and not has_text:
            if self.factory.empty_reply == "retry":
                # The official message check raises here, and its runner re-runs the simulation.
                raise ReplayEpisode("the agent sent an empty message (no text, no tool calls)",
                                    retries=self.factory.empty_reply_retries)
            self.termination = Termination.AGENT_ERROR
            return Observation(messages=[], done=True)
        if turn.tool_calls:
            results = self._run_tools(turn)
            self.messages.extend(results)
            self.steps += 1
            self._check_limits()
            return Observation(messages=results, done=self.done)
        self._check_limits()
        if self.done:
            return Observation(messages=[], done=True)
        user_msg = await self._user_turn()
        self._check_limits()
        return Observation(messages=[user_msg], done=self.done)

    def finish(self, termination: Termination) -> None:
        if self.termination is None:
            self.termination = termination

    def score(self) -> Score:
        if self.termination is None:
            raise RuntimeError("score() before the episode ended")
        started = time.perf_counter()
        result = grading.grade(self.task.data, self.messages, self.termination.value, self.factory.base)
        self.env_seconds += time.perf_counter() - started
        return result

    @property
    def done(self) -> bool:
        return self.termination is not None

    # -- internals --------------------------------------------------------------------------
    async def _user_turn(self) -> dict[str, Any]:
        visible = [m for m in self.messages if m["role"] in ("user", "assistant") and not m.get("tool_calls")]
        reply = await self.user.reply(visible)
        self.user_usage.add(reply.usage)
        self.steps += 1
        if not reply.content.strip():
            # The official user simulator rejects empty messages; it is the simulator's failure.
            self.termination = Termination.USER_ERROR
        elif is_stop(reply.content):
            self.termination = Termination.USER_STOP
        msg = {"role": "user", "content": reply.content}
        self.messages.append(msg)
        return msg

    def _run_tools(self, turn: AgentTurn) -> list[dict[str, Any]]:
        started = time.perf_counter()
        out = []
        for call in turn.tool_calls:
            try:
                args = call.parsed_arguments()
            except ValueError as exc:
                content, error = f"Error: {exc}", True
            else:
                outcome = tools.execute(self.state, call.name, args)
                content, error = outcome.content, outcome.error
            self.tool_errors += int(error)
            out.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
        self.env_seconds += time.perf_counter() - started
        return out

    def _check_limits(self) -> None:
        # Same order and comparisons as the official loop; may overwrite a user stop.
        if self.steps >= self.max_steps:
            self.termination = Termination.MAX_STEPS
        if self.tool_errors >= self.max_errors:
            self.termination = Termination.TOO_MANY_ERRORS


@dataclass
class TauOptions:
    data_version: str = option("tau3", flags=("--data-version",))
    """Task set: tau3 (default, the τ³ fixes) or tau2 (v0.2.0 tasks)."""
    user: str = option("litellm", flags=("--user",))
    """User simulator: litellm (an LLM, --user-model) or scripted (replays the scenario; oracle checks)."""
    user_model: str | None = option(None, flags=("--user-model",))
    """User simulator model (litellm string)."""
    user_guidelines: str = option("ours", flags=("--user-guidelines",))
    """ours | official (the pulled guidelines file)."""
    user_api_base: str | None = option(None, flags=("--user-api-base",))
    """Endpoint of the user model (default: the agent's --api-base)."""
    user_temperature: float = option(0.0, flags=("--user-temperature",), minimum=0)
    """User simulator temperature."""
    max_steps: int = option(200, flags=("--max-steps",), minimum=1)
    """Routed messages before an episode is cut (tau2: 200)."""
    max_errors: int = option(10, flags=("--max-errors",), minimum=1)
    """Tool errors before an episode is cut (tau2: 10)."""
    agent_prompt: str = option("ours", flags=("--agent-prompt",))
    """The agent's instructions around the policy: ours | official (tau2's LLMAgent wording, read from the
    pinned official release; `harness data pull tau-airline` caches it)."""
    grader: str | None = option(None, flags=("--grader",))
    """The official grading reproduced, stamped on the run: tau-1.0.1 (--data-version tau3) or tau-0.2.0 (tau2);
    default: the data version's. τ-bench 2.x is not reproduced."""
    empty_reply: str = option("retry", before="agent-error", train="agent-error")
    """An empty agent message: retry (as the official runner: play the episode again, up to
    --max-retries times, then store it as an infrastructure error) | agent-error (end it, reward 0;
    what runs stored before this setting did, and harness train's default: a training reward must
    punish an empty reply, which a replay with the same seed would only repeat)."""

    def __post_init__(self) -> None:
        if self.grader is None:  # stored resolved, so the run records which grader scored it
            self.grader = default_grader(self.data_version)


@register_env("tau-airline")
class TauAirlineFactory(EnvFactory):
    """Loads the airline data once and creates one ``TauAirlineEnv`` per episode."""

    Options = TauOptions
    default_split = "base"
    export_formats = ("tau2",)

    def __init__(
        self,
        data_version: str = "tau3",
        user: UserSpec | None = None,
        max_steps: int = 200,
        max_errors: int = 10,
        grader: str | None = None,
        empty_reply: str = "retry",
        empty_reply_retries: int = 3,
        agent_prompt: str = "ours",
    ):
        if data_version not in ("tau3", "tau2"):
            raise ConfigError(f"--data-version must be tau3 or tau2, got '{data_version}'")
        self.grader = grader or default_grader(data_version)
        check_grader(self.grader, data_version)
        if empty_reply not in EMPTY_REPLY:
            raise ConfigError(f"empty_reply must be {' or '.join(EMPTY_REPLY)}, got '{empty_reply}'")
        self.data_version = data_version
        self.user = user or UserSpec(name="scripted", guidelines_source="none")
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.empty_reply = empty_reply
        self.empty_reply_retries = empty_reply_retries  # the official default: 3 (its --max-retries)
        self.paths = tau_data.airline_paths(data_version)  # raises DataMissingError with the fix
        self.agent_prompt = agent_prompt
        self.agent_instruction = tau_prompt.instruction(agent_prompt)  # before any episode: one line if missing
        self.base = load_base(self.paths.db)

    @cached_property
    def system_prompt(self) -> str:
        return agent_system_prompt(self.paths.policy.read_text(), self.agent_instruction)

    @cached_property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return tools.tool_schemas()

    def tasks(self, split: str = "base", task_ids: list[str] | None = None) -> list[Task]:
        raw = tau_data.load_airline_tasks(self.data_version, split)
        by_id = {str(t["id"]): t for t in raw}
        if task_ids:
            unknown = [t for t in task_ids if t not in by_id]
            if unknown:
                known = sorted(by_id, key=lambda s: (len(s), s))
                raise ConfigError(
                    f"unknown task id(s) {', '.join(unknown)} in split '{split}' of tau-airline "
                    f"({self.data_version}); valid ids: {known[0]}..{known[-1]} ({len(known)} tasks)"
                )
            raw = [by_id[t] for t in task_ids]
        return [
            Task(env=self.name, id=str(t["id"]), split=split, instruction="", data=t, version=self.data_version)
            for t in raw
        ]

    def create(self, task: Task, seed: int) -> TauAirlineEnv:
        return TauAirlineEnv(self, task, self.user.create(task.data, seed), self.max_steps, self.max_errors)

    def privileged_info(self, task: Task) -> str:
        """The gold action sequence (and the outputs the agent must say), for teachers that see
        privileged information (RLSD, OPSD). Never shown to the acting policy."""
        import json

        criteria = task.data.get("evaluation_criteria") or {}
        lines = ["Gold actions, in order:"]
        for i, action in enumerate(criteria.get("actions") or [], start=1):
            lines.append(f"{i}. {action.get('name')}({json.dumps(action.get('arguments') or {}, sort_keys=True)})")
        if len(lines) == 1:
            lines.append("(none: the correct behaviour changes nothing in the database)")
        outputs = criteria.get("communicate_info") or []
        if outputs:
            lines.append("Say to the user: " + "; ".join(str(x) for x in outputs))
        return "\n".join(lines)

    def redaction_literals(self, task: Task) -> list[str]:
        """Literals the SGCD summarizer must never see or write: every value in the gold actions'
        arguments (reservation / user / payment ids, flight numbers, dates, names, dates of birth,
        airport codes, amounts >= 10 also spelled "1,628"), the outputs the agent must communicate,
        the action ids, and the user / reservation ids in the user scenario. Skipped as generic:
        enum values of the tool schemas (cabin, flight type, yes/no), booleans, small integers
        (bag counts) and free text (``summary``); the shared redactor also drops anything under 3
        characters."""
        import json
        import re

        def enums(node: Any) -> list[Any]:
            if isinstance(node, dict):
                return list(node.get("enum") or []) + [v for x in node.values() for v in enums(x)]
            return [v for x in node for v in enums(x)] if isinstance(node, list) else []

        def spellings(text: str) -> list[str]:
            try:
                number = float(text.replace(",", ""))
            except ValueError:
                return [text]
            if not number.is_integer():
                return [text]
            return [] if abs(number) < 10 else [str(int(number)), f"{int(number):,}"]

        generic = {str(v).lower() for v in enums(self.tool_schemas)}
        found: list[str] = []

        def add(value: Any, key: str | None = None) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    add(v, k)
            elif isinstance(value, list):
                for v in value:
                    add(v, key)
            elif not (isinstance(value, bool) or value is None or key == "summary"):
                text = str(value).strip()
                if text.lower() not in generic:
                    found.extend(spellings(text))

        criteria = task.data.get("evaluation_criteria") or {}
        for action in criteria.get("actions") or []:
            add(action.get("arguments") or {})
            if action.get("action_id"):
                found.append(str(action["action_id"]))
        add(criteria.get("communicate_info") or [])
        # Ids the user simulator hands out (user ids, 6-character reservation codes) from the scenario.
        scenario = json.dumps(task.data.get("user_scenario") or {})
        found += re.findall(r"\b[a-z]+(?:_[a-z]+)+_\d{3,}\b", scenario)
        found += re.findall(r"\b(?=[A-Z0-9]*\d)(?=[A-Z0-9]*[A-Z])[A-Z0-9]{6}\b", scenario)
        return [x for x in dict.fromkeys(found) if x]

    def describe(self) -> dict[str, Any]:
        return {
            "data_version": self.data_version,
            "max_steps": self.max_steps,
            "max_errors": self.max_errors,
            "user": self.user.settings(),
        }

    @classmethod
    def from_options(cls, options: TauOptions, transport: Transport) -> "TauAirlineFactory":
        if options.data_version not in tau_data.VERSIONS:
            raise ConfigError(f"--data-version must be tau3 or tau2, got '{options.data_version}'")
        check_grader(options.grader, options.data_version)  # before any data or key check
        tau_prompt.check_kind(options.agent_prompt)
        paths = tau_data.airline_paths(options.data_version)
        user = make_user_spec(
            options.user, model=options.user_model, guidelines=options.user_guidelines,
            official_guidelines_path=paths.user_guidelines, api_base=options.user_api_base or transport.api_base,
            temperature=options.user_temperature, timeout=transport.timeout, max_retries=transport.max_retries,
            backoff_base=transport.retry_backoff, client=transport.llm_client,
        )
        # One --max-retries bounds both the LLM request retries and the episode replays, as the
        # official runner's --max-retries does.
        return cls(data_version=options.data_version, user=user, max_steps=options.max_steps,
                   max_errors=options.max_errors, grader=options.grader, empty_reply=options.empty_reply,
                   empty_reply_retries=transport.max_retries, agent_prompt=options.agent_prompt)

    @classmethod
    def regrader(cls, run: Any) -> Regrade:
        """Replays stored messages on a fresh DB, as the official evaluator does."""
        version = run.data_version or tau_data.DEFAULT_VERSION
        base = load_base(tau_data.airline_paths(version).db)
        tasks = {str(t["id"]): t for t in tau_data.load_airline_tasks(version, "base")}

        def regrade(task_id: str, messages: list[dict[str, Any]], termination: str) -> Score:
            if task_id not in tasks:
                raise ConfigError(f"run {run.name!r}: task {task_id!r} is not in τ data {version!r}")
            return grading.grade(tasks[task_id], messages, termination, base)

        return regrade

    @classmethod
    def run_metrics(cls, store: Any, run: Any) -> dict[str, Any]:
        """Every official termination reason, the DB match rate and the partial action reward
        (``envs.tau.metrics``)."""
        from envs.tau.metrics import tau_run_rows
        from harness.store.records import episode_breakdowns

        return tau_run_rows(episode_breakdowns(store, run.name), store.episodes_df(run.name)["termination"])

    @classmethod
    def task_metrics(cls, store: Any, run: Any) -> Any:
        """Per task: success, DB match, partial action reward, gold actions (``envs.tau.metrics``)."""
        from envs.tau.metrics import tau_task_rows
        from harness.store.records import episode_breakdowns

        return tau_task_rows(episode_breakdowns(store, run.name))

    @classmethod
    def export(cls, fmt: str, store: Any, run: Any, out: Path, **options: Any) -> Path:
        """``tau2``: the official τ²-bench results file (``envs.tau.export``)."""
        if fmt != "tau2":
            return super().export(fmt, store, run, out, **options)
        from envs.tau.export import export_tau2

        return export_tau2(store, run, out, data_version=options.get("data_version"))

    @classmethod
    def grader_version(cls, run: Any) -> str | None:
        return standard.run_grader(run)

    @classmethod
    def nonstandard_reasons(cls, run: Any) -> list[str] | None:
        return standard.nonstandard_reasons(run)

    @classmethod
    def submission(cls, store: Any, runs: list[Any], out: Path, identity: dict[str, Any]) -> list[Path]:
        """The τ-bench leaderboard package (``envs.tau.submission``)."""
        from envs.tau.submission import write_submission

        return write_submission(store, runs, out, identity)

    @classmethod
    def pull_data(cls, version: str | None, from_dir: str | None, force: bool,
                  progress: Callable[[str, str], None]) -> Path:
        target = tau_data.pull(version or tau_data.DEFAULT_VERSION, from_dir=from_dir, force=force, progress=progress)
        try:  # the data is usable without it (--agent-prompt ours): a missing source is a warning here
            tau_prompt.pull(force=force, progress=progress, download=from_dir is None)
        except DataMissingError as exc:
            progress(f"{tau_prompt.OFFICIAL_MEMBER} ({exc}; only --agent-prompt official needs it)", "missing")
        return target
