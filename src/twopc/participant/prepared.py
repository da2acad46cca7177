"""A participant whose business SQL runs as it is, in a PostgreSQL prepared transaction.

`PreparedParticipant` is for a service whose data already lives in PostgreSQL and
whose writes should stay exactly as they are: no reservation tables, no separate
commit and abort steps. A Prepare runs the service's `prepare(db, txn_id, op)` in a
PostgreSQL transaction and ends it with `PREPARE TRANSACTION` (durable: it survives a
crash of the service and of PostgreSQL); Commit is `COMMIT PREPARED`, Abort
`ROLLBACK PREPARED`. The price: every row the transaction wrote (or locked) stays
locked until phase 2, across the network round trips; other transactions touching
those rows wait (up to `lock_timeout_s`, then vote ABORT).

How the protocol's rules are kept (rules 1, 6 and 7 of docs/design.md):

* The global id (gid) is derived from the twopc txn id and the database and schema,
  so two services on one PostgreSQL server (gids are server-wide) never collide, and
  it is 46 characters whatever the txn id's length (the limit is 199).
* The outcome is remembered by the transaction itself: the prepared transaction also
  inserts the service's `twopc_txn` row with state COMMITTED. `COMMIT PREPARED` makes
  the business changes and that row visible at once; `ROLLBACK PREPARED` drops both.
  So after the prepared transaction is gone from `pg_prepared_xacts`, the row says
  which way it went: present means committed, a tombstone (ABORTED, written after the
  rollback) means aborted, nothing means never prepared. Commit and Abort are
  idempotent across restarts of the service and of PostgreSQL.
* A late Prepare meets the tombstone and votes ABORT. A Prepare racing an Abort of
  the same transaction conflicts on the row's primary key; one of them waits or
  loses, never both win.
* Before the business transaction starts, a row in `twopc_prepared` (gid, txn id,
  coordinator, digest) is committed, so a restarted service knows whom to ask about
  each prepared transaction it finds in `pg_prepared_xacts`: the in-doubt resolver
  asks GetOutcome and commits or rolls back accordingly.

The server must allow prepared transactions: `max_prepared_transactions` > 0 (it is
0 by default). Opening the participant on a server where it is 0 raises
`PreparedTransactionsDisabledError` naming the setting.

Example (a debit, with the service's own SQL)::

    class Debits:
        operations = (wallet_pb2.Debit,)

        def prepare(self, db, txn_id, debit):
            done = execute(db, "UPDATE accounts SET balance = balance - :amount"
                               " WHERE account = :account AND balance >= :amount",
                           {"amount": debit.amount, "account": debit.account})
            if done.rowcount != 1:
                raise VoteAbort("insufficient funds")
            return Vote.COMMIT

    async with PreparedParticipant(Debits(), "postgresql://...", credentials=...) as p:
        await p.serve("127.0.0.1:50051")
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import sqlalchemy
import structlog
from google.protobuf.message import Message
from sqlalchemy import exc

from twopc.config import Credentials, ParticipantConfig
from twopc.errors import TwoPCError
from twopc.observe import EventKind, Observer
from twopc.participant.helper import (
    ABORTED,
    COMMITTED,
    PREPARED,
    Participant,
    _Item,
    _ItemError,
    _refusal,
    _RefusedError,
    _repeated,
)
from twopc.stores.base import execute, is_retried
from twopc.stores.postgres import PostgresStore
from twopc.types import Vote

_log = structlog.get_logger("twopc.participant.prepared")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS twopc_prepared (
    gid          TEXT PRIMARY KEY,
    txn_id       TEXT NOT NULL,
    coordinator  TEXT NOT NULL,
    digest       TEXT NOT NULL,
    prepared_at  DOUBLE PRECISION NOT NULL
);
"""

_UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a gid that is not prepared


class PreparedTransactionsDisabledError(TwoPCError):
    """The PostgreSQL server has `max_prepared_transactions = 0`."""


