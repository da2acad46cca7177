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

Idle fast path: a short protocol job (`write(..., inline_if_idle=True)`) that finds
the store idle runs on the caller's (event loop's) thread, without the two hand-offs
to the writer thread and back; the loop waits for its fsync, which the caller would
wait for anyway. The store counts as idle only when nothing is queued or running and
nothing else was submitted in the same turn of the event loop: the first write of a
turn waits one `call_soon` for others, so a burst (many RPCs answered in one turn)
still goes to the writer thread as one batch, and group commit under load is kept.
The idle path blocks the event loop for one commit, so it is only taken while the
disk is fast: while the moving average of synced commits (on either path) stays
under `idle_path_max_s`. A disk that turns slow costs the loop one wait, then the
writes go to the thread until fast commits bring the average down again.

A failed commit is fatal (rule 8 of docs/design.md): the page cache may have dropped
the data, so the store refuses all further work with `DurabilityError` and the process
must restart and recover from what is on disk. Any other failure of the writer (a
locked database at BEGIN, a savepoint that cannot be released) fails the store the
same way: the writer thread never dies and leaves callers waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from twopc.errors import ClosedError, DurabilityError, StoreInUseError

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]

_log = structlog.get_logger("twopc.stores.sqlite")


@dataclass
class _Task:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    future: asyncio.Future[Any]
    inline: bool = False  # may run on the caller's thread when the store is idle
    result: Any = None
    error: BaseException | None = None


@dataclass
class StoreStats:
    """Counters for benchmarks: commits that were synced, and jobs they carried."""

    syncs: int = 0
    jobs: int = 0
    batches: int = 0


_STOP = object()
_SMOOTHING = 0.2  # weight of the latest synced commit in the moving average


