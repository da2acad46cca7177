"""What a participant needs of its store, and SQL that runs on either store.

A store runs jobs: `await store.write(fn)` calls `fn(connection)` inside one local
transaction and returns once that transaction is committed (and, with
`durable=True`, on disk). The connection a job gets is the store's own:

* `twopc.store.SqliteStore`: a `sqlite3.Connection` (the standard library);
* `twopc.stores.postgres.PostgresStore`: a `sqlalchemy.Connection` on psycopg.

Business SQL stays portable by writing it once with named parameters (`:name`) and
running it through `execute`: SQLite's own driver takes `:name` natively, and
SQLAlchemy's `text()` compiles the same text for psycopg, once per text; the
statement then runs on psycopg directly (`twopc.stores.postgres.run`), since
SQLAlchemy's execution machinery cost more CPU than the statement. Nothing else
rewrites SQL here; each driver reads what it documents. The statements themselves
must be in the dialects' common subset (standard DML is; DDL often is not, which is
why a handler's `schema` may be given per dialect).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

from twopc.errors import TwoPCError
from twopc.stores.sqlite import SqliteStore, StoreStats

T = TypeVar("T")

Connection = Any
"""A job's connection: `sqlite3.Connection` or `sqlalchemy.Connection`."""

POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
"""What `?schema=` may name in a PostgreSQL URL: a lowercase SQL identifier."""


def url_schema(url: str) -> str | None:
    """The schema a PostgreSQL URL names with `?schema=` (every URL twopc takes:
    stores, the adapter, the decision log, the CLI), or None.

    Raises:
        ValueError: it is not a lowercase SQL identifier.
    """
    values = [v for k, v in parse_qsl(urlsplit(url).query) if k == "schema"]
    if not values:
        return None
    if len(values) > 1 or not SCHEMA_NAME.fullmatch(values[0]):
        raise ValueError(f"?schema= must be one lowercase SQL identifier, got {', '.join(values)!r}")
    return values[0]


class StoreUnavailableError(TwoPCError):
    """The store could not run the job now, and nothing of it can be promised: the
    database is unreachable, or the connection broke so that whether the job
    committed is unknown. Retry later; a participant answers UNAVAILABLE.
    """


class ConflictError(StoreUnavailableError):
    """The job kept losing to concurrent transactions (serialization failures,
    deadlocks, lock timeouts) and was given up; it changed nothing. A Prepare
    votes ABORT with this reason."""


class StoreSetupError(TwoPCError):
    """The store refuses to open for a reason that a restart does not fix: a bad URL,
    authentication, a database that does not exist, a schema that does not apply.
    (A database that is down or still starting is `StoreUnavailableError`: retry.)"""


