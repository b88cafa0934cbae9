"""τ data pull / verify / locate, against the real mirror (no mocks, no internet)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from envs.tau import data
from harness.errors import ConfigError, DataMissingError, HarnessError

MIRROR = Path(os.environ["HARNESS_DATA_DIR"])  # conftest resolved it (tests/data_source.py)


@pytest.fixture(autouse=True)
def _mirror(tau_mirror):
    """Every test here reads the real mirror: fail (never skip) when it is missing."""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache and no mirror override: data must come from pull()."""
    root = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(root))
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    monkeypatch.delenv("HARNESS_TAU_DATA_URL", raising=False)
    return root


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_manifest_matches_git_blob_hash_of_mirror():
    for version in data.VERSIONS:
        for entry in data.MANIFEST[version]:
            sub = "tau2" if entry.commit == data.TAU2_COMMIT else "tau3"
            raw = (MIRROR / sub / entry.path).read_bytes()
            assert len(raw) == entry.size and data.git_blob_sha1(raw) == entry.sha1, entry.path
    assert data.git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert data.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.mark.parametrize("version", ["tau3", "tau2"])
def test_pull_from_mirror_gives_complete_verified_set(cache, version):
    seen = []
    target = data.pull(version, from_dir=MIRROR, progress=lambda rel, status: seen.append(status))
    assert target == cache / "tau" / version
    assert _files(target) == {e.path for e in data.MANIFEST[version]}
    assert seen == ["copied"] * len(data.MANIFEST[version])
    assert data.data_dir(version) == target
    paths = data.airline_paths(version)
    assert paths.tasks == target / "data/tau2/domains/airline/tasks.json"
    expected_sha = {"tau3": "ea4ff5e3f5e3d97ca391846a6e8dd9eb3437dc80",
                    "tau2": "ca8b69141e816ad140a042f16b94fc646f0acdc9"}
    assert data.git_blob_sha1(paths.tasks.read_bytes()) == expected_sha[version]
    # Second pull: everything is already valid, nothing is rewritten.
    seen.clear()
    data.pull(version, from_dir=MIRROR, progress=lambda rel, status: seen.append(status))
    assert set(seen) == {"cached"}


def test_corrupted_mirror_file_fails_and_leaves_nothing(cache, tmp_path):
    bad = tmp_path / "bad_mirror"
    shutil.copytree(MIRROR / "tau3", bad / "tau3")
    policy = bad / "tau3/data/tau2/domains/airline/policy.md"
    policy.write_bytes(policy.read_bytes().replace(b"policy", b"Policy", 1))
    with pytest.raises(DataMissingError) as err:
        data.pull("tau3", from_dir=bad)
    msg = str(err.value)
    assert "data/tau2/domains/airline/policy.md" in msg
    assert "8098be7db3f47de943fad39d1e057ede6cc6cd04" in msg
    assert data.git_blob_sha1(policy.read_bytes()) in msg
    target = cache / "tau" / "tau3"
    assert not target.exists() or _files(target) == set()


def test_corrupted_file_in_data_dir_mirror_is_detected(tmp_path, monkeypatch):
    bad = tmp_path / "m"
    shutil.copytree(MIRROR / "tau3", bad / "tau3")
    (bad / "tau3/data/tau2/domains/airline/split_tasks.json").write_text("{}")
    monkeypatch.setenv("HARNESS_DATA_DIR", str(bad))
    with pytest.raises(DataMissingError, match="corrupted"):
        data.airline_paths("tau3")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def raw_github_server(tmp_path):
    """A local http.server serving the mirror in raw-GitHub layout: /<commit>/<repo path>."""
    root = tmp_path / "www"
    for commit, sub in ((data.TAU3_COMMIT, "tau3"), (data.TAU2_COMMIT, "tau2")):
        (root / commit).mkdir(parents=True)
        for item in (MIRROR / sub).iterdir():
            (root / commit / item.name).symlink_to(item)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("version", ["tau2", "tau3"])
def test_download_through_local_http_server(cache, monkeypatch, raw_github_server, version):
    monkeypatch.setenv("HARNESS_TAU_DATA_URL", raw_github_server + "/")
    seen = []
    target = data.pull(version, progress=lambda rel, status: seen.append(status))
    assert set(seen) == {"downloaded"}
    assert _files(target) == {e.path for e in data.MANIFEST[version]}
    assert len(data.load_airline_tasks(version)) == 50


def test_download_404_is_a_clear_error(cache, monkeypatch, raw_github_server):
    monkeypatch.setenv("HARNESS_TAU_DATA_URL", raw_github_server + "/nothing-here")
    with pytest.raises(HarnessError) as err:
        data.pull("tau3")
    assert "could not download" in str(err.value) and "HTTP 404" in str(err.value)
    assert not cache.exists() or _files(cache) == set()


