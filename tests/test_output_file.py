"""``--out PATH`` never destroys what is there: atomic onto new paths and regular files (a crash
leaves the old file), through FIFOs and devices, refused for directories, ``-`` is stdout; and the
export commands use it.
Run: .venv/bin/python -m pytest tests/test_output_file.py
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from harness.errors import ConfigError
from harness.output_file import write_output


def _text(content: str):
    return lambda path: path.write_text(content, encoding="utf-8")


def test_a_new_path_and_a_regular_file_are_written_atomically(tmp_path):
    out = tmp_path / "sub" / "r.json"
    assert write_output(out, _text("one")) == out and out.read_text() == "one"
    assert write_output(str(out), _text("two")) == out and out.read_text() == "two"

    def crash(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ConfigError, match="cannot write .*No space left on device"):
        write_output(out, crash)
    assert out.read_text() == "two"  # the old file survives a failed write
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no .part left behind


def test_a_symlink_keeps_pointing_at_its_replaced_target(tmp_path):
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    write_output(link, _text("new"))
    assert link.is_symlink() and target.read_text() == "new"


def test_a_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_output(fifo, _text("streamed"))
    reader.join(timeout=10)
    assert got == ["streamed"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_directory_is_refused_untouched(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a directory"):
        write_output(tmp_path, _text("x"))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_dash_is_standard_output(capfd):
    assert str(write_output("-", _text("to stdout\n"))) == "-"
    assert capfd.readouterr().out == "to stdout\n"


def test_an_impossible_place_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConfigError, match="cannot write .*a-file/r.csv"):
        write_output(tmp_path / "a-file" / "r.csv", _text("x"))  # its parent is a file: cannot be made
    assert (tmp_path / "a-file").read_text() == "mine"


def test_results_export_to_stdout_and_onto_a_directory(tmp_path):
    db = f"sqlite:///{tmp_path}/runs.db"

    def harness(*args):
        return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    played = harness("eval", "--env", "toy", "--agent", "oracle", "--tasks", "0,1", "--run", "r", "--db", db, "--quiet")
    assert played.returncode == 0, played.stderr
    csv = harness("results", "export", "r", "--format", "csv", "--out", "-", "--db", db)
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.splitlines()
    assert lines[0].startswith("task_id,") and len(lines) == 3  # the header and two episodes, nothing else
    onto_dir = harness("results", "export", "r", "--format", "jsonl", "--out", str(tmp_path), "--db", db)
    assert onto_dir.returncode == 2 and "is a directory" in onto_dir.stderr and "Traceback" not in onto_dir.stderr
