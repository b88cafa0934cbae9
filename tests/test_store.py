"""SQL store on real SQLite files and a real PostgreSQL server (``db_url`` runs a test on both)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from harness.errors import ConfigError, HarnessError
from harness.results.episode_export import export_episodes
from harness.store import (
    DuplicateEpisodeError,
    RunRecord,
    StorageError,
    Store,
    add_checkpoint,
    checkpoints,
    code_version,
    get_guidance,
    guidance_df,
    log_train_step,
    put_guidance,
    train_steps,
)
from harness.store.records import graded_rows, iter_full_episodes, rewrite_scores
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage


def _episode(task_id="3", trial=0, reward=1.0, error_class=ErrorClass.NONE, **kw) -> EpisodeResult:
    return EpisodeResult(
        task_id=task_id, trial=trial, seed=300 + trial,
        messages=[{"role": "system", "content": "policy"}, {"role": "user", "content": "Hi — ünïcode"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "get_user_details", "arguments": "{\"user_id\": \"x\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "{}"}],
        termination=kw.pop("termination", Termination.USER_STOP),
        score=Score(reward=reward, success=reward == 1.0, breakdown={"db": True, "communicate": [1.0]}),
        error_class=error_class, error=kw.pop("error", None),
        agent_usage=Usage(prompt_tokens=1000, completion_tokens=50, cost=0.012, calls=3, llm_seconds=2.5),
        user_usage=Usage(prompt_tokens=400, completion_tokens=20, cost=0.001, calls=2, llm_seconds=0.5),
        wall_seconds=4.0, env_seconds=0.25, group_id=kw.pop("group_id", "g-1"), **kw)


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'sub' / 'h.db'}")
    yield s
    s.close()


def _run(store, name="r1", **kw) -> RunRecord:
    args = dict(kind="eval", env="tau-airline", data_version="tau3", split="base", agent="litellm",
                agent_model="openai/gpt-4.1-mini", user="llm", user_model="openai/gpt-4.1",
                config={"trials": 4, "temperature": 0.0})
    args.update(kw)
    return store.create_run(name, **args)


def test_sqlite_file_wal_and_foreign_keys(tmp_path, sqlite_store):
    assert (tmp_path / "sub" / "h.db").is_file()
    with sqlite_store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    # The mode is persistent in the file, as any other client sees it.
    with sqlite3.connect(tmp_path / "sub" / "h.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_url_is_results_dir_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Store()
    _run(s)
    s.close()
    assert (tmp_path / "results" / "harness.db").is_file()


def test_run_lifecycle(store):
    rec = _run(store)
    assert rec.status == "running" and rec.finished_at is None and rec.config["trials"] == 4
    assert rec.code_version == code_version() and rec.code_version
    with pytest.raises(ConfigError, match="already exists"):
        _run(store)
    with pytest.raises(ConfigError, match="kind"):
        _run(store, name="x", kind="play")
    store.set_run_status("r1", "finished")
    got = store.get_run("r1")
    assert got.status == "finished" and got.finished_at is not None
    assert store.get_run(rec.id).name == "r1"
    _run(store, name="r2")
    assert [r.name for r in store.list_runs()] == ["r1", "r2"]
    with pytest.raises(ConfigError, match="status"):
        store.set_run_status("r1", "done")
    store.set_run_status("r1", "failed", "no episode was scored")
    assert (store.get_run("r1").status, store.get_run("r1").status_reason) == ("failed", "no episode was scored")
    store.set_run_status("r1", "running")  # a resume clears the reason
    assert (store.get_run("r1").status, store.get_run("r1").status_reason) == ("running", None)


def test_run_names_by_prefix_reads_the_prefix_literally(store):
    """``run_names(prefix=)`` is how the viewer finds a train run's eval points; ``_`` and ``%`` in a
    run name are literal there, not SQL LIKE wildcards."""
    for name in ("a_b", "a_b/eval-step-000001", "axb/eval-step-000001", "a_b%", "zz"):
        _run(store, name=name)
    assert store.run_names(prefix="a_b/") == ["a_b/eval-step-000001"]
    assert store.run_names(prefix="a_b%") == ["a_b%"]
    assert store.run_names() == ["a_b", "a_b/eval-step-000001", "axb/eval-step-000001", "a_b%", "zz"]


def test_a_database_from_before_status_reason_gains_the_column(tmp_path):
    """Files written before ``runs.status_reason`` existed open as they are: the column is added,
    their runs read with no reason, and new reasons are stored."""
    path = tmp_path / "old.db"
    old = Store(f"sqlite:///{path}")
    _run(old)
    old.close()
    with sqlite3.connect(path) as raw:
        raw.execute("ALTER TABLE runs DROP COLUMN status_reason")  # the schema as it was
    reopened = Store(f"sqlite:///{path}")
    assert reopened.get_run("r1").status_reason is None
    reopened.set_run_status("r1", "interrupted", "SIGTERM")
    assert Store(f"sqlite:///{path}").get_run("r1").status_reason == "SIGTERM"


def test_unknown_run_lists_known_names(store):
    with pytest.raises(ConfigError, match="no runs yet"):
        store.get_run("nope")
    for i in range(12):
        _run(store, name=f"run-{i}")
    with pytest.raises(ConfigError) as err:
        store.get_run("nope")
    msg = str(err.value)
    assert "unknown run 'nope'" in msg and "run-11" in msg and "run-2" in msg and "run-1," not in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError):
        store.episodes_df("nope")


def test_episode_round_trip(store):
    _run(store)
    original = _episode()
    store.add_episode("r1", original)
    got = store.get_episode("r1", "3", 0)
    assert got == original
    assert isinstance(got.termination, Termination) and isinstance(got.error_class, ErrorClass)


def test_unique_run_task_trial(store):
    rec = _run(store)
    store.add_episode("r1", _episode(reward=0.0))
    with pytest.raises(DuplicateEpisodeError, match="task '3' trial 0"):
        store.add_episode("r1", _episode(reward=1.0))
    with pytest.raises(DuplicateEpisodeError):
        store.add_episode(rec.id, _episode(reward=1.0))
    assert issubclass(DuplicateEpisodeError, HarnessError)
    df = store.episodes_df("r1")
    assert len(df) == 1 and df.loc[0, "reward"] == 0.0
    # The schema itself refuses a second row, whatever the code path.
    with store.engine.begin() as conn:
        with pytest.raises(IntegrityError, match="(?i)unique"):
            conn.execute(text("INSERT INTO episodes (run_id, task_id, trial, seed, messages, termination, reward, "
                              "success, score_breakdown, error_class, agent_prompt_tokens, agent_completion_tokens, "
                              "agent_cost, agent_llm_calls, agent_llm_seconds, user_prompt_tokens, "
                              "user_completion_tokens, user_cost, user_llm_calls, user_llm_seconds, wall_seconds, "
                              "llm_seconds, env_seconds, created_at) VALUES (:r, '3', 0, 1, '[]', 'user_stop', 1, "
                              "TRUE, '{}', 'none', 0,0,0,0,0,0,0,0,0,0,0,0,0, '2024-01-01')"), {"r": rec.id})


def test_infra_episode_is_replaced_and_not_completed(store):
    _run(store)
    store.add_episode("r1", _episode(error_class=ErrorClass.INFRA, reward=0.0,
                                     termination=Termination.INFRASTRUCTURE_ERROR, error="429 rate limited"))
    store.add_episode("r1", _episode("10", 1))
    assert store.completed_keys("r1") == {("10", 1)}
    store.add_episode("r1", _episode(reward=1.0))
    df = store.episodes_df("r1")
    assert len(df) == 2 and list(df["task_id"]) == ["3", "10"]  # natural task order
    assert store.get_episode("r1", "3", 0).error_class == ErrorClass.NONE
    assert store.completed_keys("r1") == {("3", 0), ("10", 1)}


def test_episodes_df_columns(store):
    _run(store)
    assert list(store.episodes_df("r1").columns)[:3] == ["task_id", "trial", "seed"]
    store.add_episode("r1", _episode())
    row = store.episodes_df("r1").iloc[0]
    assert "messages" not in row.index
    assert row["agent_prompt_tokens"] == 1000 and row["user_cost"] == pytest.approx(0.001)
    assert row["llm_seconds"] == pytest.approx(3.0) and row["termination"] == "user_stop"
    assert bool(row["success"]) and row["error_class"] == "none"
    with pytest.raises(ConfigError, match="no episode"):
        store.get_episode("r1", "3", 7)


def test_foreign_key_enforced(store):
    with store.engine.begin() as conn, pytest.raises(IntegrityError, match="(?i)foreign key"):
        conn.execute(text("INSERT INTO episodes (run_id, task_id, trial, seed, messages, termination, reward, success, "
                          "score_breakdown, error_class, agent_prompt_tokens, agent_completion_tokens, agent_cost, "
                          "agent_llm_calls, agent_llm_seconds, user_prompt_tokens, user_completion_tokens, user_cost, "
                          "user_llm_calls, user_llm_seconds, wall_seconds, llm_seconds, env_seconds, created_at) "
                          "VALUES (999, '3', 0, 1, '[]', 'user_stop', 1, TRUE, '{}', 'none', "
                          "0,0,0,0,0,0,0,0,0,0,0,0,0, '2024-01-01')"))


def test_two_store_objects_share_one_database(db_url):
    a, b = Store(db_url), Store(db_url)
    _run(a)
    b.add_episode("r1", _episode())
    assert len(a.episodes_df("r1")) == 1
    a.close(), b.close()


def test_every_accessor_reads_back_what_it_wrote(store, tmp_path):
    """Training steps, checkpoints, guidance, re-grading and exports on each backend: JSON columns,
    upserts by delete-and-insert, first-writer-wins inserts and time stamps read back alike."""
    _run(store, name="t", kind="train")
    log_train_step(store, "t", 1, {"reward/mean": 0.5, "loss/policy": float("nan")})
    log_train_step(store, "t", 1, {"reward/mean": 0.75})  # a resumed run replays step 1
    log_train_step(store, "t", 2, {"reward/mean": 1.0})
    steps = train_steps(store, "t")
    assert steps["step"].tolist() == [1, 2] and steps["reward/mean"].tolist() == [0.75, 1.0]
    add_checkpoint(store, "t", 2, "/ckpt/a")
    add_checkpoint(store, "t", 2, "/ckpt/b")
    assert checkpoints(store, "t") == [(2, "/ckpt/b")]
    key = dict(digest="d" * 64, model="diff", prompt_version="v1")
    assert put_guidance(store, **key, task_id="3", run="t", status="ok", text="hint ü", cost_usd=0.01)
    assert not put_guidance(store, **key, task_id="3", run="t", status="ok", text="other")
    assert get_guidance(store, [("d" * 64, "diff", "v1")])[("d" * 64, "diff", "v1")]["text"] == "hint ü"
    assert len(guidance_df(store, "t")) == 1

    _run(store)
    store.add_episode("r1", _episode())
    store.add_episode("r1", _episode("4", reward=0.0))
    rows = graded_rows(store, "r1")
    rewrite_scores(store, "r1", [(rows[1], Score(reward=1.0, success=True, breakdown={"regraded": True}))])
    assert store.episodes_df("r1")["reward"].tolist() == [1.0, 1.0]
    full = list(iter_full_episodes(store, "r1"))
    assert full[0]["messages"][1]["content"] == "Hi — ünïcode" and full[1]["score_breakdown"] == {"regraded": True}
    assert full[0]["created_at"].tzinfo is None and store.get_run("r1").created_at.tzinfo is None
    out = export_episodes(store, "r1", tmp_path / "r1.jsonl", "jsonl")
    assert out.read_text().count("\n") == 2 and "+00:00" not in out.read_text()



def test_a_database_from_a_newer_harness_is_refused(db_url):
    """The schema checks read the catalog through SQLAlchemy: the same on PostgreSQL as on SQLite."""
    store = Store(db_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE harness_meta SET schema_version = schema_version + 1"))
    store.close()
    with pytest.raises(StorageError, match="made by a newer harness"):
        Store(db_url)


def test_another_programs_database_is_refused_and_left_alone(db_url):
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(url.database).parent.mkdir(parents=True)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (body TEXT)"))
    with pytest.raises(StorageError, match=r"not a harness database \(it holds other tables: notes\)"):
        Store(db_url)
    assert inspect(engine).get_table_names() == ["notes"]
    engine.dispose()
