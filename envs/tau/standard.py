"""The official τ-bench setup of a tau-airline run: which grader version scored it, and how its
setup differs from the one the leaderboard calls standard.

Grader versions (``--grader``): each data version is graded as the tau2-bench release it was
pinned from (``envs.tau.data``) grades it:

- ``tau3`` (commit ``a2c0247``, v1.0.x content): ``tau-1.0.1``;
- ``tau2`` (tag v0.2.0): ``tau-0.2.0``.

τ-bench 2.x is refused: it grades "communicate" with an LLM judge and changed the user-simulator
prompts and name / id lookups, none of which the harness reproduces (docs/evaluation.md).

Runs stored before ``--grader`` existed carry no ``grader`` key: they are shown under their data
version's grader and marked non-standard with that reason, since nothing on record says which
grading code scored them (``harness rescore`` re-grades them with the current one).

The official setup (tau2-bench ``docs/leaderboard-submission.md`` and its 1.x defaults): a model
behind the official scaffold with the official ``LLMAgent`` system prompt (``--agent-prompt
official``, byte-identical: tests/test_tau_prompts_differential.py), the user simulator gpt-4.1 at
temperature 0 with the official guidelines (``--user-guidelines official``, whose system prompt is
byte-identical to the official ``UserSimulator``'s too), every task of the ``base`` split, at
least 4 trials, ``max_steps`` 200, ``max_errors`` 10, the data version's grader. A local or trained
policy, the oracle, the scripted user and any other difference make a run non-standard;
``nonstandard_reasons`` names each one. Everything is computed from the stored run record, so runs
stored before this module existed get the flag too (a run without ``agent_prompt`` played ours).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from envs.tau import data as tau_data
from harness.errors import ConfigError, DataMissingError

__all__ = ["OFFICIAL_GRADER", "GRADER_2X_REFUSAL", "default_grader", "check_grader", "run_grader", "is_stamped",
           "bench_version", "differences", "nonstandard_reasons", "OFFICIAL_USER_MODEL", "OFFICIAL_TRIALS"]

OFFICIAL_GRADER = {"tau3": "tau-1.0.1", "tau2": "tau-0.2.0"}
"""Data version -> the tau2-bench release whose grading the harness reproduces for it."""
GRADER_2X_REFUSAL = (
    "τ-bench 2.x is not reproduced: it grades \"communicate\" with an LLM judge and changed the user-simulator "
    "prompts and the name/id lookups (case and accent folding), so its scores are not comparable with 1.x; "
    "use --grader tau-1.0.1 (see docs/evaluation.md, \"Submitting to the τ-bench leaderboard\")")
_TAU_2X = re.compile(r"(tau-)?v?2(\.\d+)*", re.IGNORECASE)  # tau-2.0, 2.1, v2; not the data version "tau2"

OFFICIAL_USER_MODEL = "gpt-4.1"
_USER_MODEL_SPELLINGS = {"gpt-4.1", "openai/gpt-4.1", "gpt-4.1-2025-04-14", "openai/gpt-4.1-2025-04-14"}
OFFICIAL_TRIALS = 4
_OFFICIAL_LIMITS = {"max_steps": 200, "max_errors": 10}


def default_grader(data_version: str) -> str | None:
    """The grader of ``data_version`` (None for an unknown version, refused elsewhere)."""
    return OFFICIAL_GRADER.get(data_version)


def check_grader(grader: str, data_version: str) -> None:
    """A ``ConfigError`` (one line) unless ``grader`` is the one this harness reproduces for ``data_version``."""
    if _TAU_2X.fullmatch(grader.strip()):
        raise ConfigError(f"--grader {grader}: {GRADER_2X_REFUSAL}")
    if grader not in OFFICIAL_GRADER.values():
        known = ", ".join(f"{g} (--data-version {v})" for v, g in OFFICIAL_GRADER.items())
        raise ConfigError(f"unknown --grader {grader!r}; the harness reproduces {known}")
    if OFFICIAL_GRADER.get(data_version) != grader:
        version = next(v for v, g in OFFICIAL_GRADER.items() if g == grader)
        raise ConfigError(f"--grader {grader} grades the {version} task set, but this run plays --data-version "
                          f"{data_version}, graded as {OFFICIAL_GRADER.get(data_version)}; leave --grader out "
                          "or pass the matching --data-version")


def is_stamped(run: Any) -> bool:
    """Whether the run recorded its grader (runs stored before ``--grader`` did not)."""
    return bool((run.config or {}).get("grader"))


def run_grader(run: Any) -> str | None:
    """The grader version of a stored run: the stamped one, else its data version's."""
    return (run.config or {}).get("grader") or default_grader(run.data_version or tau_data.DEFAULT_VERSION)


