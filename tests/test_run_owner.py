"""One live process plays a run (harness.store.owners; docs/reliability.md "Ownership").

A second `harness eval` or `harness train` on a run that a live process is playing is refused with
one line before it changes anything, `--force-new` included; a crashed owner (kill -9) is taken
over at once on its host; an owner on another host is taken over only once its heartbeat is stale.
Real processes, real SQLite files."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import Delayed, TauPolicy

from harness.store import Store
from harness.store.owners import RunBusyError, claim_run, run_owner

AGENT, USER = "fake-agent", "fake-user"


def _store_with_run(tmp_path, name: str = "r") -> tuple[Store, str]:
    db = f"sqlite:///{tmp_path / 'owners.db'}"
    store = Store(db)
    store.create_run(name=name, kind="eval", env="toy", data_version="v", split="test", agent="a", agent_model=None,
                     user=None, user_model=None, config={})
    return store, db


def _claim_in_other_process(db: str, run: str) -> subprocess.Popen:
    """A second Python process that claims ``run`` and holds it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from harness.store import Store
        from harness.store.owners import claim_run
        claim_run(Store({db!r}), {run!r}, every=0.2)
        print("claimed", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "claimed", proc.stderr.read()
    return proc


def test_a_live_owner_on_this_host_is_refused_and_a_killed_one_taken_over(tmp_path):
    store, db = _store_with_run(tmp_path)
    other = _claim_in_other_process(db, "r")
    try:
        with pytest.raises(RunBusyError, match=rf"run 'r' is being played by pid {other.pid} on this host"):
            claim_run(store, "r")
        assert run_owner(store, "r")["pid"] == other.pid  # the refused claim changed nothing
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    lease = claim_run(store, "r")  # its pid is dead: taken over at once, no waiting for staleness
    try:
        assert run_owner(store, "r")["pid"] == os.getpid()
    finally:
        lease.release()
    assert run_owner(store, "r") is None


def _set_owner(db: str, host: str, pid: int, heartbeat: datetime) -> None:
    """What a process on another machine sharing the database would have written."""
    con = sqlite3.connect(db.removeprefix("sqlite:///"))
    with con:
        con.execute("DELETE FROM run_owners")
        con.execute("INSERT INTO run_owners (run_id, host, pid, token, started_at, heartbeat_at) "
                    "SELECT id, ?, ?, 'theirs', ?, ? FROM runs WHERE name = 'r'",
                    (host, pid, heartbeat.replace(tzinfo=None), heartbeat.replace(tzinfo=None)))
    con.close()


def test_an_owner_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path):
    store, db = _store_with_run(tmp_path)
    now = datetime.now(timezone.utc)
    # pid 1 is alive here, but the owner is elsewhere: only its heartbeat can tell, whatever the pid
    _set_owner(db, "elsewhere.example", 999_999, now - timedelta(seconds=5))
    with pytest.raises(RunBusyError, match="on host elsewhere.example"):
        claim_run(store, "r", stale_after=60)
    _set_owner(db, "elsewhere.example", 999_999, now - timedelta(seconds=61))
    lease = claim_run(store, "r", stale_after=60)
    try:
        assert run_owner(store, "r")["host"] == socket.gethostname()
    finally:
        lease.release()


