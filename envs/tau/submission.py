"""``harness results submission``: stored tau-airline runs packaged for the τ-bench leaderboard.

Writes, into a new directory, what tau2-bench ``docs/leaderboard-submission.md`` asks for:

    DIR/submission.json                                        metadata and pass^1..pass^4 per domain
    DIR/trajectories/<model>_airline_default_<user>_<n>trials.json   the run as an official results file

Decisions:

- The fields follow the documented layout; ``submission_schema.json`` (beside this module) is that
  layout as a JSON schema, and the tests check every file written against it.
- pass^k are the numbers ``results show`` prints (``harness.results.metrics``), in percent; a pass^k
  the run has too few trials for is null. ``cost`` is the mean agent cost of the scored episodes,
  for an LLM agent only (a local policy or the oracle has no per-call price: null).
- ``submission_type`` is ``custom`` when any run is not the standard setup (``envs.tau.standard``):
  a local or trained policy, the oracle, another user simulator, a task subset, fewer than 4
  trials, changed limits. The reasons go into ``methodology.notes`` and ``verification.details``;
  ``modified_prompts`` says whether the agent or user prompt differs from the official one, and
  ``omitted_questions`` whether a task of the base split has no scored episode.
- Who made the model and who to contact are the submitter's flags; nothing is invented. One run
  per domain; every run must be finished (a stopped run would be a partial result).
- The trajectory file is the ``results export --format tau2`` file (``envs.tau.export``).
- All or nothing: everything is written into a temporary directory beside ``DIR``, which is then
  renamed to ``DIR``; an existing non-empty ``DIR`` is refused, never overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from envs.tau import standard
from envs.tau.export import export_tau2
from harness.errors import ConfigError
from harness.results.metrics import summarize
from harness.types import ErrorClass

__all__ = ["SCHEMA_PATH", "DOMAIN", "build_submission", "write_submission"]

SCHEMA_PATH = Path(__file__).with_name("submission_schema.json")
DOMAIN = "airline"
SUBMISSION_FILE = "submission.json"
TRAJECTORIES_DIR = "trajectories"
_PROMPT_DIFFERENCES = ("agent_prompt", "user", "user_guidelines")
_OMISSIONS = ("split", "tasks")


def _slug(text: str) -> str:
    """A file-name part: lower case, letters, digits, dots, hyphens (``openai/gpt-4.1`` -> ``openai-gpt-4.1``)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def _check_runs(runs: list[Any]) -> None:
    seen: dict[str, str] = {}
    for run in runs:
        if run.kind != "eval":
            raise ConfigError(f"run {run.name!r} is a {run.kind} run; submit an eval run (a train run's "
                              f"evaluation points are named {run.name}/eval-step-N)")
        if run.status != "finished":
            raise ConfigError(f"run {run.name!r} is {run.status}, not finished; resume it with the same "
                              "`harness eval --run` command first, so the submission is not a partial result")
        if DOMAIN in seen:
            raise ConfigError(f"runs {seen[DOMAIN]!r} and {run.name!r} are both {DOMAIN} results; a submission "
                              "has one result per domain")
        seen[DOMAIN] = run.name


