"""A participant's store in PostgreSQL: jobs run in parallel on a connection pool.

`PostgresStore` has the interface of `twopc.store.SqliteStore` (`write`, `read`,
`schema`, `stats`), so `Participant` keeps every rule it keeps on SQLite: a
prepare's table row and the business reservation commit in one local transaction,
and `write` returns only after PostgreSQL has committed it (with
`synchronous_commit = on`, once its WAL record is flushed: rule 1).

Where SQLite has one writer thread and batches jobs into one fsync, PostgreSQL has
many backends: jobs run concurrently on a pool of connections (one thread per
connection, since business code is synchronous), and PostgreSQL's own group commit
shares one WAL flush among the commits that arrive together.

Concurrency control is PostgreSQL's SERIALIZABLE isolation by default, so business
code that is correct on SQLite (one writer at a time) stays correct here: two
prepares racing for the last item cannot both reserve it. The loser gets a
serialization failure; the store runs the job again on a fresh snapshot (the job
must be a function of the database only), a few times with jittered backoff.
SERIALIZABLE also fails jobs that share no row (its predicate locks cover a page or
a whole small table), so under load many jobs run more than once. Code that locks
the rows its rules read (`twopc.stores.lock_rows`) can run at READ COMMITTED
(`isolation=`): jobs then queue only on the rows they share. There a unique
violation is what a concurrent insert of the same key looks like (SERIALIZABLE
reports it as a serialization failure), so the job runs again on a fresh
snapshot, where it sees that row (a few times at most: one that keeps coming back
is the job's own duplicate and is raised). A job that keeps losing, a
deadlock or a lock wait past `lock_timeout_s` raise `ConflictError`: a Prepare then
votes ABORT with that reason. A broken connection before COMMIT is retried (the
server rolled the transaction back); a broken connection *during* COMMIT leaves the
outcome unknown and raises `StoreUnavailableError`, so the participant votes nothing
it cannot stand behind. Retrying never duplicates work: a job runs again only after
its earlier attempt was rolled back.

Replicated PostgreSQL: the URL may name several hosts, as libpq's does
(`postgresql://u@a:5432,b:5432,c:5432/db?target_session_attrs=read-write`), and each
new connection goes to whichever is the primary. While there is none (a failover
under way) a lost connection is not an error yet: the job waits for a primary, with
backoff, for up to `failover_wait_s`, then runs again on it. A node that turned
read-only (demoted) counts as a lost connection. With `autocommit` the job runs
its own transactions and tells a repeat from a first run, so a connection lost at
any point, even in COMMIT PREPARED or PREPARE TRANSACTION, is settled the same way:
the job runs again on the new primary and first reads back what became of the
earlier run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import sqlalchemy
import structlog
from psycopg.pq import TransactionStatus
from sqlalchemy import event, exc
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import make_url

from twopc.errors import ClosedError
from twopc.stores.base import ConflictError, StoreSetupError, StoreUnavailableError, url_schema
from twopc.stores.sqlite import StoreStats

T = TypeVar("T")

_log = structlog.get_logger("twopc.stores.postgres")

# SQLSTATEs: https://www.postgresql.org/docs/current/errcodes-appendix.html
_RETRY = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_OPEN = (TransactionStatus.INTRANS, TransactionStatus.INERROR)
_UNIQUE = "23505"  # unique_violation
_UNIQUE_RERUNS = 3
_ISOLATIONS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
_CONFLICT = {"55P03": "lock wait timed out", "57014": "statement timed out"}  # lock_not_available, query_canceled
_READ_ONLY = "25006"  # read_only_sql_transaction: the node is a standby now


def run(conn: sqlalchemy.Connection, sql: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
    """Runs `sql` (`:name` parameters) on the psycopg connection under `conn`, in the
    job's transaction: `twopc.stores.execute` on PostgreSQL.

    SQLAlchemy compiles each text once (`:name` to `%(name)s`, `%` escaped); the
    statement then goes to psycopg directly (which prepares a statement it sees
    often), without SQLAlchemy's per-statement execution and result machinery. A
    driver error is raised as SQLAlchemy would have raised it (`exc.DBAPIError`
    and its subclasses), so callers and the store's retries see no difference; a
    connection the error broke is invalidated, so the pool drops it.
    """
    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        return raw.execute(_pyformat(sql), params or {})  # type: ignore[no-any-return]
    except psycopg.Error as e:
        broken = raw.broken or raw.closed
        if broken:
            conn.invalidate(e)
        raise exc.DBAPIError.instance(sql, params, e, psycopg.Error, connection_invalidated=broken) from e


@functools.lru_cache(maxsize=1024)
def _pyformat(sql: str) -> bytes:
    """`sql` with psycopg's placeholders, encoded once."""
    return sqlalchemy.text(sql).compile(dialect=_DIALECT).string.encode()


