"""SqliteStore: one writer thread, group commit, a failed commit is final."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from twopc import DurabilityError, SqliteStore
from twopc.testing import query

SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER PRIMARY KEY)"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open store on a fresh file with one table, t(x)."""
    async with SqliteStore(tmp_path / "s.db", schema=SCHEMA) as s:
        yield s


def insert(x: int) -> Callable[[sqlite3.Connection], int]:
    """A job that inserts `x` and returns it."""

    def job(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t VALUES (?)", (x,))
        return x

    return job


def on_disk(store: SqliteStore) -> list[int]:
    """What another connection reads from the store's file."""
    return [x for (x,) in query(Path(store.path), "SELECT x FROM t ORDER BY x")]


async def test_job_that_raises_is_rolled_back_alone(store: SqliteStore) -> None:
    """A job that wrote and then raised gets its exception and leaves nothing, while a
    job queued beside it (group commit: the same transaction) commits."""

    def write_then_refuse(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (1)")
        raise ValueError("refused after writing")

    # Both are queued before the writer thread drains its queue: one batch, one
    # SQLite transaction, in which each job has its own savepoint.
    refused, kept = await asyncio.gather(store.write(write_then_refuse), store.write(insert(2)), return_exceptions=True)
    assert isinstance(refused, ValueError) and str(refused) == "refused after writing"
    assert kept == 2
    assert on_disk(store) == [2]


async def test_read_sees_committed_writes(store: SqliteStore) -> None:
    """A read returns what earlier writes committed, as the file does to other readers."""
    await store.write(insert(1))
    await store.write(insert(2), durable=False)
    assert await store.read(lambda db: db.execute("SELECT x FROM t ORDER BY x").fetchall()) == [(1,), (2,)]
    assert on_disk(store) == [1, 2]


async def test_every_call_after_a_failed_commit_raises(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed commit (EIO) raises DurabilityError and keeps nothing; from then on every
    write and read raises it too, even once the disk works again (rule 8)."""
    await store.write(insert(1))

    def fail(conn: sqlite3.Connection) -> None:
        monkeypatch.undo()  # the disk works again: the store must still refuse
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_commit", fail)
    with pytest.raises(DurabilityError, match="disk I/O error"):
        await store.write(insert(2))
    assert store.failed
    later: list[Callable[[], Awaitable[object]]] = [
        lambda: store.write(insert(3)),
        lambda: store.write(insert(4), durable=False),
        lambda: store.read(lambda db: None),
    ]
    for call in later:
        with pytest.raises(DurabilityError):
            await call()
    assert on_disk(store) == [1]
