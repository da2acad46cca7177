"""A SQLite database owned by one thread, with group commit.

Every durable step in twopc (the coordinator's decisions, a participant's prepared
and committed transactions) goes through `SqliteStore.write`. The store runs all SQL
on one dedicated thread, so the event loop never blocks on the disk, and it commits
whatever work queued up while the previous commit was being synced as one SQLite
transaction: concurrent writers share one fsync (group commit). Each job runs in
its own SAVEPOINT, so a job that raises is rolled back alone and the others commit.

Durability: WAL mode with `synchronous=FULL` syncs the WAL on every commit, so when
`write` returns, the job's effects are on disk. A job marked `durable=False` (an END
record, an abort) may ride along unsynced; the next synced commit, or a checkpoint,
makes it durable, which is all presumed abort needs for those records.

A failed commit is fatal (DESIGN.md rule 8): the page cache may have dropped the
data, so the store refuses all further work with `DurabilityError` and the process
must restart and recover from what is on disk.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from twopc.errors import DurabilityError

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]

_log = structlog.get_logger("twopc.store")


@dataclass
class _Task:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


@dataclass
class StoreStats:
    """Counters for benchmarks: commits that were synced, and jobs they carried."""

    syncs: int = 0
    jobs: int = 0
    batches: int = 0


_STOP = object()


class SqliteStore:
    """One SQLite file, one writer thread, group commit.

    Args:
        path: the database file. Created with its schema if missing.
        schema: SQL script run at open; use `CREATE TABLE IF NOT EXISTS`.
    """

    def __init__(self, path: str | os.PathLike[str], schema: str = "") -> None:
        self.path = path
        self.schema = schema
        self.stats = StoreStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None

    async def open(self) -> None:
        """Starts the writer thread, opens the file and applies the schema."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"sqlite:{os.fspath(self.path)}", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        """Finishes queued work, then stops the thread and closes the file."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def failed(self) -> bool:
        """True once a commit failed; every call raises DurabilityError from then."""
        return self._failure is not None

    async def write(self, fn: Job[T], *, durable: bool = True) -> T:
        """Runs `fn(conn)` in a transaction and returns its result once committed.

        Args:
            fn: runs on the store's thread; it must not block on anything but SQLite.
            durable: when True the commit is synced before this returns.

        Raises:
            DurabilityError: the commit failed; the store has stopped.
            Exception: whatever `fn` raised; its changes are rolled back.
        """
        if self._failure is not None:
            raise DurabilityError(f"store {self.path} failed earlier: {self._failure}")
        if self._loop is None or self._thread is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Task(fn, durable, future))
        return await future

    async def read(self, fn: Job[T]) -> T:
        """Runs `fn(conn)` on the store's thread and returns its result."""
        return await self.write(fn, durable=False)

    # --- the writer thread -------------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            if self.schema:
                conn.executescript(self.schema)
        except BaseException as e:  # noqa: BLE001 - handed to the opener
            self._loop.call_soon_threadsafe(_settle_open, ready, e)
            return
        self._loop.call_soon_threadsafe(_settle_open, ready, None)
        synced = True
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Task] = [first]
                stop = False
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                durable = any(t.durable for t in batch)
                if durable != synced:
                    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    synced = durable
                self._run_batch(conn, batch, durable)
                self._loop.call_soon_threadsafe(_settle, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Task], durable: bool) -> None:
        if self._failure is not None:
            for t in batch:
                t.error = DurabilityError(f"store {self.path} failed earlier: {self._failure}")
            return
        changes = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        alone = len(batch) == 1  # a job alone in its transaction needs no savepoint
        for t in batch:
            if not alone:
                conn.execute("SAVEPOINT job")
            try:
                t.result = t.fn(conn)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                t.error = e
                if alone:
                    conn.execute("ROLLBACK")
                    return
                conn.execute("ROLLBACK TO job")
            if not alone:
                conn.execute("RELEASE job")
        try:
            self._commit(conn)
        except sqlite3.Error as e:
            self._failure = e
            _log.critical("store_commit_failed", path=os.fspath(self.path), error=str(e))
            for t in batch:
                t.error = DurabilityError(f"commit to {self.path} failed: {e}")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        if durable and conn.total_changes != changes:
            self.stats.syncs += 1

    def _commit(self, conn: sqlite3.Connection) -> None:
        """The commit point of a batch: with synchronous=FULL it returns after fsync.

        Kept apart so a test can make it fail as a disk would (EIO).
        """
        conn.execute("COMMIT")


def _settle_open(ready: asyncio.Future[None], error: BaseException | None) -> None:
    if error is None:
        ready.set_result(None)
    else:
        ready.set_exception(error)


def _settle(batch: list[_Task]) -> None:
    for t in batch:
        if t.future.done():  # the caller was cancelled; the work stands
            continue
        if t.error is not None:
            t.future.set_exception(t.error)
        else:
            t.future.set_result(t.result)
