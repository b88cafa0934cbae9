"""Group commit of episodes (``Store.add_episodes``, ``EpisodeWriter``): a burst of finished
episodes shares one transaction, every episode still gets its own outcome (stored, infra row
replaced, or DuplicateEpisodeError), and nothing handed over is lost on cancellation."""

from __future__ import annotations

import asyncio

import pytest

from harness.store import DuplicateEpisodeError, EpisodeWriter, Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage


def _ep(task: str, trial: int = 0, reward: float = 1.0, error_class=ErrorClass.NONE) -> EpisodeResult:
    return EpisodeResult(
        task_id=task, trial=trial, seed=trial, messages=[{"role": "assistant", "content": f"hi {task}"}],
        termination=Termination.USER_STOP, score=Score(reward=reward, success=reward == 1.0),
        error_class=error_class, error="HTTP 500" if error_class is ErrorClass.INFRA else None,
        agent_usage=Usage(prompt_tokens=10, calls=1), user_usage=Usage(completion_tokens=5, calls=1),
        llm_calls=[{"role": "agent", "model": "m", "attempts": 1}])


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'h.db'}")
    s.create_run("r", kind="eval", env="tau-airline", data_version="tau3", split="base", agent="litellm",
                 agent_model="m", user="litellm", user_model="u", config={})
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
