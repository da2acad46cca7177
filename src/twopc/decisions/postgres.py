"""A decision log in PostgreSQL, shared by several coordinator instances.

Each coordinator process is an *instance*: a random id and a row in `instances`
(id, epoch, expiry by the database's clock) that it renews in the background. A
transaction belongs to the instance that runs it and its id names that instance
(`"<instance id>:<local id>"`). The rules (model-checked in tests/model/ha_model.py):

1. A restarted process is a new instance with a new row; its old row is taken over
   like any other.
2. Fencing, by the database: the COMMIT record is inserted in the database
   transaction that also reads the writer's row `FOR SHARE` and checks its epoch. A
   takeover's epoch bump waits for that lock, so a COMMIT either lands before the
   bump (and the taker sees it) or finds the epoch moved and writes nothing. No
   local clock is trusted.
3. Takeover: every instance looks for rows whose expiry passed (database clock);
   one database transaction bumps the epoch of such a row, then moves that
   instance's COMMIT records without END to the taker, which delivers them.
   Ownership changes are written to `ownership` and logged.
4. Outcome, from any instance: COMMITTED if a COMMIT record exists; PENDING while
   the owner's row has its first epoch (the owner may still write: expired but not
   taken over counts as live); ABORTED once the epoch moved. The owner itself
   answers ABORTED for its own ids it holds neither in flight nor uncertain (the
   coordinator answers those from memory first): it is their only writer, so an
   abort it never logged does not read PENDING for as long as it lives. An owner
   the database never knew is PENDING: the id is another log's (a peer on another
   schema, or on a file), and this log cannot tell. Instance rows are never
   deleted (a taken-over row is the tombstone), so "never knew" is never "purged".
5. A COMMIT write whose result was not seen (connection lost, timeout) is neither
   success nor failure: `log_commit` reads it back before returning. The read-back
   inserts an *abort marker* for the txn id if there is no record, so a write still
   on its way can no longer land (its INSERT conflicts), then follows the record.
   This is a stronger form of the model's "the write can no longer land".
6. END is not fenced: it is written only after every target acknowledged, and two
   instances delivering one COMMIT send idempotent Commits.

Group commit: COMMIT records of concurrent transactions are written together, one
batch at a time (those that queue while one is written go in the next): one
database transaction, one epoch check and one INSERT for the batch, so one WAL
flush. Rule 2 holds for each record, since each is in a transaction that checked
the epoch; a batch whose result was not seen is read back record by record (rule 5).

While the database cannot be reached (renewals fail, or the lease ran out by the
local clock since the last renewal) `check_writable` refuses new transactions;
phase 2 of logged commits goes on, and END waits for the database.

Replicated PostgreSQL (a primary and synchronous standbys under a failover manager):
the URL may name several hosts with `target_session_attrs=read-write`, as libpq's
does, and the pool connects to whichever is the primary. A failover is the database
being unreachable for a while: a COMMIT write caught in it is read back on the new
primary (rule 5), and the pool reconnects with backoff. A node that turned read-only
counts as unreachable, and its connection is dropped. Choose `lease_s` longer than
the database's failover time: the leases expire by the database's clock, so after a
longer failover the first instance back takes the others over and fences them.

The schema lives in its own PostgreSQL schema (`twopc` by default; `?schema=` in
the URL) and carries its version and the log's identity (`log_id`, made once at
random) in `meta`; `open` creates or checks it. Instances that name each other as
peers compare that identity (`Coordinator`), so a mistyped schema is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
import structlog
from psycopg.types.json import Jsonb

from twopc.decisions import CommitRecord
from twopc.errors import DurabilityError, FencedError, LogUnavailableError, NotLoggedError
from twopc.stores.base import SCHEMA_NAME
from twopc.types import Outcome

_log = structlog.get_logger("twopc.decisions.postgres")

SCHEMA_VERSION = 1
"""The version of the tables below; `open` refuses a database with a newer one."""

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.instances (
    id         text PRIMARY KEY,
    epoch      bigint NOT NULL DEFAULT 0,         -- 0 while the instance holds it
    expires_at timestamptz NOT NULL,              -- by the database's clock
    address    text NOT NULL DEFAULT '',
    started_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    taken_by   text,                              -- the instance that took it over
    taken_at   timestamptz
);
CREATE TABLE IF NOT EXISTS {s}.decisions (
    txn_id    text PRIMARY KEY,
    owner     text NOT NULL,                      -- the instance named in txn_id
    driver    text NOT NULL,                      -- who delivers it now
    decision  text NOT NULL CHECK (decision IN ('commit', 'abort')),
    targets   jsonb NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    ended_at  timestamptz                         -- NULL until every target acknowledged
);
CREATE INDEX IF NOT EXISTS decisions_open ON {s}.decisions (driver) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS decisions_ended ON {s}.decisions (ended_at);
CREATE TABLE IF NOT EXISTS {s}.ownership (
    at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    instance text NOT NULL,
    epoch    bigint NOT NULL,
    taken_by text NOT NULL,
    commits  integer NOT NULL
);
"""

