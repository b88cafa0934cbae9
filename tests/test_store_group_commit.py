"""Group commit of episodes (``Store.add_episodes``, ``EpisodeWriter``): a burst of finished
episodes shares one transaction, every episode still gets its own outcome (stored, infra row
replaced, or DuplicateEpisodeError), nothing handed over is lost on cancellation, and a group that
meets a locked database waits and is written (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from harness.store import DuplicateEpisodeError, EpisodeWriter, StorageError, Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage


def _ep(task: str, trial: int = 0, reward: float = 1.0, error_class=ErrorClass.NONE) -> EpisodeResult:
    return EpisodeResult(
        task_id=task, trial=trial, seed=trial, messages=[{"role": "assistant", "content": f"hi {task}"}],
        termination=Termination.USER_STOP, score=Score(reward=reward, success=reward == 1.0),
        error_class=error_class, error="HTTP 500" if error_class is ErrorClass.INFRA else None,
        agent_usage=Usage(prompt_tokens=10, calls=1), user_usage=Usage(completion_tokens=5, calls=1),
        llm_calls=[{"role": "agent", "model": "m", "attempts": 1}])


def _new_store(url: str) -> Store:
    s = Store(url)
    s.create_run("r", kind="eval", env="tau-airline", data_version="tau3", split="base", agent="litellm",
                 agent_model="m", user="litellm", user_model="u", config={})
    return s


@pytest.fixture
def store(db_url):
    s = _new_store(db_url)
    yield s
    s.close()


def _rows(store: Store) -> dict[tuple[str, int], float]:
    df = store.episodes_df("r")
    return {(t, n): r for t, n, r in zip(df.task_id, df.trial, df.reward)}


def test_add_episodes_one_transaction_and_per_episode_outcomes(store):
    assert store.add_episodes("r", [_ep(str(i)) for i in range(5)]) == [None] * 5
    store.add_episode("r", _ep("9", error_class=ErrorClass.INFRA, reward=0.0))
    # A group mixing a new episode, a retried infra failure and a real duplicate: the first two
    # are stored, the duplicate is reported (not raised) and the stored row is untouched.
    outcomes = store.add_episodes("r", [_ep("5"), _ep("9", reward=1.0), _ep("0", reward=0.0)])
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], DuplicateEpisodeError)
    rows = _rows(store)
    assert len(rows) == 7 and rows[("9", 0)] == 1.0 and rows[("0", 0)] == 1.0
    assert store.episodes_df("r").error_class.tolist().count("infra") == 0
    with pytest.raises(DuplicateEpisodeError):
        store.add_episode("r", _ep("5"))
    assert store.get_episode("r", "5", 0).llm_calls == [{"role": "agent", "model": "m", "attempts": 1}]


def test_writer_groups_a_burst_and_reports_duplicates(store):
    async def main() -> EpisodeWriter:
        writer = EpisodeWriter(store, "r", window=0.01)
        await asyncio.gather(*(writer.add(_ep(str(i))) for i in range(40)))
        with pytest.raises(DuplicateEpisodeError):
            await writer.add(_ep("3"))
        await writer.add(_ep("3", trial=1))
        return writer

    writer = asyncio.run(main())
    assert writer.groups == 3  # the burst of 40 in one transaction, then one each
    assert len(_rows(store)) == 41


def test_writer_commits_before_add_returns(store):
    async def main() -> None:
        writer = EpisodeWriter(store, "r")
        await writer.add(_ep("1"))
        assert ("1", 0) in _rows(store)  # durable as soon as add() returns

    asyncio.run(main())


def test_cancelled_run_still_writes_handed_over_episodes(store):
    async def main() -> None:
        writer = EpisodeWriter(store, "r", window=5.0)  # a group that would wait long
        adds = [asyncio.create_task(writer.add(_ep(str(i)))) for i in range(10)]
        await asyncio.sleep(0.05)
        for t in adds:
            t.cancel()
        writer._task.cancel()  # what asyncio.run does to leftover tasks on Ctrl-C
        await asyncio.gather(*adds, writer._task, return_exceptions=True)

    asyncio.run(main())
    assert len(_rows(store)) == 10


def test_writer_failure_reaches_every_waiting_episode(store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "add_episodes", broken)

    async def main() -> list:
        writer = EpisodeWriter(store, "r")
        return await asyncio.gather(*(writer.add(_ep(str(i))) for i in range(3)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [str(o) for o in outcomes] == ["disk full"] * 3


def _hold_exclusive_lock(path, seconds: float) -> threading.Event:
    """Another connection takes SQLite's exclusive lock on ``path`` for ``seconds`` (in a thread);
    the returned event is set once the lock is held."""
    held = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    return held


def _write_twenty(writer: EpisodeWriter) -> list:
    async def main() -> list:
        return await asyncio.gather(*(writer.add(_ep(str(i))) for i in range(20)), return_exceptions=True)

    return asyncio.run(main())


def test_a_lock_held_past_the_busy_timeout_delays_the_group_and_loses_nothing(tmp_path):
    """The busy timeout is 0.1 s; another connection holds the lock 1.5 s: each attempt fails with
    "database is locked", the writer waits and tries again, and every episode is stored."""
    path = tmp_path / "h.db"
    store = _new_store(f"sqlite:///{path}?timeout=0.1")
    _hold_exclusive_lock(path, 1.5)
    started = time.monotonic()
    outcomes = _write_twenty(EpisodeWriter(store, "r"))
    assert outcomes == [None] * 20
    assert time.monotonic() - started > 1.0  # it really waited for the lock
    assert len(_rows(store)) == 20


def test_a_lock_held_past_the_writers_patience_fails_every_episode_loudly(tmp_path):
    path = tmp_path / "h.db"
    store = _new_store(f"sqlite:///{path}?timeout=0.1")
    _hold_exclusive_lock(path, 3.0)
    outcomes = _write_twenty(EpisodeWriter(store, "r", lock_wait=0.5))
    assert all(isinstance(o, StorageError) for o in outcomes), outcomes
    message = str(outcomes[0])
    assert "database is locked" in message and "20 finished episode(s) were not stored" in message
    assert str(path) in message and "\n" not in message
    time.sleep(3.0)
    assert _rows(store) == {}  # the group is all or nothing