def _domain_results(store: Any, run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the domain's ``results`` entry, the run's summary)."""
    df = store.episodes_df(run.name)
    summary = summarize(df)
    infra = int(summary.get("infra_episodes") or 0)
    if infra:  # the export leaves them out, and verification wants every trial of every task
        raise ConfigError(f"run {run.name!r} has {infra} episode(s) that ended in an infrastructure error; "
                          "the official verification needs every trial of every task: resume it with the "
                          "same `harness eval --run` command (it plays them again) first")
    out: dict[str, Any] = {}
    for k in range(1, 5):
        value = summary.get(f"pass^{k}")
        out[f"pass_{k}"] = None if value is None or math.isnan(value) else 100.0 * float(value)
    scored = df[df["error_class"] != ErrorClass.INFRA.value]
    cost = None
    if run.agent == "litellm" and len(scored) and "agent_cost" in scored.columns:
        cost = float(scored["agent_cost"].fillna(0.0).astype(float).mean())
    out["cost"] = cost
    return out, summary


def build_submission(store: Any, runs: list[Any], identity: dict[str, Any],
                     trajectory_files: dict[str, str]) -> dict[str, Any]:
    """The ``submission.json`` document for ``runs`` (checked by ``write_submission``)."""
    results: dict[str, Any] = {}
    notes: list[str] = []
    found: dict[str, str] = {}
    omitted = False
    graders = sorted({standard.run_grader(run) for run in runs})
    if len(graders) != 1:
        raise ConfigError(f"these runs were graded under different grader versions ({', '.join(graders)}); a "
                          "submission reports one τ-bench version")
    users = sorted({str(run.user_model if run.user == "litellm" else run.user) for run in runs})
    if len(users) != 1:
        raise ConfigError(f"these runs used different user simulators ({', '.join(users)}); a submission uses one")
    for run in runs:
        results[DOMAIN], summary = _domain_results(store, run)
        differences = standard.differences(run)
        found |= differences
        omitted = omitted or bool(summary.get("unscored_tasks")) or any(k in differences for k in _OMISSIONS)
        setup = (f"not the standard setup: {'; '.join(differences.values())}" if differences
                 else "the standard setup")
        notes.append(f"{DOMAIN}: harness {run.code_version or '(version not recorded)'} run {run.name!r}, data "
                     f"{run.data_version}, grader {standard.run_grader(run)}, {summary.get('trials')} trials, "
                     f"seed {(run.config or {}).get('seed')}; {setup}")
    if identity.get("notes"):
        notes.insert(0, identity["notes"])
    contact = {"email": identity["contact_email"]}
    if identity.get("contact_name"):
        contact["name"] = identity["contact_name"]
    return {
        "model_name": identity["model_name"],
        "model_organization": identity["model_organization"],
        "submitting_organization": identity["submitting_organization"],
        "submission_date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "submission_type": "custom" if found else "standard",
        "modality": "text",
        "contact_info": contact,
        "trajectories_available": True,
        "trajectory_files": trajectory_files,
        "results": results,
        "methodology": {
            "evaluation_date": min(run.created_at for run in runs).date().isoformat(),
            "tau2_bench_version": standard.bench_version(graders[0]),
            "user_simulator": users[0],
            "notes": "\n".join(notes),
            "verification": {
                "modified_prompts": any(k in found for k in _PROMPT_DIFFERENCES),
                "omitted_questions": omitted,
                "details": "; ".join(found.values()) or "Every task of the base split, official settings.",
            },
        },
    }


def _target(out: Path) -> Path:
    """``out`` as a directory the submission may take: absent, or an empty directory."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} exists and is not a directory; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; give a new directory (a submission never overwrites files)")
    return out


def write_submission(store: Any, runs: list[Any], out: str | Path, identity: dict[str, Any]) -> list[Path]:
    """Write the submission of ``runs`` into the new directory ``out``; returns the files written."""
    _check_runs(runs)
    target = _target(Path(out))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.part")  # umask-respecting, unlike mkdtemp
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed earlier attempt of this pid
        staging.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        files: dict[str, str] = {}
        for run in runs:
            trials = int((run.config or {}).get("trials") or 1)
            user = run.user_model if run.user == "litellm" else run.user
            name = f"{_slug(identity['model_name'])}_{DOMAIN}_default_{_slug(str(user))}_{trials}trials.json"
            export_tau2(store, run.name, staging / TRAJECTORIES_DIR / name)
            files[DOMAIN] = name
        doc = build_submission(store, runs, identity, files)
        (staging / SUBMISSION_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if target.is_dir():
            target.rmdir()  # empty (checked above); the rename below puts the whole package in its place
        os.replace(staging, target)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [target / SUBMISSION_FILE, *(target / TRAJECTORIES_DIR / f for f in files.values())]
