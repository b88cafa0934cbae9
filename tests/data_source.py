"""Where the test suite reads the official τ data from (the tests never fetch it themselves).

Lookup order, first hit wins:

1. ``$HARNESS_DATA_DIR`` when set and non-empty: a mirror you point to (layout
   ``<dir>/tau3/data/tau2/...``, ``<dir>/tau2/data/tau2/...``);
2. ``../shared/data/tau`` beside the repository: this project's CI layout;
3. the per-user cache that ``harness data pull`` fills (``<cache root>/tau``, which has the same
   layout), when both τ versions there are complete and verified.

With ``--pull`` (what ``scripts/test.sh`` runs), a miss at all three fetches the pinned,
checksum-verified files into the cache first (``harness data pull`` for tau3 and tau2; files
already valid are reused), so a fresh clone anywhere with network access runs the suite.

    .venv/bin/python tests/data_source.py --pull     # prints the directory to export
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("tau3", "tau2")


def sibling_mirror(repo: Path = REPO) -> Path:
    return repo.parent / "shared" / "data" / "tau"


def _cache_complete() -> bool:
    from envs.tau import data

    return all(data._file_ok(entry, data.cache_dir(v) / entry.path) for v in VERSIONS for entry in data.MANIFEST[v])


def locate(repo: Path = REPO, pull: bool = False) -> tuple[Path | None, str]:
    """``(mirror directory, where it came from)``; ``(None, why)`` when nothing is there and
    ``pull`` is off."""
    from envs.tau import data

    env = os.environ.get("HARNESS_DATA_DIR")
    if env:
        return Path(env).expanduser(), "HARNESS_DATA_DIR"
    shared = sibling_mirror(repo)
    if (shared / "tau3").is_dir():
        return shared, "../shared/data/tau"
    cache = data.cache_dir("tau3").parent
    if _cache_complete():
        return cache, "cache"
    if not pull:
        return None, (f"no τ data: HARNESS_DATA_DIR is unset, {shared} does not exist and the cache {cache} "
                      "is incomplete; run `bash scripts/test.sh` (it pulls the data) or "
                      "`harness data pull tau-airline`")
    for version in VERSIONS:
        data.pull(version)
    return cache, "pulled"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from harness.errors import HarnessError

    try:
        path, source = locate(pull="--pull" in argv)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is None:
        print(f"error: {source}", file=sys.stderr)
        return 2
    print(f"τ data for the tests: {path} ({source})", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
