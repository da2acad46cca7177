"""The embedded decision log: one SQLite file, one coordinator.

Presumed abort keeps the log small. Only COMMIT decisions are written, each with the
participants that must hear it, and the write is forced (fsync) before any Commit is
sent (rule 2 of docs/design.md). Once every participant has acknowledged, END marks the
record; END need not be forced, since losing it only means recovery re-sends Commits
that participants acknowledge again. A record without END after a restart is a
commit still to deliver (rule 4). No record means aborted.

Ended records stay on disk for `retention_s` (an audit trail that invariant checkers
read to verify that every participant commit was logged), then are purged, at open
and every few thousand ENDs. The coordinator keeps nothing in memory for them; it
reads them back to answer `Coordinator.outcome` and GetOutcome.

Every log has an id, made once at random and kept in the log itself. It names the
coordinator: transaction ids on the wire are `"<log id>:<local id>"`, so two
coordinators can never mean two different transactions by one id at a participant.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence

from twopc.decisions.base import CommitRecord
from twopc.stores import SqliteStore
from twopc.types import Outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    txn_id    TEXT PRIMARY KEY,
    targets   TEXT NOT NULL,   -- JSON list of participant addresses
    logged_at REAL NOT NULL,   -- unix seconds
    ended_at  REAL             -- NULL until every participant acknowledged
);
CREATE INDEX IF NOT EXISTS decisions_open ON decisions (ended_at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
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
        self._id = ""

    @property
    def id(self) -> str:
        return self._id

    @property
    def log_id(self) -> str:
        return self._id  # one owner: the coordinator is the log

    @property
    def shared(self) -> bool:
        return False

    @property
    def available(self) -> bool:
        return True  # a local file: a failing disk fail-stops the coordinator instead

    async def open(self) -> list[CommitRecord]:
        await self.store.open()
        cutoff = time.time() - self.retention_s
        new_id = secrets.token_hex(8)

        def identify(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('log_id', ?)", (new_id,))
            return str(conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0])

        def purge_and_list(conn: sqlite3.Connection) -> list[CommitRecord]:
            conn.execute("DELETE FROM decisions WHERE ended_at < ?", (cutoff,))
            rows = conn.execute("SELECT txn_id, targets FROM decisions WHERE ended_at IS NULL ORDER BY rowid")
            return [CommitRecord(t, tuple(json.loads(ts))) for t, ts in rows]

        try:
            self._id = await self.store.write(identify)  # forced: the id outlives any crash
            return await self.store.write(purge_and_list, durable=False)
        except BaseException:
            await self.store.close()
            raise

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> bool:
        row = (txn_id, json.dumps(list(targets)), time.time())
        inserted: int = await self.store.write(
            lambda c: c.execute("INSERT INTO decisions VALUES (?, ?, ?, NULL) ON CONFLICT DO NOTHING", row).rowcount
        )
        return inserted == 1

    async def find(self, txn_id: str) -> CommitRecord | None:
        def lookup(c: sqlite3.Connection) -> CommitRecord | None:
            row = c.execute("SELECT targets, ended_at FROM decisions WHERE txn_id = ?", (txn_id,)).fetchone()
            return None if row is None else CommitRecord(txn_id, tuple(json.loads(row[0])), row[1] is not None)

        return await self.store.read(lookup)

    async def log_end(self, txn_id: str) -> None:
        now = time.time()
        self._ends += 1
        purge = self._ends % 4096 == 0  # now and then, drop ended records past retention

        def end(c: sqlite3.Connection) -> None:
            c.execute("UPDATE decisions SET ended_at = ? WHERE txn_id = ?", (now, txn_id))
            if purge:
                c.execute("DELETE FROM decisions WHERE ended_at < ?", (now - self.retention_s,))

        await self.store.write(end, durable=False)

    async def decided(self, txn_id: str) -> Outcome | None:
        return Outcome.COMMITTED if await self.find(txn_id) is not None else None

    async def outcome(self, txn_id: str) -> Outcome:
        if await self.find(txn_id) is not None:
            return Outcome.COMMITTED
        # One owner: what it has not logged it aborted (presumed abort). But only
        # its own ids: another coordinator's transaction (this one listed by
        # mistake as its peer) is not this log's to answer (rule 12).
        return Outcome.ABORTED if txn_id.startswith(f"{self._id}:") else Outcome.PENDING

    def check_writable(self) -> None:
        """Always writable: a failed write is fatal (DurabilityError), not passing."""

    def watch(self, *, adopt: Callable[[Sequence[CommitRecord]], None], fail: Callable[[BaseException], None]) -> None:
        """Nothing to watch: one owner, no leases."""

    async def close(self) -> None:
        await self.store.close()

    @property
    def syncs(self) -> int:
        return self.store.stats.syncs