def test_a_stale_owner_on_this_host_with_a_reused_pid_is_taken_over(tmp_path):
    """A pid that is alive again (reused) but whose heartbeat stopped long ago is no owner."""
    store, db = _store_with_run(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _set_owner(db, socket.gethostname(), other.pid, datetime.now(timezone.utc) - timedelta(seconds=5))
        with pytest.raises(RunBusyError):
            claim_run(store, "r", stale_after=60)
        _set_owner(db, socket.gethostname(), other.pid, datetime.now(timezone.utc) - timedelta(seconds=61))
        claim_run(store, "r", stale_after=60).release()
    finally:
        other.kill()
        other.wait()


def test_the_heartbeat_is_refreshed_and_notices_a_takeover(tmp_path):
    store, db = _store_with_run(tmp_path)
    lease = claim_run(store, "r", every=0.1)
    try:
        time.sleep(1.0)
        assert run_owner(store, "r")["heartbeat_age"] < 0.6
        _set_owner(db, "elsewhere.example", 1, datetime.now(timezone.utc))  # another claim replaced ours
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost
    finally:
        lease.release()
    assert run_owner(store, "r")["host"] == "elsewhere.example"  # releasing never removes another's claim


def _eval_args(server, db: str, tasks: list[str], *extra: str) -> list[str]:
    return ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
            "--api-base", server.base_url, "--tasks", ",".join(tasks), "--run", "r", "--db", db, "--quiet",
            "--concurrency", "2", "--max-retries", "1", "--retry-backoff", "0.01", *extra]


def _count(db_file, table: str) -> int:
    con = sqlite3.connect(db_file, timeout=30)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # no schema yet
        return 0
    finally:
        con.close()


def test_a_second_eval_of_a_run_being_played_is_refused_and_changes_nothing(tmp_path):
    """While `harness eval --run r` plays, the same command (a resume) and the same with
    --force-new each exit 2 with one line; the first run then finishes with every episode once."""
    db_file = tmp_path / "two.db"
    db = f"sqlite:///{db_file}"
    tasks = [str(i) for i in range(12)]
    env = {**os.environ, "OPENAI_API_KEY": ""}
    slow = Delayed(TauPolicy(AGENT, USER), 0.5)  # slow while the second process tries, then fast
    with FakeOpenAIServer(slow) as server:
        first = subprocess.Popen([sys.executable, "-m", "harness.cli", *_eval_args(server, db, tasks)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 120
            while _count(db_file, "episodes") < 2:
                assert first.poll() is None, first.stderr.read()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for extra in ((), ("--force-new",)):
                second = subprocess.run([sys.executable, "-m", "harness.cli", *_eval_args(server, db, tasks, *extra)],
                                        capture_output=True, text=True, env=env, timeout=120)
                assert second.returncode == 2, second.stderr[-3000:]
                lines = second.stderr.strip().splitlines()
                assert len(lines) == 1 and f"is being played by pid {first.pid} on this host" in lines[0], lines
            slow.delay = 0.0
            _, err = first.communicate(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
    assert first.returncode == 0, err[-3000:]
    con = sqlite3.connect(db_file)
    try:
        assert con.execute("SELECT status FROM runs WHERE name = 'r'").fetchall() == [("finished",)]
        rows = con.execute("SELECT task_id, trial FROM episodes").fetchall()
        assert con.execute("SELECT COUNT(*) FROM run_owners").fetchone()[0] == 0  # released at the end
    finally:
        con.close()
    assert sorted(rows) == sorted((t, 0) for t in tasks)


def test_a_second_train_resume_of_a_run_being_trained_is_refused(tmp_path):
    pytest.importorskip("torch")
    db_file = tmp_path / "t.db"
    args = ["train", "--env", "toy", "--policy", "tiny-toy", "--run", "t", "--db", f"sqlite:///{db_file}",
            "--out-dir", str(tmp_path / "t"), "--steps", "200", "--tasks-per-step", "2", "--group-size", "2",
            "--eval-every", "0", "--checkpoint-every", "1", "--max-new-tokens", "8"]
    first = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # the first checkpoint row exists: a resume would otherwise be accepted
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            if _count(db_file, "checkpoints") >= 2:
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "harness.cli", *args, "--resume"], capture_output=True,
                                text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run 't' is being played by pid {first.pid} on this host" in second.stderr
        assert "Traceback" not in second.stderr
        con = sqlite3.connect(db_file, timeout=30)
        try:
            assert con.execute("SELECT status FROM runs WHERE name = 't'").fetchall() == [("running",)]
        finally:
            con.close()
    finally:
        first.kill()
        first.communicate()
