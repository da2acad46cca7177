"""The transaction table every kind of participant keeps, and the one in-doubt query.

`twopc_txn` holds a row per transaction a participant took part in: PREPARED
(reservations: `twopc.participant.helper`), then COMMITTED or ABORTED, kept for
`ParticipantConfig.retention_s`. The PREPARE TRANSACTION adapter
(`twopc.participant.prepared`) keeps its prepared transactions in PostgreSQL's
`pg_prepared_xacts` instead, each with a `twopc_prepared` row that says whom to ask.

`in_doubt` and `undecided` read both, so that the participant itself (its resolver,
its drain, its cap of undecided transactions) and the operator's command
(`twopc participant in-doubt`, `twopc resolve`) see the same transactions, whatever
the kind. They run on a job's connection (`twopc.stores.execute`): SQLite or PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from twopc.stores.base import Connection, execute

PREPARED, COMMITTED, ABORTED = "PREPARED", "COMMITTED", "ABORTED"

SCHEMA = """
CREATE TABLE IF NOT EXISTS twopc_txn (
    txn_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('PREPARED', 'COMMITTED', 'ABORTED')),
    coordinator  TEXT NOT NULL DEFAULT '',
    prepared_at  DOUBLE PRECISION,
    decided_at   DOUBLE PRECISION,
    digest       TEXT NOT NULL DEFAULT '',  -- of the prepared operation: a repeat must match
    alternates   TEXT NOT NULL DEFAULT '',  -- more GetOutcome addresses (instances sharing a log)
    holder       TEXT NOT NULL DEFAULT ''   -- who the cap of undecided transactions counts it for
);
CREATE INDEX IF NOT EXISTS twopc_txn_state ON twopc_txn (state, prepared_at);
CREATE INDEX IF NOT EXISTS twopc_txn_decided ON twopc_txn (decided_at);
"""

POSTGRES_SCHEMA = """
ALTER TABLE twopc_txn ADD COLUMN IF NOT EXISTS holder TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS twopc_txn_holder ON twopc_txn (holder, state);
"""
"""PostgreSQL: brings a table of an earlier version up to this one (SQLite: `migrate`)."""

RECENT_S = 60.0
"""A `twopc_prepared` row younger than this whose transaction is not (yet) prepared is
a Prepare in flight: it counts against the cap. An older one is a Prepare that died
before PREPARE TRANSACTION, purged later."""


@dataclass(frozen=True, slots=True)
class InDoubt:
    """A transaction prepared here and not decided yet.

    Attributes:
        txn_id: the transaction's global id.
        coordinator: whom to ask: its address, then other instances' sharing its
            log, space-separated ("a:1 b:1").
        prepared_at: when it was prepared (seconds since the epoch, this host's clock).
        gid: the PostgreSQL prepared transaction holding it (the adapter), or None
            (a reservation in `twopc_txn`).
    """

    txn_id: str
    coordinator: str
    prepared_at: float
    gid: str | None = None


def migrate(db: sqlite3.Connection) -> None:
    """Brings a SQLite transaction table from an earlier version up to this one."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(twopc_txn)")}
    for column in ("digest", "alternates", "holder"):
        if column not in columns:
            db.execute(f"ALTER TABLE twopc_txn ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX IF NOT EXISTS twopc_txn_holder ON twopc_txn (holder, state)")


def _has_prepared_table(db: Connection) -> bool:
    """True on PostgreSQL where the adapter's `twopc_prepared` exists (in the search path)."""
    if isinstance(db, sqlite3.Connection):
        return False
    return bool(execute(db, "SELECT to_regclass('twopc_prepared') IS NOT NULL").fetchone()[0])


def in_doubt(db: Connection, cutoff: float) -> list[InDoubt]:
    """Transactions prepared here at or before `cutoff` (seconds since the epoch) and
    not decided, oldest first: reservations and PostgreSQL prepared transactions."""
    found = [
        InDoubt(t, c, at)
        for t, c, at in execute(
            db,
            "SELECT txn_id, trim(coordinator || ' ' || alternates), prepared_at FROM twopc_txn"
            " WHERE state = :state AND prepared_at <= :cutoff ORDER BY prepared_at",
            {"state": PREPARED, "cutoff": cutoff},
        )
    ]
    if _has_prepared_table(db):
        found += [
            InDoubt(t, c, at, gid)
            for t, c, at, gid in execute(
                db,
                "SELECT t.txn_id, t.coordinator, t.prepared_at, t.gid FROM pg_prepared_xacts p"
                " JOIN twopc_prepared t USING (gid) WHERE p.database = current_database()"
                " AND t.prepared_at <= :cutoff",
                {"cutoff": cutoff},
            )
        ]
        found.sort(key=lambda x: x.prepared_at)
    return found


def undecided(db: Connection, holder: str, now: float) -> int:
    """How many transactions prepared here, not decided, `holder` holds: what the cap
    of undecided transactions per coordinator counts (prepares in flight included)."""
    (count,) = execute(
        db,
        "SELECT count(*) FROM twopc_txn WHERE holder = :holder AND state = :state",
        {"holder": holder, "state": PREPARED},
    ).fetchone()
    if _has_prepared_table(db):
        (more,) = execute(
            db,
            "SELECT count(*) FROM twopc_prepared t WHERE t.holder = :holder"
            " AND (t.prepared_at > :recent OR t.gid IN (SELECT gid FROM pg_prepared_xacts))",
            {"holder": holder, "recent": now - RECENT_S},
        ).fetchone()
        count += more
    return int(count)
