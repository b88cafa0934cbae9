"""The result plots: held-out intervals on a 0-1 axis, panels that carry nothing left out (and
named), 16 runs in 16 colours with the legend outside the data, a title that fits.

Real SQLite stores, written the way ``trainers/loop.py`` and ``trainers/evaluate.py`` write them (a
train run with one ``train_steps`` row per step, its held-out evaluations as eval runs
``<run>/eval-step-N`` linked by ``config.train_run``); the assertions read the matplotlib figures
the commands save.
"""

from __future__ import annotations

import pytest
from matplotlib.colors import to_hex
from matplotlib.text import Text
from typer.testing import CliRunner

from harness.cli import app
from harness.results import stats
from harness.results.curves import curves_figure, curves_frame, plot_run_curves
from harness.results.plots import RUN_COLOURS, held_out_intervals
from harness.results.train_compare import compare_figure, compare_title, eval_step_run, load_steps
from harness.store import Store, log_train_step
from harness.types import EpisodeResult, ErrorClass, Score, Termination, Usage

# Per-task outcomes (one reward per trial) of the held-out evaluations of train run "r".
EVALS = {
    0: {"t0": [1, 1], "t1": [1, 0], "t2": [0, 0], "t3": [0, 1]},  # task rates 1, .5, 0, .5
    2: {"t0": [1, 1], "t1": [1, 1], "t2": [0, 1], "t3": [0, 0]},  # 1, 1, .5, 0
    4: {"t0": [1, 1], "t1": [1, 1], "t2": [1, 1], "t3": [1, 1]},  # all solved: the interval is (1, 1)
}
# Train metrics of steps 1..4: three of them carry nothing worth a panel.
TRAIN = {"reward/mean": [0.2, 0.4, 0.5, 0.7], "entropy": [1.5, 1.4, 1.3, 1.2], "clip/frac": [0.0] * 4,
         "loss/policy": [1e-8, -2e-8, 3e-8, 0.5e-8]}
NOT_DRAWN = "not drawn: loss/policy (flat: range 5e-08), clip/frac (constant 0), sft/loss (1 point)"


def _episode(task: str, trial: int, reward: float) -> EpisodeResult:
    return EpisodeResult(task_id=task, trial=trial, seed=trial, messages=[{"role": "user", "content": "hi"}],
                         termination=Termination.AGENT_STOP, score=Score(reward=reward, success=reward == 1.0),
                         error_class=ErrorClass.NONE, agent_usage=Usage(), user_usage=Usage(), wall_seconds=0.1)


def _record(store: Store, run: str, train: dict[str, list[float]], evals: dict[int, dict[str, list[int]]],
            sft_loss: float | None = None) -> None:
    store.create_run(name=run, kind="train", env="toy", data_version="toy-v2", split="train", agent="hf",
                     agent_model="tiny-toy", user=None, user_model=None,
                     config={"train": {"env": "toy", "method": "grpo", "run": run}, "method_settings": {}})
    steps = max(len(v) for v in train.values())
    for step in range(steps + 1):
        metrics = {name: values[step - 1] for name, values in train.items() if step}
        if step == 0 and sft_loss is not None:
            metrics["sft/loss"] = sft_loss  # the warm start's last loss, logged once
        if step in evals:
            outcomes = [r for rewards in evals[step].values() for r in rewards]
            metrics |= {"eval/success": sum(outcomes) / len(outcomes), "eval/reward": sum(outcomes) / len(outcomes)}
            name = eval_step_run(run, step)
            store.create_run(name=name, kind="eval", env="toy", data_version="toy-v2", split="test", agent="hf",
                             agent_model="tiny-toy", user=None, user_model=None,
                             config={"train_run": run, "step": step, "temperature": 1.0, "trials": 2,
                                     "tasks": list(evals[step])})
            store.add_episodes(name, [_episode(task, i, float(r)) for task, rewards in evals[step].items()
                                      for i, r in enumerate(rewards)])
            store.set_run_status(name, "finished")
        log_train_step(store, run, step, metrics)
    store.set_run_status(run, "finished")


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    _record(store, "r", TRAIN, EVALS, sft_loss=2.3)
    return store


def _drawn(fig) -> list:
    return [ax for ax in fig.axes if ax.axison]


def test_curves_leave_out_empty_and_flat_panels_and_name_them(store):
    fig, not_drawn = curves_figure(curves_frame(store, "r"), "r", held_out_intervals(store, ["r"])["r"])
    assert [ax.get_title() for ax in _drawn(fig)] == [
        "reward/mean", "eval/success (95% CI over tasks)", "eval/reward", "entropy"]
    assert not_drawn == {"loss/policy": "flat: range 5e-08", "clip/frac": "constant 0", "sft/loss": "1 point"}
    assert fig.get_supxlabel() == NOT_DRAWN