_DIALECT = psycopg_dialect.dialect()  # type: ignore[no-untyped-call]


# What a server says while it cannot take connections yet, or for now: worth retrying.
_NOT_YET = ("starting up", "shutting down", "in recovery", "not yet accepting", "too many", "connection slots")


def _refused_for_good(error: BaseException) -> bool:
    """True if the server answered a connection with a refusal that waiting does not
    change (authentication, an unknown role or database): psycopg gives no SQLSTATE
    for a failed connection, so the server's FATAL message is what tells. No answer at
    all (refused, unreachable, a name that does not resolve yet) is worth retrying."""
    message = str(error)
    return "FATAL" in message and not any(phrase in message for phrase in _NOT_YET)


def engine_url(url: str) -> sqlalchemy.URL:
    """A `postgresql://` URL for SQLAlchemy with the psycopg (3) driver; its
    `?schema=NAME` becomes the connections' search_path, and libpq's multi-host form
    (`u@a:5432,b:5432/db`) becomes SQLAlchemy's (`u@/db?host=a:5432&host=b:5432`).

    Raises:
        ValueError: not a URL, or a bad schema name (one line, for a person).
    """
    schema = url_schema(url)
    parts = urlsplit(url)
    user, at, hosts = parts.netloc.rpartition("@")
    if "," in hosts:
        query = [("host", h) for h in hosts.split(",")] + parse_qsl(parts.query)
        url = urlunsplit(parts._replace(netloc=user + at, query=urlencode(query)))
    try:
        parsed = make_url(url).set(drivername="postgresql+psycopg")
    except exc.ArgumentError:
        raise ValueError(f"not a PostgreSQL URL: {url.split('@')[-1]!r}") from None
    if schema is None:
        return parsed
    options = parsed.query.get("options", "")
    options = " ".join([*([options] if isinstance(options, str) and options else []), f"-csearch_path={schema}"])
    return parsed.difference_update_query(["schema"]).update_query_dict({"options": options})


