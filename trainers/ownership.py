"""Which training run a run directory belongs to: ``<out_dir>/run.json``.

A run writes the file when it starts (and again when it resumes): its name, the database it lives
in (URL without user name or password), and the run row's id and creation time, which tell two
runs of one name apart (another database, or a run deleted and started again). A new run refuses
a directory that has an owner file or any checkpoint; a resumed run refuses a directory whose owner
file names another run. Checkpoints name their run as well (``trainer_state.pt``: ``run``), which
``--resume`` checks before loading anything (``trainers.loop``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.redact import redact
from harness.store import RunRecord

__all__ = ["OWNER_FILE", "owner_of", "read_owner", "check_new_run_dir", "check_resumed_run_dir", "claim_run_dir",
           "check_checkpoint_owner", "public_db_url"]

OWNER_FILE = "run.json"
_WHAT_TO_DO = "pass --out-dir DIR, pick another --run, or delete {out} if it is not needed"


def public_db_url(url: str) -> str:
    """``url`` without user name and password (what may be written next to checkpoints)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: keep nothing that could be a secret
        return redact(url.split("@")[-1])
    # URL.set() reads None as "unchanged"; the named tuple's _replace clears them; redact masks
    # what the query may hold (?password=...)
    return redact(parsed._replace(username=None, password=None).render_as_string(hide_password=False))


def _stamp(when: datetime) -> str:
    """A creation time the same whether the row was just written (aware) or read back (naive UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat()


def owner_of(record: RunRecord, db_url: str) -> dict[str, Any]:
    """What ``run.json`` says for the run ``record`` of database ``db_url``."""
    return {"run": record.name, "db": public_db_url(db_url), "run_id": record.id,
            "created_at": _stamp(record.created_at)}


def read_owner(out: Path) -> dict[str, Any] | None:
    """The owner recorded in ``out`` (None: no owner file); an unreadable file is refused."""
    path = Path(out) / OWNER_FILE
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); " + _WHAT_TO_DO.format(out=out)) from None
    if not isinstance(owner, dict) or not isinstance(owner.get("run"), str):
        raise ConfigError(f"{path} names no run; " + _WHAT_TO_DO.format(out=out))
    return owner


def _describe(owner: dict[str, Any]) -> str:
    return f"run '{owner['run']}' of {owner.get('db', 'an unknown database')} (started {owner.get('created_at')})"


def _has_checkpoints(out: Path) -> bool:
    root = Path(out) / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step-") for p in root.iterdir())


def check_new_run_dir(out: Path, run: str) -> None:
    """A new run ``run`` may write to ``out`` only if no run owns it: no owner file, no checkpoints."""
    owner = read_owner(out)
    if owner is not None:
        raise ConfigError(f"{out} belongs to {_describe(owner)}, not to the new run '{run}'; "
                          + _WHAT_TO_DO.format(out=out))
    if _has_checkpoints(out):
        raise ConfigError(f"{out} holds checkpoints of an earlier run (and no {OWNER_FILE} naming it), not of the "
                          f"new run '{run}'; " + _WHAT_TO_DO.format(out=out))


def check_resumed_run_dir(out: Path, record: RunRecord, db_url: str) -> None:
    """The resumed run ``record`` may write to ``out`` if the owner file names it (or there is none:
    a run started before owners were recorded; its checkpoints are checked one by one on load)."""
    owner = read_owner(out)
    if owner is None:
        return
    mine = owner_of(record, db_url)
    if any(owner.get(k) != mine[k] for k in ("run", "run_id", "created_at")):
        raise ConfigError(f"{out} belongs to {_describe(owner)}, not to the resumed run '{record.name}' of "
                          f"{mine['db']} (started {mine['created_at']}); pass the run's own --out-dir, or "
                          "pick another --run")


def claim_run_dir(out: Path, record: RunRecord, db_url: str) -> None:
    """Write ``out/run.json`` for ``record`` (atomically: a kill leaves the old file or the new one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(owner_of(record, db_url), indent=2) + "\n")
    os.replace(tmp, out / OWNER_FILE)


def check_checkpoint_owner(state: dict[str, Any], path: Path, run: str) -> None:
    """Refuse to resume run ``run`` from a checkpoint whose trainer state names another run
    (checkpoints written before runs were named in them name none, and are accepted)."""
    owner = state.get("run")
    if owner is not None and owner != run:
        raise ConfigError(f"checkpoint {path} belongs to run '{owner}', not '{run}'; resume run '{owner}' from it, "
                          f"or restore run '{run}''s own checkpoint there")