def test_missing_data_names_the_exact_command(cache):
    with pytest.raises(DataMissingError) as err:
        data.data_dir("tau2")
    msg = str(err.value)
    assert "harness data pull tau-airline --data-version tau2" in msg
    assert str(cache / "tau" / "tau2") in msg and "HARNESS_DATA_DIR" in msg
    with pytest.raises(DataMissingError, match="--data-version tau3"):
        data.load_airline_tasks("tau3")


def test_data_dir_env_reads_mirror_in_place_with_tau2_fallback(monkeypatch, tmp_path):
    # A mirror whose tau2 copy holds only what differs from tau3 (the tasks and the user guidelines),
    # built here from whichever complete copy the tests read, so the layout does not depend on it.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tau3").symlink_to(MIRROR / "tau3", target_is_directory=True)
    for rel in ("data/tau2/domains/airline/tasks.json", "data/tau2/user_simulator/simulation_guidelines.md"):
        (mirror / "tau2" / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / "tau2" / rel).symlink_to(MIRROR / "tau2" / rel)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(mirror))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "unused"))
    assert data.data_dir("tau3") == mirror / "tau3"
    paths = data.airline_paths("tau2")
    assert paths.tasks == mirror / "tau2/data/tau2/domains/airline/tasks.json"
    assert paths.db == mirror / "tau3/data/tau2/domains/airline/db.json"
    assert paths.split_tasks == mirror / "tau3/data/tau2/domains/airline/split_tasks.json"
    assert paths.user_guidelines == mirror / "tau2/data/tau2/user_simulator/simulation_guidelines.md"
    assert not (tmp_path / "unused").exists()


def test_load_airline_tasks_splits(monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(MIRROR))
    base = data.load_airline_tasks("tau3")
    assert [t["id"] for t in base] == [str(i) for i in range(50)]
    train, test = data.load_airline_tasks("tau3", "train"), data.load_airline_tasks("tau3", "test")
    assert (len(train), len(test)) == (30, 20)
    assert [t["id"] for t in test][:3] == ["2", "6", "8"]
    assert {t["id"] for t in train} | {t["id"] for t in test} == {t["id"] for t in base}
    assert base[7]["evaluation_criteria"]["communicate_info"] == ["1628"]
    assert len(data.load_airline_tasks("tau2", "test")) == 20


def test_unknown_split_and_version(monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(MIRROR))
    with pytest.raises(ConfigError, match="valid: base, test, train"):
        data.load_airline_tasks("tau3", "dev")
    with pytest.raises(ConfigError, match="valid: tau3, tau2"):
        data.data_dir("tau9")


def test_test_suite_data_lookup_order(tmp_path, monkeypatch, raw_github_server):
    """tests/data_source.py: HARNESS_DATA_DIR, then ../shared/data/tau beside the clone, then the
    pull cache; on a fresh clone (none of them) scripts/test.sh pulls into the cache first."""
    import subprocess
    import sys

    from data_source import locate

    repo = tmp_path / "clone" / "harness"
    (repo / "tests").mkdir(parents=True)
    script = shutil.copy(Path(__file__).with_name("data_source.py"), repo / "tests")  # a fresh clone's copy
    cache = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "mine"))
    (tmp_path / "clone" / "shared" / "data" / "tau" / "tau3").mkdir(parents=True)
    assert locate(repo) == (tmp_path / "mine", "HARNESS_DATA_DIR")
    monkeypatch.setenv("HARNESS_DATA_DIR", "")  # set but empty counts as unset
    assert locate(repo) == (tmp_path / "clone" / "shared" / "data" / "tau", "../shared/data/tau")
    shutil.rmtree(tmp_path / "clone" / "shared")
    found, why = locate(repo)
    assert found is None and "harness data pull" in why  # a fresh clone without --pull: a clear reason
    # the way scripts/test.sh runs it: pull from the (local) upstream, then print the cache
    env = {**os.environ, "HARNESS_TAU_DATA_URL": raw_github_server + "/"}
    out = subprocess.run([sys.executable, str(script), "--pull"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache / "tau") and "(pulled)" in out.stderr
    assert locate(repo) == (cache / "tau", "cache")  # now complete and verified: reused, not fetched
    monkeypatch.setenv("HARNESS_DATA_DIR", str(cache / "tau"))  # the cache reads as a mirror
    assert len(data.load_airline_tasks("tau2", "test")) == 20
    (cache / "tau" / "tau2" / "data/tau2/domains/airline/tasks.json").write_text("[]")
    monkeypatch.setenv("HARNESS_DATA_DIR", "")
    assert locate(repo)[0] is None  # a corrupted cache is not used
