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
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from twopc import rpc
from twopc.config import Credentials, ParticipantConfig
from twopc.errors import DurabilityError, InvalidOperation, NotFound, VoteAbort
from twopc.faults import crash_point
from twopc.observe import EventKind, Observer, Observers, health_for_serve
from twopc.participant import trust
from twopc.security import auth, limits
from twopc.stores.base import (
    ConflictError,
    Connection,
    Store,
    StoreUnavailableError,
    execute,
    for_update,
    is_retried,
    open_store,
    schema_for,
)
from twopc.types import Outcome, Vote
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.participant.helper")

PREPARED, COMMITTED, ABORTED = "PREPARED", "COMMITTED", "ABORTED"
_OUTCOME = {COMMITTED: Outcome.COMMITTED, ABORTED: Outcome.ABORTED}
_ANSWERED = {
    coordinator_pb2.OUTCOME_COMMITTED: Outcome.COMMITTED,
    coordinator_pb2.OUTCOME_ABORTED: Outcome.ABORTED,
    coordinator_pb2.OUTCOME_PENDING: Outcome.PENDING,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS twopc_txn (
    txn_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('PREPARED', 'COMMITTED', 'ABORTED')),
    coordinator  TEXT NOT NULL DEFAULT '',
    prepared_at  DOUBLE PRECISION,
    decided_at   DOUBLE PRECISION,
    digest       TEXT NOT NULL DEFAULT '',  -- of the prepared operation: a repeat must match
    alternates   TEXT NOT NULL DEFAULT ''   -- more GetOutcome addresses (instances sharing a log)
);
CREATE INDEX IF NOT EXISTS twopc_txn_state ON twopc_txn (state, prepared_at);
CREATE INDEX IF NOT EXISTS twopc_txn_decided ON twopc_txn (decided_at);
CREATE INDEX IF NOT EXISTS twopc_txn_coordinator ON twopc_txn (coordinator, state);
"""

_PB_VOTE = {
    Vote.COMMIT: participant_pb2.VOTE_COMMIT,
    Vote.ABORT: participant_pb2.VOTE_ABORT,
    Vote.READ_ONLY: participant_pb2.VOTE_READ_ONLY,
}


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


class _RefusedError(Exception):
    """A Commit or Abort that the transaction's state forbids."""


class _ExhaustedError(Exception):
    """A Prepare past the coordinator's cap of undecided transactions."""


def _check_prepare(request: participant_pb2.PrepareRequest) -> None:
    limits.check_txn_id(request.txn_id)
    if not request.HasField("operation"):
        raise limits.LimitError("operation is required")
    if len(request.operation.value) > limits.MAX_OPERATION_BYTES:
        raise limits.LimitError(f"operation is larger than {limits.MAX_OPERATION_BYTES} bytes")
    if len(request.operation.type_url) > limits.MAX_TYPE_URL_LEN:
        raise limits.LimitError(f"operation type_url is longer than {limits.MAX_TYPE_URL_LEN} characters")
    limits.check_count("coordinators", len(request.coordinators), limits.MAX_COORDINATORS)
    for address in request.coordinators:
        limits.check_address("each of coordinators", address)


def _check_commit_many(txn_ids: Sequence[str]) -> None:
    if not txn_ids:
        raise limits.LimitError("txn_ids are required")
    limits.check_count("txn_ids", len(txn_ids), limits.MAX_COMMIT_MANY)
    for txn_id in txn_ids:
        limits.check_txn_id(txn_id, "each of txn_ids")


INLINE_MAX_ITEMS = 4
"""Batches up to this size may take the store's idle path (no thread hand-offs). A
bigger one is a sign of load: it goes to the store's thread, so that the event loop
reads the next message while the batch is written."""


@dataclass(frozen=True, slots=True)
class _Item:
    """One Prepare, checked and unpacked, ready for the store."""

    txn_id: str
    coordinator: str
    alternates: str  # the other coordinator instances' addresses, space-separated
    operation: Message
    digest: str
    deadline: float | None  # time.monotonic(); None: no deadline
    one_phase: bool


