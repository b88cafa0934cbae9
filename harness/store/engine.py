"""Opening a database: the SQLAlchemy engine for a ``--db`` URL, and every storage failure as one line.

Why: a wrong ``--db`` (a directory, a file that is not SQLite, a missing driver, a read-only
place) must be refused when the ``Store`` opens, before any episode is played and paid for, with
one line naming the database and the cause; and a failure later (a full disk, a lock held past the
busy timeout) must read the same way instead of a traceback.

Decisions:

- Every database error except ``IntegrityError`` (which the store handles: duplicates, races)
  reaches callers as ``StorageError`` (a ``HarnessError``: the CLI prints it as one line), raised
  from the engine's ``handle_error`` hook, so the accessors in ``train``, ``guidance`` and
  ``records`` get it without their own try blocks. The original error stays its ``__cause__``.
- URLs in messages never show a password (``safe_url``).
- A SQLite file (or its directory) that this process cannot write is opened read-only
  (``mode=ro``), so ``harness results ...`` reads databases on read-only media or owned by someone
  else; where the directory is read-only and no write-ahead log is pending, the file is opened
  ``immutable`` (WAL readers otherwise need to create the ``-shm`` file beside it).
- SQLite: WAL journal (``use_wal``), and on each connection ``synchronous=NORMAL``,
  ``foreign_keys=ON`` and a busy timeout of 30 s (the URL's ``?timeout=SECONDS`` changes it).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError

from harness.errors import HarnessError

__all__ = ["StorageError", "open_engine", "use_wal", "safe_url", "is_locked"]

SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0

# The pip install that provides the default driver of a backend.
_DRIVER_HINTS = {
    "postgresql": "install it with pip install 'harness[postgres]' and use a postgresql+psycopg:// URL",
    "mysql": "install one with pip install pymysql and use a mysql+pymysql:// URL",
    "mariadb": "install one with pip install pymysql and use a mariadb+pymysql:// URL",
}


class StorageError(HarnessError):
    """The results database cannot be opened, read or written; the message names it and the cause."""

    def __init__(self, message: str, locked: bool = False):
        super().__init__(message)
        self.locked = locked
        """True when another connection held a lock past the busy timeout (worth retrying)."""


def safe_url(url: str | URL) -> str:
    """``url`` as text with any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def is_locked(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and exc.locked


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_engine(url: str, read_only: bool = False) -> tuple[Engine, bool]:
    """(engine, read_only) for ``url``; a URL that cannot work raises ``StorageError``. With
    ``read_only`` the engine never writes (``harness view``): a SQLite file is opened ``mode=ro``
    (a missing one is refused rather than created), a PostgreSQL session is read-only."""
    shown = safe_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"--db {shown!r} is not a database URL; use e.g. sqlite:///results/harness.db "
                           "or postgresql+psycopg://user@host/harness") from None
    forced = read_only
    try:
        if parsed.get_backend_name() == "sqlite":
            engine, read_only = _sqlite_engine(parsed, shown, forced)
        else:
            engine = create_engine(parsed)
            if forced and parsed.get_backend_name() == "postgresql":
                event.listen(engine, "connect", _postgres_read_only)
    except NoSuchModuleError:
        raise StorageError(f"--db {shown!r}: SQLAlchemy knows no database kind {parsed.drivername!r}; use e.g. "
                           "sqlite:///results/harness.db or postgresql+psycopg://user@host/harness") from None
    except ImportError as exc:
        hint = _DRIVER_HINTS.get(parsed.get_backend_name(), "install the Python driver it names")
        raise StorageError(f"database {shown}: its driver is not installed ({_one_line(exc)}); {hint}") from None
    except ArgumentError as exc:
        raise StorageError(f"database {shown}: {_one_line(exc)}") from None

    @event.listens_for(engine, "handle_error")
    def _as_storage_error(context) -> None:
        exc = context.sqlalchemy_exception
        if isinstance(exc, IntegrityError) or not isinstance(exc, DBAPIError):
            return  # duplicates and races are the store's to settle
        cause = _one_line(exc)
        locked = "database is locked" in cause or "database table is locked" in cause
        if "readonly database" in cause:
            cause += " (the file or its directory is not writable)"
        elif "malformed" in cause or "not a database" in cause:
            cause += " (the file is damaged or truncated; pick another --db or restore it)"
        raise StorageError(f"database {shown}: {cause}", locked=locked) from exc

    return engine, read_only