T = TypeVar("T")
Cursor = psycopg.AsyncCursor[Any]


def _split(url: str) -> tuple[SplitResult, dict[str, str], str]:
    """The URL's parts, its query without `schema`, and the schema."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "twopc")
    if not SCHEMA_NAME.fullmatch(schema):  # one rule for every URL's ?schema=
        raise ValueError(f"schema must be a lowercase SQL identifier, got {schema!r}")
    return parts, query, schema


def connection_info(url: str) -> tuple[str, str]:
    """A log URL as (libpq URL without twopc's own parameters, schema), for tools
    that read the tables themselves."""
    parts, query, schema = _split(url)
    for option in ("lease_s", "op_timeout_s"):
        query.pop(option, None)
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote))), schema


def read_commits(url: str) -> dict[str, bool]:
    """Every COMMIT record of a shared log, txn id -> ended: what an auditor (the
    invariant checker) reads. Synchronous, one connection."""
    conninfo, schema = connection_info(url)
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        rows = conn.execute(
            f"SELECT txn_id, ended_at IS NOT NULL FROM {schema}.decisions WHERE decision = 'commit'"
        ).fetchall()
    return {str(t): bool(e) for t, e in rows}


def lease_timeout(lease_s: float, renew_every_s: float, op_timeout_s: float | None) -> float:
    """Checks a lease's timing and returns the database round's bound.

    A renewal is sent `renew_every_s` after the last one and may take up to
    `op_timeout_s`: that slow round must still land before the lease runs out, or
    one slow renewal loses it (a false takeover of a live instance). So
    `renew_every_s + op_timeout_s < lease_s`. Without an explicit `op_timeout_s`:
    2 s, or 90% of what the lease leaves, if less (0.675 s at `lease_s=1`).

    Raises:
        ValueError: a value is not positive, or one slow renewal would outlast the
            lease.
    """
    if not (lease_s > 0 and renew_every_s > 0 and (op_timeout_s is None or op_timeout_s > 0)):
        raise ValueError("lease_s, renew_every_s and op_timeout_s must be > 0")
    room = lease_s - renew_every_s
    if room <= 0:
        raise ValueError(f"renew_every_s={renew_every_s} must be shorter than lease_s={lease_s}")
    if op_timeout_s is None:
        return min(2.0, 0.9 * room)
    if op_timeout_s >= room:
        raise ValueError(
            f"lease_s={lease_s} is too short for op_timeout_s={op_timeout_s} with renew_every_s={renew_every_s}:"
            f" one slow renewal would let the lease expire; give lease_s > {renew_every_s + op_timeout_s:g},"
            " or a shorter op_timeout_s"
        )
    return op_timeout_s


class _EpochMovedError(Exception):
    """Inside a database transaction: this instance's epoch moved."""


class PostgresDecisionLog:
    """The decision log in PostgreSQL, for one coordinator instance among several.

    Args:
        url: a libpq URL, "postgresql://user@host:port/db". Query parameters of
            twopc's own are taken out of it: `schema` names the PostgreSQL schema of
            the tables (default `twopc`; every instance sharing a log names the same
            one), and `lease_s`, `op_timeout_s` set those options (they win over
            the arguments), so one URL configures a coordinator's command line:
            "postgresql://db/app?schema=shop_log&lease_s=2".
        address: this instance's GetOutcome address, recorded in its row for
            operators.
        lease_s: how long a renewal keeps the lease. Longer: fewer false takeovers
            of a slow instance; shorter: a dead instance's transactions wait less.
        renew_every_s: how often the lease is renewed (lease_s / 4 by default).
        takeover_every_s: how often to look for expired leases (lease_s / 2).
        op_timeout_s: the bound on one database round (connect, statement, commit);
            past it the database counts as unreachable. A renewal that takes
            this long must still land in time: `renew_every_s + op_timeout_s`
            must be below `lease_s` (else ValueError). By default 2 s, or less
            when the lease is short enough to need it (0.675 s at `lease_s=1`).
        decision_wait_s: how long a COMMIT write whose result was lost is read back
            before the coordinator gives up (DurabilityError; restart).
        pool_size: connections; concurrent COMMITs share WAL flushes.
        retention_s: how long ended records are kept (an audit trail).
    """

    def __init__(
        self,
        url: str,
        *,
        address: str = "",
        lease_s: float = 5.0,
        renew_every_s: float | None = None,
        takeover_every_s: float | None = None,
        op_timeout_s: float | None = None,
        decision_wait_s: float = 30.0,
        pool_size: int = 8,
        retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        parts, query, schema = _split(url)
        lease_s = float(query.pop("lease_s", lease_s))
        given = query.pop("op_timeout_s", op_timeout_s)
        renew_every_s = renew_every_s or lease_s / 4
        op_timeout_s = lease_timeout(lease_s, renew_every_s, None if given is None else float(given))
        if not (decision_wait_s > 0 and pool_size > 0):
            raise ValueError("decision_wait_s and pool_size must be > 0")
        # A partition must surface as an error, not a socket that waits for ever.
        timeout_ms = str(int(op_timeout_s * 1000))
        query.setdefault("connect_timeout", str(max(1, round(op_timeout_s))))
        query.setdefault("tcp_user_timeout", timeout_ms)
        query.setdefault("keepalives_idle", "1")
        query.setdefault("keepalives_interval", "1")
        query.setdefault("keepalives_count", "3")
        # And the server must not hold a cut-off writer's lock on its lease row for
        # ever (it would hold up the takeover that fences it): a transaction idle
        # or waiting for a lock longer than a round is ended by the server.
        bound = f"{max(1, int(op_timeout_s * 1000))}ms"
        server_side = (
            f"-c idle_in_transaction_session_timeout={bound} -c lock_timeout={bound} -c statement_timeout={bound}"
        )
        query["options"] = f"{query['options']} {server_side}" if "options" in query else server_side
        self._conninfo = urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))
        self.schema = schema
        self.address = address
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s
        self.takeover_every_s = takeover_every_s or lease_s / 2
        self.op_timeout_s = op_timeout_s
        # Opening (connecting, creating the schema) holds no lease yet: a short lease's
        # short rounds need not bound it.
        self._start_s = max(2 * op_timeout_s, 4.0)
        self.decision_wait_s = decision_wait_s
        self.retention_s = retention_s
        self._pool = psycopg_pool.AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=op_timeout_s,
            name="twopc-log",
            configure=_read_committed,
        )
        self._id = ""
        self._log_id = ""
        self._epoch = 0
        self._renewed_at = 0.0  # loop time a successful renewal was sent
        self._unreachable = ""  # why the last round failed, or ""
        self._fenced: FencedError | None = None
        self._fail: Callable[[BaseException], None] = lambda e: None
        self._adopt: Callable[[Sequence[CommitRecord]], None] = lambda records: None
        self._tasks: list[asyncio.Task[None]] = []
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._syncs = 0
        self._closed = False
        self._commits: list[_Commit] = []  # queued for the next batch
        self._writing = False  # a batch of COMMIT records is being written
        self._ends: list[tuple[str, asyncio.Future[bool]]] = []  # ENDs queued for the next batch
        self._ending = False  # a batch of ENDs is being written

    # --- the DecisionLog protocol ----------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def shared(self) -> bool:
        return True

    @property
    def syncs(self) -> int:
        return self._syncs

    @property
    def available(self) -> bool:
        """False while lease renewals fail (the database unreachable, or failing
        over) and once fenced: the coordinator's readiness check reads it."""
        return not self._unreachable and self._fenced is None and not self._closed

    async def open(self) -> list[CommitRecord]:
        """Creates or checks the schema and registers a new instance with a fresh
        lease. Returns no records: an instance has none at birth (a previous
        process's are taken over from its expired row).

        Raises:
            LogUnavailableError: the database cannot be reached.
            DurabilityError: the schema is newer than this code.
        """
        loop = asyncio.get_running_loop()
        try:
            await self._pool.open(wait=True, timeout=self._start_s)
        except psycopg_pool.PoolTimeout as e:
            await self._pool.close()
            raise LogUnavailableError(f"cannot reach the decision log's database: {e}") from e
        new_id = secrets.token_hex(8)

        async def create(cur: Cursor) -> str:
            # One creator at a time: concurrent CREATE IF NOT EXISTS can collide.
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"twopc-schema:{self.schema}",))
            await cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await cur.execute(_DDL.format(s=self.schema))
            await cur.execute(
                f"INSERT INTO {self.schema}.meta VALUES ('schema_version', %s) ON CONFLICT DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            await cur.execute(f"SELECT value FROM {self.schema}.meta WHERE key = 'schema_version'")
            found = await cur.fetchone()
            version = int(found[0]) if found is not None else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise DurabilityError(
                    f"the decision log's schema is version {version}; this twopc knows {SCHEMA_VERSION}: upgrade"
                )
            # The log's identity, made once: every instance of this log reads the same.
            await cur.execute(
                f"INSERT INTO {self.schema}.meta VALUES ('log_id', %s) ON CONFLICT DO NOTHING", (secrets.token_hex(8),)
            )
            await cur.execute(f"SELECT value FROM {self.schema}.meta WHERE key = 'log_id'")
            row = await cur.fetchone()
            assert row is not None  # inserted just above, or before
            return str(row[0])

        async def register(cur: Cursor) -> None:
            await cur.execute(
                f"INSERT INTO {self.schema}.instances (id, expires_at, address) "
                "VALUES (%s, statement_timestamp() + %s * interval '1 second', %s)",
                (new_id, self.lease_s, self.address),
            )

        try:
            log_id = await self._run(create, timeout_s=self._start_s)  # DDL: no lease to keep yet
            sent = loop.time()
            await self._run(register)
        except BaseException:
            await self._pool.close()
            raise
        self._id, self._log_id, self._renewed_at = new_id, log_id, sent
        _log.info("instance_registered", instance=new_id, log_id=log_id, schema=self.schema, lease_s=self.lease_s)
        return []

    def watch(self, *, adopt: Callable[[Sequence[CommitRecord]], None], fail: Callable[[BaseException], None]) -> None:
        self._adopt, self._fail = adopt, fail
        self._tasks = [asyncio.create_task(self._renew_forever()), asyncio.create_task(self._take_over_forever())]
        for task in self._tasks:
            task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """A background loop ended: fenced (it said so), closed, or by an error no
        loop catches. The last must stop the coordinator visibly, not leave it
        refusing every run with nobody told."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        _log.critical("lease_task_died", instance=self._id, error=repr(error))
        self._fail(DurabilityError(f"the decision log's lease work stopped: {error!r}"))

    def check_writable(self) -> None:
        if self._fenced is not None:
            raise self._fenced
        if self._closed:
            raise LogUnavailableError("the decision log is closed")
        held_s = asyncio.get_running_loop().time() - self._renewed_at
        if held_s > self.lease_s:
            why = f": {self._unreachable}" if self._unreachable else ""
            raise LogUnavailableError(
                f"the decision log's database has not renewed this instance's lease for {held_s:.1f} s{why};"
                " no new transaction until it does"
            )

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> bool:
        """Logs the COMMIT, fenced by this instance's epoch (rule 2).

        Raises:
            FencedError: the epoch moved: nothing was written, and this instance is
                done deciding.
            NotLoggedError: the write's result was lost and the read-back found
                nothing (and made sure nothing can land), or an abort marker holds
                the id already: the transaction aborts.
            DurabilityError: the result stayed unknown for `decision_wait_s`.
        """
        if self._fenced is not None:
            raise self._fenced
        commit = _Commit(txn_id, Jsonb(list(targets)), asyncio.get_running_loop().create_future())
        commit.written.add_done_callback(_seen)  # its waiter may have been cancelled
        self._commits.append(commit)
        if not self._writing:
            self._writing = True
            self._spawn(self._write_commits())
        try:
            return await asyncio.shield(commit.written)
        except asyncio.CancelledError:
            if commit in self._commits:  # not sent yet: withdrawn, never written
                self._commits.remove(commit)
            raise

    async def _write_commits(self) -> None:
        """Writes what queued, a batch at a time, until nothing is left."""
        try:
            while self._commits:
                batch, self._commits = self._commits, []
                await self._write_batch(batch)
        finally:
            self._writing = False
            for commit in self._commits:  # only if this was cancelled (close)
                commit.written.cancel()

    async def _write_batch(self, batch: list[_Commit]) -> None:
        async def write(cur: Cursor) -> tuple[set[str], set[str]]:
            await self._check_epoch(cur)
            await cur.execute(
                f"INSERT INTO {self.schema}.decisions (txn_id, owner, driver, decision, targets) "
                "SELECT txn_id, %s, %s, 'commit', targets FROM unnest(%s::text[], %s::jsonb[]) AS b (txn_id, targets)"
                " ON CONFLICT DO NOTHING RETURNING txn_id",
                (self._id, self._id, [c.txn_id for c in batch], [c.targets for c in batch]),
            )
            inserted = {row[0] for row in await cur.fetchall()}
            # An id already held by an abort marker (an earlier attempt settled as
            # aborted, rule 5): that decision stands, and this one aborts too.
            await cur.execute(
                f"SELECT txn_id FROM {self.schema}.decisions WHERE txn_id = ANY(%s) AND decision = 'abort'",
                ([c.txn_id for c in batch if c.txn_id not in inserted],),
            )
            return inserted, {row[0] for row in await cur.fetchall()}

        try:
            found = await self._run(write)
        except _EpochMovedError:
            _settle(batch, self._fence())
        except LogUnavailableError as e:
            _log.warning("decision_write_unseen", txn_ids=[c.txn_id for c in batch[:8]], error=str(e))
            await asyncio.gather(*(self._settle_by_reading_back(c) for c in batch))
        except Exception as e:  # noqa: BLE001 - every waiter hears of it
            _settle(batch, e)
        else:
            inserted, aborted = found
            if inserted:
                self._syncs += 1
            for c in batch:
                if c.txn_id in aborted:
                    _settle([c], NotLoggedError(f"{c.txn_id} was decided ABORT already (an abort marker holds its id)"))
                elif not c.written.done():
                    c.written.set_result(c.txn_id in inserted)

    async def _settle_by_reading_back(self, commit: _Commit) -> None:
        try:
            logged = await self._read_back(commit.txn_id)
        except Exception as e:  # noqa: BLE001 - the waiter hears of it
            _settle([commit], e)
            return
        if not commit.written.done():
            commit.written.set_result(logged)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._abandoned.add(task)  # close() cancels and awaits it with the others
        task.add_done_callback(self._abandoned.discard)
        task.add_done_callback(_consume)

    async def find(self, txn_id: str) -> CommitRecord | None:
        async def lookup(cur: Cursor) -> tuple[Any, ...] | None:
            await cur.execute(
                f"SELECT targets, ended_at IS NOT NULL FROM {self.schema}.decisions "
                "WHERE txn_id = %s AND decision = 'commit'",
                (txn_id,),
            )
            return await cur.fetchone()

        row = await self._run(lookup)
        return None if row is None else CommitRecord(txn_id, tuple(row[0]), bool(row[1]))

    async def decided(self, txn_id: str) -> Outcome | None:
        async def lookup(cur: Cursor) -> tuple[Any, ...] | None:
            await cur.execute(f"SELECT decision FROM {self.schema}.decisions WHERE txn_id = %s", (txn_id,))
            return await cur.fetchone()

        row = await self._run(lookup)
        return None if row is None else Outcome.COMMITTED if row[0] == "commit" else Outcome.ABORTED

    async def log_end(self, txn_id: str) -> None:
        """Marks the record ended, waiting (with backoff) for the database if it is
        down: phase 2 is done, and nobody waits for END.

        ENDs that queue while one batch is written go together in the next: one
        transaction per batch, not forced (as on SQLite: a lost END only means the
        Commits are sent again, idempotent). One transaction each held the pool's
        connections from the COMMIT writes: with ENDs the log made a tenth of the
        commits a second it made without.
        """
        ended = asyncio.get_running_loop().create_future()
        ended.add_done_callback(_seen)
        self._ends.append((txn_id, ended))
        if not self._ending:
            self._ending = True
            self._spawn(self._write_ends())
        await asyncio.shield(ended)

    async def _write_ends(self) -> None:
        batch: list[tuple[str, asyncio.Future[bool]]] = []
        try:
            while self._ends:
                batch, self._ends = self._ends, []
                end = functools.partial(self._end, [txn_id for txn_id, _ in batch])
                delay = 0.05
                while True:
                    try:
                        await self._run(end)
                        break
                    except LogUnavailableError:
                        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                        delay = min(delay * 2, 2.0)
                for _, ended in batch:
                    if not ended.done():
                        ended.set_result(True)
        finally:
            self._ending = False
            for _, ended in (*batch, *self._ends):  # only if this was cancelled (close)
                ended.cancel()

    async def _end(self, txn_ids: list[str], cur: Cursor) -> None:
        # Durable, still one transaction per batch: an unforced END lost when the server
        # crashes or fails over (an acknowledged asynchronous commit is not on the
        # standby) is re-driven only at a restart or takeover, so a live owner would keep
        # an acknowledged commit pending for ever (seen under a Patroni failover).
        await cur.execute(
            f"UPDATE {self.schema}.decisions SET ended_at = statement_timestamp() WHERE txn_id = ANY(%s)", (txn_ids,)
        )

    async def outcome(self, txn_id: str) -> Outcome:
        owner = txn_id.split(":", 1)[0] if ":" in txn_id else ""

        async def read(cur: Cursor) -> Outcome:
            # The owner's epoch first, the record second (a fresh snapshot per
            # statement): a moved epoch means every COMMIT the owner could ever log
            # is already committed, so the second read sees it. The other order
            # could miss a COMMIT that lands between the reads, then see the epoch
            # moved by a takeover, and answer ABORTED for a committed transaction.
            await cur.execute(f"SELECT epoch FROM {self.schema}.instances WHERE id = %s", (owner,))
            lease = await cur.fetchone()
            await cur.execute(f"SELECT decision FROM {self.schema}.decisions WHERE txn_id = %s", (txn_id,))
            row = await cur.fetchone()
            if row is not None:
                return Outcome.COMMITTED if row[0] == "commit" else Outcome.ABORTED
            if owner == self._id:
                # Our own id, and the coordinator holds it neither in flight nor
                # uncertain (it asks its memory first): we are its only writer,
                # and will never log it.
                return Outcome.ABORTED
            if lease is None:
                # An owner this database never knew (rows are never deleted): the
                # id is another log's, and this one cannot tell (rule 12).
                return Outcome.PENDING
            # Rule 4: the owner may still write while its row has its first epoch.
            return Outcome.PENDING if lease[0] == 0 else Outcome.ABORTED

        return await self._run(read)

    async def close(self) -> None:
        """Stops renewing and taking over, and lets the lease go at once (so
        another instance takes over what is left without waiting for expiry)."""
        if self._closed:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        async def release(cur: Cursor) -> None:
            await cur.execute(
                f"UPDATE {self.schema}.instances SET expires_at = statement_timestamp() WHERE id = %s AND epoch = %s",
                (self._id, self._epoch),
            )

        if self._id and self._fenced is None:
            with contextlib.suppress(LogUnavailableError):
                await self._run(release)
        self._closed = True
        for task in list(self._abandoned):
            task.cancel()
        if self._abandoned:
            await asyncio.wait(set(self._abandoned), timeout=self.op_timeout_s)
        await self._pool.close(timeout=self.op_timeout_s)

    # --- leases and takeover ---------------------------------------------------------

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()

        async def renew(cur: Cursor) -> bool:
            await cur.execute(
                f"UPDATE {self.schema}.instances SET expires_at = statement_timestamp() + %s * interval '1 second'"
                " WHERE id = %s AND epoch = %s",
                (self.lease_s, self._id, self._epoch),
            )
            return cur.rowcount == 1

        while True:
            await asyncio.sleep(self.renew_every_s)
            sent = loop.time()
            try:
                held = await self._run(renew)
            except LogUnavailableError as e:
                if not self._unreachable:
                    _log.warning("lease_renewal_failed", instance=self._id, error=str(e))
                self._unreachable = str(e)
                continue
            except Exception as e:  # noqa: BLE001 - the lease must outlive any one bad round
                # Not the network: a dropped table, a permission, a bug. Counted as
                # a failed renewal (so new runs are refused once the lease lapses),
                # logged loudly, and tried again; the lease itself decides the rest.
                _log.error("lease_renewal_error", instance=self._id, error=repr(e), exc_info=True)
                self._unreachable = repr(e)
                continue
            if not held:
                self._fence()
                return
            if self._unreachable:
                _log.info("lease_renewed_again", instance=self._id)
            self._unreachable = ""
            self._renewed_at = sent

    async def _take_over_forever(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.takeover_every_s * random.uniform(0.5, 1.5))
            rounds += 1
            try:
                await self.take_over()
                if rounds % 500 == 0:  # now and then, drop what retention no longer needs
                    await self.purge()
            except LogUnavailableError:
                continue  # the renewal loop reports it
            except _EpochMovedError:
                self._fence()
                return
            except Exception as e:  # noqa: BLE001 - a dead instance's commits wait on this loop
                _log.error("takeover_error", instance=self._id, error=repr(e), exc_info=True)
                continue

    async def purge(self) -> None:
        """Deletes ended records past `retention_s` (a commit past retention reads
        ABORTED, as presumed abort says). Instance rows stay, however old: a
        taken-over row is the tombstone that keeps its ids ABORTED, where an
        owner the log never knew is PENDING (rule 4). A row is a few dozen bytes
        per process start."""

        async def purge(cur: Cursor) -> None:
            await cur.execute(
                f"DELETE FROM {self.schema}.decisions"
                " WHERE ended_at < statement_timestamp() - %s * interval '1 second'",
                (self.retention_s,),
            )

        await self._run(purge)

    async def take_over(self) -> list[str]:
        """Takes over every instance whose lease expired (rule 3) and hands their
        commits without END to `adopt`. Returns the instances taken over."""

        async def take(cur: Cursor) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            await cur.execute(
                f"UPDATE {self.schema}.instances SET epoch = epoch + 1, taken_by = %s,"
                " taken_at = statement_timestamp()"
                " WHERE expires_at < statement_timestamp() AND taken_by IS NULL AND id <> %s RETURNING id, epoch",
                (self._id, self._id),
            )
            taken = await cur.fetchall()
            if not taken:
                return [], []
            # After the bump, in the same transaction (a fresh snapshot per
            # statement): every COMMIT those instances could ever write is here.
            await cur.execute(
                f"SELECT txn_id, targets, driver FROM {self.schema}.decisions"
                " WHERE driver = ANY(%s) AND ended_at IS NULL AND decision = 'commit' FOR UPDATE",
                ([row[0] for row in taken],),
            )
            records = await cur.fetchall()
            await cur.execute(
                f"UPDATE {self.schema}.decisions SET driver = %s WHERE txn_id = ANY(%s)",
                (self._id, [r[0] for r in records]),
            )
            for instance, epoch in taken:
                await cur.execute(
                    f"INSERT INTO {self.schema}.ownership (instance, epoch, taken_by, commits) VALUES (%s, %s, %s, %s)",
                    (instance, epoch, self._id, sum(1 for r in records if r[2] == instance)),
                )
            # A fenced instance takes nothing over. Checked last: waiting for the
            # taken rows' locks must not hold our own row (it would block renewals).
            await self._check_epoch(cur)
            return taken, records

        taken, records = await self._run(take)
        for instance, epoch in taken:
            commits = sum(1 for r in records if r[2] == instance)
            _log.warning("instance_taken_over", instance=instance, epoch=epoch, taken_by=self._id, commits=commits)
        if records:
            self._adopt([CommitRecord(txn_id, tuple(targets)) for txn_id, targets, _ in records])
        return [row[0] for row in taken]

    # --- plumbing --------------------------------------------------------------------

    async def _check_epoch(self, cur: Cursor) -> None:
        # FOR SHARE: a takeover's epoch bump waits for this transaction to end.
        await cur.execute(f"SELECT epoch FROM {self.schema}.instances WHERE id = %s FOR SHARE", (self._id,))
        row = await cur.fetchone()
        if row is None or row[0] != self._epoch:
            raise _EpochMovedError

    def _fence(self) -> FencedError:
        if self._fenced is None:
            self._fenced = FencedError(
                f"instance {self._id} was taken over by another coordinator (its lease expired):"
                " it logs no COMMIT any more; restart the process"
            )
            _log.error("instance_fenced", instance=self._id)
            self._fail(self._fenced)
        return self._fenced

    async def _read_back(self, txn_id: str) -> bool:
        """Rule 5: learns what became of a COMMIT write whose result was lost."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.decision_wait_s

        async def settle(cur: Cursor) -> str:
            # If nothing is there, an abort marker makes sure the lost write can
            # never land (its INSERT conflicts, or it already rolled back).
            await cur.execute(
                f"INSERT INTO {self.schema}.decisions (txn_id, owner, driver, decision, targets, ended_at) "
                "VALUES (%s, %s, %s, 'abort', '[]', statement_timestamp()) ON CONFLICT DO NOTHING",
                (txn_id, self._id, self._id),
            )
            await cur.execute(f"SELECT decision FROM {self.schema}.decisions WHERE txn_id = %s", (txn_id,))
            row = await cur.fetchone()
            return str(row[0]) if row is not None else "abort"

        delay = 0.05
        while True:
            try:
                decision = await self._run(settle)
            except LogUnavailableError as e:
                if loop.time() > give_up:
                    raise DurabilityError(f"the COMMIT of {txn_id} may or may not be logged: {e}") from e
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 1.0)
                continue
            _log.info("decision_write_read_back", txn_id=txn_id, decision=decision)
            if decision == "commit":
                self._syncs += 1
                return True
            raise NotLoggedError(f"the COMMIT write of {txn_id} was lost, and the log now holds none")

    async def _run(self, work: Callable[[Cursor], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Runs `work` in one database transaction, bounded by `op_timeout_s` (or
        `timeout_s`); an unreachable or failing server is LogUnavailableError.

        Past the bound the work is abandoned, not awaited: psycopg's cancellation of
        a query on a silent network takes seconds more, and a decision must not.
        """
        if self._pool.closed:
            raise LogUnavailableError("the decision log is closed")

        async def transaction() -> T:
            async with self._pool.connection() as conn:
                try:
                    async with conn.transaction(), conn.cursor() as cur:
                        return await work(cur)
                except psycopg.errors.ReadOnlySqlTransaction:
                    await conn.close()  # a standby now (demoted): the pool connects anew
                    raise

        task = asyncio.create_task(transaction())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s or self.op_timeout_s)
        except BaseException:
            task.cancel()
            raise
        if not done:
            task.cancel()  # it ends in the background; its connection is discarded
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
            task.add_done_callback(_consume)
            raise LogUnavailableError(
                f"the decision log's database did not answer within {timeout_s or self.op_timeout_s} s"
            )
        try:
            return task.result()
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction, psycopg_pool.PoolTimeout) as e:
            raise LogUnavailableError(f"the decision log's database is unreachable: {e}") from e


@dataclass(frozen=True, slots=True)
class _Commit:
    """A COMMIT record waiting for its batch."""

    txn_id: str
    targets: Jsonb
    written: asyncio.Future[bool]  # True: written now; False: there was one already


def _settle(batch: Sequence[_Commit], error: BaseException) -> None:
    for commit in batch:
        if not commit.written.done():
            commit.written.set_exception(error)


async def _read_committed(conn: psycopg.AsyncConnection[Any]) -> None:
    """Every rule above reads with a fresh snapshot per statement (the takeover's
    records after its bump, an outcome's record after the epoch): READ COMMITTED,
    whatever the server's default."""
    await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)


def _seen(future: asyncio.Future[bool]) -> None:
    """Marks a COMMIT's error as seen."""
    if not future.cancelled():
        future.exception()


def _consume(task: asyncio.Task[Any]) -> None:
    """Marks an abandoned transaction's error as seen."""
    if not task.cancelled():
        task.exception()
