#!/usr/bin/env bash
# Run the test suite offline. Data comes from the local τ mirror (../shared/data/tau by default);
# the differential tests against the official tau2 package must run (no silent skip).
set -euo pipefail
cd "$(dirname "$0")/.."
export HARNESS_DATA_DIR="${HARNESS_DATA_DIR:-$(cd .. && pwd)/shared/data/tau}"
export HARNESS_TAU2_PYTHON="${HARNESS_TAU2_PYTHON:-$PWD/.venv-tau2/bin/python}"
export HARNESS_REQUIRE_DIFFERENTIAL="${HARNESS_REQUIRE_DIFFERENTIAL:-1}"
export LITELLM_LOCAL_MODEL_COST_MAP=True
export HARNESS_APPWORLD_VENV="${HARNESS_APPWORLD_VENV:-$PWD/.venv-appworld}"
if [ -z "${SKIP_APPWORLD:-}" ]; then export HARNESS_REQUIRE_APPWORLD="${HARNESS_REQUIRE_APPWORLD:-1}"; fi
exec .venv/bin/python -m pytest -q "$@"
