"""A training run owns its name, its directory and its checkpoints (docs/reliability.md "Ownership").

Two run names never share a directory; a directory or a checkpoint of another run is refused with
one line before any episode plays; resume follows the run's own checkpoint rows; ``harness eval``
never deletes a train run or one of its evaluation points. Real SQLite files, the real command
where a user meets the behaviour.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from harness.errors import ConfigError  # noqa: E402
from harness.store import Store, checkpoints, train_steps  # noqa: E402
from trainers.config import TrainConfig, default_run_dir  # noqa: E402
from trainers.loop import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = ("--env", "toy", "--policy", "tiny-toy", "--steps", "1", "--tasks-per-step", "2", "--group-size", "2",
       "--eval-every", "0", "--max-new-tokens", "8")


def _harness(cwd: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """The command run from ``cwd`` (so the default run directory lands under it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one ``error:`` line holding every needle; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _cfg(tmp_path: Path, run: str, **kw) -> TrainConfig:
    base = TrainConfig(env="toy", policy="tiny-toy", run=run, db=f"sqlite:///{tmp_path}/h.db",
                       out_dir=str(tmp_path / run), steps=2, tasks_per_step=2, group_size=2, eval_every=0,
                       max_new_tokens=8, checkpoint_every=1, seed=3, quiet=True)
    return replace(base, **kw)


def _quiet(_line: str) -> None:
    pass


def test_run_names_map_to_distinct_single_directories():
    names = ["toy-grpo", "A.b-c_9", "col/x", "col_x", "col%2Fx", "col%x", "%", "%25", "a b", "a:b", ".", "..",
             "x/..", "../x", "ä", "a\\b", "a/eval-step-000000"]
    dirs = [default_run_dir(n) for n in names]
    assert len(set(dirs)) == len(names), dirs
    for d in dirs:  # one component right under results/runs, never . or ..
        assert d.parent == Path("results") / "runs" and d.name not in ("", ".", "..") and "/" not in d.name, d
        assert "\\" not in d.name and ":" not in d.name and " " not in d.name, d
    # plain names keep the documented paths
    assert default_run_dir("toy-grpo") == Path("results/runs/toy-grpo")
    assert default_run_dir("A.b-c_9") == Path("results/runs/A.b-c_9")
    with pytest.raises(ConfigError, match="--out-dir"):
        default_run_dir("x" * 300)



def test_the_owner_file_names_the_database_without_credentials():
    from trainers.ownership import public_db_url

    assert public_db_url("postgresql+psycopg://alice:s3cret@db.example:5432/harness") == \
        "postgresql+psycopg://db.example:5432/harness"
    assert public_db_url("sqlite:///results/harness.db") == "sqlite:///results/harness.db"

def test_col_slash_x_and_col_underscore_x_keep_their_own_directories(tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/h.db"
    proc = _harness(tmp_path, "train", *TOY, "--run", "col/x", "--db", db, "--quiet", check=True)
    assert "results/runs/col%2Fx/checkpoints/step-000001" in proc.stdout
    monkeypatch.chdir(tmp_path)  # the default run directory is relative to the working directory
    train(_cfg(tmp_path, "col_x", out_dir=None, db=db, steps=1), echo=_quiet)
    store = Store(db)
    paths = {run: (tmp_path / checkpoints(store, run)[-1][1]).resolve() for run in ("col/x", "col_x")}
    assert paths["col/x"] != paths["col_x"]
    assert paths["col/x"].parents[1].name == "col%2Fx" and paths["col_x"].parents[1].name == "col_x"
    for run, path in paths.items():
        run_dir = path.parents[1]
        assert run_dir.parent == (tmp_path / "results" / "runs").resolve()
        assert json.loads((run_dir / "run.json").read_text())["run"] == run
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000", "step-000001"]


def test_a_directory_that_belongs_to_another_run_is_refused(tmp_path):
    db, fresh = f"sqlite:///{tmp_path}/h.db", f"sqlite:///{tmp_path}/fresh.db"
    out = tmp_path / "shared"
    train(_cfg(tmp_path, "a", out_dir=str(out), steps=1), echo=_quiet)
    owner = json.loads((out / "run.json").read_text())
    assert owner["run"] == "a" and owner["db"] == db
    before = sorted(str(p) for p in out.rglob("*"))

    # another run of the same database, from the command line: one line, exit 2, nothing written
    _refused(_harness(tmp_path, "train", *TOY, "--run", "b", "--db", db, "--out-dir", str(out)),
             str(out), "run 'a'", "--out-dir", "--run")
    # the same name in a fresh database
    _refused(_harness(tmp_path, "train", *TOY, "--run", "a", "--db", fresh, "--out-dir", str(out)),
             str(out), "run 'a'", db, "--out-dir")
    assert [r.name for r in Store(db).list_runs()] == ["a"] and Store(fresh).list_runs() == []
    assert sorted(str(p) for p in out.rglob("*")) == before
    # a run resumed into another run's directory
    train(_cfg(tmp_path, "c", steps=1), echo=_quiet)
    with pytest.raises(ConfigError, match=re.escape(f"{out} belongs to run 'a'") + ".*not to the resumed run 'c'"):
        train(_cfg(tmp_path, "c", out_dir=str(out), resume=True), echo=_quiet)
    # checkpoints without an owner file (written before owners were recorded) belong to someone
    (out / "run.json").unlink()
    with pytest.raises(ConfigError, match=re.escape(f"{out} holds checkpoints of an earlier run") + ".*--out-dir"):
        train(_cfg(tmp_path, "d", out_dir=str(out)), echo=_quiet)
    assert sorted(str(p) for p in out.rglob("*")) == [p for p in before if not p.endswith("run.json")]
    assert [r.name for r in Store(db).list_runs()] == ["a", "c"]
    # its own run still resumes there, and records itself as the owner again
    train(_cfg(tmp_path, "a", out_dir=str(out), resume=True), echo=_quiet)
    assert json.loads((out / "run.json").read_text())["run"] == "a"
    assert list(train_steps(Store(db), "a")["step"]) == [0, 1, 2]



def test_a_policy_path_that_is_no_model_is_refused_before_the_run_claims_anything(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        train(_cfg(tmp_path, "p", policy=str(tmp_path / "empty")), echo=_quiet)
    assert Store(f"sqlite:///{tmp_path}/h.db").list_runs() == [] and not (tmp_path / "p").exists()

def test_resume_follows_the_runs_checkpoint_rows_and_refuses_another_runs_checkpoint(tmp_path):
    train(_cfg(tmp_path, "a", stop_after=1), echo=_quiet)
    train(_cfg(tmp_path, "b", steps=1), echo=_quiet)
    a_ckpts, b_ckpts = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    # a newer-looking checkpoint that is not a's own (copied in by hand) is not what a resumes from
    shutil.copytree(b_ckpts / "step-000001", a_ckpts / "step-000007")
    summary = train(_cfg(tmp_path, "a", resume=True), echo=_quiet)
    assert summary["finished"] and summary["checkpoint"].endswith("step-000002"), summary
    store = Store(f"sqlite:///{tmp_path}/h.db")
    assert list(train_steps(store, "a")["step"]) == [0, 1, 2]
    assert [s for s, _ in checkpoints(store, "a")] == [0, 1, 2]
    # a's newest recorded checkpoint replaced by b's: refused, naming both, before any step
    shutil.rmtree(a_ckpts / "step-000002")
    shutil.copytree(b_ckpts / "step-000001", a_ckpts / "step-000002")
    with pytest.raises(ConfigError, match=r"belongs to run 'b'.*not 'a'"):
        train(_cfg(tmp_path, "a", steps=3, resume=True), echo=_quiet)
    assert list(train_steps(store, "a")["step"]) == [0, 1, 2]
    # a recorded checkpoint that is gone is named, not silently replaced by a fresh start
    shutil.rmtree(a_ckpts / "step-000002")
    with pytest.raises(ConfigError, match="step 2.*missing"):
        train(_cfg(tmp_path, "a", steps=3, resume=True), echo=_quiet)


def test_eval_never_deletes_a_train_run_or_its_evaluation_points(tmp_path):
    from harness.cli.eval import EvalOptions, run_eval

    db = f"sqlite:///{tmp_path}/h.db"
    train(_cfg(tmp_path, "t", steps=1, eval_every=1, eval_tasks=1, db=db), echo=_quiet)
    store = Store(db)
    kept = (list(train_steps(store, "t")["step"]), checkpoints(store, "t"))
    ev = ("eval", "--env", "toy", "--agent", "oracle", "--tasks", "0", "--db", db, "--quiet")

    def oracle(run: str, **kw) -> str:
        return run_eval(EvalOptions(env="toy", agent="oracle", tasks=["0"], db=db, quiet=True, run=run, **kw))

    for run in ("t", "t/eval-step-000000"):
        line = _refused(_harness(tmp_path, *ev, "--run", run, "--force-new"), f"'{run}'", "pick another --run")
        assert "--force-new" not in line  # no longer suggested for a run it must not delete
        with pytest.raises(ConfigError, match="eval neither resumes nor deletes it") as refused:
            oracle(run)
        assert "--force-new" not in str(refused.value)
    store = Store(db)
    assert (list(train_steps(store, "t")["step"]), checkpoints(store, "t")) == kept
    assert {r.name for r in store.list_runs()} == {"t", "t/eval-step-000000", "t/eval-step-000001"}
    # train refuses an eval run's name, and a name whose evaluation points another run holds
    oracle("e")
    oracle("u/eval-step-000000")
    with pytest.raises(ConfigError, match="'e' exists and is an eval run; pick another --run"):
        train(_cfg(tmp_path, "e", db=db), echo=_quiet)
    with pytest.raises(ConfigError, match="'u/eval-step-000000' exists and is not an evaluation point.*--run"):
        train(_cfg(tmp_path, "u", db=db, eval_every=1), echo=_quiet)
    assert Store(db).get_run("u/eval-step-000000").kind == "eval"
    assert "u" not in {r.name for r in Store(db).list_runs()}
