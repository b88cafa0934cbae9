#!/usr/bin/env bash
# Run the test suite offline. The τ data comes from HARNESS_DATA_DIR, else ../shared/data/tau
# beside the clone, else the `harness data pull` cache; on a fresh clone with none of them the
# pinned, checksum-verified files are pulled into the cache first (tests/data_source.py).
# The differential tests against the official tau2 package must run (no silent skip).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS_DATA_DIR="$(.venv/bin/python tests/data_source.py --pull)"
export HARNESS_DATA_DIR
export HARNESS_TAU2_PYTHON="${HARNESS_TAU2_PYTHON:-$PWD/.venv-tau2/bin/python}"
export HARNESS_REQUIRE_DIFFERENTIAL="${HARNESS_REQUIRE_DIFFERENTIAL:-1}"
export LITELLM_LOCAL_MODEL_COST_MAP=True
export HARNESS_APPWORLD_VENV="${HARNESS_APPWORLD_VENV:-$PWD/.venv-appworld}"
if [ -z "${SKIP_APPWORLD:-}" ]; then export HARNESS_REQUIRE_APPWORLD="${HARNESS_REQUIRE_APPWORLD:-1}"; fi
# The store tests also run against a real PostgreSQL server (tests/pg_server.py): no silent skip.
if [ -z "${SKIP_POSTGRES:-}" ]; then export HARNESS_REQUIRE_POSTGRES="${HARNESS_REQUIRE_POSTGRES:-1}"; fi
# The viewer's browser tests drive Debian's headless Chromium (tests/test_view_browser.py): no silent skip.
if [ -z "${SKIP_BROWSER:-}" ]; then export HARNESS_REQUIRE_BROWSER="${HARNESS_REQUIRE_BROWSER:-1}"; fi
# The vLLM protocol test reads the wheel scripts/setup.sh fetched (tests/test_vllm_protocol.py): no silent skip.
if [ -z "${SKIP_VLLM_WHEEL:-}" ]; then export HARNESS_REQUIRE_VLLM_WHEEL="${HARNESS_REQUIRE_VLLM_WHEEL:-1}"; fi
# Lint first (rules in pyproject.toml): a one-second check that fails the run like a test.
.venv/bin/ruff check .
# Two test processes (pytest-xdist): most tests wait on subprocesses, servers and sockets, so two
# workers halve the suite's wall time on a 2-core machine (33 -> 19 minutes on a clean clone, README).
# HARNESS_TEST_WORKERS=0 runs everything in this process (e.g. to debug with pdb).
exec .venv/bin/python -m pytest -q -n "${HARNESS_TEST_WORKERS:-2}" "$@"
