"""Provision AppWorld as a side service: its own venv, ``appworld install``, and the data tree.

``setup_appworld(venv_dir, appworld_root, from_dir=None)`` (``harness appworld setup``):

1. ``python -m venv VENV`` (Python >= 3.11; AppWorld pins pydantic<2, so never the harness venv);
2. ``VENV/bin/pip install "appworld==0.1.3.post1" "click<8.5"``;
3. ``VENV/bin/appworld install`` (decrypts the app code shipped in the wheel; offline);
4. data: copy ``FROM/data`` (or ``FROM`` itself when it is a data tree) to ``ROOT/data``, or run
   ``VENV/bin/appworld download data --root ROOT`` (S3; fails offline -> ``DataMissingError``);
5. check the split lists in ``ROOT/data/datasets`` against ``../shared/data/appworld/splits``
   (or ``$HARNESS_APPWORLD_SPLITS``) when that directory exists; mismatches are warnings.

Every step is skipped when its result is already there. Defaults: venv ``$HARNESS_APPWORLD_VENV``,
the repository's ``.venv-appworld`` (``scripts/setup.sh``) when present, or
``<user cache>/harness/appworld-venv``; root ``$APPWORLD_ROOT`` or ``<user cache>/harness/appworld-root``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import platformdirs

from harness.errors import ConfigError, DataMissingError

__all__ = ["SetupReport", "setup_appworld", "default_venv_dir", "default_root",
           "check_splits", "APPWORLD_REQUIREMENTS"]

APPWORLD_REQUIREMENTS = ("appworld==0.1.3.post1", "click<8.5")
SPLITS = ("train", "dev", "test_normal", "test_challenge")
_REPO = Path(__file__).resolve().parents[2]


def default_venv_dir(repo: Path = _REPO) -> Path:
    """``$HARNESS_APPWORLD_VENV``; else the ``.venv-appworld`` that ``scripts/setup.sh`` builds beside
    the harness's own ``.venv`` in ``repo``, when it holds a Python (a set-up machine needs no second
    ``harness appworld setup``); else ``<user cache>/harness/appworld-venv``."""
    env = os.environ.get("HARNESS_APPWORLD_VENV")
    if env:
        return Path(env)
    beside = repo / ".venv-appworld"
    if (beside / "bin" / "python").exists():
        return beside
    return Path(platformdirs.user_cache_dir("harness")) / "appworld-venv"


def default_root() -> Path:
    env = os.environ.get("APPWORLD_ROOT")
    return Path(env) if env else Path(platformdirs.user_cache_dir("harness")) / "appworld-root"


def default_splits_dir() -> Optional[Path]:
    env = os.environ.get("HARNESS_APPWORLD_SPLITS")
    path = Path(env) if env else _REPO.parent / "shared" / "data" / "appworld" / "splits"
    return path if path.is_dir() else None


@dataclass
class SetupReport:
    venv_dir: Path
    appworld_root: Path
    python: Path
    created_venv: bool = False
    installed_package: bool = False
    ran_appworld_install: bool = False
    data_source: str = "existing"  # existing | copied:<dir> | downloaded
    split_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"venv:  {self.venv_dir} ({'created' if self.created_venv else 'existing'}; "
               f"appworld {'installed' if self.installed_package else 'already installed'})",
               f"root:  {self.appworld_root} (data: {self.data_source})"]
        if self.split_counts:
            out.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.split_counts.items()))
        out += [f"warning: {w}" for w in self.warnings]
        out.append(f"use: export HARNESS_APPWORLD_VENV={self.venv_dir} APPWORLD_ROOT={self.appworld_root}")
        return out


Runner = Callable[[Sequence[str], Optional[dict]], subprocess.CompletedProcess]


def _run(cmd: Sequence[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True)


def _tail(proc: subprocess.CompletedProcess, n: int = 1500) -> str:
    return ((proc.stdout or "") + (proc.stderr or ""))[-n:].strip()


def _is_data_tree(path: Path) -> bool:
    return (path / "tasks").is_dir() and (path / "base_dbs").is_dir()


def _offline_message(root: Path, venv: Path, detail: str) -> str:
    return (
        f"could not download the AppWorld data into {root}/data ({detail}). This machine seems to "
        f"have no internet access. Either copy an existing data tree: `harness appworld setup "
        f"--root {root} --from DIR` (DIR holds data/ with tasks/, base_dbs/, api_docs/, "
        f"datasets/), or run on a machine with internet: `{venv}/bin/appworld download data "
        f"--root {root}` (a 34 MB bundle from s3.us-west-2.amazonaws.com, see "
        f"../shared/docs/appworld.md §9.3) and copy {root}/data here"
    )


def setup_appworld(
    venv_dir: Optional[os.PathLike | str] = None,
    appworld_root: Optional[os.PathLike | str] = None,
    from_dir: Optional[os.PathLike | str] = None,
    *,
    python: Optional[str] = None,
    runner: Runner = _run,
    log: Callable[[str], None] = lambda msg: None,
) -> SetupReport:
    """Create/complete the AppWorld side venv and data root; idempotent. See module docstring."""
    venv = Path(venv_dir or default_venv_dir()).expanduser().resolve()
    root = Path(appworld_root or default_root()).expanduser().resolve()
    vpy = venv / "bin" / "python"
    cli = venv / "bin" / "appworld"
    report = SetupReport(venv_dir=venv, appworld_root=root, python=vpy)
    env = dict(os.environ, APPWORLD_ROOT=str(root))
    env.pop("PYTHONPATH", None)

    # 1. venv
    if not vpy.exists():
        base = python or os.environ.get("HARNESS_APPWORLD_BASE_PYTHON") or sys.executable
        log(f"creating {venv} with {base}")
        proc = runner([base, "-m", "venv", str(venv)], None)
        if proc.returncode != 0:
            raise ConfigError(f"could not create the AppWorld venv {venv} with {base} "
                              f"(AppWorld needs Python >= 3.11): {_tail(proc)}")
        report.created_venv = True
    # 2. package
    check = runner([str(vpy), "-c", "import importlib.metadata as m; print(m.version('appworld'))"], env)
    if check.returncode != 0 or check.stdout.strip() != APPWORLD_REQUIREMENTS[0].split("==")[1]:
        log("pip install " + " ".join(APPWORLD_REQUIREMENTS))
        proc = runner([str(vpy), "-m", "pip", "install", *APPWORLD_REQUIREMENTS], env)
        if proc.returncode != 0:
            raise ConfigError(f"pip install {' '.join(APPWORLD_REQUIREMENTS)} failed in {venv} "
                              f"(needs the package registry): {_tail(proc)}")
        report.installed_package = True
    # 3. appworld install (decrypt the apps into the package)
    check = runner([str(vpy), "-c", "import appworld.apps.simple_note.apis"], env)
    if check.returncode != 0:
        log("appworld install")
        proc = runner([str(cli), "install"], env)
        if proc.returncode != 0:
            raise ConfigError(f"`{cli} install` failed: {_tail(proc)}")
        report.ran_appworld_install = True
    # 4. data
    data = root / "data"
    if not _is_data_tree(data):
        root.mkdir(parents=True, exist_ok=True)
        if from_dir is not None:
            src = Path(from_dir).expanduser().resolve()
            src_data = src / "data" if _is_data_tree(src / "data") else src
            if not _is_data_tree(src_data):
                raise DataMissingError(
                    f"--from {src} holds no AppWorld data tree (expected {src}/data/tasks and "
                    f"{src}/data/base_dbs, or tasks/ and base_dbs/ directly)")
            log(f"copying {src_data} -> {data}")
            tmp = root / ".data.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src_data, tmp)
            shutil.rmtree(data, ignore_errors=True)
            tmp.rename(data)
            report.data_source = f"copied:{src_data}"
        else:
            log(f"appworld download data --root {root}")
            proc = runner([str(cli), "download", "data", "--root", str(root)], env)
            if proc.returncode != 0 or not _is_data_tree(data):
                tail = _tail(proc, 4000)
                reason = ("no network" if any(s in tail for s in (
                    "NameResolutionError", "ConnectionError", "Max retries", "Name or service"))
                    else f"exit {proc.returncode}")
                raise DataMissingError(_offline_message(root, venv, reason))
            report.data_source = "downloaded"
    elif from_dir is not None:
        report.warnings.append(f"{data} already holds a data tree; --from {from_dir} was not copied")
    # 5. splits
    counts, warns = check_splits(data / "datasets", default_splits_dir())
    report.split_counts = counts
    report.warnings += warns
    return report


def _read_ids(path: Path) -> list[str]:
    return [line.split(":", 1)[0].strip() for line in path.read_text().splitlines() if line.strip()]


def check_splits(datasets_dir: Path, reference_dir: Optional[Path]) -> tuple[dict[str, int], list[str]]:
    """Task-ID counts per split in ``datasets_dir``, plus warnings where a list differs from the
    reference copy (``../shared/data/appworld/splits``). Nothing is copied anywhere."""
    counts: dict[str, int] = {}
    warns: list[str] = []
    for split in SPLITS:
        path = datasets_dir / f"{split}.txt"
        if not path.exists():
            warns.append(f"split list {path} is missing")
            continue
        ids = _read_ids(path)
        counts[split] = len(ids)
        if reference_dir is None:
            continue
        ref = reference_dir / f"{split}.txt"
        if not ref.exists():
            continue
        ref_ids = _read_ids(ref)
        if sorted(ids) != sorted(ref_ids):
            missing = sorted(set(ref_ids) - set(ids))[:5]
            extra = sorted(set(ids) - set(ref_ids))[:5]
            warns.append(f"split {split}: {len(ids)} task ids in the data, {len(ref_ids)} in "
                         f"{ref} (missing e.g. {missing}, extra e.g. {extra})")
    return counts, warns