class SqliteStore:
    """One SQLite file, one writer thread, group commit.

    The file has one owner: `open` takes an exclusive lock on `<path>.lock` (flock,
    released by the kernel when the process dies), so a second store on the same
    file, in this process or another, fails at once with `StoreInUseError` instead
    of two writers deciding from one file.

    Args:
        path: the database file. Created with its schema if missing.
        schema: SQL script run at open; use `CREATE TABLE IF NOT EXISTS`.
        max_batch: the most jobs one commit carries. Group commit needs only a few
            dozen to pay off; the bound keeps one transaction (and the latency of the
            jobs that wait on it) small however much work queues up.
        idle_path_max_s: the idle path (see the module's docstring) is taken while
            synced commits take less than this; 0 turns it off.
    """

    idle_path_max_s_default = 0.002
    dialect = "sqlite"  # which of a handler's schemas it applies (see twopc.stores)

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: str = "",
        *,
        max_batch: int = 256,
        idle_path_max_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.path = path
        self.schema = schema
        self.max_batch = max_batch
        self.idle_path_max_s = self.idle_path_max_s_default if idle_path_max_s is None else idle_path_max_s
        self._commit_s = 0.0  # moving average of synced commits' durations
        self.stats = StoreStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._lock_fd: int | None = None
        self._failed: asyncio.Event | None = None
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()  # who runs SQL: the writer thread or an idle-path caller
        self._synced = True  # the connection's PRAGMA synchronous is FULL
        self._outstanding = 0  # jobs handed to the writer thread, not yet settled
        self._gathered: list[_Task] = []  # this loop turn's jobs, while the store is idle

    async def open(self) -> None:
        """Locks the file for this store, starts the writer thread, opens the file and
        applies the schema.

        Raises:
            StoreInUseError: another store (in any process) has the file open.
            RuntimeError: this store is open already.
        """
        if self._thread is not None:
            raise RuntimeError(f"store {self.path} is open already")
        self._lock()
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._outstanding, self._gathered, self._synced, self._commit_s = 0, [], True, 0.0
        self._failed = asyncio.Event()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"sqlite:{os.fspath(self.path)}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            self._unlock()
            raise

    @property
    def is_open(self) -> bool:
        """True between `open` and `close`."""
        return self._thread is not None

    async def close(self) -> None:
        """Finishes the work queued before it, then stops the thread and closes the
        file. Work submitted once closing has begun raises `ClosedError`."""
        thread = self._thread
        if thread is None:
            return
        if not self._closing:
            self._closing = True
            self._submit(self._gathered)  # accepted before close(): they run first
            self._gathered = []
            self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)
        if self._thread is not thread:
            return  # a concurrent close() finished the job
        self._thread = None
        # Nothing may wait for ever: what is still queued never ran, and says so.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Task) and not item.future.done():
                item.future.set_exception(ClosedError(f"store {self.path} closed before this job ran"))
        self._unlock()

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def failed(self) -> bool:
        """True once the store failed; every call raises DurabilityError from then."""
        return self._failure is not None

    async def wait_failed(self) -> BaseException:
        """Returns the store's fatal error once it has failed (the process must then
        restart and recover from disk). Call it while the store is open."""
        if self._failed is None:
            raise ClosedError(f"store {self.path} is not open")
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def write(self, fn: Job[T], *, durable: bool = True, inline_if_idle: bool = False) -> T:
        """Runs `fn(conn)` in a transaction and returns its result once committed.

        Args:
            fn: runs on the store's thread; it must not block on anything but SQLite.
            durable: when True the commit is synced before this returns.
            inline_if_idle: `fn` is short (a protocol step, never a scan or a wait):
                if the store is idle, run it and its commit on this thread rather
                than hand it to the writer thread (see the module's docstring).

        Raises:
            DurabilityError: the store failed (now or earlier) and has stopped.
            ClosedError: the store is closed or closing; `fn` did not run.
            Exception: whatever `fn` raised; its changes are rolled back.
        """
        if self._failure is not None:
            raise DurabilityError(f"store {self.path} failed earlier: {self._failure}")
        if self._loop is None or self._thread is None:
            raise ClosedError(f"store {self.path} is not open")
        if self._closing:
            raise ClosedError(f"store {self.path} is closing")
        future: asyncio.Future[T] = self._loop.create_future()
        task = _Task(fn, durable, future, inline=inline_if_idle)
        if self._outstanding == 0:  # idle: gather this turn's jobs, then decide
            self._gathered.append(task)
            if len(self._gathered) == 1:
                self._loop.call_soon(self._flush)
        else:
            self._submit([task])
        return await future

    def _submit(self, batch: list[_Task]) -> None:
        self._outstanding += len(batch)
        for t in batch:
            self._queue.put(t)

    def _flush(self) -> None:
        """The end of an idle turn: a lone short job runs here, anything else goes to
        the writer thread (in order, as one batch if it is free)."""
        batch, self._gathered = self._gathered, []
        if not batch:
            return
        conn = self._conn
        if (
            len(batch) == 1
            and batch[0].inline
            and self.idle_path_max_s > 0
            and self._commit_s < self.idle_path_max_s
            and conn is not None
            and not self._closing
            and self._conn_lock.acquire(blocking=False)
        ):
            try:
                self._execute(conn, batch)
            finally:
                self._conn_lock.release()
            _settle(batch)
        else:
            self._submit(batch)

    def _settle_submitted(self, batch: list[_Task]) -> None:
        self._outstanding -= len(batch)
        _settle(batch)

    async def read(self, fn: Job[T]) -> T:
        """Runs `fn(conn)` on the store's thread and returns its result."""
        return await self.write(fn, durable=False)

    # --- the owner's lock ----------------------------------------------------------

    def _lock(self) -> None:
        name = f"{os.fspath(self.path)}.lock"
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUseError(f"{os.fspath(self.path)} is in use by another store (lock {name} is held)") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- the writer thread -------------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            # Used from the writer thread and, on the idle path, the loop's thread: never
            # both at once (`_conn_lock`).
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            if self.schema:
                conn.executescript(self.schema)
        except BaseException as e:  # noqa: BLE001 - handed to the opener
            self._loop.call_soon_threadsafe(_settle_open, ready, e)
            return
        self._conn = conn
        self._loop.call_soon_threadsafe(_settle_open, ready, None)
        try:
            self._serve(conn)
        finally:
            with self._conn_lock:
                self._conn = None
                conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        """Runs batches until the stop marker. Never dies early: whatever goes wrong
        fails the store, and every job, present and future, hears of it."""
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            if not batch:
                continue
            with self._conn_lock:
                self._execute(conn, batch)
            try:
                self._loop.call_soon_threadsafe(self._settle_submitted, batch)  # type: ignore[union-attr]
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _execute(self, conn: sqlite3.Connection, batch: list[_Task]) -> None:
        """Runs one batch; any failure fails the store (the jobs hear of it)."""
        durable = any(t.durable for t in batch)
        try:
            if self._failure is not None:
                raise DurabilityError(f"store {self.path} failed earlier: {self._failure}")
            if durable != self._synced:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._synced = durable
            self._run_batch(conn, batch, durable)
        except BaseException as e:  # noqa: BLE001 - the store fails; no waiter hangs
            self._fail(conn, batch, e)

    def _next_batch(self) -> tuple[list[_Task], bool]:
        """Blocks for the next job, then takes what else is queued, up to max_batch."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch: list[_Task] = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Task], durable: bool) -> None:
        """One SQLite transaction for the batch; each job in its own savepoint. Raises
        for any failure outside a job (BEGIN, savepoints, COMMIT): the caller fails
        the store."""
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
        self._timed_commit(conn, durable)
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        if durable and conn.total_changes != changes:
            self.stats.syncs += 1

    def _fail(self, conn: sqlite3.Connection, batch: list[_Task], error: BaseException) -> None:
        """Rule 8: the store stops for good. The batch's jobs did not commit."""
        if self._failure is None:
            self._failure = error
            _log.critical("store_failed", path=os.fspath(self.path), error=str(error))
            if self._loop is not None and self._failed is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                    self._loop.call_soon_threadsafe(self._failed.set)
        failed = error if isinstance(error, DurabilityError) else DurabilityError(f"store {self.path} failed: {error}")
        for t in batch:
            t.result = None
            if t.error is None or isinstance(t.error, DurabilityError):
                t.error = failed
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _commit(self, conn: sqlite3.Connection) -> None:
        """The commit point of a batch: with synchronous=FULL it returns after fsync.

        Kept apart so a test can make it fail as a disk would (EIO).
        """
        conn.execute("COMMIT")

    def _timed_commit(self, conn: sqlite3.Connection, durable: bool) -> None:
        """Commits, and keeps the moving average of synced commits' durations."""
        if not durable:
            self._commit(conn)
            return
        started = time.monotonic()
        self._commit(conn)
        self._commit_s += _SMOOTHING * (time.monotonic() - started - self._commit_s)


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
