"""A database that cannot serve is refused when the store opens, with one line naming it and the
cause (real CLI runs): a directory, a file that is not SQLite or is truncated, another program's
database, one made by a newer harness, a missing driver, an unwritable place, a full disk. An older
harness's database is migrated and stamped; a read-only one can be read."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.store import Store
from harness.store.version import SCHEMA_VERSION
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage

REPO = Path(__file__).resolve().parents[1]


def _harness(*args: str) -> subprocess.CompletedProcess:
    """``harness ARGS`` as a user runs it: a subprocess."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OPENAI_API_KEY": ""}, timeout=300)


def _results(*args: str) -> subprocess.CompletedProcess:
    """``harness results ARGS`` in this process (the same typer app and error handler; a subprocess
    per case would cost seconds of imports each)."""
    result = CliRunner().invoke(app, ["results", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _new_run(store: Store, name: str) -> None:
    store.create_run(name, kind="eval", env="tau-airline", data_version="tau3", split="base", agent="oracle",
                     agent_model=None, user="scripted", user_model=None, config={"trials": 1})
    for task in ("0", "1"):
        store.add_episode(name, EpisodeResult(
            task_id=task, trial=0, seed=0, messages=[{"role": "user", "content": "hi"}],
            termination=Termination.USER_STOP, score=Score(reward=1.0, success=True), error_class=ErrorClass.NONE,
            agent_usage=Usage(), user_usage=Usage()))


def _sqlite_with_a_table(path: Path, rows: int = 100) -> Path:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
        con.executemany("INSERT INTO notes VALUES (?)", [("x" * 1000,)] * rows)
    return path


def _cut(source: Path, target: Path, size: int) -> Path:
    target.write_bytes(source.read_bytes()[:size])
    return target


@pytest.mark.parametrize("case", ["directory", "text file", "truncated header", "truncated pages", "foreign tables"])
def test_a_file_that_is_not_a_harness_database_is_refused_in_one_line(tmp_path, case):
    other = _sqlite_with_a_table(tmp_path / "other.db")
    path = {
        "directory": lambda: (tmp_path / "dir.db").mkdir() or tmp_path / "dir.db",
        "text file": lambda: (tmp_path / "notes.txt").write_text("not a database\n") and tmp_path / "notes.txt",
        "truncated header": lambda: _cut(other, tmp_path / "cut.db", 10),
        "truncated pages": lambda: _cut(other, tmp_path / "cut.db", 4096),
        "foreign tables": lambda: other,
    }[case]()
    expected = {
        "directory": "is a directory", "text file": "is not a SQLite database", "truncated header": "is truncated",
        "truncated pages": "damaged or truncated",
        "foreign tables": "not a harness database (it holds other tables: notes)",
    }[case]
    before = path.read_bytes() if path.is_file() else None
    _one_line_error(_results("list", "--db", f"sqlite:///{path}"), f"sqlite:///{path}", expected)
    assert (path.read_bytes() if path.is_file() else None) == before  # nothing written into it


def test_a_foreign_database_is_refused_before_an_eval_plays_anything(tmp_path, fake_llm):
    other = _sqlite_with_a_table(tmp_path / "other.db")
    done = _harness("eval", "--env", "tau-airline", "--model", "openai/agent", "--user-model", "openai/user",
                    "--api-base", fake_llm.base_url, "--tasks", "0", "--run", "x", "--db", f"sqlite:///{other}")
    _one_line_error(done, "not a harness database")
    assert fake_llm.requests_for("agent") == [] and fake_llm.requests_for("user") == []
    with sqlite3.connect(other) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]


def test_a_database_from_a_newer_harness_is_refused(tmp_path):
    path = tmp_path / "h.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE harness_meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    _one_line_error(_results("list", "--db", f"sqlite:///{path}"),
                    f"made by a newer harness (schema version {SCHEMA_VERSION + 1}", "upgrade harness")


def test_an_older_harness_database_is_migrated_and_stamped(tmp_path):
    """A file written before ``harness_meta`` and ``runs.status_reason`` existed: its runs are
    kept, the column is added and the version stamped, and it then opens as current."""
    path = tmp_path / "old.db"
    store = Store(f"sqlite:///{path}")
    _new_run(store, "old")
    store.close()
    with sqlite3.connect(path) as con:  # the schema as the first release wrote it
        con.execute("DROP TABLE harness_meta")
        con.execute("ALTER TABLE runs DROP COLUMN status_reason")
    done = _results("list", "--db", f"sqlite:///{path}", "--format", "csv")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "old,eval" in done.stdout
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT id, schema_version FROM harness_meta").fetchall() == [(1, SCHEMA_VERSION)]
        assert "status_reason" in [r[1] for r in con.execute("PRAGMA table_info(runs)")]
        assert con.execute("SELECT COUNT(*) FROM episodes").fetchone() == (2,)