def bench_version(grader: str) -> str:
    """The tau2-bench release a grader names, as the submission's ``tau2_bench_version``: tau-1.0.1 -> 1.0.1."""
    return grader.removeprefix("tau-")


@functools.lru_cache(maxsize=None)
def _split_ids(version: str, split: str) -> frozenset[str] | None:
    """The task ids of a split of the pinned data; None when the data is not on this machine."""
    try:
        return frozenset(str(t["id"]) for t in tau_data.load_airline_tasks(version, split))
    except (DataMissingError, ConfigError):
        return None


def _played_ids(run: Any) -> list[str]:
    cfg = run.config or {}
    # eval runs record the selected ids as task_ids; a train run's evaluation points as tasks
    return [str(t) for t in (cfg.get("task_ids") or cfg.get("tasks") or [])]


def differences(run: Any) -> dict[str, str]:
    """How a stored tau-airline run differs from the official leaderboard setup: what differs
    (``agent``, ``agent_prompt``, ``user``, ``user_model``, ``user_temperature``, ``user_guidelines``,
    ``split``, ``tasks``, ``trials``, ``max_steps``, ``max_errors``, ``empty_reply``, ``grader``) -> a
    short reason."""
    cfg = run.config or {}
    found: dict[str, str] = {}
    version = run.data_version or tau_data.DEFAULT_VERSION
    if run.agent == "oracle":
        found["agent"] = "agent: the oracle (replays the gold actions)"
    elif run.agent == "hf" or cfg.get("train_run"):
        found["agent"] = "agent: a local or trained policy (always custom)"
    elif run.agent != "litellm":
        found["agent"] = f"agent: {run.agent}"
    if run.agent in ("litellm", "hf") and cfg.get("agent_prompt", "ours") != "official":
        # The harness's own instruction block around policy.md (runs stored before --agent-prompt had it too).
        found["agent_prompt"] = ("agent prompt: the harness's wording, not tau2's llm_agent prompt "
                                 "(official: --agent-prompt official)")
    if run.user != "litellm":
        found["user"] = f"user simulator: {run.user or 'not recorded'} (official: {OFFICIAL_USER_MODEL})"
    else:
        if (run.user_model or "") not in _USER_MODEL_SPELLINGS:
            found["user_model"] = f"user model: {run.user_model} (official: {OFFICIAL_USER_MODEL})"
        if float(cfg.get("user_temperature", 0.0) or 0.0) != 0.0:
            found["user_temperature"] = f"user temperature: {cfg.get('user_temperature')} (official: 0)"
        if cfg.get("user_guidelines") != "official":
            found["user_guidelines"] = (f"user guidelines: {cfg.get('user_guidelines')} "
                                        "(official: --user-guidelines official)")
    if run.split != "base":
        found["split"] = f"split: {run.split} (official: base)"
    else:
        played, split_ids = set(_played_ids(run)), _split_ids(version, "base")
        if split_ids is None and cfg.get("tasks"):
            found["tasks"] = f"tasks: {len(played)} chosen with --tasks (official: all of the base split)"
        elif split_ids is not None and played != split_ids:
            found["tasks"] = f"tasks: {len(played & split_ids)} of {len(split_ids)} (official: all of the base split)"
    trials = int(cfg.get("trials") or 1)
    if trials < OFFICIAL_TRIALS:
        found["trials"] = f"trials: {trials} (official: {OFFICIAL_TRIALS} or more)"
    for key, official in _OFFICIAL_LIMITS.items():
        if key in cfg and cfg[key] != official:
            found[key] = f"{key}: {cfg[key]} (official: {official})"
    if cfg.get("empty_reply", "agent-error") != "retry":  # stored before the setting: agent-error then
        found["empty_reply"] = ("empty agent reply: ends the episode as agent_error "
                                "(official: replayed, then an infrastructure error: --env-arg empty_reply=retry)")
    if not is_stamped(run):
        found["grader"] = f"grader: not recorded (run predates --grader; shown as {run_grader(run)})"
    elif cfg["grader"] != default_grader(version):
        found["grader"] = f"grader: {cfg['grader']} (official for {version}: {default_grader(version)})"
    return found


def nonstandard_reasons(run: Any) -> list[str]:
    """How a stored tau-airline run differs from the official leaderboard setup, one short reason
    per difference, in a fixed order; [] means standard."""
    return list(differences(run).values())