class _ItemError(Exception):
    """A Prepare answered with a status instead of a vote; nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(error: Exception) -> str | _ItemError:
    """What a business `prepare` that raised answers: an ABORT vote's reason, or a status."""
    if isinstance(error, VoteAbort):
        return error.reason
    if isinstance(error, ConflictError):  # lost to concurrent transactions; nothing reserved
        return f"conflict: {error}"
    if isinstance(error, StoreUnavailableError):  # no vote it could not stand behind
        return _ItemError(grpc.StatusCode.UNAVAILABLE, f"participant store unavailable: {error}")
    if isinstance(error, _ExhaustedError):
        return _ItemError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, InvalidOperation):
        return _ItemError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, NotFound):
        return _ItemError(grpc.StatusCode.NOT_FOUND, str(error))
    return _ItemError(grpc.StatusCode.INTERNAL, f"prepare failed: {limits.clip(repr(error))}")


def _repeated(state: str, digest: str, item: _Item) -> tuple[Vote, str, bool]:
    """The answer to a Prepare of a transaction already known here (in `state`, its
    operation's `digest` kept): the first answer again, with no work."""
    if state == ABORTED:
        return Vote.ABORT, "transaction already aborted", True
    if digest != item.digest:
        # Not a repeat but another transaction under a used id: refuse it and leave
        # the first one as it is.
        return Vote.ABORT, "transaction id already used for another operation", True
    return Vote.COMMIT, "", True


def _report(item: _Item, failure: _ItemError, error: Exception) -> None:
    """Logs a Prepare answered with a status: a bug loudly, a capped coordinator as a warning."""
    if failure.code is grpc.StatusCode.INTERNAL:
        _log.error("prepare_raised", txn_id=item.txn_id, exc_info=error)
    elif failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        _log.warning("prepare_refused_cap", txn_id=item.txn_id, coordinator=item.coordinator)