class Store(Protocol):
    """A participant's store.

    Attributes:
        dialect: "sqlite" or "postgresql": which `schema` of a handler to apply.
        schema: SQL run when the store opens (`CREATE TABLE IF NOT EXISTS ...`).
        stats: counters of synced commits, for tests and benchmarks.
    """

    dialect: str
    schema: str
    stats: StoreStats

    @property
    def failed(self) -> bool:
        """True once the store has stopped for good (a failed fsync)."""
        ...

    @property
    def is_open(self) -> bool:
        """True between `open` and `close`."""
        ...

    async def wait_failed(self) -> BaseException:
        """Returns the store's fatal error once it has failed for good."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, fn: Callable[[Connection], T], *, durable: bool = True, inline_if_idle: bool = False) -> T:
        """Runs `fn(connection)` in one local transaction; returns once committed."""
        ...

    async def read(self, fn: Callable[[Connection], T]) -> T: ...


def open_store(where: Store | str | os.PathLike[str], **options: Any) -> Store:
    """The store for a SQLite path or a PostgreSQL URL (`postgresql://...`).

    Args:
        where: a file path (SQLite), a URL (PostgreSQL), or a store, returned as is.
        options: keyword arguments for `PostgresStore` (pool size, timeouts).
    """
    if isinstance(where, str) and where.startswith(POSTGRES_SCHEMES):
        from twopc.stores.postgres import PostgresStore  # the [postgres] extra, only when used

        return PostgresStore(where, **options)
    if isinstance(where, str | os.PathLike):
        return SqliteStore(where)
    return where


def execute(db: Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    """Runs one statement with named parameters (`:name`) on a job's connection.

    Returns the driver's cursor or result: both iterate rows as tuples and have
    `fetchone`, `fetchall` and `rowcount`.
    """
    if isinstance(db, sqlite3.Connection):
        return db.execute(sql, params or {})
    from twopc.stores.postgres import run  # the [postgres] extra, only when used

    return run(db, sql, params)


def lock_rows(db: Connection, table: str, column: str, keys: Iterable[Any]) -> None:
    """Locks the rows of `table` whose `column` is one of `keys`, until the job ends.

    On PostgreSQL, `SELECT ... FOR UPDATE` one key at a time in sorted order (two jobs
    locking overlapping rows queue instead of deadlocking); a job that reads a row to
    decide, then writes, locks it first, so its later statements see every commit
    before it and none after. On SQLite it does nothing: its one writer runs jobs one
    at a time. `table` and `column` are the caller's identifiers, never user input.
    """
    if isinstance(db, sqlite3.Connection):
        return
    if not (table.isidentifier() and column.isidentifier()):
        raise ValueError(f"not an identifier: {table!r}.{column!r}")
    sql = f"SELECT 1 FROM {table} WHERE {column} = :key FOR UPDATE"  # identifiers checked above
    for key in sorted(set(keys)):
        execute(db, sql, {"key": key})


def for_update(db: Connection, select: str) -> str:
    """`select` made to lock the rows it reads until the job ends: with `FOR UPDATE`
    on PostgreSQL (one statement where `lock_rows` and a read are two); as it is on
    SQLite, whose one writer runs jobs one at a time. Read and lock one table's rows
    this way, not a join or a subquery: under READ COMMITTED only the locked rows
    are read again at their latest version once the lock is held."""
    return select if isinstance(db, sqlite3.Connection) else f"{select} FOR UPDATE"


_RERUN = ("40001", "40P01")  # serialization_failure, deadlock_detected: the job runs again
_ITEM_CONFLICTS = {
    "55P03": "lock wait timed out",  # lock_not_available: waited past lock_timeout_s
    "57014": "statement timed out",  # query_canceled: statement_timeout
    "23505": "unique violation",
    "23514": "check violation",
    "23503": "foreign key violation",
    "23502": "not-null violation",
    "23P01": "exclusion violation",
}


def _sqlstate(error: BaseException) -> str:
    return str(getattr(getattr(error, "orig", None), "sqlstate", None) or getattr(error, "sqlstate", None) or "")


def is_retried(error: BaseException) -> bool:
    """True for a database error after which the store runs the whole job again on a
    fresh snapshot (PostgreSQL's: a serialization failure, a deadlock, a lost
    connection): a job that catches errors of its own must let these through. Never
    true on SQLite. The errors of one statement (a lock wait past `lock_timeout_s`, a
    constraint) are not: see `item_conflict`."""
    exc = sys.modules.get("sqlalchemy.exc")  # loaded only where PostgreSQL is used
    if exc is None or not isinstance(error, exc.DBAPIError):
        return False
    state = _sqlstate(error)
    if state in _RERUN or state.startswith(("08", "57P")) or error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError) and not state  # the connection broke: no server answer


def item_conflict(error: BaseException) -> str | None:
    """Why one statement of a job lost to the database, for people ("lock wait timed
    out", "unique violation on accounts_pkey"), if that is what `error` is: the job
    may roll back to a savepoint and go on (a batch votes ABORT for that item). None
    for anything else."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None or not isinstance(error, exc.DBAPIError):
        return None
    what = _ITEM_CONFLICTS.get(_sqlstate(error))
    if what is None:
        return None
    constraint = getattr(getattr(error.orig, "diag", None), "constraint_name", None)
    return f"{what} on {constraint}" if constraint else what


def schema_for(schema: str | Mapping[str, str], dialect: str) -> str:
    """A handler's schema for one dialect: the same text for both, or one per dialect."""
    if isinstance(schema, str):
        return schema
    if dialect not in schema:
        raise ValueError(f"the handler's schema has no {dialect!r} version (it has {sorted(schema)})")
    return schema[dialect]


@contextlib.contextmanager
def snapshot(where: str | os.PathLike[str]) -> Iterator[Any]:
    """A read-only, consistent view of a store, opened as another process would open
    it: a SQLite file (WAL lets it read while the service writes), or a PostgreSQL
    URL (one REPEATABLE READ snapshot). Run SQL on it with `twopc.stores.execute`."""
    if isinstance(where, str) and where.startswith(POSTGRES_SCHEMES):
        with _engine(where).connect() as pg:
            pg.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield pg
        return
    conn = sqlite3.connect(f"file:{os.fspath(where)}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")  # one snapshot for every query in the block
        yield conn
    finally:
        conn.close()


@functools.cache
def _engine(url: str) -> Any:
    import sqlalchemy

    from twopc.stores.postgres import engine_url

    # Autocommit at the driver so the snapshot's own BEGIN opens the transaction.
    return sqlalchemy.create_engine(engine_url(url), poolclass=sqlalchemy.NullPool, isolation_level="AUTOCOMMIT")


def query(where: str | os.PathLike[str], sql: str, *params: Any, **named: Any) -> list[tuple[Any, ...]]:
    """The rows of one query against a store (file or URL), read-only. Parameters are
    `?` positional (SQLite only) or `:name` keywords (either store)."""
    with snapshot(where) as db:
        if params:
            return db.execute(sql, params).fetchall()  # type: ignore[no-any-return]
        return [tuple(row) for row in execute(db, sql, named)]