def _postgres_read_only(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cur.close()
    dbapi_conn.commit()


def _sqlite_engine(parsed: URL, shown: str, forced_read_only: bool = False) -> tuple[Engine, bool]:
    database = parsed.database or ""
    try:
        timeout = float(parsed.query.get("timeout", BUSY_TIMEOUT_S))
    except ValueError:
        raise StorageError(f"database {shown}: ?timeout= takes seconds, e.g. ?timeout=30") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        engine = create_engine(parsed)  # in memory, or the caller's own URI: taken as given
        event.listen(engine, "connect", _sqlite_pragmas(timeout, read_only=False))
        return engine, forced_read_only
    path = Path(database).expanduser()
    if forced_read_only and not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise StorageError(f"database {shown}: {path} {what}; give the path of an existing results database")
    file_id = _file_id(path)
    if file_id is not None and file_id in _CHECKED_IN_THIS_PROCESS:
        # Never open the file again beside SQLite connections this process may hold: closing any
        # descriptor of a file drops every POSIX lock the process holds on it (SQLite's among
        # them), and another process may then checkpoint and remove the WAL under those
        # connections ("disk I/O error"; seen with a second Store in train-suite and a reader).
        read_only = _only_readable(path) or forced_read_only
    else:
        read_only = _check_sqlite_file(path, shown) or forced_read_only
        file_id = _file_id(path)  # the check may have created the file's directory, not the file
        if file_id is not None:
            _CHECKED_IN_THIS_PROCESS.add(file_id)
    if not read_only:
        engine = create_engine(parsed)
    else:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        if not os.access(path.parent, os.W_OK) and not _pending_wal(path):
            uri += "&immutable=1"  # nobody can write here; and the -shm file cannot be created
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
    event.listen(engine, "connect", _sqlite_pragmas(timeout, read_only))
    return engine, read_only


_CHECKED_IN_THIS_PROCESS: set[tuple[int, int]] = set()
"""(device, inode) of the SQLite files this process has checked, and so may hold connections to."""


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_sqlite_file(path: Path, shown: str) -> bool:
    """Refuse a path that cannot hold a SQLite database; True when it can only be read."""
    if path.is_dir():
        raise StorageError(f"database {shown}: {path} is a directory; give a file path such as {path}/harness.db")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"database {shown}: cannot create directory {path.parent} ({exc.strerror})") from None
        if not os.access(path.parent, os.W_OK):
            raise StorageError(f"database {shown}: {path} does not exist and its directory is not writable")
        return False
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StorageError(f"database {shown}: cannot read {path} ({exc.strerror})") from None
    if header and header != SQLITE_HEADER[:len(header)]:
        raise StorageError(f"database {shown}: {path} is not a SQLite database; pick another --db")
    if header and len(header) < len(SQLITE_HEADER):
        raise StorageError(f"database {shown}: {path} is truncated ({len(header)} bytes); pick another --db")
    return _only_readable(path)


def _only_readable(path: Path) -> bool:
    """SQLite can read but not write here (the file, or its folder for the journal, is not writable)."""
    return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def _pending_wal(path: Path) -> bool:
    wal = path.with_name(path.name + "-wal")
    return wal.exists() and wal.stat().st_size > 0


def _sqlite_pragmas(timeout: float, read_only: bool):
    pragmas = [f"busy_timeout={int(timeout * 1000)}", "foreign_keys=ON"]
    if not read_only:
        # synchronous=NORMAL is the documented safe pairing with WAL: a killed process loses nothing
        # committed; only a power cut may drop the last commits. It avoids an fsync per episode.
        pragmas.append("synchronous=NORMAL")

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        for pragma in pragmas:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    return on_connect


def use_wal(engine: Engine) -> None:
    """Switch a SQLite file to the WAL journal (kept in the file). Done once the file is known to
    be the harness's, so a file that is refused is left exactly as it was."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