class PostgresStore:
    """A PostgreSQL database (or one schema of it) as a participant's store.

    Args:
        url: `postgresql://user@host:port/database`; add `?schema=name` to keep
            the tables in a schema (created if missing).
        schema: SQL run at open, under an advisory lock (`CREATE TABLE IF NOT EXISTS`);
            once per text: its digest is kept in `twopc_schema`.
        pool_size: connections (and threads) running jobs at once.
        lock_timeout_s: the longest a job waits for a row lock before giving up.
        statement_timeout_s: the longest one statement may run.
        retries: runs of a job that lost to a concurrent one before `ConflictError`.
        connect_timeout_s: the longest to wait for a new connection (per host), and
            for a sent packet to be acknowledged before the connection counts as lost.
        failover_wait_s: how long a job whose connection was lost waits (with
            backoff) for the server, or a new primary, before `StoreUnavailableError`.
        autocommit: jobs get a connection outside any transaction and run their own
            (`BEGIN ... PREPARE TRANSACTION`: `twopc.participant.prepared`); a job that fails is
            retried as a whole, so it must tell a repeat from a first run.
        isolation: "SERIALIZABLE" (the default: correct for code written for SQLite's
            one writer) or "READ COMMITTED" for jobs that lock the rows their rules
            read with `twopc.stores.lock_rows` (far fewer retries under load).
    """

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        schema: str = "",
        *,
        pool_size: int = 16,
        lock_timeout_s: float = 1.0,
        statement_timeout_s: float = 10.0,
        retries: int = 30,
        connect_timeout_s: float = 5.0,
        failover_wait_s: float = 30.0,
        autocommit: bool = False,
        isolation: str = "SERIALIZABLE",
    ) -> None:
        if isolation not in _ISOLATIONS:
            raise ValueError(f"unknown isolation level {isolation!r}")
        if pool_size < 1 or retries < 1:
            raise ValueError("pool_size and retries must be >= 1")
        if min(lock_timeout_s, statement_timeout_s, connect_timeout_s) <= 0 or failover_wait_s < 0:
            raise ValueError("timeouts must be > 0")
        self.url = url
        self.namespace = url_schema(url)  # ?schema=: created at open if missing
        engine_url(url)  # a bad URL fails here, in one line, not at the first job
        self.schema = schema
        self.pool_size = pool_size
        self.lock_timeout_s = lock_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s
        self.failover_wait_s = failover_wait_s
        self.autocommit = autocommit
        self.isolation = isolation
        self.stats = StoreStats()
        self.engine: sqlalchemy.Engine | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def path(self) -> str:
        """Where the data is, for messages (the URL without a password)."""
        return engine_url(self.url).set(drivername="postgresql").render_as_string(hide_password=True)

    @property
    def failed(self) -> bool:
        """Never: PostgreSQL itself stops on a failed fsync; a failed job is retried."""
        return False

    @property
    def is_open(self) -> bool:
        """True between `open` and `close`."""
        return self._executor is not None

    async def wait_failed(self) -> BaseException:
        """Never returns: nothing here is fatal to the process (PostgreSQL stops
        itself on a failed fsync, and recovers from its WAL)."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def open(self) -> None:
        """Creates the pool and applies the schema.

        Raises:
            RuntimeError: it is open already.
            StoreUnavailableError: the server cannot be reached, or is starting: retry.
            StoreSetupError: the server refused for good (authentication, no such
                database or role); a schema that does not apply raises the driver's error.
        """
        if self.is_open:
            raise RuntimeError(f"store {self.path} is open already")
        engine = sqlalchemy.create_engine(
            engine_url(self.url),
            pool_size=self.pool_size,
            max_overflow=0,
            pool_timeout=self.connect_timeout_s,
            isolation_level=self.isolation,
            connect_args={
                "connect_timeout": max(1, round(self.connect_timeout_s)),
                # A primary cut off by a partition must surface as a lost connection,
                # not a socket that waits for ever (the job then runs on the new one).
                "tcp_user_timeout": round(self.connect_timeout_s * 1000),
                "keepalives_idle": 1,
                "keepalives_interval": 1,
                "keepalives_count": 3,
            },
        )
        settings = (
            f"SET lock_timeout = {round(self.lock_timeout_s * 1000)};"
            f" SET statement_timeout = {round(self.statement_timeout_s * 1000)};"
            " SET synchronous_commit = on"
        )

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cur:
                for statement in settings.split(";"):
                    cur.execute(statement)
            dbapi_connection.commit()

        @event.listens_for(engine, "handle_error")
        def _demoted(context: sqlalchemy.engine.ExceptionContext) -> None:
            # A connection to a node that is no longer the primary is as good as
            # lost: SQLAlchemy then drops it (and the pool's older ones).
            if getattr(context.original_exception, "sqlstate", None) == _READ_ONLY:
                context.is_disconnect = True

        self.engine = engine
        self._executor = ThreadPoolExecutor(self.pool_size, thread_name_prefix="postgres")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._apply_schema)
        except BaseException:
            await self.close()
            raise

    def _apply_schema(self) -> None:
        assert self.engine is not None
        try:
            raw = self.engine.raw_connection()
        except (exc.DBAPIError, psycopg.OperationalError) as e:  # the pool raises the driver's own
            cause = getattr(e, "orig", None) or e
            if _refused_for_good(cause):
                raise StoreSetupError(f"{self.path} refused the connection: {cause}") from e
            raise StoreUnavailableError(f"cannot connect to {self.path}: {cause}") from e
        try:
            conn = raw.driver_connection
            assert conn is not None
            # Two services starting on one database must not race to create a table.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('twopc schema'))")
            if self.namespace is not None:  # checked by url_schema: a plain identifier
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.namespace}"'.encode())
            # Run a schema once: even `CREATE INDEX IF NOT EXISTS` locks its table, and
            # after a crash a prepared transaction may hold that table until resolved.
            conn.execute(b"CREATE TABLE IF NOT EXISTS twopc_schema (digest TEXT PRIMARY KEY)")
            digest = hashlib.sha256(self.schema.encode()).hexdigest()
            seen = conn.execute(b"SELECT 1 FROM twopc_schema WHERE digest = %s", (digest,)).fetchone()
            if seen is None and self.schema.strip():
                conn.execute(self.schema.encode())  # no parameters: many statements allowed
                conn.execute(b"INSERT INTO twopc_schema VALUES (%s)", (digest,))
            conn.commit()
        except psycopg.OperationalError as e:
            if e.sqlstate == "55P03":  # a new schema text waits on a table a prepared transaction holds
                hint = "; a prepared transaction holds a table: settle it (twopc participant in-doubt, twopc resolve)"
                raise StoreUnavailableError(f"cannot set up {self.path}: {e}{hint}") from e
            raise StoreUnavailableError(f"cannot set up {self.path}: {e}") from e
        finally:
            raw.close()

    async def close(self) -> None:
        """Waits for running jobs, then closes every connection."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def write(
        self, fn: Callable[[sqlalchemy.Connection], T], *, durable: bool = True, inline_if_idle: bool = False
    ) -> T:
        """Runs `fn(conn)` in a transaction at `isolation` and returns its result once
        committed (with `durable`, once the commit's WAL is flushed).

        `inline_if_idle` is SQLite's shortcut and means nothing here. `fn` may run
        more than once (after a serialization failure, a deadlock, a unique violation
        below SERIALIZABLE or a broken connection, each earlier run rolled back): it
        must depend on the database only.

        Raises:
            ConflictError: it kept losing to concurrent transactions; nothing changed.
            StoreUnavailableError: no connection, or the outcome of COMMIT is unknown.
            Exception: whatever `fn` raised; its changes are rolled back.
        """
        if self._executor is None:
            raise ClosedError(f"store {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, durable)

    async def read(self, fn: Callable[[sqlalchemy.Connection], T]) -> T:
        """Runs `fn(conn)` in a transaction and returns its result."""
        return await self.write(fn, durable=False)

    def _run(self, fn: Callable[[sqlalchemy.Connection], T], durable: bool) -> T:
        assert self.engine is not None
        lost: list[str] = []
        give_up = time.monotonic() + self.failover_wait_s
        delay = 0.05
        attempt = 0
        while True:
            committing = False
            try:
                with self.engine.connect() as conn:
                    if self.autocommit:
                        result = self._run_bare(conn, fn)
                    else:
                        tx = conn.begin()
                        try:
                            if not durable:  # an abort or an END: losing it only means asking again
                                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                            result = fn(conn)
                            committing = True
                            tx.commit()
                        finally:
                            if tx.is_active:
                                tx.rollback()
            except exc.DBAPIError as e:
                if attempt + 1 < self.retries and self._raced(e, lost):
                    lost.append("unique violation")
                    attempt += 1
                    continue
                reason = self._classify(e, committing)
                if reason == "connection lost":  # a restart or a failover: wait for a primary
                    if time.monotonic() + delay > give_up:
                        raise StoreUnavailableError(
                            f"{self.path}: no connection to a primary within {self.failover_wait_s} s: {e.orig}"
                        ) from e
                    if not lost or lost[-1] != reason:
                        _log.warning("store_connection_lost", store=self.path, error=str(e.orig))
                    lost.append(reason)
                    time.sleep(delay * random.uniform(0.5, 1.5))  # a pool thread's, not the loop's
                    delay = min(delay * 2, 1.0)
                    continue
                lost.append(reason)
                attempt += 1
                if attempt < self.retries:
                    time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))  # a pool thread's, not the loop's
                    continue
                raise ConflictError(f"gave up after {self.retries} tries: {', '.join(lost)}") from e
            if lost and lost[-1] == "connection lost":
                _log.info("store_reconnected", store=self.path)
            self.stats.batches += 1
            self.stats.jobs += 1
            if durable:
                self.stats.syncs += 1
            return result

    @staticmethod
    def _run_bare(conn: sqlalchemy.Connection, fn: Callable[[sqlalchemy.Connection], T]) -> T:
        """Runs a job that manages its own transactions; none is left open after it."""
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        try:
            return fn(conn)
        finally:
            if not conn.invalidated:  # a broken connection is discarded, with its transaction
                raw = conn.connection.driver_connection
                if raw is not None and raw.info.transaction_status in _OPEN:
                    raw.execute("ROLLBACK")

    def _raced(self, e: exc.DBAPIError, lost: list[str]) -> bool:
        """True for a unique violation below SERIALIZABLE, up to `_UNIQUE_RERUNS` times
        a job: it may be a concurrent insert of the same key, which a fresh snapshot
        sees (a batch of prepares may meet one per item). One that keeps coming back
        is the job's own duplicate, raised as it is."""
        sqlstate = getattr(e.orig, "sqlstate", None)
        return (
            self.isolation != "SERIALIZABLE" and sqlstate == _UNIQUE and lost.count("unique violation") < _UNIQUE_RERUNS
        )

    def _classify(self, e: exc.DBAPIError, committing: bool) -> str:
        """The reason to retry `e`, or raises what it means for the caller."""
        sqlstate = getattr(e.orig, "sqlstate", None) or ""
        if sqlstate in _RETRY:
            return "serialization failure" if sqlstate == "40001" else "deadlock"
        if sqlstate in _CONFLICT:
            raise ConflictError(_CONFLICT[sqlstate]) from e
        if e.connection_invalidated or sqlstate.startswith("08") or isinstance(e, exc.OperationalError):
            if committing:
                _log.warning("commit_outcome_unknown", store=self.path, error=str(e.orig))
                raise StoreUnavailableError(f"connection to {self.path} lost during COMMIT: outcome unknown") from e
            # No SQLSTATE: the connection could not be made (no primary, yet).
            if not sqlstate or sqlstate.startswith(("08", "57P")) or e.connection_invalidated:
                return "connection lost"
            raise StoreUnavailableError(f"{self.path}: {e.orig}") from e
        raise e
