"""The coordinator's decision log: the commit point of every transaction.

Presumed abort keeps the log small. Only COMMIT decisions are written, each with the
participants that must hear it, and the write is forced (fsync) before any Commit is
sent (DESIGN.md rule 2). Once every participant has acknowledged, END marks the
record; END need not be forced, since losing it only means recovery re-sends Commits
that participants acknowledge again. A record without END after a restart is a
commit still to deliver (rule 4). No record means aborted.

Ended records stay on disk for `retention_s` (an audit trail that invariant checkers
read to verify that every participant commit was logged), then are purged, at open
and every few thousand ENDs. The coordinator keeps nothing in memory for them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twopc.store import SqliteStore


@dataclass(frozen=True)
class CommitRecord:
    """A logged COMMIT decision: the transaction and the participants to tell."""

    txn_id: str
    targets: tuple[str, ...]


class DecisionLog(Protocol):
    """Where a coordinator makes its decisions durable. Implementations must force
    `log_commit` to stable storage before returning, and raise `DurabilityError`
    (and refuse all further writes) when that fails."""

    async def open(self) -> list[CommitRecord]:
        """Opens the log and returns the commits that have no END yet."""
        ...

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> None:
        """Durably records the COMMIT decision. Returns once it is on disk."""
        ...

    async def log_end(self, txn_id: str) -> None:
        """Records that every participant acknowledged; the record may be forgotten."""
        ...

    async def close(self) -> None: ...

    @property
    def syncs(self) -> int:
        """How many forced writes the log has made (for benchmarks)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    txn_id    TEXT PRIMARY KEY,
    targets   TEXT NOT NULL,   -- JSON list of participant addresses
    logged_at REAL NOT NULL,   -- unix seconds
    ended_at  REAL             -- NULL until every participant acknowledged
);
CREATE INDEX IF NOT EXISTS decisions_open ON decisions (ended_at);
"""


class SqliteDecisionLog:
    """The embedded decision log: one SQLite file, WAL, synchronous=FULL, with
    concurrent decisions sharing one fsync (group commit).

    Args:
        path: the log file.
        retention_s: how long ended records are kept on disk as an audit trail.
    """

    def __init__(self, path: str | os.PathLike[str], *, retention_s: float = 7 * 24 * 3600.0) -> None:
        self.store = SqliteStore(path, schema=_SCHEMA)
        self.retention_s = retention_s
        self._ends = 0

    async def open(self) -> list[CommitRecord]:
        await self.store.open()
        cutoff = time.time() - self.retention_s

        def purge_and_list(conn: sqlite3.Connection) -> list[CommitRecord]:
            conn.execute("DELETE FROM decisions WHERE ended_at < ?", (cutoff,))
            rows = conn.execute("SELECT txn_id, targets FROM decisions WHERE ended_at IS NULL ORDER BY rowid")
            return [CommitRecord(t, tuple(json.loads(ts))) for t, ts in rows]

        return await self.store.write(purge_and_list, durable=False)

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> None:
        row = (txn_id, json.dumps(list(targets)), time.time())
        await self.store.write(lambda c: c.execute("INSERT INTO decisions VALUES (?, ?, ?, NULL)", row))

    async def log_end(self, txn_id: str) -> None:
        now = time.time()
        self._ends += 1
        purge = self._ends % 4096 == 0  # now and then, drop ended records past retention

        def end(c: sqlite3.Connection) -> None:
            c.execute("UPDATE decisions SET ended_at = ? WHERE txn_id = ?", (now, txn_id))
            if purge:
                c.execute("DELETE FROM decisions WHERE ended_at < ?", (now - self.retention_s,))

        await self.store.write(end, durable=False)

    async def close(self) -> None:
        await self.store.close()

    @property
    def syncs(self) -> int:
        return self.store.stats.syncs
