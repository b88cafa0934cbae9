"""A training run owns its name, its directory and its checkpoints (docs/reliability.md "Ownership").

Two run names never share a directory; a directory or a checkpoint of another run is refused with
one line before any episode plays; resume follows the run's own checkpoint rows; ``harness eval``
never deletes a train run or one of its evaluation points. Real SQLite files, the real command
where a user meets the behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError
from trainers.config import default_run_dir


def test_run_names_map_to_distinct_single_directories():
    names = ["toy-grpo", "A.b-c_9", "col/x", "col_x", "col%2Fx", "col%x", "%", "%25", "a b", "a:b", ".", "..",
             "x/..", "../x", "ä", "a\\b", "a/eval-step-000000"]
    dirs = [default_run_dir(n) for n in names]
    assert len(set(dirs)) == len(names), dirs
    for d in dirs:  # one component right under results/runs, never . or ..
        assert d.parent == Path("results") / "runs" and d.name not in ("", ".", "..") and "/" not in d.name, d
        assert "\\" not in d.name and ":" not in d.name and " " not in d.name, d
    # plain names keep the documented paths
    assert default_run_dir("toy-grpo") == Path("results/runs/toy-grpo")
    assert default_run_dir("A.b-c_9") == Path("results/runs/A.b-c_9")
    with pytest.raises(ConfigError, match="--out-dir"):
        default_run_dir("x" * 300)

