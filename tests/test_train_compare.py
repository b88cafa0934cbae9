"""``harness results compare`` on train runs: per-step held-out table, summary, overlaid PNG, errors.

Real SQLite files; the train runs are written the way ``trainers/loop.py`` writes them (a ``train``
run with ``train`` / ``method_settings`` config, one ``train_steps`` row per step, step 0 the
baseline evaluation) and their held-out evaluations as eval runs ``<run>/eval-step-N``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import ConfigError
from harness.results.train_compare import (
    compare_train_runs,
    default_plot_path,
    eval_step_run,
    load_steps,
    per_step_table,
    summary_table,
    train_runs,
)
from harness.store import Store, log_train_step
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# run -> (method, method settings, lr, {eval step: (success, reward)}, train reward/mean of steps 1..6)
RUNS = {
    "toy-grpo": ("grpo", {"normalize_std": True, "clip_high": 0.2}, 1e-3,
                 {0: (0.5, 0.6), 3: (0.6, 0.7), 6: (0.55, 0.65)}, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    "toy-sgcd": ("sgcd", {"normalize_std": True, "guide": "summary"}, 5e-4,
                 {0: (0.5, 0.6), 2: (0.7, 0.8), 4: (0.8, 0.9), 6: (0.8, 0.85)}, [0.2, 0.2, 0.4, 0.4, 0.6, 0.8]),
}
# Per-task outcomes of the final (step 6) held-out evaluation of each run.
FINAL_TASKS = {"toy-grpo": {"t0": 1.0, "t1": 0.0, "t2": 1.0}, "toy-sgcd": {"t0": 1.0, "t1": 1.0, "t2": 1.0}}


def _episode(task: str, reward: float) -> EpisodeResult:
    return EpisodeResult(task_id=task, trial=0, seed=0, messages=[{"role": "user", "content": "hi"}],
                         termination=Termination.AGENT_STOP,
                         score=Score(reward=reward, success=reward == 1.0), error_class=ErrorClass.NONE,
                         agent_usage=Usage(), user_usage=Usage(), wall_seconds=0.1)


def _train_run(store: Store, name: str, method: str, settings: dict, lr: float, evals: dict, rewards: list,
               summarizer_cost: float | None = None) -> None:
    store.create_run(name=name, kind="train", env="toy", data_version="toy-v2", split="train", agent="hf",
                     agent_model="tiny-toy", user=None, user_model=None,
                     config={"train": {"env": "toy", "method": method, "lr": lr, "seed": 0, "run": name},
                             "method_settings": settings})
    for step in range(len(rewards) + 1):
        metrics: dict = {}
        if step:
            metrics |= {"reward/mean": rewards[step - 1], "time/rollout": 1.0 + step, "time/update": 0.5,
                        "loss/policy": 0.01 * step}
            if summarizer_cost is not None:  # the method with a summarizer also logs its prepare time
                metrics |= {"summarizer/cost_usd": summarizer_cost, "time/prepare": 0.25}
        if step in evals:
            metrics |= {"eval/success": evals[step][0], "eval/reward": evals[step][1]}
        log_train_step(store, name, step, metrics)
    store.set_run_status(name, "finished")


def _eval_run(store: Store, train: str, step: int, outcomes: dict[str, float]) -> None:
    name = eval_step_run(train, step)
    store.create_run(name=name, kind="eval", env="toy", data_version="toy-v2", split="test", agent="hf",
                     agent_model="tiny-toy", user=None, user_model=None,
                     config={"train_run": train, "step": step, "temperature": 0.0, "trials": 1,
                             "tasks": list(outcomes)})
    for task, reward in outcomes.items():
        store.add_episode(name, _episode(task, reward))
    store.set_run_status(name, "finished")


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default PNG path is relative to the working directory
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    for name, (method, settings, lr, evals, rewards) in RUNS.items():
        _train_run(store, name, method, settings, lr, evals, rewards,
                   summarizer_cost=0.002 if name == "toy-sgcd" else None)
        _eval_run(store, name, 6, FINAL_TASKS[name])
    store.create_run(name="oracle", kind="eval", env="toy", data_version="toy-v2", split="test", agent="oracle",
                     agent_model=None, user=None, user_model=None, config={})
    store.add_episode("oracle", _episode("t0", 1.0))
    store.close()
    return url


def _tables(url: str):
    store = Store(url)
    runs = list(RUNS)
    steps = {run: load_steps(store, run) for run in runs}
    return per_step_table(steps), summary_table(store, runs, steps)


def test_per_step_table_has_every_eval_step_and_blanks(db):
    per_step, _ = _tables(db)
    assert per_step.index.name == "step" and list(per_step.index) == [0, 2, 3, 4, 6]
    assert list(per_step.columns) == ["eval/success toy-grpo", "eval/success toy-sgcd",
                                      "eval/reward toy-grpo", "eval/reward toy-sgcd"]
    assert list(per_step["eval/success toy-grpo"].fillna(-1)) == pytest.approx([0.5, -1, 0.6, -1, 0.55])
    assert list(per_step["eval/success toy-sgcd"].fillna(-1)) == pytest.approx([0.5, 0.7, -1, 0.8, 0.8])
    assert per_step.loc[6, "eval/reward toy-sgcd"] == pytest.approx(0.85)
    assert math.isnan(per_step.loc[2, "eval/reward toy-grpo"]) and math.isnan(per_step.loc[3, "eval/reward toy-sgcd"])


def test_summary_numbers(db):
    _, summary = _tables(db)
    assert list(summary.columns) == ["toy-grpo", "toy-sgcd"] and summary.index.name == "metric"
    row = summary.loc
    assert (row["method", "toy-grpo"], row["method", "toy-sgcd"]) == ("grpo", "sgcd")
    # Only the settings that differ are listed, as text (5e-4 must not print as 0.001).
    assert "settings/normalize_std" not in summary.index and "config/seed" not in summary.index
    assert row["settings/clip_high", "toy-grpo"] == "0.2" and row["settings/clip_high", "toy-sgcd"] is None
    assert row["settings/guide", "toy-sgcd"] == "summary"
    assert (row["config/lr", "toy-grpo"], row["config/lr", "toy-sgcd"]) == ("0.001", "0.0005")
    assert "config/run" not in summary.index
    assert row["steps", "toy-grpo"] == 6 and row["eval/last_step", "toy-sgcd"] == 6
    assert row["eval/success/step0", "toy-grpo"] == pytest.approx(0.5)
    assert row["eval/success/final", "toy-grpo"] == pytest.approx(0.55)
    assert row["eval/success/final", "toy-sgcd"] == pytest.approx(0.8)
    assert row["eval/success/delta", "toy-grpo"] == pytest.approx(0.05)
    assert row["eval/success/delta", "toy-sgcd"] == pytest.approx(0.3)
    assert row["eval/success/best", "toy-grpo"] == pytest.approx(0.6) and row["eval/success/best_step", "toy-grpo"] == 3
    # A tie (0.8 at steps 4 and 6) reports the first step that reached it.
    assert row["eval/success/best", "toy-sgcd"] == pytest.approx(0.8) and row["eval/success/best_step", "toy-sgcd"] == 4
    assert row["eval/reward/final", "toy-sgcd"] == pytest.approx(0.85)
    assert row["eval/reward/delta", "toy-sgcd"] == pytest.approx(0.25)
    assert row["eval/reward/delta", "toy-grpo"] == pytest.approx(0.05)
    assert row["reward/mean/last5", "toy-grpo"] == pytest.approx((0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 5)
    assert row["reward/mean/last5", "toy-sgcd"] == pytest.approx((0.2 + 0.4 + 0.4 + 0.6 + 0.8) / 5)
    assert row["time/total_seconds", "toy-grpo"] == pytest.approx(sum(1.0 + s + 0.5 for s in range(1, 7)))
    assert row["time/total_seconds", "toy-sgcd"] == pytest.approx(sum(1.0 + s + 0.5 + 0.25 for s in range(1, 7)))
    assert row["summarizer/total_cost", "toy-sgcd"] == pytest.approx(6 * 0.002)
    assert row["summarizer/total_cost", "toy-grpo"] is None  # not logged by that run: blank
    assert row["status", "toy-grpo"] == "finished"


def test_run_without_steps_or_eval_is_blank(db):
    store = Store(db)
    store.create_run(name="fresh", kind="train", env="toy", data_version="toy-v2", split="train", agent="hf",
                     agent_model="tiny-toy", user=None, user_model=None,
                     config={"train": {"method": "rloo"}, "method_settings": {}})
    steps = {run: load_steps(store, run) for run in ("toy-grpo", "fresh")}
    per_step = per_step_table(steps)
    assert per_step["eval/success fresh"].isna().all() and list(per_step.index) == [0, 3, 6]
    summary = summary_table(store, ["toy-grpo", "fresh"], steps)
    assert summary.loc["method", "fresh"] == "rloo" and summary.loc["steps", "fresh"] is None
    assert summary.loc["eval/success/final", "fresh"] is None


def test_compare_train_runs_writes_png_and_json(db, tmp_path):
    store = Store(db)
    lines: list[str] = []
    parts = compare_train_runs(store, list(RUNS), "json", out=str(tmp_path / "plots" / "c.png"), echo=lines.append)
    doc = json.loads("\n".join(lines))
    assert set(doc) == {"per_step", "summary", "plot"}
    assert [r["step"] for r in doc["per_step"]] == [0, 2, 3, 4, 6]
    assert doc["per_step"][1]["eval/success toy-grpo"] is None and doc["per_step"][1]["eval/success toy-sgcd"] == 0.7
    summary = {r["metric"]: r for r in doc["summary"]}
    assert summary["eval/success/best_step"] == {"metric": "eval/success/best_step", "toy-grpo": 3, "toy-sgcd": 4}
    assert summary["method"]["toy-sgcd"] == "sgcd"
    path = parts["plot"]
    assert doc["plot"] == str(path) and path == tmp_path / "plots" / "c.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_default_plot_path():
    assert str(default_plot_path(["toy-grpo", "toy-sgcd"])) == "results/compare-toy-grpo-vs-toy-sgcd.png"
    assert str(default_plot_path(["a/b", "c", "d"])) == "results/compare-a_b-vs-c-vs-d.png"
    # a train-suite's 15 runs: the joined name would pass the file system's 255-byte limit
    suite = [f"suite-toy-s0-{m}" for m in ["grpo", "dr_grpo", "dapo", "rloo", "sgcd", "rlcsd", "rlsd", "rlad",
                                           "oisd", "gspo", "tgc", "opsd", "sdpo", "opd", "grpo_kl"]]
    long = default_plot_path(suite)
    assert long.name.startswith("compare-suite-toy-s0-grpo-and-14-more-") and len(long.name.encode()) <= 200
    assert default_plot_path(suite) == long != default_plot_path(suite[:-1] + ["suite-toy-s0-other"])


def test_kinds_mixed_unknown_and_eval_only(db):
    store = Store(db)
    assert train_runs(store, ["toy-grpo", "toy-sgcd"]) is True
    assert train_runs(store, ["oracle", eval_step_run("toy-grpo", 6)]) is False
    with pytest.raises(ConfigError, match=r"cannot compare train runs \(toy-grpo\) with eval runs \(oracle\)"):
        train_runs(store, ["toy-grpo", "oracle"])
    with pytest.raises(ConfigError, match="unknown run 'ghost'"):
        train_runs(store, ["toy-grpo", "ghost"])
    with pytest.raises(ConfigError, match="distinct"):
        train_runs(store, ["toy-grpo", "toy-grpo"])


# -- through the CLI ----------------------------------------------------------------------------

runner = CliRunner()


def test_cli_table_prints_both_tables_and_png(db, tmp_path):
    result = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Held-out score per eval step" in out and "Train runs compared" in out
    assert "eval/success toy-grpo" in out and "eval/success/best_step" in out
    assert "+0.300" in out and "+0.050" in out  # deltas carry their sign
    step2 = next(line for line in out.splitlines() if line.startswith("│ 2 "))
    assert step2.split("│")[2].strip() == "-" and step2.split("│")[3].strip() == "0.700"  # blank for toy-grpo
    assert "plot: results/compare-toy-grpo-vs-toy-sgcd.png" in out
    assert (tmp_path / "results" / "compare-toy-grpo-vs-toy-sgcd.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_csv_markdown_json(db, tmp_path):
    csv = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--format", "csv",
                              "--out", str(tmp_path / "x.png")])
    assert csv.exit_code == 0, csv.output
    first, second = csv.stdout.strip().split("\n\n")
    assert first.splitlines()[0] == ("step,eval/success toy-grpo,eval/success toy-sgcd,"
                                     "eval/reward toy-grpo,eval/reward toy-sgcd")
    assert "2,,0.7,,0.8" in first.splitlines()
    assert second.splitlines()[0] == "metric,toy-grpo,toy-sgcd" and "method,grpo,sgcd" in second.splitlines()
    assert "plot:" not in csv.stdout and f"plot: {tmp_path / 'x.png'}" in csv.stderr
    md = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--format", "markdown"])
    assert md.exit_code == 0, md.output
    assert "| step | eval/success toy-grpo | eval/success toy-sgcd |" in md.stdout
    assert "| eval/success/delta | +0.050 | +0.300 |" in md.stdout
    js = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--format", "json"])
    assert js.exit_code == 0, js.output
    doc = json.loads(js.stdout)
    assert set(doc) == {"per_step", "summary", "plot"} and len(doc["per_step"]) == 5


def test_cli_episodes_reuses_eval_comparison(db):
    result = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--format", "json",
                                 "--episodes"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    episodes = {r["metric"]: r for r in doc["episodes"]}
    assert episodes["pass^1"]["toy-grpo/eval-step-000006"] == pytest.approx(2 / 3)
    assert episodes["pass^1"]["toy-sgcd/eval-step-000006"] == pytest.approx(1.0)
    assert [r["task_id"] for r in doc["episodes_per_task"]] == ["t1"]  # only the task that differs
    # A run whose final eval run is gone: a clear message, not a traceback.
    store = Store(db)
    store.delete_run(eval_step_run("toy-grpo", 6))
    gone = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--episodes"])
    assert gone.exit_code == 2 and "toy-grpo/eval-step-000006" in gone.stderr and "not in" in gone.stderr


def test_cli_errors(db, tmp_path):
    mixed = runner.invoke(app, ["results", "compare", "toy-grpo", "oracle", "--db", db])
    assert mixed.exit_code == 2 and "cannot compare train runs" in mixed.stderr and "oracle" in mixed.stderr
    unknown = runner.invoke(app, ["results", "compare", "toy-grpo", "ghost", "--db", db])
    assert unknown.exit_code == 2 and "unknown run 'ghost'" in unknown.stderr
    flags = runner.invoke(app, ["results", "compare", "oracle", eval_step_run("toy-sgcd", 6), "--db", db,
                                "--out", "x.png"])
    assert flags.exit_code == 2 and "train runs only" in flags.stderr
    # Eval runs keep the episode comparison.
    plain = runner.invoke(app, ["results", "compare", "oracle", eval_step_run("toy-sgcd", 6), "--db", db,
                                "--format", "csv"])
    assert plain.exit_code == 0 and "pass^1" in plain.stdout and "Train runs compared" not in plain.output
    # a plot path that cannot be written: one line, exit 2, nothing left behind
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    bad = runner.invoke(app, ["results", "compare", "toy-grpo", "toy-sgcd", "--db", db, "--format", "csv",
                              "--out", str(blocked / "x.png")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: cannot write") and len(bad.stderr.splitlines()) == 1
    assert blocked.read_text() == "not a directory"


def test_cli_subprocess(db, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "results", "compare", "toy-grpo", "toy-sgcd",
                           "--db", db], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Held-out score per eval step" in proc.stdout and "Train runs compared" in proc.stdout
    assert "plot: results/compare-toy-grpo-vs-toy-sgcd.png" in proc.stdout
    assert "Traceback" not in proc.stderr
