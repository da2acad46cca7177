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

Admission (trust, the cap of undecided transactions per coordinator, limits, the
repeated-Prepare digest) and the per-item loop of PrepareMany are `ParticipantBase`'s
(`twopc.participant.base`), shared with the reservation helper: this module is only
the kind's hooks. Each item of a batch is its own prepared transaction (one cannot
be a savepoint of another): an item that fails is rolled back alone and votes ABORT,
and when the store gives a batch up to run it again, the items it had already
prepared are rolled back first (`abandon`).

`commit_prepared` and `rollback_prepared` settle one transaction by its txn id on
any connection to the database: the adapter's Commit and Abort, and the operator's
`twopc resolve`, are the same code.

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
from twopc.observe import Observer
from twopc.participant.admission import DecisionRefused, Item
from twopc.participant.base import ParticipantBase, execute_purge
from twopc.participant.table import ABORTED, COMMITTED, PREPARED, RECENT_S
from twopc.stores.base import Connection, execute
from twopc.stores.postgres import PostgresStore
from twopc.types import Vote

_log = structlog.get_logger("twopc.participant.prepared")

SCHEMA = """
CREATE TABLE IF NOT EXISTS twopc_prepared (
    gid          TEXT PRIMARY KEY,
    txn_id       TEXT NOT NULL,
    coordinator  TEXT NOT NULL,
    digest       TEXT NOT NULL,
    prepared_at  DOUBLE PRECISION NOT NULL,
    holder       TEXT NOT NULL DEFAULT ''
);
ALTER TABLE twopc_prepared ADD COLUMN IF NOT EXISTS holder TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS twopc_prepared_txn ON twopc_prepared (txn_id);
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


class PreparedParticipant(ParticipantBase):
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
        schema = SCHEMA + str(getattr(handler, "schema", ""))
        super().__init__(
            store, handler.operations, schema=schema, credentials=credentials, config=config, observers=observers
        )
        self.handler = handler
        self.pg: PostgresStore = store
        self.isolation = isolation
        self._namespace = ""

    async def opened(self) -> None:
        setting, namespace = await self.pg.read(_server_facts)
        if int(setting) == 0:
            raise PreparedTransactionsDisabledError(
                f"PostgreSQL at {self.pg.path} has max_prepared_transactions = 0, which disables"
                " PREPARE TRANSACTION: set max_prepared_transactions (for example to max_connections)"
                " in postgresql.conf and restart the server"
            )
        self._namespace = namespace

    def gid(self, txn_id: str) -> str:
        """The prepared transaction's global id for `txn_id` in this database and schema."""
        return "twopc_" + hashlib.sha256(f"{self._namespace}\0{txn_id}".encode()).hexdigest()[:40]

    # --- the hooks (twopc.participant.base): autocommit connections, own transactions ----

    def recorded(self, db: Connection, txn_id: str) -> tuple[str, str] | None:
        known = _row(db, txn_id)
        if known is not None:  # decided: committed (its row) or aborted (a tombstone)
            return known
        pending = execute(
            db,
            "SELECT t.digest FROM pg_prepared_xacts p JOIN twopc_prepared t USING (gid) WHERE p.gid = :gid",
            {"gid": self.gid(txn_id)},
        ).fetchone()
        return None if pending is None else (PREPARED, pending[0])

    def prepare_item(self, db: Connection, item: Item) -> Vote:
        """The business SQL in a transaction of its own, ended by PREPARE TRANSACTION
        (or COMMIT, one-phase), after a committed `twopc_prepared` row saying whom to ask."""
        txn_id, gid = item.txn_id, self.gid(item.txn_id)
        now = time.time()
        # Whom to ask (every instance), should the service restart with this transaction
        # prepared. Unforced: PREPARE TRANSACTION flushes the WAL up to itself.
        ask = f"{item.coordinator} {item.alternates}".strip()
        db.exec_driver_sql("BEGIN")
        db.exec_driver_sql("SET LOCAL synchronous_commit = off")
        execute(
            db,
            "INSERT INTO twopc_prepared (gid, txn_id, coordinator, digest, prepared_at, holder)"
            " VALUES (:gid, :txn_id, :coordinator, :digest, :now, :holder)"
            " ON CONFLICT (gid) DO UPDATE SET coordinator = excluded.coordinator, digest = excluded.digest,"
            " prepared_at = excluded.prepared_at, holder = excluded.holder",
            {
                "gid": gid,
                "txn_id": txn_id,
                "coordinator": ask,
                "digest": item.digest,
                "now": now,
                "holder": item.holder,
            },
        )
        db.exec_driver_sql("COMMIT")
        db.exec_driver_sql(f"BEGIN ISOLATION LEVEL {self.isolation}")
        vote = self.handler.prepare(db, txn_id, item.operation)
        if vote is not Vote.COMMIT:
            db.exec_driver_sql("ROLLBACK")
            _forget(db, gid)
            return vote
        # The outcome travels with the work: visible exactly when the work is.
        execute(
            db,
            "INSERT INTO twopc_txn (txn_id, state, coordinator, prepared_at, decided_at, digest)"
            " VALUES (:txn_id, :state, :coordinator, :now, :now, :digest)",
            {"txn_id": txn_id, "state": COMMITTED, "coordinator": item.coordinator, "now": now, "digest": item.digest},
        )
        if item.one_phase:
            db.exec_driver_sql("COMMIT")
            _forget(db, gid)
        else:
            db.exec_driver_sql(f"PREPARE TRANSACTION '{gid}'")
        return vote

    def rollback_item(self, db: Connection, item: Item) -> None:
        db.exec_driver_sql("ROLLBACK")  # outside a transaction only a warning
        _forget(db, self.gid(item.txn_id))  # it never reached PREPARE TRANSACTION: no one need ask

    def abandon(self, db: Connection, items: Sequence[Item]) -> None:
        db.exec_driver_sql("ROLLBACK")  # the failed item's transaction, if it is still open
        for item in items:
            # No tombstone: the job runs again, or its items vote ABORT.
            rollback_prepared(db, item.txn_id, self.gid(item.txn_id), tombstone=False)

    def commit_txn(self, db: Connection, txn_id: str) -> bool:
        return commit_prepared(db, txn_id, self.gid(txn_id))

    async def commit_many(self, txn_ids: list[str]) -> dict[str, str]:
        """Each COMMIT PREPARED is a transaction, and a WAL flush, of its own: run one
        after another on one connection they flush one at a time. Spread over half
        the pool's connections, PostgreSQL's group commit shares the flushes."""
        lanes = min(len(txn_ids), max(1, self.pg.pool_size // 2))
        done = await asyncio.gather(
            *(self.pg.write(functools.partial(self.commit_each, txn_ids=txn_ids[i::lanes])) for i in range(lanes))
        )
        return {txn_id: why for refused in done for txn_id, why in refused.items()}

    def abort_txn(self, db: Connection, txn_id: str) -> bool:
        return rollback_prepared(db, txn_id, self.gid(txn_id))

    def purge_decided(self, db: Connection, cutoff: float) -> None:
        execute_purge(db, cutoff)
        # Rows of prepares that never reached PREPARE TRANSACTION (the process died).
        execute(
            db,
            "DELETE FROM twopc_prepared t WHERE prepared_at < :cutoff"
            " AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = t.gid)",
            {"cutoff": time.time() - max(RECENT_S, 3600.0)},
        )


def _gid_of(db: Connection, txn_id: str) -> str | None:
    row = execute(db, "SELECT gid FROM twopc_prepared WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
    return None if row is None else str(row[0])


def commit_prepared(db: Connection, txn_id: str, gid: str | None = None) -> bool:
    """COMMIT PREPARED of `txn_id`'s prepared transaction, on an autocommit connection
    to the adapter's database: True if it committed it, False if it was committed
    already. `gid` defaults to the one its `twopc_prepared` row records.

    Raises:
        DecisionRefused: it was aborted, or never prepared here.
    """
    gid = gid or _gid_of(db, txn_id)
    if gid is not None and _finish(db, "COMMIT PREPARED", gid):
        _forget(db, gid)
        return True
    known = _row(db, txn_id)
    if known is None:
        raise DecisionRefused(f"cannot commit {txn_id}: never prepared here")
    if known[0] == ABORTED:
        raise DecisionRefused(f"cannot commit {txn_id}: already aborted")
    return False


def rollback_prepared(db: Connection, txn_id: str, gid: str | None = None, *, tombstone: bool = True) -> bool:
    """ROLLBACK PREPARED of `txn_id`'s prepared transaction, on an autocommit
    connection, leaving a tombstone (a late Prepare of it votes ABORT): True if it
    changed something. `gid` defaults to the one its `twopc_prepared` row records.

    Raises:
        DecisionRefused: it was committed.
    """
    gid = gid or _gid_of(db, txn_id)
    rolled_back = gid is not None and _finish(db, "ROLLBACK PREPARED", gid)
    if not tombstone:
        if gid is not None:
            _forget(db, gid)
        return rolled_back
    known = _row(db, txn_id)
    if known is not None and known[0] == COMMITTED:
        raise DecisionRefused(f"cannot abort {txn_id}: already committed")
    if known is None:  # the tombstone: a late Prepare for it is refused
        execute(
            db,
            "INSERT INTO twopc_txn (txn_id, state, coordinator, decided_at) VALUES (:txn_id, :state, '', :now)"
            " ON CONFLICT (txn_id) DO NOTHING",
            {"txn_id": txn_id, "state": ABORTED, "now": time.time()},
        )
    if gid is not None:
        _forget(db, gid)
    return rolled_back or known is None


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
    """Drops `gid`'s row saying whom to ask, unless it is (still) prepared."""
    db.exec_driver_sql("BEGIN")
    db.exec_driver_sql("SET LOCAL synchronous_commit = off")
    execute(
        db,
        "DELETE FROM twopc_prepared WHERE gid = :gid"
        " AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = :gid)",
        {"gid": gid},
    )
    db.exec_driver_sql("COMMIT")
