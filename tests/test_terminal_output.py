"""Output that fits a terminal: tables at 80 and 120 columns with no run name broken, the runs
list's main score, help pages whose option names are whole.

All through the real CLI in a subprocess (``COLUMNS`` set, as a terminal of that width would),
on a real SQLite file filled by real runs with long names: oracle evaluations of the toy env and
a short train run (whose held-out evaluations are runs named ``<train run>/eval-step-000001``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long as real names get: two side by side (32 characters each) and the borders fit 80 columns.
EVAL_RUNS = [f"oracle-toy-test-split-baseline-{n}" for n in range(3)]
TRAIN_RUN = "grpo-toy-lr5e-4"
WIDTHS = (80, 120)


def harness(*args: str, columns: int = 200) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": str(columns), "PYTHONPATH": REPO})
    assert proc.returncode == 0, f"harness {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    where = tmp_path_factory.mktemp("terminal")
    url = f"sqlite:///{where}/h.db"
    for name in EVAL_RUNS:
        harness("eval", "--env", "toy", "--agent", "oracle", "--tasks", "0,1,2,3", "--run", name, "--db", url,
                "--quiet")
    harness("train", "--env", "toy", "--policy", "tiny-toy", "--steps", "1", "--tasks-per-step", "2",
            "--group-size", "2", "--eval-every", "1", "--eval-tasks", "3", "--max-new-tokens", "8", "--run", TRAIN_RUN,
            "--db", url, "--out-dir", str(where / "train"), "--quiet")
    return url


def assert_fits(text: str, width: int, names: list[str]) -> None:
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, f"lines wider than {width}:\n" + "\n".join(too_wide)
    for name in names:
        assert any(name in line for line in lines), f"run name {name!r} not on one line:\n{text}"


@pytest.mark.parametrize("width", WIDTHS)
def test_results_list_fits_the_terminal_names_whole(db, width):
    names = [*EVAL_RUNS, TRAIN_RUN, f"{TRAIN_RUN}/eval-step-000000", f"{TRAIN_RUN}/eval-step-000001"]
    assert_fits(harness("results", "list", "--db", db, columns=width).stdout, width, names)


def test_results_list_shows_each_runs_main_score(db):
    rows = {row["run"]: row for row in json.loads(harness("results", "list", "--db", db, "--format", "json").stdout)}
    for name in EVAL_RUNS:
        assert rows[name]["score"] == 1.0, "the oracle passes every task: pass^1 = 1"
    last_eval = json.loads(harness("results", "show", f"{TRAIN_RUN}/eval-step-000001", "--db", db,
                                   "--format", "json").stdout)[0]["pass^1"]
    assert rows[TRAIN_RUN]["score"] == pytest.approx(last_eval), "a train run: its last held-out success"
    assert rows[f"{TRAIN_RUN}/eval-step-000001"]["score"] == pytest.approx(last_eval)
    assert "score" in harness("results", "list", "--db", db, columns=80).stdout


@pytest.mark.parametrize("width", WIDTHS)
def test_a_comparison_wider_than_the_terminal_is_pivoted_or_split_names_whole(db, width):
    runs = [EVAL_RUNS[0], f"{TRAIN_RUN}/eval-step-000001"]
    # every eval run of the toy's test split: one task set, so compared task by task
    shown = harness("results", "compare", *EVAL_RUNS, "--db", db, columns=width).stdout
    assert_fits(shown, width, EVAL_RUNS)
    assert "pass^1" in shown
    # a train run's evaluation point (a name with a slash) against an eval run
    shown = harness("results", "compare", *runs, "--db", db, columns=width).stdout
    assert_fits(shown, width, runs)


def test_one_run_that_fits_is_shown_one_metric_a_line(db):
    """A table that fits the terminal is not pivoted: one run's `results show` keeps each metric on
    its own line beside its value (not one wide row under wrapped headers)."""
    shown = harness("results", "show", EVAL_RUNS[0], "--db", db, columns=200).stdout
    assert re.search(r"pass\^1\W+1\.000", shown), shown
    assert_fits(shown, 200, [EVAL_RUNS[0]])


@pytest.mark.parametrize("command", [("train",), ("eval",), ("results", "compare")])
def test_help_at_80_columns_shows_every_option_name_whole_and_flags_as_flags(command):
    from typer.main import get_command

    from harness.cli.app import app

    text = harness(*command, "--help", columns=80).stdout
    assert max(len(line) for line in text.splitlines()) <= 80, text
    click_command = get_command(app)
    for part in command:
        click_command = click_command.commands[part]
    for param in click_command.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option":
            continue
        for name in (*param.opts, *param.secondary_opts):
            # an option's entry starts its line: "  --name <type>  help", "  --run, --run-name <str>",
            # "  --std-normalize / --no-std-normalize"
            entry = re.compile(rf"^  (\S+(, | / ))*{re.escape(name)}(,| |$)")
            lines = [line for line in text.splitlines() if entry.match(line)]
            assert lines, f"{name} not shown whole:\n{text}"
            if param.is_flag:  # its names, then its help after two spaces: no value after the names
                assert "<" not in re.split(r"\s{2,}", lines[0].strip())[0], f"flag {name} takes a value? {lines[0]}"