class Participant(participant_pb2_grpc.ParticipantServicer):
    """The `twopc.v1.Participant` servicer around a business handler.

    Use it as an async context manager (it opens the store and runs the in-doubt
    resolver), and serve it, with the service's own API beside it, until SIGTERM::

        async with Participant(Wallet(), "wallet.db", credentials=Credentials.insecure()) as p:
            await p.serve("127.0.0.1:50051", services=[lambda s: add_WalletServicer_to_server(api, s)])

    (or register it on a server you own with `add_to_server`).

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
        self.store = open_store(store, isolation=getattr(handler, "isolation", "SERIALIZABLE"))
        # All applied when it opens.
        self.store.schema = _SCHEMA + schema_for(handler.schema, self.store.dialect) + self.store.schema
        self.config = config or ParticipantConfig()
        if self.config.trusted_coordinators is None and credentials.secure:
            # Under TLS the default trusts no address, only the caller's own name.
            self.config = dataclasses.replace(self.config, trusted_coordinators=frozenset())
        self._credentials = credentials
        self._types = {t.DESCRIPTOR.full_name: t for t in handler.operations}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._resolver: asyncio.Task[None] | None = None
        self.observers = Observers(observers)
        self.draining = False  # shutting down: new Prepares are refused (UNAVAILABLE)
        self._outreach = trust.Outreach(self.config)

    async def __aenter__(self) -> Self:
        if self.store.is_open:
            raise ValueError("give the participant its store unopened: it opens it with the twopc schema")
        await self.store.open()
        try:
            if self.store.dialect == "sqlite":  # PostgreSQL tables date from this version
                await self.store.write(_migrate)
        except BaseException:
            await self.store.close()
            raise
        self._resolver = asyncio.create_task(self._resolve_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close(None)
        await self.store.close()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the Participant service on a server you own."""
        participant_pb2_grpc.add_ParticipantServicer_to_server(self, server)

    async def serve(
        self,
        address: str,
        *,
        services: Sequence[Callable[[grpc.aio.Server], None]] = (),
        grace_s: float = 1.0,
        health: rpc.Health | None = None,
        interceptors: Sequence[Any] = (),
        policy: auth.Policy | None = None,
    ) -> None:
        """Serves the Participant contract and the caller's `services` on `address`
        until SIGTERM or SIGINT: the usual way to run a participant process.

        Binds exclusively, prints `READY host:port` once serving, and stops
        gracefully on a signal.

        Args:
            address: "host:port" to listen on (port 0 for any free one).
            services: functions that add the service's own servicers to the server.
            grace_s: on a signal, how long to drain (new Prepares refused, prepared
                transactions decided) and let in-flight RPCs finish.
            health: the standard health and reflection services (`twopc.observe.health`);
                by default one for the Participant service (with the `ops` extra).
                Either way it is NOT_SERVING while the store cannot be read.
            interceptors: server interceptors (e.g. `Tracing.server_interceptor()`).
            policy: who may call what (`twopc.security.auth`), enforced under mutual TLS.

        Raises:
            DurabilityError: the store failed; restart the process to recover.
        """
        await rpc.serve(
            address,
            self._credentials,
            [self.add_to_server, *services],
            failed=self.store.wait_failed,
            grace_s=grace_s,
            health=health_for_serve(
                health, [auth.PARTICIPANT_SERVICE], failed=self.store.wait_failed, probe=self._store_reachable
            ),
            drain=self.drain,
            interceptors=interceptors,
            policy=policy,
        )

    async def _store_reachable(self) -> None:
        """Readiness: one read of the store (a PostgreSQL server may be down)."""
        await self.store.read(lambda db: execute(db, "SELECT 1"))

    # --- the RPCs ------------------------------------------------------------------

    async def Prepare(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareResponse:
        if self.draining:  # the coordinator decides ABORT at once; nothing is reserved
            await context.abort(grpc.StatusCode.UNAVAILABLE, "participant is shutting down")
        remaining = context.time_remaining()
        try:
            item = self._item(
                request, None if remaining is None else time.monotonic() + remaining, auth.peer_identities(context)
            )
        except _ItemError as e:
            await context.abort(e.code, e.message)
        try:
            vote, reason, repeat = await self.store.write(
                functools.partial(self._prepare_tx, item), inline_if_idle=True
            )
        except DurabilityError as e:
            _log.critical("prepare_write_failed", txn_id=item.txn_id, error=str(e))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
        except Exception as e:  # noqa: BLE001 - mapped to a vote or a status; a bug is INTERNAL
            failure = _refusal(e)
            if isinstance(failure, _ItemError):
                _report(item, failure, e)
                await context.abort(failure.code, failure.message)
            vote, reason, repeat = Vote.ABORT, failure, False
        self._prepared([(item, vote, reason, repeat)])
        return participant_pb2.PrepareResponse(vote=_PB_VOTE[vote], reason=reason)

    async def PrepareMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareManyResponse:
        if not 1 <= len(request.items) <= limits.MAX_PREPARE_MANY:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"PrepareMany takes 1 to {limits.MAX_PREPARE_MANY} items, got {len(request.items)}",
            )
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "participant is shutting down")
        now = time.monotonic()
        remaining = context.time_remaining()
        caller = auth.peer_identities(context)
        results = [participant_pb2.PrepareManyResponse.Result() for _ in request.items]
        items: list[tuple[int, _Item]] = []
        for i, entry in enumerate(request.items):
            try:
                left = entry.timeout.ToNanoseconds() / 1e9 if entry.HasField("timeout") else 0.0
                if not 0 < left <= limits.MAX_TIMEOUT_S:
                    raise _ItemError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"timeout is required, from 0 to {limits.MAX_TIMEOUT_S:g} s"
                    )
                deadline = now + (left if remaining is None else min(left, remaining))
                items.append((i, self._item(entry.prepare, deadline, caller)))
            except _ItemError as e:
                results[i].code, results[i].message = e.code.value[0], e.message
        if items:
            try:
                outcomes = await self.store.write(
                    functools.partial(self._prepare_many_tx, [x for _, x in items]),
                    inline_if_idle=len(items) <= INLINE_MAX_ITEMS,
                )
            except DurabilityError as e:
                _log.critical("prepare_write_failed", txn_ids=[x.txn_id for _, x in items[:8]], error=str(e))
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
            except StoreUnavailableError as e:  # PostgreSQL: lost, or gave up on conflicts; nothing voted
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store unavailable: {e}")
            except Exception as e:  # noqa: BLE001 - a failure outside any item: nothing changed
                _log.error("prepare_many_failed", count=len(items), exc_info=e)
                await context.abort(grpc.StatusCode.INTERNAL, f"prepare failed at the participant: {type(e).__name__}")
            voted = []
            for (i, item), outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, _ItemError):
                    results[i].code, results[i].message = outcome.code.value[0], outcome.message
                else:
                    vote, reason, repeat = outcome
                    results[i].response.vote, results[i].response.reason = _PB_VOTE[vote], reason
                    voted.append((item, vote, reason, repeat))
            self._prepared(voted)
        return participant_pb2.PrepareManyResponse(results=results)

    def _item(self, request: participant_pb2.PrepareRequest, deadline: float | None, caller: Sequence[str]) -> _Item:
        """Checks one Prepare (its bounds, and the coordinator it names against the
        trusted ones, for `caller`'s identities) and unpacks its operation, before any
        store work.

        Raises:
            _ItemError: INVALID_ARGUMENT or PERMISSION_DENIED, with what is wrong.
        """
        try:
            _check_prepare(request)
        except limits.LimitError as e:
            raise _ItemError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            # Each address is kept bound to the identity that must answer there.
            coordinator = trust.admit(self.config, request.coordinator, request.one_phase, caller)
            others = [
                trust.admit(self.config, address, request.one_phase, caller)
                for address in request.coordinators  # any of them will be believed
                if address
            ]
        except trust.Refused as e:
            _log.warning(
                "prepare_refused_coordinator",
                txn_id=request.txn_id,
                coordinator=limits.clip(request.coordinator),
                caller=",".join(caller[:4]),
            )
            raise _ItemError(grpc.StatusCode[e.code], str(e)) from None
        kind = self._types.get(request.operation.TypeName())
        if kind is None:
            accepted = ", ".join(sorted(self._types))
            raise _ItemError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown operation type {limits.clip(request.operation.type_url, 100)!r};"
                f" this participant accepts {accepted}",
            )
        operation = kind()
        try:
            unpacked = request.operation.Unpack(operation)
        except DecodeError:
            unpacked = False
        if not unpacked:
            raise _ItemError(grpc.StatusCode.INVALID_ARGUMENT, "operation does not parse")
        digest = _digest(request.operation.type_url, request.operation.value)
        # Several coordinator instances sharing a log: any of them can answer.
        alternates = " ".join(dict.fromkeys(a for a in others if a != coordinator))
        return _Item(request.txn_id, coordinator, alternates, operation, digest, deadline, request.one_phase)

    def _prepared(self, outcomes: Sequence[tuple[_Item, Vote, str, bool]]) -> None:
        """After the votes are durable, before they are answered."""
        if any(not repeat and vote is Vote.COMMIT and not item.one_phase for item, vote, _, repeat in outcomes):
            crash_point("participant.after_prepare_durable")
        for item, vote, reason, repeat in outcomes:
            # Happy-path events are debug: at info they cost more than the fsync they log.
            report = _log.info if vote is Vote.ABORT else _log.debug
            report(
                "prepared", txn_id=item.txn_id, vote=vote.value, reason=reason, one_phase=item.one_phase, repeat=repeat
            )
            self.observers.emit(
                EventKind.PREPARED,
                item.txn_id,
                target=item.coordinator,
                vote=vote,
                reason=reason,
                one_phase=item.one_phase,
            )

    async def Commit(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitResponse:
        crash_point("participant.before_commit")
        await self._decide(request.txn_id, COMMITTED, context)
        return participant_pb2.CommitResponse()

    async def CommitMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitManyResponse:
        await rpc.validate(context, lambda: _check_commit_many(request.txn_ids))
        crash_point("participant.before_commit")
        try:
            refused = await self._commit_many(list(request.txn_ids))
        except (DurabilityError, StoreUnavailableError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
        except Exception as e:  # noqa: BLE001 - a business commit that raises; loud, never UNKNOWN
            _log.critical("commit_raised", txn_ids=list(request.txn_ids)[:8], count=len(request.txn_ids), exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL, f"commit failed at the participant: {type(e).__name__}")
        if self.observers:  # one decision each, refused ones aside
            for txn_id in set(request.txn_ids).difference(refused):
                self.observers.emit(EventKind.APPLIED, txn_id, outcome=Outcome.COMMITTED)
        return participant_pb2.CommitManyResponse(refused=refused)

    async def _commit_many(self, txn_ids: list[str]) -> dict[str, str]:
        """Commits a CommitMany's transactions; returns the refused ones, with why.
        Here in one local transaction: one fsync for the batch."""
        job = functools.partial(self._commit_many_tx, txn_ids)
        refused: dict[str, str] = await self.store.write(job, inline_if_idle=len(txn_ids) <= INLINE_MAX_ITEMS)
        return refused

    async def Abort(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.AbortResponse:
        await self._decide(request.txn_id, ABORTED, context)
        return participant_pb2.AbortResponse()

    async def _decide(self, txn_id: str, state: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await rpc.validate(context, lambda: limits.check_txn_id(txn_id))
        try:
            await self.apply(txn_id, state)
        except _RefusedError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (DurabilityError, StoreUnavailableError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
        except Exception as e:  # noqa: BLE001 - the business commit/abort raised; loud, never UNKNOWN
            # After a yes vote the decision is final: a commit that cannot be applied
            # is the most serious fault a participant can have. Nothing changed; the
            # coordinator retries, and an operator must look.
            _log.critical("decision_raised", txn_id=txn_id, state=state, exc_info=e)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{state.lower()} failed at the participant: {type(e).__name__}"
            )

    async def apply(self, txn_id: str, state: str) -> None:
        """Applies a decision (COMMITTED or ABORTED) to `txn_id`, idempotently."""
        # A commit must be on disk before it is acknowledged: the coordinator then
        # forgets the transaction, and a lost commit would be resolved as ABORTED.
        # An abort need not be forced (presumed abort: losing it only means the
        # transaction is resolved again, to the same answer).
        fn = self._commit_tx if state == COMMITTED else self._abort_tx
        changed = await self.store.write(functools.partial(fn, txn_id), durable=state == COMMITTED, inline_if_idle=True)
        if changed:
            _log.debug("decided", txn_id=txn_id, state=state)
            self.observers.emit(EventKind.APPLIED, txn_id, outcome=_OUTCOME[state])

    # --- admission: limits and trust (twopc.security.limits, twopc.participant.trust) ------------------

    def _check_capacity(self, db: Connection, coordinator: str) -> None:
        """Raises _ExhaustedError if `coordinator` holds its cap of undecided
        transactions here (counted in the Prepare's own local transaction)."""
        cap = self.config.max_undecided_per_coordinator
        (held,) = execute(
            db,
            "SELECT count(*) FROM (SELECT 1 FROM twopc_txn WHERE coordinator = :coordinator AND state = :state"
            " LIMIT :cap) AS held",
            {"coordinator": coordinator, "state": PREPARED, "cap": cap},
        ).fetchone()
        if held >= cap:
            raise _ExhaustedError(f"the coordinator holds {cap} undecided transactions here; try later")

    # --- the local transactions (on the store's thread) ----------------------------

    def _prepare_tx(self, item: _Item, db: Connection) -> tuple[Vote, str, bool]:
        """Returns (vote, reason, repeat): `repeat` when the row existed already."""
        row = execute(
            db, "SELECT state, digest FROM twopc_txn WHERE txn_id = :txn_id", {"txn_id": item.txn_id}
        ).fetchone()
        if row is not None:
            return _repeated(row[0], row[1], item)
        if item.deadline is not None and time.monotonic() >= item.deadline:
            return Vote.ABORT, "deadline passed before prepare", False
        if not item.one_phase:
            self._check_capacity(db, item.coordinator)
        vote = self.handler.prepare(db, item.txn_id, item.operation)
        if vote is Vote.READ_ONLY:
            return vote, "", False
        if vote is not Vote.COMMIT:
            raise TypeError(f"prepare must return Vote.COMMIT or Vote.READ_ONLY, got {vote!r}")
        now = time.time()
        if item.one_phase:
            self.handler.commit(db, item.txn_id)
        execute(
            db,
            "INSERT INTO twopc_txn (txn_id, state, coordinator, prepared_at, decided_at, digest, alternates)"
            " VALUES (:txn_id, :state, :coordinator, :now, :decided_at, :digest, :alternates)",
            {
                "txn_id": item.txn_id,
                "state": COMMITTED if item.one_phase else PREPARED,
                "coordinator": item.coordinator,
                "now": now,
                "decided_at": now if item.one_phase else None,
                "digest": item.digest,
                "alternates": item.alternates,
            },
        )
        return vote, "", False

    def _prepare_many_tx(self, items: list[_Item], db: Connection) -> list[tuple[Vote, str, bool] | _ItemError]:
        """Prepares each in its own savepoint of one local transaction (one fsync for
        the batch): an item whose business step raises is rolled back alone."""
        outcomes: list[tuple[Vote, str, bool] | _ItemError] = []
        for item in items:
            execute(db, "SAVEPOINT item")
            try:
                outcomes.append(self._prepare_tx(item, db))
            except Exception as e:
                if is_retried(e):  # PostgreSQL: the whole batch runs again on a fresh snapshot
                    raise
                execute(db, "ROLLBACK TO item")
                failure = _refusal(e)
                if isinstance(failure, str):
                    outcomes.append((Vote.ABORT, failure, False))
                else:
                    _report(item, failure, e)
                    outcomes.append(failure)
            execute(db, "RELEASE item")
        return outcomes

    def _commit_tx(self, txn_id: str, db: Connection) -> bool:
        row = _state(db, txn_id)
        if row is None:
            raise _RefusedError(f"cannot commit {txn_id}: never prepared here")
        if row[0] == COMMITTED:
            return False
        if row[0] == ABORTED:
            raise _RefusedError(f"cannot commit {txn_id}: already aborted")
        self.handler.commit(db, txn_id)
        _set_state(db, txn_id, COMMITTED)
        return True

    def _commit_many_tx(self, txn_ids: list[str], db: Connection) -> dict[str, str]:
        """Commits each in one local transaction (one fsync); returns the refused ones."""
        refused: dict[str, str] = {}
        for txn_id in txn_ids:
            try:  # a refusal changes nothing; any other error rolls back the whole job
                if self._commit_tx(txn_id, db):
                    _log.debug("decided", txn_id=txn_id, state=COMMITTED)
            except _RefusedError as e:
                refused[txn_id] = str(e)
        return refused

    def _abort_tx(self, txn_id: str, db: Connection) -> bool:
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
            raise _RefusedError(f"cannot abort {txn_id}: already committed")
        self.handler.abort(db, txn_id)
        _set_state(db, txn_id, ABORTED)
        return True

    # --- in-doubt resolution -------------------------------------------------------

    async def in_doubt(self, older_than_s: float = 0.0) -> list[tuple[str, str]]:
        """Prepared transactions (txn id, coordinator) older than `older_than_s`. The
        coordinator is its address, followed by the other instances' when several
        share a decision log ("a:1 b:1", space-separated)."""
        cutoff = time.time() - older_than_s
        rows = await self.store.read(
            lambda db: execute(
                db,
                "SELECT txn_id, trim(coordinator || ' ' || alternates) FROM twopc_txn"
                " WHERE state = :state AND prepared_at <= :cutoff ORDER BY prepared_at",
                {"state": PREPARED, "cutoff": cutoff},
            ).fetchall()
        )
        return [(t, c) for t, c in rows]

    async def drain(self, timeout_s: float) -> bool:
        """Starts a graceful stop: refuses new Prepares with UNAVAILABLE and waits up
        to `timeout_s` for every prepared transaction to be decided (Commit, Abort
        and in-doubt resolution go on). Returns True if none is left in doubt; the
        others stay prepared on disk and are resolved after the restart."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while await self.in_doubt():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def report_in_doubt(self) -> None:
        """Tells the observers how many transactions are prepared and the age of the
        oldest (IN_DOUBT_SCANNED); the resolver does it every round."""
        count, oldest = await self.store.read(
            lambda db: execute(
                db, "SELECT count(*), min(prepared_at) FROM twopc_txn WHERE state = :state", {"state": PREPARED}
            ).fetchone()
        )
        age = time.time() - oldest if oldest is not None else 0.0
        self.observers.emit(EventKind.IN_DOUBT_SCANNED, "", count=count, duration_s=max(age, 0.0))

    async def resolve_in_doubt(self) -> int:
        """Asks the coordinators about every in-doubt transaction once (several
        coordinators at once, each in its own backoff while it does not answer) and
        applies what they say. Returns how many were resolved."""
        return await self._outreach.ask(await self.in_doubt(self.config.in_doubt_after_s), self._ask_coordinator)

    async def _ask_coordinator(self, coordinator: str, txn_ids: list[str]) -> tuple[int, bool]:
        """Asks one coordinator about its txn ids, one by one. With several addresses
        (instances sharing a log, `in_doubt`), each txn is asked of them in order
        until one answers COMMITTED or ABORTED; an address that gave no answer is not
        asked again this time, and once none is left it stops. Returns (how many
        resolved, whether any answered)."""
        if not coordinator:
            for txn_id in txn_ids:
                _log.warning("in_doubt_no_coordinator", txn_id=txn_id)
            return 0, True  # nobody to ask; only with allow_no_coordinator
        addresses = coordinator.split()
        resolved, answered = 0, False
        decided = {coordinator_pb2.OUTCOME_COMMITTED: COMMITTED, coordinator_pb2.OUTCOME_ABORTED: ABORTED}
        for txn_id in txn_ids:
            outcome = None
            for address in list(addresses):
                log = _log.bind(txn_id=txn_id, coordinator=address)
                stub = coordinator_pb2_grpc.CoordinatorStub(self._channel(address))
                try:
                    reply = await stub.GetOutcome(
                        coordinator_pb2.GetOutcomeRequest(txn_id=txn_id), timeout=self.config.rpc_timeout_s
                    )
                except grpc.aio.AioRpcError as e:
                    log.info("in_doubt_unreachable", error=limits.clip(rpc.describe(e)))
                    self.observers.emit(
                        EventKind.IN_DOUBT_ASKED, txn_id, target=address, reason=limits.clip(rpc.describe(e))
                    )
                    addresses.remove(address)
                    continue
                answered = True
                log.info("in_doubt_asked", outcome=coordinator_pb2.Outcome.Name(reply.outcome))
                self.observers.emit(
                    EventKind.IN_DOUBT_ASKED, txn_id, target=address, outcome=_ANSWERED.get(reply.outcome)
                )
                if reply.outcome in decided:
                    outcome = decided[reply.outcome]
                    break
            if not addresses:
                return resolved, answered
            if outcome is None:
                continue  # PENDING: ask again next round
            try:
                await self.apply(txn_id, outcome)
            except _RefusedError as e:  # only if the protocol was broken elsewhere
                _log.error("in_doubt_refused", txn_id=txn_id, error=str(e))
                continue
            resolved += 1
        return resolved, True

    async def _resolve_forever(self) -> None:
        interval = self.config.resolve_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                await self.resolve_in_doubt()
                await self._purge()
                if self.observers:
                    await self.report_in_doubt()
            except DurabilityError:
                return  # the store has stopped; the process must restart
            except Exception:  # noqa: BLE001 - the resolver must outlive one bad round
                _log.exception("resolver_failed")

    async def _purge(self) -> None:
        cutoff = time.time() - self.config.retention_s
        await self.store.write(
            # Only decided rows have decided_at; the index makes this a range delete.
            lambda db: execute(db, "DELETE FROM twopc_txn WHERE decided_at < :cutoff", {"cutoff": cutoff}),
            durable=False,
        )

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = rpc.channel(target, self._credentials)
        return self._channels[target]


def _digest(type_url: str, value: bytes) -> str:
    """What identifies an operation's content: a repeat of a Prepare carries the same."""
    h = hashlib.sha256(type_url.encode())
    h.update(b"\0")
    h.update(value)
    return h.hexdigest()[:32]


def _migrate(db: sqlite3.Connection) -> None:
    """Brings a transaction table from an earlier version up to this one."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(twopc_txn)")}
    if "digest" not in columns:
        db.execute("ALTER TABLE twopc_txn ADD COLUMN digest TEXT NOT NULL DEFAULT ''")
    if "alternates" not in columns:
        db.execute("ALTER TABLE twopc_txn ADD COLUMN alternates TEXT NOT NULL DEFAULT ''")


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
