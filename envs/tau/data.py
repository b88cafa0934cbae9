"""τ-bench data: pull, verify and locate the official tau2-bench data files.

Why: scores must equal the official grader's, so the engine must read byte-identical upstream files.
Every file is pinned by (repo path, commit, size, git blob sha1); the facts come from
``shared/data/tau/*/SOURCE.md``. The data itself is never copied into this repository.

Versions (``tau3`` is the default):

- ``tau3``: tau2-bench ``a2c0247`` (= v1.0.0 / v1.0.1 content, the τ³ task fixes).
- ``tau2``: tag v0.2.0 ``f8de30c``. A τ² set is the τ³ set with the two ``tasks.json`` files and the
  two user-simulator guideline files (and LICENSE, same blob) taken from the τ² commit. DB and
  policy blobs are identical in both commits; ``split_tasks.json`` did not exist at v0.2.0 and is
  taken from the τ³ commit (same content as when it was added in v0.2.1, same task ids).

Where the files live (``data_dir`` / ``data_file`` resolve this; callers never build paths):

1. ``$HARNESS_DATA_DIR`` set: a local mirror read in place (no copy). Layout
   ``<dir>/tau3/data/tau2/...`` (complete τ³ set) and ``<dir>/tau2/data/tau2/...`` (τ²-only files);
   for ``tau2`` a file missing under ``<dir>/tau2`` falls back to ``<dir>/tau3``.
2. otherwise the per-user cache ``<cache root>/tau/<version>/`` (repo layout), filled by ``pull``.
   Cache root: ``$HARNESS_CACHE_DIR`` or ``platformdirs.user_cache_dir("harness")``.

Decisions: located files are hash-checked once per process (memoised on path, size and mtime), so a
corrupted mirror is caught before any score depends on it. ``pull`` is all-or-nothing: every missing
file is fetched and verified in memory (the whole set is ~10 MB) before anything is written; each
file is then written via temp file + rename, so no partial file is ever visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import platformdirs

from harness.errors import ConfigError, DataMissingError, HarnessError

__all__ = [
    "VERSIONS", "DEFAULT_VERSION", "TAU3_COMMIT", "TAU2_COMMIT", "DEFAULT_BASE_URL", "ManifestFile",
    "MANIFEST", "ChecksumError", "git_blob_sha1", "cache_root", "cache_dir", "write_atomic", "pull", "data_dir",
    "data_file", "AirlinePaths", "airline_paths", "load_airline_tasks",
]

TAU3_COMMIT = "a2c024725189473d2d7cea3a5cfdbcc67478e41f"
TAU2_COMMIT = "f8de30c298689cbe0117d76a378e7315a17e5bd8"  # tag v0.2.0
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/sierra-research/tau2-bench"
VERSIONS = ("tau3", "tau2")
DEFAULT_VERSION = "tau3"
_DOMAINS = "data/tau2/domains"
_USER_SIM = "data/tau2/user_simulator"


class ManifestFile(NamedTuple):
    """One pinned upstream file."""

    path: str
    """Path inside the tau2-bench repository (also the path inside a version directory)."""
    commit: str
    size: int
    sha1: str
    """Git blob sha1: ``sha1(b"blob <size>\\0" + data)``, what ``git hash-object`` prints."""


_TAU3_FILES = [
    ManifestFile("LICENSE", TAU3_COMMIT, 1072, "f0323a32227c1327820da33d2fb9d3338a27ac84"),
    ManifestFile(f"{_DOMAINS}/airline/db.json", TAU3_COMMIT, 7042725, "c6a1e817aa9102c5822e83affb3595acbc312701"),
    ManifestFile(f"{_DOMAINS}/airline/policy.md", TAU3_COMMIT, 7676, "8098be7db3f47de943fad39d1e057ede6cc6cd04"),
    ManifestFile(f"{_DOMAINS}/airline/split_tasks.json", TAU3_COMMIT, 1443, "c83cce155671e66a6bf07450fd2845fe0eb1f229"),
    ManifestFile(f"{_DOMAINS}/airline/tasks.json", TAU3_COMMIT, 155528, "ea4ff5e3f5e3d97ca391846a6e8dd9eb3437dc80"),
    ManifestFile(f"{_DOMAINS}/retail/db.json", TAU3_COMMIT, 2811616, "4d67b03b2d39ade5a7ab6facb2edd7ab3e013d48"),
    ManifestFile(f"{_DOMAINS}/retail/policy.md", TAU3_COMMIT, 6699, "d127e6b074654926f337d0d98b0e669ebe90d19e"),
    ManifestFile(f"{_DOMAINS}/retail/split_tasks.json", TAU3_COMMIT, 3263, "8b20704a17aa1940b1e58668f89dcef2ddaeeea3"),
    ManifestFile(f"{_DOMAINS}/retail/tasks.json", TAU3_COMMIT, 345982, "e95a9f898b2d1f6568ea8faec78edc3767ce747d"),
    ManifestFile(f"{_USER_SIM}/simulation_guidelines.md", TAU3_COMMIT, 1449,
                 "b55a28a1d5eaf81e72bdc263307d9f512fe49a99"),
    ManifestFile(f"{_USER_SIM}/simulation_guidelines_tools.md", TAU3_COMMIT, 2747,
                 "a7235b1ddf8d0d1e2edc9b1708916f37b0aac045"),
]
# τ²-specific files (tag v0.2.0). Everything else in a τ² set is the τ³ file: db/policy blobs are the
# same at both commits, and split_tasks.json comes from the τ³ commit (it did not exist at v0.2.0;
# added in v0.2.1 with this content and the same task ids).
_TAU2_OVERRIDES = [
    ManifestFile("LICENSE", TAU2_COMMIT, 1072, "f0323a32227c1327820da33d2fb9d3338a27ac84"),
    ManifestFile(f"{_DOMAINS}/airline/tasks.json", TAU2_COMMIT, 149096, "ca8b69141e816ad140a042f16b94fc646f0acdc9"),
    ManifestFile(f"{_DOMAINS}/retail/tasks.json", TAU2_COMMIT, 328166, "866c95e5e89186b185c2b10e06273099e143ec69"),
    ManifestFile(f"{_USER_SIM}/simulation_guidelines.md", TAU2_COMMIT, 1449,
                 "8bf34059effa7db8683c147d973bd77006936bab"),
    ManifestFile(f"{_USER_SIM}/simulation_guidelines_tools.md", TAU2_COMMIT, 2747,
                 "09f85a5077aaca0e605945f84a0a8fdecafc5325"),

]
_tau2 = {f.path: f for f in _TAU3_FILES} | {f.path: f for f in _TAU2_OVERRIDES}
MANIFEST: dict[str, tuple[ManifestFile, ...]] = {"tau3": tuple(_TAU3_FILES), "tau2": tuple(_tau2.values())}


class ChecksumError(DataMissingError):
    """A data file does not match its pinned size / git blob sha1."""


def git_blob_sha1(data: bytes) -> str:
    """The git blob hash of ``data`` (equals ``git hash-object FILE``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_version(version: str) -> tuple[ManifestFile, ...]:
    if version not in MANIFEST:
        raise ConfigError(f"unknown τ data version {version!r}; valid: {', '.join(VERSIONS)}")
    return MANIFEST[version]


def _manifest_entry(version: str, relpath: str) -> ManifestFile:
    for entry in _check_version(version):
        if entry.path == relpath:
            return entry
    raise ConfigError(f"{relpath!r} is not part of τ data {version!r}; known files: "
                      + ", ".join(f.path for f in MANIFEST[version]))


def _verify(entry: ManifestFile, data: bytes, source: str) -> None:
    actual = git_blob_sha1(data)
    if len(data) != entry.size or actual != entry.sha1:
        raise ChecksumError(
            f"checksum mismatch for {entry.path} (from {source}): expected {entry.sha1} "
            f"({entry.size} bytes), got {actual} ({len(data)} bytes). The source is corrupted or a "
            "different version; re-run `harness data pull` (add --force to re-fetch).")


_hash_memo: dict[tuple[str, int, int], str] = {}


def _file_ok(entry: ManifestFile, path: Path) -> bool:
    """True if ``path`` holds exactly ``entry`` (hash memoised per path/size/mtime)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != entry.size:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        _hash_memo[key] = git_blob_sha1(path.read_bytes())
    return _hash_memo[key] == entry.sha1


def cache_root() -> Path:
    """``<cache root>/tau``: where pulled τ files are cached."""
    root = os.environ.get("HARNESS_CACHE_DIR") or platformdirs.user_cache_dir("harness")
    return Path(root).expanduser() / "tau"


def cache_dir(version: str) -> Path:
    """Where ``pull`` puts ``version``: ``<cache root>/tau/<version>``."""
    _check_version(version)
    return cache_root() / version


def _mirror_candidates(mirror: Path, version: str, relpath: str) -> list[Path]:
    """Mirror lookup order: ``<mirror>/<version>/<relpath>``, then (τ² only) ``<mirror>/tau3/...``."""
    paths = [mirror / version / relpath]
    if version != "tau3":
        paths.append(mirror / "tau3" / relpath)
    return paths


def _missing_error(version: str, where: Path, relpath: str, corrupt: bool = False) -> DataMissingError:
    what = "corrupted (checksum mismatch)" if corrupt else "missing"
    return DataMissingError(
        f"τ data {version!r} not found in {where} ({relpath} {what}). "
        f"Run: harness data pull tau-airline --data-version {version}   "
        "(offline: set HARNESS_DATA_DIR=/path/to/mirror or use --from DIR)")


def data_file(version: str, relpath: str) -> Path:
    """The verified on-disk path of one manifest file, e.g. ``data/tau2/domains/airline/db.json``.

    Reads ``$HARNESS_DATA_DIR`` in place if set, else the cache. Raises ``DataMissingError`` (with
    the command that fixes it) if the file is absent or does not match its pinned hash.
    """
    entry = _manifest_entry(version, relpath)
    mirror = os.environ.get("HARNESS_DATA_DIR")
    if mirror:
        where = Path(mirror).expanduser()
        candidates = _mirror_candidates(where, version, relpath)
    else:
        where = cache_dir(version)
        candidates = [where / relpath]
    present = [p for p in candidates if p.is_file()]
    for path in present:
        if _file_ok(entry, path):
            return path
    raise _missing_error(version, where, relpath, corrupt=bool(present))


def data_dir(version: str = DEFAULT_VERSION) -> Path:
    """The directory holding ``version`` after checking that every file is present and valid.

    For a τ² mirror this is ``<mirror>/tau2``, which holds only the τ²-specific files: use
    ``data_file`` / ``airline_paths`` to open files.
    """
    for entry in _check_version(version):
        data_file(version, entry.path)
    mirror = os.environ.get("HARNESS_DATA_DIR")
    return Path(mirror).expanduser() / version if mirror else cache_dir(version)


def _download(url: str, timeout: float = 60.0, attempts: int = 3) -> bytes:
    """GET ``url``; retries transient failures (network errors, 5xx) with a short backoff."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            last = exc
            exc.close()  # the error carries the open response
            if exc.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            last = exc
        if attempt + 1 < attempts:
            time.sleep(0.5 * 2**attempt)
    reason = f"HTTP {last.code} {last.reason}" if isinstance(last, urllib.error.HTTPError) else (
        getattr(last, "reason", None) or last)
    raise HarnessError(f"could not download {url}: {reason}. Offline: use `harness data pull --from DIR` "
                       "with a local mirror, or set HARNESS_DATA_DIR=/path/to/mirror")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pull(version: str = DEFAULT_VERSION, from_dir: str | os.PathLike | None = None, force: bool = False,
         progress: Callable[[str, str], None] | None = None) -> Path:
    """Fetch, verify and store ``version`` in the cache; returns the cache directory.

    ``from_dir``: copy from a local mirror (layout as ``$HARNESS_DATA_DIR``) instead of downloading
    from ``$HARNESS_TAU_DATA_URL`` (default raw GitHub) ``/<commit>/<path>``. Files already present
    and valid are skipped unless ``force``. ``progress(relpath, status)`` is called per file with
    status ``cached``, ``copied`` or ``downloaded``. Nothing is written unless every file verifies.
    """
    files, target = _check_version(version), cache_dir(version)
    report = progress or (lambda relpath, status: None)
    base_url = (os.environ.get("HARNESS_TAU_DATA_URL") or DEFAULT_BASE_URL).rstrip("/")
    mirror = Path(from_dir).expanduser() if from_dir is not None else None
    if mirror is not None and not mirror.is_dir():
        raise DataMissingError(f"--from directory {mirror} does not exist (expected <dir>/{version}/data/tau2/...)")
    fetched: list[tuple[ManifestFile, bytes, str]] = []
    for entry in files:
        dest = target / entry.path
        if not force and _file_ok(entry, dest):
            report(entry.path, "cached")
            continue
        if mirror is not None:
            src = next((p for p in _mirror_candidates(mirror, version, entry.path) if p.is_file()), None)
            if src is None:
                raise DataMissingError(f"{entry.path} not found in mirror {mirror} (expected <dir>/{version}/...)")
            data, source, status = src.read_bytes(), str(src), "copied"
        else:
            source = f"{base_url}/{entry.commit}/{entry.path}"
            data, status = _download(source), "downloaded"
        _verify(entry, data, source)
        fetched.append((entry, data, status))
    for entry, data, status in fetched:
        write_atomic(target / entry.path, data)
        report(entry.path, status)
    return target


@dataclass(frozen=True)
class AirlinePaths:
    """Verified paths of the airline files of one data version."""

    db: Path
    policy: Path
    tasks: Path
    split_tasks: Path
    user_guidelines: Path
    """User-simulator guidelines for users without tools (airline users have none)."""


def airline_paths(version: str = DEFAULT_VERSION) -> AirlinePaths:
    """Paths of the airline files; for ``tau2`` the split file is the τ³ one (same content; it did not
    exist at v0.2.0)."""
    air = f"{_DOMAINS}/airline"
    return AirlinePaths(
        db=data_file(version, f"{air}/db.json"), policy=data_file(version, f"{air}/policy.md"),
        tasks=data_file(version, f"{air}/tasks.json"), split_tasks=data_file(version, f"{air}/split_tasks.json"),
        user_guidelines=data_file(version, f"{_USER_SIM}/simulation_guidelines.md"))


def load_airline_tasks(version: str = DEFAULT_VERSION, split: str = "base") -> list[dict[str, Any]]:
    """Raw airline task dicts of ``split`` (``base``, ``train``, ``test``), in ``tasks.json`` order."""
    paths = airline_paths(version)
    splits: dict[str, list[str]] = json.loads(paths.split_tasks.read_text(encoding="utf-8"))
    if split not in splits:
        raise ConfigError(f"unknown split {split!r} for tau-airline ({version}); valid: {', '.join(sorted(splits))}")
    wanted = {str(i) for i in splits[split]}
    tasks: list[dict[str, Any]] = json.loads(paths.tasks.read_text(encoding="utf-8"))
    return [t for t in tasks if str(t["id"]) in wanted]