def test_a_driver_that_is_not_installed_names_the_extra_and_hides_the_password(monkeypatch):
    for module in ("psycopg", "pymysql"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as when it is not installed
    line = _one_line_error(_results("list", "--db", "postgresql+psycopg://ann:s3cret@127.0.0.1/h"),
                           "postgresql+psycopg://ann:***@127.0.0.1/h", "driver is not installed",
                           "pip install 'harness[postgres]'")
    assert "s3cret" not in line
    _one_line_error(_results("list", "--db", "mysql+pymysql://ann:s3cret@127.0.0.1/h"),
                    "mysql+pymysql://ann:***@127.0.0.1/h", "pip install pymysql")


@pytest.mark.parametrize(("url", "expected"), [
    ("results/harness.db", "is not a database URL"),
    ("sqlit:///h.db", "SQLAlchemy knows no database kind 'sqlit'"),
    ("sqlite:///h.db?timeout=soon", "?timeout= takes seconds"),
])
def test_a_url_that_cannot_work_is_one_line(tmp_path, monkeypatch, url, expected):
    monkeypatch.chdir(tmp_path)
    _one_line_error(_results("list", "--db", url), expected)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_does_not_answer_is_one_line_without_the_password():
    line = _one_line_error(_results("list", "--db", "postgresql+psycopg://ann:s3cret@127.0.0.1:1/h"),
                           "postgresql+psycopg://ann:***@127.0.0.1:1/h", "Connection refused")
    assert "s3cret" not in line


# --- read-only places and full disks: a small tmpfs of our own (root), or file modes (a user) -----

def _mount_tmpfs(directory: Path, size: str) -> None:
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    directory = tmp_path / "disk"
    _mount_tmpfs(directory, "200k")
    yield directory
    subprocess.run(["umount", "--lazy", str(directory)], check=True)


@contextlib.contextmanager
def read_only_directory(directory: Path, size: str, fill: Callable[[Path], None]) -> Iterator[Path]:
    """``directory`` filled by ``fill(directory)``, then made read-only until the block ends: a
    read-only remount of a tmpfs of ``size`` as root (root ignores file modes), file modes otherwise."""
    as_root = os.geteuid() == 0
    if as_root:
        _mount_tmpfs(directory, size)
    else:
        directory.mkdir()
    fill(directory)
    if as_root:
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    else:
        for path in directory.iterdir():
            path.chmod(0o444)
        directory.chmod(0o555)
    try:
        yield directory
    finally:
        if as_root:  # lazy: the in-process commands' connection pools may still hold the file
            subprocess.run(["umount", "--lazy", str(directory)], check=True)
        else:
            directory.chmod(0o755)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory holding a harness database with runs ``a`` and ``b``, then made read-only."""
    def fill(directory: Path) -> None:
        store = Store(f"sqlite:///{directory / 'h.db'}")
        _new_run(store, "a")
        _new_run(store, "b")
        store.close()

    with read_only_directory(tmp_path / "ro", "4m", fill) as directory:
        yield directory


def test_a_read_only_database_can_be_read_but_not_written(read_only_dir, tmp_path):
    url = f"sqlite:///{read_only_dir / 'h.db'}"
    for args in (["list"], ["show", "a"], ["compare", "a", "b"],
                 ["export", "a", "--format", "jsonl", "--out", str(tmp_path / "a.jsonl")]):
        done = _results(*args, "--db", url)
        assert done.returncode == 0, (args, done.stderr[-3000:])
    assert (tmp_path / "a.jsonl").read_text().count("\n") == 2
    done = _harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0",
                    "--run", "c", "--db", url)
    _one_line_error(done, url, "readonly database", "not writable")
    _one_line_error(_results("list", "--db", f"sqlite:///{read_only_dir / 'new.db'}"),
                    "does not exist and its directory is not writable")
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["h.db"]


def test_a_full_disk_stops_the_eval_with_one_line(small_disk):
    url = f"sqlite:///{small_disk / 'h.db'}"
    done = _harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--trials", "3",
                    "--run", "full", "--db", url, "--quiet")
    assert done.returncode != 0
    # the oracle with the scripted user is not the official setup: one warning line says so at the start
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("warning: run full is not")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0] == f"error: database {url}: database or disk is full"
