"""The schema version of a results database: checked, migrated and stamped when a ``Store`` opens.

Why: a file written by another program, or by a newer harness whose tables this one does not
know, must be refused before an eval plays (and pays for) any episode, not fail on the first
insert or, worse, be written into. An older harness's file is brought up to date in place.

Versions (``harness_meta.schema_version``):

1. the tables as first released, without ``harness_meta`` (``runs.status_reason`` was later added
   to them in place, see ``ADDED_COLUMNS``);
2. ``harness_meta`` records the version;
3. ``token_credit`` (per-token credit of recorded training groups) is added.

A database is judged by its tables: none (a new or empty file) is created; ``harness_meta`` with
a version above ``SCHEMA_VERSION`` is refused ("made by a newer harness"); harness tables without
``harness_meta`` are version 1 if every column of the first release is there (migrated and
stamped), and foreign otherwise; tables of which none is the harness's are foreign (refused). A
read-only database is read as it is if it needs no migration or lacks only optional tables added
later (``ADDED_TABLES``), and refused otherwise.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, inspect, select, text, update
from sqlalchemy.exc import DBAPIError

from harness.store.engine import StorageError
from harness.store.schema import Base, HarnessMeta

__all__ = ["SCHEMA_VERSION", "ADDED_COLUMNS", "ADDED_TABLES", "prepare_schema"]

SCHEMA_VERSION = 3

ADDED_COLUMNS = (("runs", "status_reason"),)
"""(table, column) added after the first release: nullable, so old rows read as empty."""

ADDED_TABLES = ("token_credit",)
"""Tables added after version 2 that hold only optional records: a read-only database without
them is read as it is (its readers find no rows, ``harness.store.credit``) instead of refused."""

_META = HarnessMeta.__tablename__
_CORE_TABLES = {"runs", "episodes"}


def prepare_schema(engine: Engine, shown: str, read_only: bool) -> None:
    """Make the database at ``engine`` hold this harness's schema, or raise ``StorageError``.

    Two processes opening a new database at once can both see a table missing and both create it;
    the loser's error ("already exists", or a unique violation in PostgreSQL's catalog) means the
    other one did, so the check runs again."""
    for attempt in range(3):
        try:
            _prepare(engine, shown, read_only)
            return
        except (StorageError, DBAPIError) as exc:
            if attempt == 2 or read_only or _refusal(exc):
                raise


def _refusal(exc: Exception) -> bool:
    return isinstance(exc, StorageError) and exc.__cause__ is None


def _prepare(engine: Engine, shown: str, read_only: bool) -> None:
    from harness import __version__

    inspector = inspect(engine)
    tables = set(inspector.get_table_names())
    if _META in tables:
        with engine.connect() as conn:
            version = _stored_version(conn)
    else:
        version = None
    if version is not None and version > SCHEMA_VERSION:
        raise StorageError(f"database {shown} was made by a newer harness (schema version {version}; this harness "
                           f"reads up to {SCHEMA_VERSION}); upgrade harness to use it")
    ours = tables & set(Base.metadata.tables)
    if tables and not ours & _CORE_TABLES and _META not in tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(f"database {shown} is not a harness database (it holds other tables: {listed}); "
                           "pick another --db")
    missing_columns = []
    for table in sorted(ours - {_META}):
        have = {c["name"] for c in inspector.get_columns(table)}
        want = set(Base.metadata.tables[table].c.keys())
        first_release = want - {column for t, column in ADDED_COLUMNS if t == table}
        if not first_release <= have:
            raise StorageError(f"database {shown} is not a harness database (its table {table} lacks "
                               f"{', '.join(sorted(first_release - have))}); pick another --db")
        missing_columns += [(table, c) for t, c in ADDED_COLUMNS if t == table and c not in have]
    up_to_date = version == SCHEMA_VERSION and not missing_columns and ours == set(Base.metadata.tables)
    if up_to_date:
        return
    if read_only and version is not None and not missing_columns \
            and set(Base.metadata.tables) - ours <= set(ADDED_TABLES):
        return
    if read_only:
        raise StorageError(f"database {shown} was made by an older harness and is read-only here; open it once "
                           "where it is writable (any harness command) to upgrade it")
    Base.metadata.create_all(engine)
    for table, column in missing_columns:
        _add_column(engine, table, column)
    with engine.begin() as conn:
        if _stored_version(conn) is None:
            conn.execute(HarnessMeta.__table__.insert().values(id=1, schema_version=SCHEMA_VERSION,
                                                               written_by=__version__))
        else:
            conn.execute(update(HarnessMeta).where(HarnessMeta.id == 1, HarnessMeta.schema_version < SCHEMA_VERSION)
                         .values(schema_version=SCHEMA_VERSION, written_by=__version__))


def _stored_version(conn: Connection) -> int | None:
    return conn.execute(select(HarnessMeta.schema_version).where(HarnessMeta.id == 1)).scalar_one_or_none()


def _add_column(engine: Engine, table: str, column: str) -> None:
    sql = Base.metadata.tables[table].c[column].type.compile(dialect=engine.dialect)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql}"))
    except (StorageError, DBAPIError):  # another process added it first
        if column not in {c["name"] for c in inspect(engine).get_columns(table)}:
            raise
