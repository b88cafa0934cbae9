"""The layer rule, read from the imports of every module (lazy ones inside functions included).

From the bottom up: the kernel (``harness/`` without ``harness/cli``), ``envs/``, ``trainers/``,
the CLI (``harness/cli``). No import runs upward: the kernel imports no env, trainer or CLI
module; an env imports no trainer or CLI module; a trainer imports no CLI module.
Run: .venv/bin/python -m pytest tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = {  # layer -> the top-level module prefixes it must not import
    "kernel": ("envs", "trainers", "harness.cli"),
    "envs": ("trainers", "harness.cli"),
    "trainers": ("harness.cli",),
}


def layer_of(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).as_posix()
    if rel.startswith("harness/cli/"):
        return "cli"
    return {"harness": "kernel", "envs": "envs", "trainers": "trainers"}[rel.split("/", 1)[0]]


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """Per import statement: its line and the module names it may load."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from harness import cli`` loads harness.cli too
            found.append((node.lineno, [node.module, *(f"{node.module}.{a.name}" for a in node.names)]))
    return found


def violations(root: Path = REPO) -> list[str]:
    out = []
    for package in ("harness", "envs", "trainers"):
        for path in sorted((root / package).rglob("*.py")):
            layer = layer_of(path, root)
            banned = LAYERS.get(layer, ())
            for line, modules in imported_modules(path):
                bad = [m for m in modules if any(m == b or m.startswith(b + ".") for b in banned)]
                if bad:
                    out.append(f"{path.relative_to(root)}:{line}: {layer} imports {bad[0]}")
    return out


def test_no_import_runs_upward():
    found = violations()
    assert not found, "layer violations:\n" + "\n".join(found)


@pytest.mark.parametrize("where, line, layer", [
    ("harness/stats_probe.py", "from envs.registry import env_class", "kernel"),
    ("harness/stats_probe.py", "import trainers.loop", "kernel"),
    ("harness/stats_probe.py", "from harness import cli", "kernel"),
    ("envs/probe_env.py", "from trainers.methods import make_method", "envs"),
    ("trainers/probe.py", "from harness.cli.app import app", "trainers"),
])
def test_the_check_catches_an_upward_import(tmp_path, where, line, layer):
    """The rule is not vacuous: one upward import, planted in a copy of the tree, is reported."""
    for package in ("harness", "envs", "trainers"):
        (tmp_path / package).mkdir()
    (tmp_path / "harness" / "cli").mkdir()
    target = tmp_path / where
    target.write_text(f"def f():\n    {line}\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{where}:2: {layer} imports")
    (tmp_path / "harness" / "cli" / "ok.py").write_text("import trainers.loop\nimport envs.registry\n")
    assert len(violations(tmp_path)) == 1  # the CLI may import everything
