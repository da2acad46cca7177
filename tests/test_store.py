"""SqliteStore: one writer thread, group commit, a failed commit is final."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from twopc import ClosedError, DurabilityError, SqliteStore, StoreInUseError
from twopc.dev.testing import query

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


async def blocked(store: SqliteStore) -> tuple[threading.Event, asyncio.Future[None]]:
    """Holds the writer thread inside a job until the returned event is set, so that
    what the test queues next waits behind it (and forms one batch)."""
    release, entered = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    held = asyncio.ensure_future(store.write(hold))
    await asyncio.to_thread(entered.wait, 10)
    return release, held


async def test_a_failure_outside_any_job_fails_the_store_instead_of_hanging(store: SqliteStore) -> None:
    """A SQLite error between jobs (here RELEASE of a savepoint a job destroyed by
    committing on its own) fails the store: both waiters get DurabilityError within
    seconds, and so does every later call, instead of hanging on a dead thread."""
    release, held = await blocked(store)

    def commit_behind_the_stores_back(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (7)")
        db.execute("COMMIT")  # ends the batch's transaction: RELEASE job then fails

    first = asyncio.ensure_future(store.write(commit_behind_the_stores_back))
    second = asyncio.ensure_future(store.write(insert(8)))
    await asyncio.sleep(0.05)  # both queued behind the held job: one batch
    release.set()
    await held
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), timeout=5)
    assert all(isinstance(r, DurabilityError) for r in results), results
    assert store.failed
    with pytest.raises(DurabilityError):
        await asyncio.wait_for(store.write(insert(9)), timeout=5)
    assert isinstance(await asyncio.wait_for(store.wait_failed(), timeout=5), sqlite3.Error)


async def test_write_racing_close_is_refused_not_left_waiting(tmp_path: Path) -> None:
    """A write that arrives while close() is under way gets ClosedError at once; work
    queued before close() still commits."""
    store = SqliteStore(tmp_path / "s.db", schema=SCHEMA)
    await store.open()
    release, held = await blocked(store)
    before = asyncio.ensure_future(store.write(insert(1)))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.05)
    with pytest.raises(ClosedError):
        await asyncio.wait_for(store.write(insert(2)), timeout=5)
    release.set()
    await asyncio.wait_for(asyncio.gather(held, closing), timeout=5)
    assert await before == 1
    assert [x for (x,) in query(tmp_path / "s.db", "SELECT x FROM t")] == [1]
    with pytest.raises(ClosedError):
        await store.write(insert(3))


async def test_one_file_has_one_store(tmp_path: Path) -> None:
    """Opening a store twice is refused, and so is a second store on the same file, in
    this process or in another one; the lock goes with close()."""
    path = tmp_path / "s.db"
    async with SqliteStore(path, schema=SCHEMA) as first:
        with pytest.raises(RuntimeError, match="open already"):
            await first.open()
        with pytest.raises(StoreInUseError):
            await SqliteStore(path).open()
        argv = [sys.executable, "-c", OPEN_IN_ANOTHER_PROCESS, str(path)]
        other = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30)
        assert other.returncode == 3, other.stderr
        assert first.is_open and await first.write(insert(1)) == 1
    async with SqliteStore(path) as again:  # released by close()
        assert await again.read(lambda db: db.execute("SELECT x FROM t").fetchall()) == [(1,)]


OPEN_IN_ANOTHER_PROCESS = """
import asyncio, sys
from twopc import SqliteStore, StoreInUseError
async def main():
    try:
        await SqliteStore(sys.argv[1]).open()
    except StoreInUseError:
        sys.exit(3)
asyncio.run(main())
"""


async def test_a_batch_carries_at_most_max_batch_jobs(tmp_path: Path) -> None:
    """Ten jobs queued at once commit in batches of at most three."""
    async with SqliteStore(tmp_path / "s.db", schema=SCHEMA, max_batch=3) as store:
        release, held = await blocked(store)
        jobs = [asyncio.ensure_future(store.write(insert(x))) for x in range(10)]
        await asyncio.sleep(0.05)
        batches = store.stats.batches
        release.set()
        await held
        assert await asyncio.gather(*jobs) == list(range(10))
        assert store.stats.batches - batches == 1 + 4  # the held job's, then 3 + 3 + 3 + 1


def where(db: sqlite3.Connection) -> int:
    """A job that says which thread ran it."""
    db.execute("INSERT INTO t VALUES (NULL)")
    return threading.get_ident()


async def test_a_lone_short_write_on_an_idle_store_runs_on_the_callers_thread(store: SqliteStore) -> None:
    """A write marked inline_if_idle that finds the store idle runs (and syncs) on the
    event loop's thread; an unmarked one is handed to the writer thread."""
    store.idle_path_max_s = 10.0  # however loaded the test machine's disk is
    loop_thread = threading.get_ident()
    before = store.stats.syncs
    assert await store.write(where, inline_if_idle=True) == loop_thread
    assert await store.write(where) != loop_thread
    assert store.stats.syncs - before == 2 and len(on_disk(store)) == 2


async def test_writes_of_one_loop_turn_still_share_one_commit(store: SqliteStore) -> None:
    """Group commit is kept: inline_if_idle writes submitted in the same turn of the
    event loop go to the writer thread together, one batch and one fsync."""
    before = (store.stats.batches, store.stats.syncs)
    threads = await asyncio.gather(*(store.write(where, inline_if_idle=True) for _ in range(5)))
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert (store.stats.batches, store.stats.syncs) == (before[0] + 1, before[1] + 1)


async def test_a_slow_commit_turns_the_idle_path_off(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk gone slow (synced commits averaging over idle_path_max_s) sends the
    next lone writes to the writer thread, so the event loop is not held by the disk."""
    store.idle_path_max_s = 0.05
    real = SqliteStore._commit

    def slow(self: SqliteStore, conn: sqlite3.Connection) -> None:
        real(self, conn)
        time.sleep(1.0)

    monkeypatch.setattr(SqliteStore, "_commit", slow)
    assert await store.write(where, inline_if_idle=True) == threading.get_ident()  # it could not know
    monkeypatch.undo()
    assert await store.write(where, inline_if_idle=True) != threading.get_ident()
