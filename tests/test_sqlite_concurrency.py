"""Several processes on one database at once, as when two `harness eval` runs (or an eval and a
`results show`) share `results/harness.db`: no "database is locked", no lost or doubled rows. The
two-writer tests run on a SQLite file and on a PostgreSQL database (``db_url``)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import Delayed, TauPolicy
from sqlalchemy import create_engine
from sqlalchemy.schema import CreateTable

from harness.store import Base, Store

REPO = Path(__file__).resolve().parents[1]

# One worker process. argv: url, mode, run, n, go_file, stop_file. Prints one JSON line.
WORKER = r'''
import json, os, sys, time
from harness.store import DuplicateEpisodeError, Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage

url, mode, run, n, go, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
store = Store(url)

def episode(i):
    messages = [{"role": "assistant", "content": "Hi! How can I help you today?"}]
    for k in range(12):
        messages.append({"role": "user", "content": f"turn {k} of episode {i} " + "x" * 200})
        messages.append({"role": "assistant", "content": f"reply {k} " + "y" * 200})
    return EpisodeResult(task_id=str(i % 50), trial=i // 50, seed=i, messages=messages,
                         termination=Termination.USER_STOP, score=Score(reward=float(i % 2), success=bool(i % 2)),
                         error_class=ErrorClass.NONE, agent_usage=Usage(prompt_tokens=i, calls=1),
                         user_usage=Usage(completion_tokens=i, calls=1), wall_seconds=0.1)

while not os.path.exists(go):
    time.sleep(0.002)
out = {"start": time.time(), "stored": 0, "duplicates": 0, "reads": 0, "seen": []}
if mode == "write":
    for i in range(n):
        try:
            store.add_episode(run, episode(i))
            out["stored"] += 1
        except DuplicateEpisodeError:
            out["duplicates"] += 1
elif mode == "read":
    while not os.path.exists(stop):
        out["seen"].append(len(store.episodes_df(run)))
        out["reads"] += 1
    out["seen"].append(len(store.episodes_df(run)))
out["end"] = time.time()
print(json.dumps(out))
'''


def _start(url: str, mode: str, run: str, n: int, go: Path, stop: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, url, mode, run, str(n), str(go), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))


def _wait_ready(procs, seconds: float = 1.5) -> None:
    # Workers import pandas/sqlalchemy first; give them time to reach the start line together.
    time.sleep(seconds)
    for p in procs:
        assert p.poll() is None, p.communicate()[1][-3000:]


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert "database is locked" not in err, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _count(db_file: Path) -> int:
    """Episodes stored so far (a reader: WAL lets it read while another connection writes)."""
    try:
        with sqlite3.connect(db_file, timeout=30) as con:
            return con.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _new_run(store: Store, name: str) -> None:
    store.create_run(name=name, kind="eval", env="tau-airline", data_version="tau3", split="base", agent="oracle",
                     agent_model=None, user="scripted", user_model=None, config={})


def test_two_writers_on_one_database(tmp_path, db_url):
    store = Store(db_url)
    for name in ("a", "b"):
        _new_run(store, name)
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = [_start(db_url, "write", name, 200, go, stop) for name in ("a", "b")]
    _wait_ready(procs)
    go.touch()
    results = [_result(p) for p in procs]
    assert [r["stored"] for r in results] == [200, 200]
    # They really ran at the same time.
    assert max(r["start"] for r in results) < min(r["end"] for r in results)
    counts = store.episode_counts()
    assert counts == {"a": 200, "b": 200}
    for name in ("a", "b"):
        df = store.episodes_df(name)
        assert not df.duplicated(["task_id", "trial"]).any()
        assert sorted(df["seed"]) == list(range(200))


def test_two_writers_racing_for_the_same_episodes(tmp_path, db_url):
    """Both processes store the same 150 (task, trial) keys of one run: each key ends up stored
    exactly once, and the loser of each race gets DuplicateEpisodeError (not a crash or a lock)."""
    store = Store(db_url)
    _new_run(store, "same")
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = [_start(db_url, "write", "same", 150, go, stop) for _ in range(2)]
    _wait_ready(procs)
    go.touch()
    results = [_result(p) for p in procs]
    assert sum(r["stored"] for r in results) == 150
    assert all(r["stored"] + r["duplicates"] == 150 for r in results)
    df = store.episodes_df("same")
    assert len(df) == 150 and not df.duplicated(["task_id", "trial"]).any()


def test_reader_while_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'rw.db'}"
    store = Store(url)
    _new_run(store, "w")
    go, stop = tmp_path / "go", tmp_path / "stop"
    writer = _start(url, "write", "w", 400, go, stop)
    reader = _start(url, "read", "w", 0, go, stop)
    _wait_ready([writer, reader])
    go.touch()
    try:
        wrote = _result(writer)
    finally:
        stop.touch()
    read = _result(reader)
    assert wrote["stored"] == 400
    seen = read["seen"]
    assert read["reads"] >= 5, read["reads"]
    assert seen == sorted(seen), "a reader saw the row count go down"
    assert seen[-1] == 400
    assert any(0 < s < 400 for s in seen), f"reads never overlapped the writes: {seen[:5]}...{seen[-5:]}"


def test_store_opens_a_database_whose_schema_another_process_is_creating(tmp_path):
    """Deterministic form of the race between processes opening a fresh database at once: another
    connection holds the write lock while creating the tables; Store() checks (no tables yet),
    waits for the lock to CREATE, and must cope with finding them created."""
    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN IMMEDIATE")
    ddl_engine = create_engine(f"sqlite:///{path}")
    for table in Base.metadata.sorted_tables:
        other.execute(str(CreateTable(table).compile(ddl_engine)))
    outcome: dict = {}

    def open_store() -> None:
        try:
            store = Store(f"sqlite:///{path}")
            _new_run(store, "after-race")
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    thread = threading.Thread(target=open_store)
    thread.start()
    time.sleep(1.0)  # Store() has checked the schema and now waits for the write lock
    other.execute("COMMIT")
    thread.join(60)
    other.close()
    ddl_engine.dispose()
    assert not thread.is_alive()
    assert outcome == {"ok": True}, outcome


def test_an_eval_waits_out_a_lock_held_past_the_busy_timeout(tmp_path):
    """A real `harness eval` with a 0.2 s busy timeout; mid-run another connection holds the write
    lock for 4 s. Groups that finish meanwhile meet "database is locked", wait and are written
    after the release: the run finishes with every episode stored once."""
    db_file = tmp_path / "locked.db"
    tasks, trials = [str(i) for i in range(10)], 2
    with FakeOpenAIServer(Delayed(TauPolicy("fake-agent", "fake-user"), 0.05)) as server:
        cmd = [sys.executable, "-m", "harness.cli", "eval", "--env", "tau-airline", "--model", "openai/fake-agent",
               "--user-model", "openai/fake-user", "--api-base", server.base_url, "--tasks", ",".join(tasks),
               "--trials", str(trials), "--concurrency", "2", "--run", "lk", "--db", f"sqlite:///{db_file}?timeout=0.2",
               "--quiet", "--max-retries", "1", "--retry-backoff", "0.01", "--timeout", "30"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OPENAI_API_KEY": ""})
        try:
            deadline = time.monotonic() + 120
            while _count(db_file) < 2:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "no episodes stored after 120 s"
                time.sleep(0.05)
            other = sqlite3.connect(db_file, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            locked_at = _count(db_file)
            time.sleep(4.0)
            assert proc.poll() is None, "the eval ended while the database was locked"
            assert _count(db_file) == locked_at  # nothing could be written meanwhile
            other.execute("COMMIT")
            other.close()
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "locked" not in err, err[-3000:]
    with sqlite3.connect(db_file) as con:
        rows = con.execute("SELECT task_id, trial FROM episodes").fetchall()
    assert sorted(rows) == sorted((t, n) for t in tasks for n in range(trials))