class PreparedHandler(Protocol):
    """A service's business part: only `prepare`, which does the work itself.

    Attributes:
        operations: the operation message types this participant accepts.
    """

    @property
    def operations(self) -> Sequence[type[Message]]: ...

    def prepare(self, db: sqlalchemy.Connection, txn_id: str, operation: Any) -> Vote:
        """Does the work in `db`'s transaction (which becomes the prepared one) and
        returns COMMIT, or READ_ONLY if it changed nothing.

        Raises:
            VoteAbort: refuse with a reason; everything it did is rolled back.
            InvalidOperation, NotFound: as for `ParticipantHandler.prepare`.
        """
        ...


class _Adapted:
    """A `PreparedHandler` seen as a `ParticipantHandler`: phase 2 is PostgreSQL's."""

    def __init__(self, handler: PreparedHandler) -> None:
        self.inner = handler
        self.operations = handler.operations
        self.schema = _SCHEMA + str(getattr(handler, "schema", ""))

    def prepare(self, db: Any, txn_id: str, operation: Any) -> Vote:
        return self.inner.prepare(db, txn_id, operation)

    def commit(self, db: Any, txn_id: str) -> None:
        raise AssertionError("COMMIT PREPARED applies a prepared transaction")

    def abort(self, db: Any, txn_id: str) -> None:
        raise AssertionError("ROLLBACK PREPARED releases a prepared transaction")


