"""``setup_appworld`` / ``harness appworld setup``: step order, idempotence, --from copy, the offline
message, split checks. Uses a recording fake runner (no pip, no network); one test runs against the
real side venv when it exists (copying a tiny fake data tree, so no download)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from envs.appworld import setup as aw_setup
from harness.errors import DataMissingError

REPO = Path(__file__).resolve().parents[1]


def make_data_tree(base: Path, splits: dict[str, list[str]] | None = None) -> Path:
    data = base / "data"
    (data / "tasks" / "abc_1").mkdir(parents=True)
    (data / "base_dbs").mkdir(parents=True)
    (data / "datasets").mkdir(parents=True)
    for name, ids in (splits or {}).items():
        (data / "datasets" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base


class FakeRunner:
    """Pretends to be python/pip/appworld; records the commands."""

    def __init__(self, offline: bool = True):
        self.calls: list[list[str]] = []
        self.offline = offline
        self.installed = False
        self.decrypted = False

    def __call__(self, cmd, env=None):
        cmd = list(cmd)
        self.calls.append(cmd)
        rc, out, err = 0, "", ""
        if cmd[1:3] == ["-m", "venv"]:
            py = Path(cmd[3]) / "bin" / "python"
            py.parent.mkdir(parents=True, exist_ok=True)
            py.write_text("")
        elif "importlib.metadata" in " ".join(cmd):
            rc, out = (0, "0.1.3.post1\n") if self.installed else (1, "")
        elif cmd[1:4] == ["-m", "pip", "install"]:
            self.installed = True
        elif "import appworld.apps" in " ".join(cmd):
            rc = 0 if self.decrypted else 1
        elif cmd[-1] == "install":
            self.decrypted = True
        elif cmd[1:3] == ["download", "data"]:
            if self.offline:
                rc, err = 1, ("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='s3."
                              "us-west-2.amazonaws.com'): NameResolutionError")
            else:
                make_data_tree(Path(cmd[4]))
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def kinds(self) -> list[str]:
        out = []
        for c in self.calls:
            s = " ".join(c)
            out.append("venv" if "-m venv" in s else "version" if "importlib.metadata" in s else
                       "pip" if "-m pip install" in s else "check" if "import appworld.apps" in s
                       else "install" if c[-1] == "install" else "download" if "download" in c
                       else s)
        return out


def test_offline_download_fails_with_actionable_message(tmp_path):
    runner = FakeRunner(offline=True)
    with pytest.raises(DataMissingError) as err:
        aw_setup.setup_appworld(tmp_path / "venv", tmp_path / "root", runner=runner)
    msg = str(err.value)
    assert "--from DIR" in msg and "appworld download data --root" in msg
    assert "no network" in msg and "§9.3" in msg
    assert runner.kinds() == ["venv", "version", "pip", "check", "install", "download"]
    pip = runner.calls[2]
    assert "appworld==0.1.3.post1" in pip and "click<8.5" in pip


def test_from_dir_copy_then_idempotent(tmp_path):
    src = make_data_tree(tmp_path / "mirror", {"dev": ["a_1", "a_2"], "train": ["b_1"]})
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "dev.txt").write_text("a_1\na_2\n")
    (refs / "train.txt").write_text("b_1\nb_2\n")
    os.environ["HARNESS_APPWORLD_SPLITS"] = str(refs)
    try:
        runner = FakeRunner()
        rep = aw_setup.setup_appworld(tmp_path / "venv", tmp_path / "root", src, runner=runner)
        assert rep.created_venv and rep.installed_package and rep.ran_appworld_install
        assert rep.data_source.startswith("copied:")
        assert (tmp_path / "root" / "data" / "tasks" / "abc_1").is_dir()
        assert rep.split_counts == {"train": 1, "dev": 2}
        assert any("split train" in w for w in rep.warnings)  # 1 vs 2 ids: mismatch warned
        assert not any("split dev" in w for w in rep.warnings)
        # second run: nothing to do, no pip/install/download
        again = aw_setup.setup_appworld(tmp_path / "venv", tmp_path / "root", runner=runner)
        assert not again.created_venv and not again.installed_package
        assert not again.ran_appworld_install and again.data_source == "existing"
        assert runner.kinds()[-2:] == ["version", "check"]
    finally:
        del os.environ["HARNESS_APPWORLD_SPLITS"]


def test_from_dir_without_data_tree(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataMissingError, match="no AppWorld data tree"):
        aw_setup.setup_appworld(tmp_path / "venv", tmp_path / "root", tmp_path / "empty",
                                runner=FakeRunner())


def test_defaults_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_APPWORLD_VENV", str(tmp_path / "v"))
    monkeypatch.setenv("APPWORLD_ROOT", str(tmp_path / "r"))
    assert aw_setup.default_venv_dir() == tmp_path / "v"
    assert aw_setup.default_root() == tmp_path / "r"
    monkeypatch.delenv("HARNESS_APPWORLD_VENV")
    monkeypatch.delenv("APPWORLD_ROOT")
    assert aw_setup.default_venv_dir(repo=tmp_path).name == "appworld-venv"
    assert aw_setup.default_root().name == "appworld-root"


def test_the_venv_setup_sh_built_is_used_when_present(tmp_path, monkeypatch):
    """``scripts/setup.sh`` builds ``.venv-appworld`` beside ``.venv``: ``--env appworld`` (and
    ``harness appworld setup``) use it rather than asking for a second setup; the variable still
    wins, and a repository without one falls back to the user cache."""
    monkeypatch.delenv("HARNESS_APPWORLD_VENV", raising=False)
    built = tmp_path / ".venv-appworld"
    assert aw_setup.default_venv_dir(repo=tmp_path).name == "appworld-venv"
    (built / "bin").mkdir(parents=True)
    (built / "bin" / "python").write_text("")
    assert aw_setup.default_venv_dir(repo=tmp_path) == built
    monkeypatch.setenv("HARNESS_APPWORLD_VENV", str(tmp_path / "v"))
    assert aw_setup.default_venv_dir(repo=tmp_path) == tmp_path / "v"


def test_cli_offline_one_line_error(tmp_path, monkeypatch):
    from envs.appworld.cli import appworld_app

    monkeypatch.setattr(aw_setup.setup_appworld, "__kwdefaults__",
                        {**aw_setup.setup_appworld.__kwdefaults__, "runner": FakeRunner(offline=True)})
    app = typer.Typer()
    app.add_typer(appworld_app, name="appworld")  # as harness.cli registers it
    res = CliRunner().invoke(app, ["appworld", "setup", "--venv", str(tmp_path / "v"),
                                   "--root", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "error:" in res.output and "--from DIR" in res.output
    assert "Traceback" not in res.output


def test_real_side_venv_with_from(tmp_path):
    venv = Path(os.environ.get("HARNESS_APPWORLD_VENV") or REPO / ".venv-appworld")
    if not (venv / "bin" / "appworld").exists():
        pytest.skip(f"no AppWorld side venv at {venv}")
    src = make_data_tree(tmp_path / "mirror", {"dev": ["a_1"]})
    rep = aw_setup.setup_appworld(venv, tmp_path / "root", src)
    assert not rep.created_venv and not rep.installed_package and not rep.ran_appworld_install
    assert rep.data_source.startswith("copied:") and rep.split_counts == {"dev": 1}