def test_held_out_success_has_a_0_1_axis_and_the_task_bootstrap_interval(store):
    fig, _ = curves_figure(curves_frame(store, "r"), "r", held_out_intervals(store, ["r"])["r"])
    success = next(ax for ax in _drawn(fig) if ax.get_title().startswith("eval/success"))
    assert success.get_ylim() == (0.0, 1.0)
    bars = success.containers[0].lines[2][0].get_segments()
    found = {float(seg[0][0]): (float(seg[0][1]), float(seg[1][1])) for seg in bars}
    # the interval resamples tasks (4 per point), not the 8 episodes: the results tables' pass^1 CI
    expected = {step: stats.bootstrap_ci([sum(r) / len(r) for r in tasks.values()]) for step, tasks in EVALS.items()}
    assert found.keys() == expected.keys()
    for step, (low, high) in expected.items():
        assert found[step] == pytest.approx((low, high), abs=1e-12)
    assert expected[4] == (1.0, 1.0) and expected[0][0] < 0.5 < expected[0][1]
    # the other panels keep their own scale
    reward = next(ax for ax in _drawn(fig) if ax.get_title() == "reward/mean")
    assert reward.get_ylim() != (0.0, 1.0)


def test_named_metrics_are_drawn_even_when_flat(store, tmp_path):
    _, plot = plot_run_curves(store, "r", tmp_path / "c.png", ["clip/frac", "sft/loss"])
    assert plot.not_drawn == {} and plot.path.read_bytes()[:4] == b"\x89PNG"


def test_curves_command_says_which_panels_it_left_out(store, tmp_path):
    result = CliRunner().invoke(app, ["results", "curves", "r", "--db", store.url, "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-2:] == [f"plot: {tmp_path / 'c.png'}", NOT_DRAWN]


def _suite(store: Store, names: list[str]) -> None:
    for i, run in enumerate(names):
        # each run's held-out tasks: i % 4 of 4 solved at step 2, so bands differ between runs
        final = {f"t{t}": [1 if t < i % 4 else 0] for t in range(4)}
        _record(store, run, {"reward/mean": [0.1 * (i % 5), 0.1 * (i % 7)]},
                {0: {f"t{t}": [t % 2] for t in range(4)}, 2: final})


def test_sixteen_runs_get_sixteen_colours_and_a_legend_outside_the_panels(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'suite.db'}")
    runs = [f"suite-toy-s0-method{i:02d}" for i in range(16)]
    _suite(store, runs)
    steps = {run: load_steps(store, run) for run in runs}
    fig, not_drawn = compare_figure(steps, compare_title(runs), held_out_intervals(store, runs))
    fig.canvas.draw()  # constrained layout places panels, legend and title on draw
    success, reward = fig.axes
    assert not_drawn == {} and success.get_ylim() == (0.0, 1.0)
    colours = [to_hex(line.get_color()) for line in reward.lines]
    assert len(colours) == 16 and len(set(colours)) == 16 and set(colours) == {c.lower() for c in RUN_COLOURS}
    # one legend for the figure, one entry per run, clear of both panels and inside the image
    assert len(fig.legends) == 1 and not success.get_legend() and not reward.get_legend()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == runs
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_title()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0 and box.y1 <= fig.bbox.y1
    # each run's error bars are its task-bootstrap intervals, set side by side at each evaluation step
    bars = [sorted(c.lines[2][0].get_segments(), key=lambda seg: seg[0][0]) for c in success.containers]
    assert len(bars) == 16 and len({round(float(b[-1][0][0]), 9) for b in bars}) == 16
    assert all(abs(b[-1][0][0] - 2) < 0.5 and abs(b[0][0][0]) < 0.5 for b in bars)
    assert (bars[3][-1][0][1], bars[3][-1][1][1]) == pytest.approx(stats.bootstrap_ci([1, 1, 1, 0]), abs=1e-12)
    assert fig.get_suptitle() == "16 train runs suite-toy-s0-method*"


def test_a_long_title_is_wrapped_inside_the_figure(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'long.db'}")
    runs = [f"a-rather-long-run-name-from-a-sweep-over-learning-rates-{i}" for i in range(3)]
    _suite(store, runs)
    fig, _ = compare_figure({run: load_steps(store, run) for run in runs}, compare_title(runs))
    fig.canvas.draw()
    title = fig.get_suptitle()
    assert title.count("\n") >= 1 and all(run in title.replace("\n", " ") for run in runs)  # names kept whole
    box = next(t for t in fig.findobj(Text) if t.get_text() == title).get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1
