"""The participant helper: a Python service writes only prepare, commit and abort.

`Participant` is the gRPC servicer of `twopc.v1.Participant` around a
`ParticipantHandler`, the service's business logic. It owns a transaction table in
the service's own database (a SQLite file, or PostgreSQL: `twopc.stores`),
`twopc_txn` (txn id, state, coordinator, times), and runs every business step in the
same local transaction as the table row it belongs to, so the reservation and the
record that it is PREPARED reach the disk together with one fsync (shared with
concurrent prepares: group commit).

What the helper guarantees (rules of docs/design.md), so the business code does not
have to:

* Prepare is durable before the vote (rule 1); a repeated Prepare returns the same
  vote without running the business step again; a Prepare past its deadline, or for
  a transaction already aborted (a tombstone), votes ABORT and reserves nothing. A
  Prepare that repeats a transaction id with another operation (its digest is kept
  with the row) votes ABORT and leaves the first transaction as it was.
* Commit and Abort are idempotent (rule 7): Commit of a committed transaction and
  Abort of an aborted or unknown one succeed; Commit of an aborted or never prepared
  transaction, and Abort of a committed one, are FAILED_PRECONDITION and change
  nothing.
* Transactions prepared for longer than `in_doubt_after_s` are resolved by asking
  the coordinator's GetOutcome (rule 6); PENDING or unreachable means ask later.
* A business `commit` or `abort` that raises is logged at critical level with its
  traceback and answered INTERNAL: the coordinator retries and alerts an operator.

Admission, batching, repeats, decisions and resolution are `ParticipantBase`'s
(`twopc.participant.base`), shared with the PREPARE TRANSACTION adapter; this module
is the reservation kind's hooks: a savepoint per item, and the handler's steps in
the same local transaction as the `twopc_txn` row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from google.protobuf.message import Message

from twopc.config import Credentials, ParticipantConfig
from twopc.observe import Observer
from twopc.participant.admission import DecisionRefused, Item
from twopc.participant.base import ParticipantBase
from twopc.participant.table import ABORTED, COMMITTED, PREPARED
from twopc.stores.base import Connection, Store, execute, for_update, open_store, schema_for
from twopc.types import Vote

__all__ = ["ABORTED", "COMMITTED", "PREPARED", "Participant", "ParticipantHandler"]


class ParticipantHandler(Protocol):
    """A service's business part of 2PC. Each method runs on a thread of the store,
    inside the local transaction that also records the 2PC state: use `db` for every
    read and write, keep it short, and never wait on the network.

    `db` is the store's connection: a `sqlite3.Connection` on SQLite, a
    `sqlalchemy.Connection` on PostgreSQL. Run SQL through `twopc.stores.execute`
    with `:name` parameters and the same code serves both. On PostgreSQL a method
    may run more than once (after a serialization failure, rolled back first).

    Attributes:
        operations: the operation message types this participant accepts.
        schema: SQL run when the store opens (`CREATE TABLE IF NOT EXISTS ...`),
            or one per dialect: {"sqlite": ..., "postgresql": ...}.
        isolation: optional; on PostgreSQL, the level the store runs jobs at when
            given a URL. Absent: "SERIALIZABLE" (correct for code written for
            SQLite's one writer, but under load it fails jobs that share no row).
            "READ COMMITTED" is for handlers whose `prepare` locks the rows its
            rules read (`twopc.stores.lock_rows`) before reading them.
    """

    @property
    def operations(self) -> Sequence[type[Message]]: ...

    @property
    def schema(self) -> str | Mapping[str, str]: ...

    def prepare(self, db: Connection, txn_id: str, operation: Any) -> Vote:
        """Validates and reserves. Returns COMMIT (reserved) or READ_ONLY.

        Args:
            db: the local transaction, shared with the helper's own row.
            txn_id: the transaction's global id; key the reservation by it.
            operation: the unpacked message, an instance of one of `operations`.

        Whatever `prepare` wrote is rolled back if it raises, so a refusal leaves
        nothing behind. A repeated Prepare never reaches it: the helper answers
        from its own row.

        Raises:
            VoteAbort: refuse with a reason for people (insufficient funds...).
            InvalidOperation: malformed operation (INVALID_ARGUMENT).
            NotFound: the operation names something unknown (NOT_FOUND).
        """
        ...

    def commit(self, db: Connection, txn_id: str) -> None:
        """Applies the reservation made by `prepare`. It gets no operation: the
        reservation must record all that commit needs. Must not fail for business
        reasons: the decision is final (a raise is logged as critical and the
        coordinator retries)."""
        ...

    def abort(self, db: Connection, txn_id: str) -> None:
        """Releases the reservation made by `prepare`. It gets no operation either."""
        ...


class Participant(ParticipantBase):
    """The `twopc.v1.Participant` servicer around a business handler: reservations
    in the service's own store.

    Use it as an async context manager (it opens the store and runs the in-doubt
    resolver), and serve it, with the service's own API beside it, until SIGTERM::

        async with Participant(Wallet(), "wallet.db", credentials=Credentials.insecure()) as p:
            await p.serve("127.0.0.1:50051", services=[lambda s: add_WalletServicer_to_server(api, s)])

    (or register it on a server you own with `add_to_server`; or call `serve` alone,
    which opens the store itself and waits for a database that is down or starting).

    Args:
        handler: the business logic.
        store: the service's store (not yet open: the participant opens it with
            its schema, and closes it): a SQLite file path, a PostgreSQL URL
            (`postgresql://...`, extra `[postgres]`), or a store object; the
            service may use `participant.store` for its own business API too.
        credentials: transport security for calls to the coordinator's GetOutcome.
        config: in-doubt resolution timing and retention.
        observers: told of each vote, decision and in-doubt question (`twopc.observe`).
    """

    def __init__(
        self,
        handler: ParticipantHandler,
        store: Store | str | os.PathLike[str],
        *,
        credentials: Credentials,
        config: ParticipantConfig | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.handler = handler
        # On PostgreSQL, a handler that locks what its rules read may say READ COMMITTED.
        opened = open_store(store, isolation=getattr(handler, "isolation", "SERIALIZABLE"))
        super().__init__(
            opened,
            handler.operations,
            schema=schema_for(handler.schema, opened.dialect),
            credentials=credentials,
            config=config,
            observers=observers,
        )

    # --- the hooks (twopc.participant.base): one local transaction per job ------------

    def recorded(self, db: Connection, txn_id: str) -> tuple[str, str] | None:
        row = execute(db, "SELECT state, digest FROM twopc_txn WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
        return None if row is None else (row[0], row[1])

    def begin_item(self, db: Connection, item: Item) -> None:
        execute(db, "SAVEPOINT item")

    def rollback_item(self, db: Connection, item: Item) -> None:
        execute(db, "ROLLBACK TO item")

    def end_item(self, db: Connection, item: Item) -> None:
        execute(db, "RELEASE item")

    def prepare_item(self, db: Connection, item: Item) -> Vote:
        """The reservation and its PREPARED row, in the job's transaction (one commit,
        one fsync, for the batch)."""
        vote = self.handler.prepare(db, item.txn_id, item.operation)
        if vote is not Vote.COMMIT:
            return vote
        now = time.time()
        if item.one_phase:
            self.handler.commit(db, item.txn_id)
        execute(
            db,
            "INSERT INTO twopc_txn (txn_id, state, coordinator, prepared_at, decided_at, digest, alternates, holder)"
            " VALUES (:txn_id, :state, :coordinator, :now, :decided_at, :digest, :alternates, :holder)",
            {
                "txn_id": item.txn_id,
                "state": COMMITTED if item.one_phase else PREPARED,
                "coordinator": item.coordinator,
                "now": now,
                "decided_at": now if item.one_phase else None,
                "digest": item.digest,
                "alternates": item.alternates,
                "holder": item.holder,
            },
        )
        return vote

    def commit_txn(self, db: Connection, txn_id: str) -> bool:
        row = _state(db, txn_id)
        if row is None:
            raise DecisionRefused(f"cannot commit {txn_id}: never prepared here")
        if row[0] == COMMITTED:
            return False
        if row[0] == ABORTED:
            raise DecisionRefused(f"cannot commit {txn_id}: already aborted")
        self.handler.commit(db, txn_id)
        _set_state(db, txn_id, COMMITTED)
        return True

    def abort_txn(self, db: Connection, txn_id: str) -> bool:
        row = _state(db, txn_id)
        if row is None:  # presumed abort; the tombstone refuses a late Prepare
            execute(
                db,
                "INSERT INTO twopc_txn (txn_id, state, decided_at) VALUES (:txn_id, :state, :now)",
                {"txn_id": txn_id, "state": ABORTED, "now": time.time()},
            )
            return True
        if row[0] == ABORTED:
            return False
        if row[0] == COMMITTED:
            raise DecisionRefused(f"cannot abort {txn_id}: already committed")
        self.handler.abort(db, txn_id)
        _set_state(db, txn_id, ABORTED)
        return True


def _state(db: Connection, txn_id: str) -> tuple[str] | None:
    """The transaction's state, its row locked (a concurrent Commit or Abort waits)."""
    sql = for_update(db, "SELECT state FROM twopc_txn WHERE txn_id = :txn_id")
    row = execute(db, sql, {"txn_id": txn_id}).fetchone()
    return None if row is None else (row[0],)


def _set_state(db: Connection, txn_id: str, state: str) -> None:
    execute(
        db,
        "UPDATE twopc_txn SET state = :state, decided_at = :now WHERE txn_id = :txn_id",
        {"state": state, "now": time.time(), "txn_id": txn_id},
    )
