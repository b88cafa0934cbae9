"""Episode export (csv / jsonl / parquet) from a real SQLite store."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest

from harness.errors import ConfigError
from harness.results.episode_export import EPISODE_FORMATS, export_episodes
from harness.store import EPISODE_COLUMNS, Store
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage

HAS_PARQUET = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))


def _ep(task: str, trial: int, reward: float, infra: bool = False) -> EpisodeResult:
    messages = [{"role": "assistant", "content": "Hi! How can I help you today?"},
                {"role": "user", "content": f"task {task} trial {trial} — café"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_user_details", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "{}"}]
    return EpisodeResult(task_id=task, trial=trial, seed=100 + trial, messages=messages,
                         termination=Termination.INFRASTRUCTURE_ERROR if infra else Termination.USER_STOP,
                         score=Score(reward=reward, success=reward == 1.0,
                                     breakdown={"db_match": reward == 1.0, "communicate": {"x": True}}),
                         error_class=ErrorClass.INFRA if infra else ErrorClass.NONE,
                         error="HTTP 429" if infra else None, group_id=f"g{task}",
                         agent_usage=Usage(prompt_tokens=10, completion_tokens=2, cost=0.5, calls=1), wall_seconds=1.5)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'export.db'}")
    s.create_run("r", "eval", "tau-airline", "tau3", "base", "litellm", "m", "llm", "u",
                 {"trials": 2, "api_base": "http://localhost:8000/v1"})
    for task in ("10", "2", "0"):
        for trial in range(2):
            s.add_episode("r", _ep(task, trial, 1.0 if trial == 0 else 0.0))
    s.add_episode("r", _ep("2", 2, 0.0, infra=True))
    yield s
    s.close()


def test_csv_one_row_per_episode(store, tmp_path):
    out = export_episodes(store, "r", tmp_path / "sub" / "r.csv", "csv")
    df = pd.read_csv(out, dtype={"task_id": str})
    assert len(df) == 7 and list(df.columns) == EPISODE_COLUMNS
    assert list(zip(df["task_id"], df["trial"]))[:3] == [("0", 0), ("0", 1), ("2", 0)]  # natural order
    assert df["error_class"].tolist().count("infra") == 1
    assert df.loc[df["task_id"] == "10", "reward"].tolist() == [1.0, 0.0]
    assert set(df["group_id"]) == {"g0", "g2", "g10"}
    assert not (tmp_path / "sub" / "r.csv.part").exists()


def test_jsonl_lines_parse_and_carry_messages(store, tmp_path):
    out = export_episodes(store, "r", str(tmp_path / "r.jsonl"), "jsonl")
    lines = out.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 7
    assert [(r["task_id"], r["trial"]) for r in records] == [
        ("0", 0), ("0", 1), ("2", 0), ("2", 1), ("2", 2), ("10", 0), ("10", 1)]
    first = records[0]
    assert set(first) >= {*EPISODE_COLUMNS, "messages", "score_breakdown"}
    assert set(first) - {*EPISODE_COLUMNS, "messages", "score_breakdown"} <= {"llm_call_log"}
    assert first["messages"][1]["content"] == "task 0 trial 0 — café"
    assert first["messages"][2]["tool_calls"][0]["function"]["name"] == "get_user_details"
    assert first["score_breakdown"] == {"db_match": True, "communicate": {"x": True}}
    assert first["agent_prompt_tokens"] == 10 and first["seed"] == 100
    assert isinstance(first["created_at"], str) and first["created_at"][:2] == "20"
    infra = records[4]
    assert infra["error_class"] == "infra" and infra["error"] == "HTTP 429"
    # Run config is never exported.
    assert "api_base" not in out.read_text(encoding="utf-8")


def test_jsonl_batches(store, tmp_path, monkeypatch):
    import harness.results.episode_export as mod

    monkeypatch.setattr(mod, "_BATCH", 2)
    records = [json.loads(x)
               for x in export_episodes(store, "r", tmp_path / "b.jsonl", "jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["trial"]) for r in records][-3:] == [("2", 2), ("10", 0), ("10", 1)]


@pytest.mark.skipif(not HAS_PARQUET, reason="pyarrow / fastparquet not installed")
def test_parquet_round_trip(store, tmp_path):
    df = pd.read_parquet(export_episodes(store, "r", tmp_path / "r.parquet", "parquet"))
    assert len(df) == 7 and list(df.columns) == EPISODE_COLUMNS
    assert df["reward"].sum() == 3.0


@pytest.mark.skipif(HAS_PARQUET, reason="a parquet engine is installed")
def test_parquet_without_engine_says_what_to_install(store, tmp_path):
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        export_episodes(store, "r", tmp_path / "r.parquet", "parquet")
    assert not (tmp_path / "r.parquet").exists()


def test_bad_format_and_unknown_run(store, tmp_path):
    assert EPISODE_FORMATS == ("csv", "jsonl", "parquet")
    with pytest.raises(ConfigError, match="supported: csv, jsonl, parquet"):
        export_episodes(store, "r", tmp_path / "x", "xlsx")
    with pytest.raises(ConfigError, match="unknown run"):
        export_episodes(store, "ghost", tmp_path / "x.csv", "csv")
    assert not (tmp_path / "x.csv").exists()


def test_empty_run(store, tmp_path):
    store.create_run("empty", "eval", "tau-airline", "tau3", "base", "litellm", "m", "llm", "u", {})
    assert list(pd.read_csv(export_episodes(store, "empty", tmp_path / "e.csv", "csv")).columns) == EPISODE_COLUMNS
    assert export_episodes(store, "empty", tmp_path / "e.jsonl", "jsonl").read_text() == ""
