"""Torch's thread count is chosen from the cores the process may use (harness/threads.py).

The oversubscription it prevents: torch's default of one thread per core of the machine, on a
process pinned to fewer cores (taskset, a CI runner's cgroup), spins and ran the toy command 20x
slower. The subprocess tests pin a real process to one core and load a real model through the
harness, as `harness train` / `harness sft` / `harness eval --policy` do.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.errors import ConfigError
from harness.threads import available_cores, torch_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a user's shell has: none of the thread variables the test session sets (conftest).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HARNESS_THREADS")}

PINNED_LOAD = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as under `taskset -c 0`
import torch
from harness.policy.local_policy import load_model_and_tokenizer
load_model_and_tokenizer(sys.argv[1], device="cpu")
print(torch.get_num_threads(), torch.get_num_interop_threads())
"""


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**CLEAN_ENV, **env, "PYTHONPATH": REPO})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell affinity from the machine")
def test_a_process_pinned_to_one_core_loads_its_model_with_one_thread(tiny_toy_dir):
    proc = _python(PINNED_LOAD, str(tiny_toy_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"], proc.stdout  # intra-op threads, inter-op threads


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to show the cap")
def test_harness_threads_sets_the_count_but_never_above_the_cores(tiny_toy_dir):
    proc = _python(PINNED_LOAD, str(tiny_toy_dir), HARNESS_THREADS="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "1", "8 threads asked on 1 core: capped at 1"
    assert torch_threads({"HARNESS_THREADS": "1"}) == 1
    assert torch_threads({}) == available_cores()
    assert torch_threads({"OMP_NUM_THREADS": "1"}) == 1, "torchrun's OMP_NUM_THREADS=1 is kept"
    assert torch_threads({"LOCAL_WORLD_SIZE": str(available_cores())}) == 1, "cores shared among local ranks"


def test_a_bad_harness_threads_is_one_line_and_exit_2(tmp_path):
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="HARNESS_THREADS"):
            torch_threads({"HARNESS_THREADS": bad})
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "sft", "--env", "toy", "--policy", "tiny-toy",
                           "--out", str(tmp_path / "sft"), "--steps", "1"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**CLEAN_ENV, "HARNESS_THREADS": "many", "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "HARNESS_THREADS='many' is not a positive integer" in proc.stderr
    assert not (tmp_path / "sft" / "config.json").exists()
