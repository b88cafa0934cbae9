"""The docs cannot drift from the CLI: every ``harness ...`` command in a fenced shell block of the
README or ``docs/`` names a real command, and every ``--flag`` it passes is one that command takes
(its generated options, the env and method flags, the hidden aliases). Also: the README stays a
one-screen entry (≤ 200 lines) and every relative link in the docs points at a file that exists.
Run: .venv/bin/python -m pytest tests/test_docs.py
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from harness.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"```(?:bash|sh|shell)?\n(.*?)```", re.S)


def shell_lines(text: str) -> list[str]:
    """Logical lines of the fenced shell blocks (continuations joined, comments and prompts cut,
    ``$VAR`` expanded from assignments earlier in the same block)."""
    out = []
    for block in _FENCE.findall(text):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            assignment = re.match(r'^([A-Z_]+)="([^"]*)"$', line)
            if assignment:
                variables[assignment.group(1)] = " ".join(assignment.group(2).split())
                continue
            line = re.sub(r"\$([A-Z_]+)", lambda m: variables.get(m.group(1), m.group(0)), line)
            out.append(line)
    return out


def harness_invocations(line: str) -> list[list[str]]:
    """The argument lists of every ``harness`` call on a shell line (``a && harness ...``,
    ``.venv/bin/harness``, ``python -m harness.cli``, ``torchrun ... -m harness.cli``)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    calls, current = [], None
    for before, word in zip([""] + words, words):
        if word in ("&&", "||", ";", "|"):
            current = None
            continue
        if current is not None:
            current.append(word)
        elif ((word.endswith("bin/harness") or word in ("harness", "harness.cli"))
              and before != "-t"):  # not `docker build -t harness`
            current = []
            calls.append(current)
    return calls


def resolve(args: list[str]) -> tuple[object, list[str], str]:
    """(the click command, its flags given, its path) for one invocation."""
    cmd = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):  # a group (typer vendors click)
        name = rest.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"`harness {' '.join(path + [name])}` is not a command"
        cmd, path = sub, path + [name]
    flags = [a.split("=", 1)[0] for a in rest if a.startswith("--")]
    return cmd, flags, " ".join(path)


def all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_lines(page.read_text(encoding="utf-8")):
            found += [(page.relative_to(REPO).as_posix(), args) for args in harness_invocations(line)]
    return found


def test_the_docs_show_commands():
    invocations = all_invocations()
    assert len(invocations) >= 40  # the parser found the docs' commands (not an empty pass)
    assert {"eval", "train", "train-suite", "results show", "results compare", "data pull"} <= {
        resolve(args)[2] for _, args in invocations}


@pytest.mark.parametrize("page,args", all_invocations(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_every_documented_flag_exists(page, args):
    cmd, flags, path = resolve(args)
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{page}: `harness {path}` has no option {', '.join(unknown)}"


def test_the_flag_check_catches_a_wrong_flag():
    cmd, flags, _ = resolve(["train", "--env", "toy", "--sgcd-gama", "2"])
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    assert "--sgcd-gama" not in known and "--sgcd-gamma" in known  # a typo fails, the hidden alias exists
    with pytest.raises(AssertionError, match="is not a command"):
        resolve(["results", "shw", "x"])


def test_readme_is_one_screen_and_links_resolve():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


_TEST_REF = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)?)`|`::(test_\w+)`")


def test_every_test_the_docs_cite_exists():
    """A guarantee cites the test that proves it (README "Reliability", docs/reliability.md): the
    file must exist, and a cited `file::test` (or a following `::test`, same file) must be defined there."""
    missing = []
    for page in PAGES:
        current = None
        for file, test, alone in _TEST_REF.findall(page.read_text()):
            if file:
                current = REPO / file
                if not current.is_file():
                    missing.append(f"{page.name}: {file}")
                    continue
            name = (test or "").removeprefix("::") or alone
            if name and current is not None and current.is_file() and \
                    not re.search(rf"^(?:async )?def {name}\b", current.read_text(), re.M):
                missing.append(f"{page.name}: {current.relative_to(REPO)}::{name}")
    assert not missing, missing


_MAKES_RUNS = ("eval", "train", "train-suite")


def _run_name(args: list[str]) -> str | None:
    """The run name (``--run``) or, for ``train-suite``, the prefix of its run names (``--prefix``,
    default ``suite-<env>-s<seed>``) an invocation writes; None for a command that writes no run,
    resumes one, or takes a dated default name."""
    if not args or args[0] not in _MAKES_RUNS or "--resume" in args:
        return None

    def value(flag: str, default: str | None = None) -> str | None:
        return args[args.index(flag) + 1] if flag in args else default

    if args[0] == "train-suite":
        return value("--prefix", f"suite-{value('--env', 'toy')}-s{value('--seed', '0')}")
    return value("--run")


def test_readme_commands_name_their_runs_distinctly():
    """Followed in order on one database, the README's commands never meet a run of another command
    ("run exists"): each command that writes runs has its own name (or suite prefix), and no page of
    docs/ gives one of them to a command with other settings."""
    readme = [args for line in shell_lines((REPO / "README.md").read_text(encoding="utf-8"))
              for args in harness_invocations(line)]
    named: dict[str, list[str]] = {}
    for args in readme:
        name = _run_name(args)
        if name is not None:
            assert named.setdefault(name, args) == args, f"README: run {name!r} is made by two commands"
    for page, args in all_invocations():
        name = _run_name(args)
        if page != "README.md" and name in named:
            assert args == named[name], f"{page}: run {name!r} of the README is made with other settings"


def test_readme_states_where_its_train_commands_leave_the_defaults():
    """``harness train``'s defaults suit a 7B model; the README's toy commands override them, and its
    prose names every override (``--lr 5e-4`` ...), so a reader knows which settings the toy needs."""
    from dataclasses import MISSING, fields

    from trainers.config import TrainConfig

    text = (REPO / "README.md").read_text(encoding="utf-8")
    prose = " ".join(_FENCE.sub(" ", text).split())
    defaults = {f"--{f.name.replace('_', '-')}": f.default for f in fields(TrainConfig) if f.default is not MISSING}
    checked = 0
    for line in shell_lines(text):
        for args in harness_invocations(line):
            if args[:1] != ["train"]:
                continue
            for flag, value in zip(args, args[1:]):
                if flag not in defaults or flag in ("--run", "--method") or value.startswith("--"):
                    continue
                default = defaults[flag]
                same = float(value) == default if isinstance(default, (int, float)) else value == default
                if not same:
                    checked += 1
                    assert f"{flag} {value}" in prose, f"README: `harness train {flag} {value}` overrides the " \
                                                       f"default {default} and the text does not say so"
    assert checked  # the README's toy commands do override the 7B defaults
