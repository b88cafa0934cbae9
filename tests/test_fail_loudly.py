"""Failing loudly (docs/reliability.md): a run that cannot do its work says so, stops paying for
calls, and exits non-zero with the reason and the command that resumes it.

Every test drives `harness eval` as a user does: a real subprocess, a real SQLite file, the real
litellm client (or the direct one) against the fake OpenAI-compatible server in this process."""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.tau_policy import Delayed, Switchable, TauPolicy

AGENT, USER = "fake-agent", "fake-user"
TASKS = [str(i) for i in range(10)]


def _harness(*args: str, timeout: float = 120, key: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _eval_args(server: FakeOpenAIServer, db: str, *extra: str) -> list[str]:
    return ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
            "--api-base", server.base_url, "--tasks", ",".join(TASKS), "--run", "r", "--db", db, "--quiet",
            "--max-retries", "2", "--retry-backoff", "0.01", "--timeout", "10", *extra]


def _query(db_file, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(db_file, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _run_row(db_file, run: str = "r") -> tuple:
    return _query(db_file, "SELECT status, status_reason FROM runs WHERE name = ?", run)[0]


def _episodes(db_file, run: str = "r") -> list[tuple]:
    return _query(db_file, "SELECT e.task_id, e.trial, e.error_class, e.error FROM episodes e JOIN runs r "
                           "ON e.run_id = r.id WHERE r.name = ?", run)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _resume(stderr: str) -> list[str]:
    """The arguments of the command the one error line says resumes the run."""
    line = _error_lines(stderr)[-1]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "harness"
    return command[1:]


@pytest.mark.parametrize("status, client", [(401, "litellm"), (403, "litellm"), (404, "litellm"), (401, "direct")])
def test_a_refused_key_or_model_stops_the_run_at_once(tmp_path, status, client):
    """401 / 403 / 404 will refuse every request alike: the run stops at the first refused episode
    (no retries, no further episodes), is stored as failed with the reason, exits 1 with one line,
    and the printed command resumes it once the key is fixed. (A key is given: a 401 to a request
    without one is a missing key, ``test_an_endpoint_that_needs_a_key_and_got_none_...``.)"""
    db_file = tmp_path / "refused.db"
    kind = f"HTTP {status}"
    db = f"sqlite:///{db_file}"
    policy = TauPolicy(AGENT, USER)
    provider = Switchable(policy, down=True, outage={"status": status, "message": "fake provider refuses"})
    with FakeOpenAIServer(provider) as server:
        proc = _harness(*_eval_args(server, db, "--concurrency", "1", "--llm-client", client), key="sk-wrong-0123456")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        assert "run r failed" in lines[0] and kind in lines[0] and "resume with: harness eval" in lines[0]
        stored = _episodes(db_file)
        assert len(stored) == 1 and stored[0][2] == "infra"  # stopped after the first episode
        assert provider.failed == 1  # a refusal is not retried, and nothing else was asked
        run_status, reason = _run_row(db_file)
        assert run_status == "failed" and kind in reason and "refused" in reason

        provider.down = False  # the key is fixed: the printed command finishes the run
        again = _harness(*_resume(proc.stderr))
        assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_episodes(db_file)) == sorted((t, 0, "none", None) for t in TASKS)
    assert _run_row(db_file) == ("finished", None)


@pytest.mark.parametrize("role", ["agent", "user"])
def test_an_endpoint_that_needs_a_key_and_got_none_stops_at_the_first_call_with_exit_2(tmp_path, role):
    """With --api-base (or --user-api-base) no key is required up front: local servers need none.
    An endpoint that does need one answers the first call 401; the run stops there with one line
    naming the endpoint and the key to set, exit 2 (bad input, not "exit 0 with everything failed"
    nor a failed run), keeps the refused episode as an infra error, and the printed command
    finishes it once the key is set. Through the real litellm client."""
    db_file = tmp_path / "nokey.db"
    db = f"sqlite:///{db_file}"
    key = "sk-local-server-0123"
    with FakeOpenAIServer(TauPolicy(AGENT, USER)) as open_server, \
            FakeOpenAIServer(TauPolicy(AGENT, USER), api_key=key) as needs_key:
        agent_base, user_base = (needs_key, open_server) if role == "agent" else (open_server, needs_key)
        args = [*_eval_args(agent_base, db, "--concurrency", "1"), "--user-api-base", user_base.base_url]
        proc = _harness(*args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        [line] = _error_lines(proc.stderr)
        assert f"{role} model 'openai/fake-{role}'" in line and needs_key.base_url in line
        assert "HTTP 401" in line and "set OPENAI_API_KEY" in line and "resume with: harness eval" in line
        assert needs_key.unauthorized == 1  # the first call, not retried; no other episode was played
        assert [e[2] for e in _episodes(db_file)] == ["infra"]
        assert _run_row(db_file)[0] == "failed"

        again = _harness(*_resume(proc.stderr), key=key)  # the key is set: the printed command finishes the run
        assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_episodes(db_file)) == sorted((t, 0, "none", None) for t in TASKS)


def test_consecutive_infra_errors_stop_the_run(tmp_path):
    """A provider that is down (HTTP 500 after every retry) stops the run after
    --max-consecutive-infra episodes in a row, instead of trying every task."""
    db_file = tmp_path / "down.db"
    db = f"sqlite:///{db_file}"
    provider = Switchable(TauPolicy(AGENT, USER), down=True)
    with FakeOpenAIServer(provider) as server:
        proc = _harness(*_eval_args(server, db, "--concurrency", "1", "--max-retries", "1",
                                    "--max-consecutive-infra", "3"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "3 episodes in a row" in lines[0] and "--run r" in lines[0], proc.stderr
    assert [e[2] for e in _episodes(db_file)] == ["infra"] * 3
    assert provider.failed == 3 * 2  # three episodes, one retry each, then nothing more
    run_status, reason = _run_row(db_file)
    assert run_status == "failed" and "3 episodes in a row" in reason and "InternalServerError" in reason


@pytest.mark.parametrize("flags", [
    ("--model", "opnai/gpt-4.1", "--user", "scripted"),
    ("--model", "openai/fake-agent", "--user-model", "opnai/fake-user", "--api-base", "http://127.0.0.1:9/v1"),
])
def test_an_unknown_provider_prefix_is_refused_before_any_run_row(tmp_path, flags):
    """A typo in a model's provider prefix (agent or user) is one line and exit 2 before the run
    row exists, so the corrected command is not refused as 'different settings'."""
    db_file = tmp_path / "typo.db"
    proc = _harness("eval", "--env", "tau-airline", *flags, "--tasks", "1", "--run", "typo", "--db",
                    f"sqlite:///{db_file}", "--quiet", "--max-retries", "0", "--timeout", "5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "opnai/" in lines[0] and "provider" in lines[0], proc.stderr
    assert not db_file.exists() or _query(db_file, "SELECT name FROM runs") == []


def test_duplicate_task_ids_are_refused_before_any_run_row(tmp_path):
    """`--tasks 0,1,0` would play task 0 twice and fail only when storing the second copy, after
    its calls were paid for: refused up front, one line, exit 2, no run row."""
    db_file = tmp_path / "dup.db"
    proc = _harness("eval", "--env", "tau-airline", "--model", "openai/fake-agent", "--user", "scripted",
                    "--api-base", "http://127.0.0.1:9/v1", "--tasks", "0,1", "--tasks", "0", "--run", "dup",
                    "--db", f"sqlite:///{db_file}", "--quiet", "--max-retries", "0", "--timeout", "5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "--tasks names 0 more than once" in lines[0], proc.stderr
    assert not db_file.exists() or _query(db_file, "SELECT name FROM runs") == []


def test_a_late_training_setting_error_leaves_no_run_row(tmp_path):
    """Settings `harness train` used to check only after creating the run row (the LR schedule,
    the policy directory) are refused before it: no zombie run blocks the name, and the corrected
    command starts the run under that name."""
    db_file = tmp_path / "t.db"
    common = ("train", "--env", "toy", "--run", "t", "--db", f"sqlite:///{db_file}", "--out-dir", str(tmp_path / "t"),
              "--steps", "1", "--tasks-per-step", "1", "--group-size", "2", "--eval-every", "0",
              "--max-new-tokens", "4")
    (tmp_path / "empty").mkdir()
    for bad, needle in ((("--policy", "tiny-toy", "--lr-schedule", "bogus"), "unknown --lr-schedule 'bogus'"),
                        (("--policy", str(tmp_path / "empty")), "without config.json")):
        proc = _harness(*common, *bad)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not db_file.exists() or _query(db_file, "SELECT name, status FROM runs") == []
    good = _harness(*common, "--policy", "tiny-toy")
    assert good.returncode == 0, good.stderr[-3000:]
    assert _query(db_file, "SELECT name, status FROM runs WHERE name = 't'") == [("t", "finished")]


def test_a_fresh_training_run_refused_after_the_model_loads_leaves_no_run_row(tmp_path):
    """Some settings can only be judged against the loaded model (here OISD's layer beyond the
    tiny policy's depth): the refusal comes after the run row, and the fresh run, which holds
    nothing, is removed instead of staying behind as `interrupted`."""
    pytest.importorskip("torch")
    from harness.errors import ConfigError
    from harness.store import Store
    from trainers.config import TrainConfig
    from trainers.loop import train

    db = f"sqlite:///{tmp_path}/h.db"
    cfg = TrainConfig(env="toy", policy="tiny-toy", method="oisd", method_overrides={"layer": 99}, run="o", db=db,
                      out_dir=str(tmp_path / "o"), steps=1, tasks_per_step=1, group_size=2, eval_every=0,
                      max_new_tokens=4)
    with pytest.raises(ConfigError, match="layer=99"):
        train(cfg, echo=lambda _: None)
    assert Store(db).list_runs() == []


def _stored(db_file) -> int:
    try:
        return _query(db_file, "SELECT COUNT(*) FROM episodes")[0][0]
    except sqlite3.OperationalError:  # no schema yet
        return 0


def _max_step(db_file, run: str) -> int:
    try:
        rows = _query(db_file, "SELECT MAX(s.step) FROM train_steps s JOIN runs r ON s.run_id = r.id "
                               "WHERE r.name = ?", run)
    except sqlite3.OperationalError:
        return -1
    return -1 if not rows or rows[0][0] is None else rows[0][0]


def _signal_when(proc: subprocess.Popen, ready, sig: int, what: str, timeout: float = 120) -> tuple[str, str]:
    """Send ``sig`` once ``ready()`` holds, then wait for the process to end; its (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _ctrl_c_reaches_python() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in the background
    (``nohup ... &``, a CI step) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the signal would be dropped, as it is for any program under nohup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_line(stderr: str, command: str) -> list[str]:
    """The one 'interrupted:' line, checked, and the arguments of the command it says resumes."""
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-3000:]
    args = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert args[:2] == ["harness", command], lines[0]
    return args[1:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_by_sigterm_or_ctrl_c_is_interrupted_and_says_how_to_resume(tmp_path, sig):
    """SIGTERM is handled as Ctrl-C: the run is `interrupted` (not left `running`), its finished
    episodes are kept, one line gives the command that resumes it (the run was named by the
    harness, so the line adds --run), the exit status is 128 + the signal; the command finishes it."""
    db_file = tmp_path / "sig.db"
    policy = TauPolicy(AGENT, USER)
    tasks = [str(i) for i in range(16)]
    with FakeOpenAIServer(Delayed(policy, 0.05)) as server:
        args = ["eval", "--env", "tau-airline", "--model", f"openai/{AGENT}", "--user-model", f"openai/{USER}",
                "--api-base", server.base_url, "--tasks", ",".join(tasks), "--concurrency", "2", "--db",
                f"sqlite:///{db_file}", "--quiet", "--max-retries", "1", "--retry-backoff", "0.01"]
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENAI_API_KEY": ""},
                                preexec_fn=_ctrl_c_reaches_python)
        _, err = _signal_when(proc, lambda: _stored(db_file) >= 3, sig, "3 stored episodes")
        assert proc.returncode == 128 + sig, err[-3000:]
        resume = _interrupted_line(err, "eval")
        ((name, status, reason),) = _query(db_file, "SELECT name, status, status_reason FROM runs")
        assert status == "interrupted" and signal.Signals(sig).name in reason, (status, reason)
        assert resume == [*args, "--run", name]
        kept = {(t, n) for t, n, *_ in _episodes(db_file, name)}
        assert 3 <= len(kept) < len(tasks)

        again = _harness(*resume)
        assert again.returncode == 0, again.stderr[-3000:]
    after = _episodes(db_file, name)
    assert sorted((t, n) for t, n, *_ in after) == sorted((t, 0) for t in tasks)  # each once
    assert {e[2] for e in after} == {"none"}
    assert _run_row(db_file, name) == ("finished", None)


def _start_long_training(tmp_path, checkpoint_every: int):
    """A 200-step toy training run started in the background: (db file, out dir, its args, process)."""
    db_file = tmp_path / "t.db"
    out = tmp_path / "t"
    args = ["train", "--env", "toy", "--policy", "tiny-toy", "--run", "t", "--db", f"sqlite:///{db_file}",
            "--out-dir", str(out), "--steps", "200", "--tasks-per-step", "2", "--group-size", "2",
            "--eval-every", "0", "--checkpoint-every", str(checkpoint_every), "--max-new-tokens", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_python)
    return db_file, out, args, proc


def test_train_stopped_by_sigterm_checkpoints_its_step_and_resumes(tmp_path):
    """SIGTERM during training: the current step ends, is checkpointed (never a half-written
    one), the run is `interrupted` with the reason, one line gives the command with --resume, exit
    143; that command continues from the checkpoint."""
    pytest.importorskip("torch")
    db_file, out, args, proc = _start_long_training(tmp_path, checkpoint_every=1000)
    _, err = _signal_when(proc, lambda: _max_step(db_file, "t") >= 2, signal.SIGTERM, "train step 2")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    resume = _interrupted_line(err, "train")
    assert resume == [*args, "--resume"]
    last = _max_step(db_file, "t")
    assert 2 <= last < 200
    run_status, reason = _run_row(db_file, "t")
    assert run_status == "interrupted" and reason == f"stopped by SIGTERM after step {last}"
    # The step it stopped after is checkpointed (checkpoint_every would not have), completely.
    steps = [s for (s,) in _query(db_file, "SELECT c.step FROM checkpoints c JOIN runs r ON c.run_id = r.id "
                                           "WHERE r.name = 't' ORDER BY c.step")]
    assert steps == [0, last]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000", f"step-{last:06d}"]
    assert (out / "checkpoints" / f"step-{last:06d}" / "trainer_state.pt").is_file()

    again = _harness(*resume, "--stop-after", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming t from {out / 'checkpoints' / f'step-{last:06d}'} (step {last})" in again.stdout
    assert _max_step(db_file, "t") == last + 1


def test_train_stopped_at_once_by_a_second_signal_resumes_from_a_whole_checkpoint(tmp_path):
    """Two signals (SIGTERM, then Ctrl-C) stop training at once, wherever it is, checkpoint saves
    included (one per step here): the run is `interrupted`, the line still gives the resume
    command, and --resume continues from the newest complete checkpoint (a `.tmp` left by a save
    cut short is never picked)."""
    pytest.importorskip("torch")
    db_file, out, args, proc = _start_long_training(tmp_path, checkpoint_every=1)

    def two_signals() -> bool:
        if _max_step(db_file, "t") < 2:
            return False
        proc.send_signal(signal.SIGTERM)  # the second one, below in _signal_when, stops at once
        return True

    _, err = _signal_when(proc, two_signals, signal.SIGINT, "train step 2")
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err[-3000:]
    resume = _interrupted_line(err, "train")
    assert resume == [*args, "--resume"]
    run_status, reason = _run_row(db_file, "t")
    assert run_status == "interrupted" and reason.startswith("stopped at once by "), reason
    complete = sorted(p.name for p in (out / "checkpoints").iterdir()
                      if not p.name.endswith(".tmp") and (p / "trainer_state.pt").is_file())
    newest = int(complete[-1].split("-")[1])
    logged = _max_step(db_file, "t")
    assert 1 <= newest <= logged  # a step is logged, then checkpointed: the save may have been cut

    again = _harness(*resume, "--stop-after", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {newest})" in again.stdout
    assert _max_step(db_file, "t") == max(logged, newest + 1)  # a step played again replaces its row
    assert (out / "checkpoints" / f"step-{newest + 1:06d}" / "trainer_state.pt").is_file()


def test_train_suite_stopped_by_sigterm_marks_its_arm_interrupted_and_resumes(tmp_path):
    """SIGTERM during `harness train-suite`: the arm being trained ends its step with a checkpoint
    and is `interrupted` (not left `running`), no later arm starts, one line gives the suite's own
    command with --resume (named by --prefix), exit 143; that command finishes every arm."""
    pytest.importorskip("torch")
    db_file = tmp_path / "suite.db"
    args = ["train-suite", "--methods", "grpo,rloo", "--env", "toy", "--db", f"sqlite:///{db_file}",
            "--out-dir", str(tmp_path / "suite"), "--steps", "5", "--tasks-per-step", "2", "--group-size", "2",
            "--warm-start", "0", "--eval-every", "0", "--max-new-tokens", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = _signal_when(proc, lambda: _max_step(db_file, "suite-toy-s0-grpo") >= 1, signal.SIGTERM,
                          "train step 1 of the first arm")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM during grpo (run suite-toy-s0-grpo" in lines[0], lines[0]
    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume == ["harness", *args, "--prefix", "suite-toy-s0", "--resume"]
    assert _query(db_file, "SELECT name, status FROM runs WHERE kind = 'train'") == [
        ("suite-toy-s0-grpo", "interrupted")]  # the second arm never started

    again = _harness(*resume[1:], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_query(db_file, "SELECT name, status FROM runs WHERE kind = 'train'")) == [
        ("suite-toy-s0-grpo", "finished"), ("suite-toy-s0-rloo", "finished")]


@pytest.mark.parametrize("command", ["train", "train-suite"])
def test_sigterm_during_the_warm_start_stops_at_once(tmp_path, command):
    """The warm start has no step boundary to wait for: SIGTERM (a scheduler's, with its grace
    period) ends it within seconds, not after its supervised steps (hours at this count). train
    marks the run `interrupted` before its first checkpoint; both print one resume line, exit 143."""
    pytest.importorskip("torch")
    db_file = tmp_path / "w.db"
    common = ["--env", "toy", "--db", f"sqlite:///{db_file}", "--warm-start", "100000", "--steps", "2",
              "--tasks-per-step", "2", "--group-size", "2", "--eval-every", "0", "--max-new-tokens", "8"]
    if command == "train":
        args = ["train", "--policy", "tiny-toy", "--run", "w", "--out-dir", str(tmp_path / "w"), *common]
    else:
        args = ["train-suite", "--methods", "grpo", "--out-dir", str(tmp_path / "suite"), *common]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_python)

    def ready() -> bool:  # the run row (train) or the built start model (train-suite) exists
        if command == "train-suite":
            return (tmp_path / "suite" / "init-tiny-toy" / "config.json").exists()
        try:
            return _query(db_file, "SELECT status FROM runs WHERE name = 'w'") == [("running",)]
        except sqlite3.OperationalError:  # the schema is not there yet
            return False

    _, err = _signal_when(proc, ready, signal.SIGTERM, "the warm start")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if command == "train":
        status, reason = _run_row(db_file, "w")
        assert status == "interrupted" and reason.startswith("stopped at once by SIGTERM before its first checkpoint")
    else:
        assert not (tmp_path / "suite" / "start").exists()  # no half-trained start model is kept


def test_sft_stopped_by_sigterm_says_so_and_saves_no_half_trained_model(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "sft"
    args = ["sft", "--env", "toy", "--policy", "tiny-toy", "--out", str(out), "--steps", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # the built start model exists: training has begun (it runs for hours at this step count)
    _, err = _signal_when(proc, lambda: (out / "init-tiny-toy" / "config.json").exists(), signal.SIGTERM,
                          "the start model")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: sft stopped by SIGTERM before saving the fine-tuned model to {out}; "
                     "run the same command again"], err[-3000:]
    assert not (out / "config.json").exists()


def test_a_run_name_too_long_for_the_runs_table_is_refused_before_any_row(tmp_path):
    """`runs.name` holds 200 characters (PostgreSQL enforces it, SQLite would not): a longer eval
    run name, or a train run name whose evaluation points (`<name>/eval-step-N`) would not fit,
    is one line and exit 2 with no run row, on SQLite too."""
    db_file = tmp_path / "long.db"
    db = f"sqlite:///{db_file}"
    proc = _harness("eval", "--env", "toy", "--agent", "oracle", "--run", "r" * 201, "--db", db, "--quiet")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == ["error: run name has 201 characters; use 1 to 200 characters"]
    proc = _harness("train", "--env", "toy", "--policy", "tiny-toy", "--run", "t" * 190, "--db", db,
                    "--out-dir", str(tmp_path / "t"), "--steps", "1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == ["error: run name has 190 characters; use 1 to 183 characters"]
    assert _query(db_file, "SELECT COUNT(*) FROM runs") == [(0,)]
