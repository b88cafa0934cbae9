"""A checkpoint that cannot be written (a full disk) fails the training run with one line naming the
cause, leaves no half-written `step-N.tmp` holding the space, and `--resume` continues from the
newest complete checkpoint once there is room. The disk is a real 1.5 MB tmpfs (needs root, as on
CI and the dev machines; skipped elsewhere)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("torch")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_checkpoint_on_a_full_disk_fails_in_one_line_and_resumes_after_space_is_freed(tmp_path, small_disk):
    db_file = tmp_path / "t.db"  # the database is on the roomy disk; only checkpoints fill the small one
    out = small_disk / "run"
    args = ["train", "--env", "toy", "--policy", "tiny-toy", "--run", "t", "--db", f"sqlite:///{db_file}",
            "--out-dir", str(out), "--steps", "6", "--tasks-per-step", "2", "--group-size", "2",
            "--eval-every", "0", "--checkpoint-every", "1", "--max-new-tokens", "8"]
    proc = _harness(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint step" in errors[0], proc.stderr[-3000:]
    assert "No space left on device (errno ENOSPC)" in errors[0] and "--resume" in errors[0], errors[0]

    ckpts = out / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # nothing half-written holds space
    con = sqlite3.connect(db_file)
    try:
        status, reason = con.execute("SELECT status, status_reason FROM runs WHERE name = 't'").fetchone()
        recorded = [s for (s,) in con.execute("SELECT step FROM checkpoints ORDER BY step")]
    finally:
        con.close()
    assert status == "failed" and "could not write checkpoint" in reason, (status, reason)
    assert recorded and recorded[-1] < 6  # some fitted, the rest did not
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:06d}" for s in recorded]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = _harness(*args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {recorded[-1]})" in again.stdout, again.stdout[-2000:]
    con = sqlite3.connect(db_file)
    try:
        assert con.execute("SELECT status FROM runs WHERE name = 't'").fetchone() == ("finished",)
        assert con.execute("SELECT MAX(step) FROM train_steps").fetchone() == (6,)
    finally:
        con.close()