class PreparedParticipant(Participant):
    """A twopc participant over PostgreSQL prepared transactions.

    Args:
        handler: the business logic (`prepare` only).
        url: the service's database, `postgresql://...` (a `?options=-csearch_path%3D...`
            schema is honoured).
        credentials: transport security for calls to the coordinator's GetOutcome.
        config: in-doubt resolution timing and retention.
        isolation: the business transaction's isolation level.
        pool_size: connections running prepares and decisions at once.
        lock_timeout_s: the longest a Prepare waits for a row lock (for example one
            held by a prepared transaction) before voting ABORT.
        observers: told of each vote, decision and in-doubt question (`twopc.observe`).
    """

    def __init__(
        self,
        handler: PreparedHandler,
        url: str,
        *,
        credentials: Credentials,
        config: ParticipantConfig | None = None,
        isolation: str = "READ COMMITTED",
        pool_size: int = 16,
        lock_timeout_s: float = 1.0,
        observers: Iterable[Observer] = (),
    ) -> None:
        if isolation not in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"):
            raise ValueError(f"unknown isolation level {isolation!r}")
        store = PostgresStore(url, pool_size=pool_size, lock_timeout_s=lock_timeout_s, autocommit=True)
        super().__init__(_Adapted(handler), store, credentials=credentials, config=config, observers=observers)
        self.pg: PostgresStore = store
        self.isolation = isolation
        self._namespace = ""

    async def __aenter__(self) -> PreparedParticipant:
        await super().__aenter__()
        try:
            setting, namespace = await self.pg.read(_server_facts)
            if int(setting) == 0:
                raise PreparedTransactionsDisabledError(
                    f"PostgreSQL at {self.pg.path} has max_prepared_transactions = 0, which disables"
                    " PREPARE TRANSACTION: set max_prepared_transactions (for example to max_connections)"
                    " in postgresql.conf and restart the server"
                )
        except BaseException:
            await super().__aexit__(None, None, None)
            raise
        self._namespace = namespace
        return self

    def gid(self, txn_id: str) -> str:
        """The prepared transaction's global id for `txn_id` in this database and schema."""
        return "twopc_" + hashlib.sha256(f"{self._namespace}\0{txn_id}".encode()).hexdigest()[:40]

    # --- the store jobs (autocommit connections: each runs its own transactions) ----

    def _prepare_tx(self, item: _Item, db: Any) -> tuple[Vote, str, bool]:
        txn_id, digest = item.txn_id, item.digest
        gid = self.gid(txn_id)
        known = _row(db, txn_id)
        if known is not None:  # decided: committed (its row) or aborted (a tombstone)
            return _repeated(*known, item)
        pending = execute(
            db,
            "SELECT t.digest FROM pg_prepared_xacts p JOIN twopc_prepared t USING (gid) WHERE p.gid = :gid",
            {"gid": gid},
        ).fetchone()
        if pending is not None:  # prepared already: a repeat
            return _repeated(PREPARED, pending[0], item)
        if item.deadline is not None and time.monotonic() >= item.deadline:
            return Vote.ABORT, "deadline passed before prepare", False
        now = time.time()
        # Whom to ask (every instance), should the service restart with this transaction
        # prepared. Unforced: PREPARE TRANSACTION flushes the WAL up to itself.
        ask = f"{item.coordinator} {item.alternates}".strip()
        db.exec_driver_sql("BEGIN")
        db.exec_driver_sql("SET LOCAL synchronous_commit = off")
        execute(
            db,
            "INSERT INTO twopc_prepared VALUES (:gid, :txn_id, :coordinator, :digest, :now)"
            " ON CONFLICT (gid) DO UPDATE SET coordinator = excluded.coordinator, digest = excluded.digest,"
            " prepared_at = excluded.prepared_at",
            {"gid": gid, "txn_id": txn_id, "coordinator": ask, "digest": digest, "now": now},
        )
        db.exec_driver_sql("COMMIT")
        db.exec_driver_sql(f"BEGIN ISOLATION LEVEL {self.isolation}")
        vote = self.handler.prepare(db, txn_id, item.operation)
        if vote is Vote.READ_ONLY:
            db.exec_driver_sql("ROLLBACK")
            return vote, "", False
        if vote is not Vote.COMMIT:
            raise TypeError(f"prepare must return Vote.COMMIT or Vote.READ_ONLY, got {vote!r}")
        # The outcome travels with the work: visible exactly when the work is.
        execute(
            db,
            "INSERT INTO twopc_txn (txn_id, state, coordinator, prepared_at, decided_at, digest)"
            " VALUES (:txn_id, :state, :coordinator, :now, :now, :digest)",
            {"txn_id": txn_id, "state": COMMITTED, "coordinator": item.coordinator, "now": now, "digest": digest},
        )
        if item.one_phase:
            db.exec_driver_sql("COMMIT")
        else:
            db.exec_driver_sql(f"PREPARE TRANSACTION '{gid}'")
        return vote, "", False

    def _prepare_many_tx(self, items: list[_Item], db: Any) -> list[tuple[Vote, str, bool] | _ItemError]:
        """Each item its own prepared transaction, one after the other (a prepared
        transaction cannot be a savepoint of another); a refused one is rolled back."""
        outcomes: list[tuple[Vote, str, bool] | _ItemError] = []
        for item in items:
            try:
                outcomes.append(self._prepare_tx(item, db))
            except Exception as e:
                if is_retried(e):
                    raise
                db.exec_driver_sql("ROLLBACK")  # outside a transaction only a warning
                failure = _refusal(e)
                outcomes.append((Vote.ABORT, failure, False) if isinstance(failure, str) else failure)
        return outcomes

    def _commit_tx(self, txn_id: str, db: Any) -> bool:
        gid = self.gid(txn_id)
        if _finish(db, "COMMIT PREPARED", gid):
            _forget(db, gid)
            return True
        known = _row(db, txn_id)
        if known is None:
            raise _RefusedError(f"cannot commit {txn_id}: never prepared here")
        if known[0] == ABORTED:
            raise _RefusedError(f"cannot commit {txn_id}: already aborted")
        return False

    async def _commit_many(self, txn_ids: list[str]) -> dict[str, str]:
        """Each COMMIT PREPARED is a transaction, and a WAL flush, of its own: run one
        after another on one connection they flush one at a time. Spread over half
        the pool's connections, PostgreSQL's group commit shares the flushes."""
        lanes = min(len(txn_ids), max(1, self.pg.pool_size // 2))
        done = await asyncio.gather(
            *(self.pg.write(functools.partial(self._commit_many_tx, txn_ids[i::lanes])) for i in range(lanes))
        )
        return {txn_id: why for refused in done for txn_id, why in refused.items()}

    def _abort_tx(self, txn_id: str, db: Any) -> bool:
        gid = self.gid(txn_id)
        rolled_back = _finish(db, "ROLLBACK PREPARED", gid)
        known = _row(db, txn_id)
        if known is not None and known[0] == COMMITTED:
            raise _RefusedError(f"cannot abort {txn_id}: already committed")
        if known is None:  # the tombstone: a late Prepare for it is refused
            execute(
                db,
                "INSERT INTO twopc_txn (txn_id, state, coordinator, decided_at) VALUES (:txn_id, :state, '', :now)"
                " ON CONFLICT (txn_id) DO NOTHING",
                {"txn_id": txn_id, "state": ABORTED, "now": time.time()},
            )
        _forget(db, gid)
        return rolled_back or known is None

    # --- in doubt and retention -----------------------------------------------------

    async def in_doubt(self, older_than_s: float = 0.0) -> list[tuple[str, str]]:
        """Prepared transactions of this service (txn id, coordinator) older than
        `older_than_s`, as PostgreSQL lists them."""
        rows = await self.pg.read(
            lambda db: execute(
                db,
                "SELECT t.txn_id, t.coordinator FROM pg_prepared_xacts p JOIN twopc_prepared t USING (gid)"
                " WHERE p.database = current_database() AND p.prepared <= now() - make_interval(secs => :age)"
                " ORDER BY p.prepared",
                {"age": older_than_s},
            ).fetchall()
        )
        return [(t, c) for t, c in rows]

    async def report_in_doubt(self) -> None:
        """Tells the observers how many of this service's transactions PostgreSQL holds
        prepared, and the age of the oldest (IN_DOUBT_SCANNED)."""
        count, oldest = await self.pg.read(
            lambda db: execute(
                db,
                "SELECT count(*), extract(epoch FROM now() - min(p.prepared)) FROM pg_prepared_xacts p"
                " JOIN twopc_prepared t USING (gid) WHERE p.database = current_database()",
            ).fetchone()
        )
        self.observers.emit(EventKind.IN_DOUBT_SCANNED, "", count=count, duration_s=float(oldest or 0.0))

    async def _purge(self) -> None:
        cutoff = time.time() - self.config.retention_s

        def purge(db: Any) -> None:
            execute(db, "DELETE FROM twopc_txn WHERE decided_at < :cutoff", {"cutoff": cutoff})
            # Rows of prepares that never reached PREPARE TRANSACTION.
            execute(
                db,
                "DELETE FROM twopc_prepared t WHERE prepared_at < :cutoff"
                " AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = t.gid)",
                {"cutoff": time.time() - 3600.0},
            )

        await self.pg.write(purge, durable=False)


def _server_facts(db: Any) -> tuple[str, str]:
    setting = db.exec_driver_sql("SHOW max_prepared_transactions").scalar_one()
    namespace = db.exec_driver_sql("SELECT current_database() || '.' || current_schema()").scalar_one()
    return str(setting), str(namespace)


def _row(db: Any, txn_id: str) -> tuple[str, str] | None:
    row = execute(db, "SELECT state, digest FROM twopc_txn WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
    return None if row is None else (row[0], row[1])


def _finish(db: Any, command: str, gid: str) -> bool:
    """COMMIT PREPARED or ROLLBACK PREPARED; False if `gid` is not prepared (any more)."""
    try:
        db.exec_driver_sql(f"{command} '{gid}'")
    except exc.DBAPIError as e:
        if getattr(e.orig, "sqlstate", None) == _UNDEFINED_OBJECT:
            return False
        raise
    return True


def _forget(db: Any, gid: str) -> None:
    db.exec_driver_sql("BEGIN")
    db.exec_driver_sql("SET LOCAL synchronous_commit = off")
    execute(db, "DELETE FROM twopc_prepared WHERE gid = :gid", {"gid": gid})
    db.exec_driver_sql("COMMIT")
