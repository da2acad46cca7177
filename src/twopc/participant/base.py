"""The one way to build a kind of participant: `ParticipantBase` and its hooks.

`ParticipantBase` is the `twopc.v1.Participant` servicer that every kind shares.
It does, once and for every kind, what the protocol requires around a vote:

* admission (`twopc.participant.admission`): limits, trust, the operation's type and
  digest, the cap of undecided transactions per coordinator identity;
* batching: Prepare and PrepareMany run the same per-item loop in one store job, each
  item inside its own boundary (a savepoint, or a transaction of its own), so that one
  item's failure (a business refusal, a lock wait past `lock_timeout_s`, a constraint)
  votes ABORT for that item alone; only a serialization failure, a deadlock or a lost
  connection runs the whole job again, and what the job had prepared is undone first;
* repeats: a Prepare of a known transaction answers its first vote again, and a
  Prepare past its deadline votes ABORT, before any business code runs;
* Commit, CommitMany and Abort (idempotent, rule 7), the in-doubt resolver (rule 6,
  `twopc.participant.resolver`) over the one in-doubt query
  (`twopc.participant.table.in_doubt`), retention, draining, serving.

A kind says how a vote is made durable and how a decision is applied, by overriding
the hooks below (and nothing else: the methods marked `@final` are the shared
checks). Each hook runs on a thread of the store, inside a store job (`db` is the
job's connection, see `twopc.stores`), and may run again after the store reruns the
job, so it must depend on the database only.

    recorded(db, txn_id)        (state, digest) of a transaction known here, or None
    prepare_item(db, item)      the first Prepare of an admitted item: do the work and
                                make the vote durable; return COMMIT or READ_ONLY
    begin_item / rollback_item / end_item
                                the boundary of one item in a batch (a savepoint; or
                                a transaction of the item's own)
    abandon(db, items)          undo items this job prepared, when the job is given up
    commit_txn(db, txn_id)      apply COMMIT; True if it changed something
    commit_many(txn_ids)        (async) a CommitMany's jobs: one by default, or several
    abort_txn(db, txn_id)       apply ABORT, leaving a tombstone; True if it changed something
    purge_decided(db, cutoff)   forget decisions older than the retention

`twopc.participant.helper.Participant` (reservations in the service's own tables)
and `twopc.participant.prepared.PreparedParticipant` (PostgreSQL's PREPARE
TRANSACTION) are the two kinds.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, final

import grpc
import structlog
from google.protobuf.message import Message

from twopc import rpc
from twopc.config import Credentials, ParticipantConfig
from twopc.errors import DurabilityError
from twopc.faults import crash_point
from twopc.observe import EventKind, Observer, Observers, health_for_serve
from twopc.participant import table
from twopc.participant.admission import (
    Admission,
    CapReached,
    DecisionRefused,
    Item,
    StatusError,
    check_commit_many,
    refusal,
    repeated,
    report,
)
from twopc.participant.resolver import Resolver
from twopc.participant.table import ABORTED, COMMITTED
from twopc.security import auth, limits
from twopc.stores.base import ConflictError, Connection, Store, StoreUnavailableError, execute, is_retried
from twopc.types import Outcome, Vote
from twopc.v1 import participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.participant")

_OUTCOME = {COMMITTED: Outcome.COMMITTED, ABORTED: Outcome.ABORTED}
_PB_VOTE = {
    Vote.COMMIT: participant_pb2.VOTE_COMMIT,
    Vote.ABORT: participant_pb2.VOTE_ABORT,
    Vote.READ_ONLY: participant_pb2.VOTE_READ_ONLY,
}

OPEN_RETRY_INITIAL_S = 0.2
OPEN_RETRY_MAX_S = 5.0
"""A store that cannot be reached at start is tried again with backoff between these."""

Voted = tuple[Vote, str, bool]
"""(vote, reason, repeat): `repeat` when the transaction was known already."""


class ParticipantBase(participant_pb2_grpc.ParticipantServicer, abc.ABC):
    """The servicer every kind of participant shares; a kind overrides the hooks.

    Use it as an async context manager (it opens the store and runs the in-doubt
    resolver) and serve it, or call `serve` alone: it then opens the store itself,
    waiting for a database that is down or starting.

    Args:
        store: the kind's store, not yet open (the participant opens it).
        operations: the operation message types this participant accepts.
        schema: the kind's own tables, applied after the transaction table.
        credentials: transport security for calls to the coordinator's GetOutcome.
        config: trust, caps, in-doubt resolution timing and retention.
        observers: told of each vote, decision and in-doubt question (`twopc.observe`).
    """

    def __init__(
        self,
        store: Store,
        operations: Sequence[type[Message]],
        *,
        schema: str = "",
        credentials: Credentials,
        config: ParticipantConfig | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.store = store
        table_schema = table.SCHEMA + (table.POSTGRES_SCHEMA if store.dialect == "postgresql" else "")
        self.store.schema = table_schema + schema + self.store.schema  # all applied when it opens
        self.config = config or ParticipantConfig()
        if self.config.trusted_coordinators is None and credentials.secure:
            # Under TLS the default trusts no address, only the caller's own name.
            self.config = dataclasses.replace(self.config, trusted_coordinators=frozenset())
        self.observers = Observers(observers)
        self.admission = Admission(self.config, operations)
        self.draining = False  # shutting down: new Prepares are refused (UNAVAILABLE)
        self._credentials = credentials
        self._resolver = Resolver(self.config, credentials, self.observers, self.apply)
        self._resolving: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()

    # --- hooks: what a kind of participant implements ----------------------------------

    @abc.abstractmethod
    def recorded(self, db: Connection, txn_id: str) -> tuple[str, str] | None:
        """(state, operation digest) of a transaction this participant knows (PREPARED,
        COMMITTED or ABORTED), or None."""
        ...

    @abc.abstractmethod
    def prepare_item(self, db: Connection, item: Item) -> Vote:
        """The first Prepare of `item`, admitted, before its deadline and within the
        cap: runs the business step and makes the vote durable (with the job's commit,
        or by itself), or commits at once when `item.one_phase`. Returns COMMIT or
        READ_ONLY; raises `VoteAbort` (or anything: see `admission.refusal`) to refuse,
        after which `rollback_item` undoes whatever it did."""
        ...

    def begin_item(self, db: Connection, item: Item) -> None:
        """Before `item`'s work in a batch (e.g. a savepoint)."""

    def rollback_item(self, db: Connection, item: Item) -> None:
        """Undoes what `item`'s work did after it raised, leaving the batch's other items."""

    def end_item(self, db: Connection, item: Item) -> None:
        """After `item`'s work, whichever way it went (e.g. releasing the savepoint)."""

    def abandon(self, db: Connection, items: Sequence[Item]) -> None:
        """The job is given up (to run again, or for good): undoes the `items` it
        prepared that outlive it (a prepared transaction does; a reservation in the
        job's transaction is rolled back with it, the default)."""

    @abc.abstractmethod
    def commit_txn(self, db: Connection, txn_id: str) -> bool:
        """Applies COMMIT: True if it changed something, False if already committed.
        Raises `DecisionRefused` for an aborted or never prepared transaction."""
        ...

    @abc.abstractmethod
    def abort_txn(self, db: Connection, txn_id: str) -> bool:
        """Applies ABORT, leaving a tombstone for an unknown transaction (so that a
        late Prepare votes ABORT): True if it changed something. Raises
        `DecisionRefused` for a committed transaction."""
        ...

    def purge_decided(self, db: Connection, cutoff: float) -> None:
        """Forgets decided transactions decided before `cutoff` (seconds since the epoch)."""
        execute_purge(db, cutoff)

    async def opened(self) -> None:
        """After the store opened, before any RPC is served: checks of the kind's own."""

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Opens the store (with the twopc schema) and starts the in-doubt resolver.

        Raises:
            StoreUnavailableError: the database cannot be reached now; try again.
        """
        if self.store.is_open:
            raise ValueError("give the participant its store unopened: it opens it with the twopc schema")
        await self.store.open()
        try:
            if self.store.dialect == "sqlite":  # PostgreSQL: POSTGRES_SCHEMA brings tables up to date
                await self.store.write(table.migrate)
            await self.opened()
        except BaseException:
            await self.store.close()
            raise
        self._resolving = asyncio.create_task(self._resolve_forever())
        self._opened.set()

    async def close(self) -> None:
        """Stops the resolver, closes the channels and the store."""
        if self._resolving is not None:
            self._resolving.cancel()
            await asyncio.gather(self._resolving, return_exceptions=True)
            self._resolving = None
        await self._resolver.close()
        if self._opened.is_set():
            self._opened.clear()
            await self.store.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_failed(self) -> BaseException:
        """Returns the store's fatal error once it has failed for good (once open)."""
        await self._opened.wait()
        return await self.store.wait_failed()

    async def _open_patiently(self) -> None:
        """Opens the store, trying again with backoff while the database is down or
        starting (StoreUnavailableError); anything else is raised: a restart would not
        fix it (a bad URL, authentication, a schema that does not apply)."""
        delay = OPEN_RETRY_INITIAL_S
        while True:
            try:
                await self.open()
            except StoreUnavailableError as e:
                _log.warning("store_unavailable", error=limits.clip(str(e)), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, OPEN_RETRY_MAX_S)
                continue
            _log.info("store_opened")
            return

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
        gracefully on a signal. Called on a participant that is not open, it opens
        the store first and closes it at the end; if the database cannot be reached
        yet (PostgreSQL down or starting), it serves meanwhile, `health` says
        NOT_SERVING and the Participant RPCs answer UNAVAILABLE, and it tries again
        with backoff until the store opens, then turns SERVING.

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
            StoreSetupError: the store refused to open for good (bad credentials...).
        """
        opened_here = not self._opened.is_set()
        ready = None
        if opened_here:
            try:
                await self.open()
            except StoreUnavailableError as e:
                _log.warning("store_unavailable", error=limits.clip(str(e)), retry_in_s=OPEN_RETRY_INITIAL_S)
                ready = self._open_patiently
        try:
            await rpc.serve(
                address,
                self._credentials,
                [self.add_to_server, *services],
                failed=self.wait_failed,
                ready=ready,
                grace_s=grace_s,
                health=health_for_serve(
                    health, [auth.PARTICIPANT_SERVICE], failed=self.wait_failed, probe=self._store_reachable
                ),
                drain=self.drain,
                interceptors=interceptors,
                policy=policy,
            )
        finally:
            if opened_here:
                await self.close()

    async def _store_reachable(self) -> None:
        """Readiness: one read of the store (a PostgreSQL server may be down)."""
        await self.store.read(lambda db: execute(db, "SELECT 1"))

    # --- the RPCs ------------------------------------------------------------------

    async def _refuse_while_closed(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._opened.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "participant store is not open yet")

    async def Prepare(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareResponse:
        if self.draining:  # the coordinator decides ABORT at once; nothing is reserved
            await context.abort(grpc.StatusCode.UNAVAILABLE, "participant is shutting down")
        await self._refuse_while_closed(context)
        remaining = context.time_remaining()
        try:
            item = self.admission.item(
                request, None if remaining is None else time.monotonic() + remaining, auth.peer_identities(context)
            )
        except StatusError as e:
            await context.abort(e.code, e.message)
        (outcome,) = await self._prepare([item], context)
        if isinstance(outcome, StatusError):
            await context.abort(outcome.code, outcome.message)
        vote, reason, repeat = outcome
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
        await self._refuse_while_closed(context)
        now = time.monotonic()
        remaining = context.time_remaining()
        caller = auth.peer_identities(context)
        results = [participant_pb2.PrepareManyResponse.Result() for _ in request.items]
        items: list[tuple[int, Item]] = []
        for i, entry in enumerate(request.items):
            try:
                left = entry.timeout.ToNanoseconds() / 1e9 if entry.HasField("timeout") else 0.0
                if not 0 < left <= limits.MAX_TIMEOUT_S:
                    raise StatusError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"timeout is required, from 0 to {limits.MAX_TIMEOUT_S:g} s"
                    )
                deadline = now + (left if remaining is None else min(left, remaining))
                items.append((i, self.admission.item(entry.prepare, deadline, caller)))
            except StatusError as e:
                results[i].code, results[i].message = e.code.value[0], e.message
        if items:
            outcomes = await self._prepare([x for _, x in items], context)
            voted = []
            for (i, item), outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, StatusError):
                    results[i].code, results[i].message = outcome.code.value[0], outcome.message
                else:
                    vote, reason, repeat = outcome
                    results[i].response.vote, results[i].response.reason = _PB_VOTE[vote], reason
                    voted.append((item, vote, reason, repeat))
            self._prepared(voted)
        return participant_pb2.PrepareManyResponse(results=results)

    @final
    async def _prepare(
        self, items: list[Item], context: grpc.aio.ServicerContext[Any, Any]
    ) -> list[Voted | StatusError]:
        """Prepares `items` in one store job (one commit for the batch); a failure of
        the job as a whole aborts the call, or votes ABORT for each if it lost to
        concurrent transactions (nothing of it was kept)."""
        try:
            # Not on the SQLite store's idle path: the business `prepare` may take long,
            # and there it would hold the event loop.
            return await self.store.write(functools.partial(self._prepare_items, items))
        except DurabilityError as e:
            _log.critical("prepare_write_failed", txn_ids=[x.txn_id for x in items[:8]], error=str(e))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
        except ConflictError as e:  # kept losing to concurrent transactions; nothing was kept
            return [(Vote.ABORT, f"conflict: {e}", False) for _ in items]
        except StoreUnavailableError as e:  # PostgreSQL: lost; nothing voted
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store unavailable: {e}")
        except Exception as e:  # noqa: BLE001 - a failure outside any item: nothing changed
            _log.error("prepare_many_failed", count=len(items), exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL, f"prepare failed at the participant: {type(e).__name__}")
        raise AssertionError("unreachable: abort raises")

    @final
    def _prepare_items(self, items: list[Item], db: Connection) -> list[Voted | StatusError]:
        """The store job of Prepare and PrepareMany: each item inside its own boundary
        (`begin_item`...), so that one item's failure is rolled back alone and answered
        for that item. An error after which the store reruns the whole job (a
        serialization failure, a deadlock, a lost connection) first undoes what this
        run prepared (`abandon`)."""
        outcomes: list[Voted | StatusError] = []
        prepared: list[Item] = []
        for item in items:
            self.begin_item(db, item)
            try:
                outcome = self._prepare_one(db, item)
            except Exception as e:
                if is_retried(e):
                    self._abandon(db, prepared)
                    raise
                self.rollback_item(db, item)
                outcomes.append(self._failed_item(db, item, e))
            else:
                outcomes.append(outcome)
                if outcome[0] is Vote.COMMIT and not outcome[2] and not item.one_phase:
                    prepared.append(item)
            self.end_item(db, item)
        return outcomes

    @final
    def _prepare_one(self, db: Connection, item: Item) -> Voted:
        known = self.recorded(db, item.txn_id)
        if known is not None:
            return (*repeated(*known, item), True)
        if item.deadline is not None and time.monotonic() >= item.deadline:
            return Vote.ABORT, "deadline passed before prepare", False
        if not item.one_phase:
            cap = self.config.max_undecided_per_coordinator
            if table.undecided(db, item.holder, time.time()) >= cap:
                raise CapReached(f"the coordinator holds {cap} undecided transactions here; try later")
        vote = self.prepare_item(db, item)
        if vote not in (Vote.COMMIT, Vote.READ_ONLY):
            raise TypeError(f"prepare must return Vote.COMMIT or Vote.READ_ONLY, got {vote!r}")
        return vote, "", False

    def _failed_item(self, db: Connection, item: Item, error: Exception) -> Voted | StatusError:
        """The answer for an item whose work raised, once rolled back."""
        failure = refusal(error)
        if isinstance(failure, StatusError):
            report(item, failure, error)
            return failure
        if failure.startswith("conflict:"):
            # A concurrent Prepare of the same id, or an Abort's tombstone, may be what
            # it met: then that record answers, as for any repeat.
            known = self.recorded(db, item.txn_id)
            if known is not None:
                return (*repeated(*known, item), True)
        return Vote.ABORT, failure, False

    def _abandon(self, db: Connection, prepared: Sequence[Item]) -> None:
        if not prepared:
            return
        try:
            self.abandon(db, prepared)
        except Exception as e:  # noqa: BLE001 - the connection may be gone: Abort or the resolver settles them
            _log.warning("abandon_failed", txn_ids=[x.txn_id for x in prepared[:8]], error=limits.clip(str(e)))

    def _prepared(self, outcomes: Sequence[tuple[Item, Vote, str, bool]]) -> None:
        """After the votes are durable, before they are answered."""
        if any(not repeat and vote is Vote.COMMIT and not item.one_phase for item, vote, _, repeat in outcomes):
            crash_point("participant.after_prepare_durable")
        for item, vote, reason, repeat in outcomes:
            # Happy-path events are debug: at info they cost more than the fsync they log.
            report_vote = _log.info if vote is Vote.ABORT else _log.debug
            report_vote(
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
        await self._refuse_while_closed(context)
        crash_point("participant.before_commit")
        await self._decide(request.txn_id, COMMITTED, context)
        return participant_pb2.CommitResponse()

    async def CommitMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitManyResponse:
        await rpc.validate(context, lambda: check_commit_many(request.txn_ids))
        await self._refuse_while_closed(context)
        crash_point("participant.before_commit")
        try:
            refused = await self.commit_many(list(request.txn_ids))
        except (DurabilityError, StoreUnavailableError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"participant store failed: {e}")
        except Exception as e:  # noqa: BLE001 - a business commit that raises; loud, never UNKNOWN
            _log.critical("commit_raised", txn_ids=list(request.txn_ids)[:8], count=len(request.txn_ids), exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL, f"commit failed at the participant: {type(e).__name__}")
        if self.observers:  # one decision each, refused ones aside
            for txn_id in set(request.txn_ids).difference(refused):
                self.observers.emit(EventKind.APPLIED, txn_id, outcome=Outcome.COMMITTED)
        return participant_pb2.CommitManyResponse(refused=refused)

    async def Abort(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.AbortResponse:
        await self._refuse_while_closed(context)
        await self._decide(request.txn_id, ABORTED, context)
        return participant_pb2.AbortResponse()

    async def _decide(self, txn_id: str, state: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await rpc.validate(context, lambda: limits.check_txn_id(txn_id))
        try:
            await self.apply(txn_id, state)
        except DecisionRefused as e:
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

    @final
    async def apply(self, txn_id: str, state: str) -> None:
        """Applies a decision (COMMITTED or ABORTED) to `txn_id`, idempotently.

        Raises:
            DecisionRefused: the transaction's state forbids it (FAILED_PRECONDITION).
        """
        # A commit must be on disk before it is acknowledged: the coordinator then
        # forgets the transaction, and a lost commit would be resolved as ABORTED.
        # An abort need not be forced (presumed abort: losing it only means the
        # transaction is resolved again, to the same answer).
        fn = self.commit_txn if state == COMMITTED else self.abort_txn
        changed = await self.store.write(functools.partial(fn, txn_id=txn_id), durable=state == COMMITTED)
        if changed:
            _log.debug("decided", txn_id=txn_id, state=state)
            self.observers.emit(EventKind.APPLIED, txn_id, outcome=_OUTCOME[state])

    async def commit_many(self, txn_ids: list[str]) -> dict[str, str]:
        """Hook: commits a CommitMany's transactions (`commit_each`); returns the refused
        ones, with why. By default in one store job: one commit, one fsync for the
        batch. A kind whose every commit is a transaction of its own may spread them
        over several jobs (the adapter does)."""
        refused: dict[str, str] = await self.store.write(functools.partial(self.commit_each, txn_ids=txn_ids))
        return refused

    @final
    def commit_each(self, db: Connection, txn_ids: Sequence[str]) -> dict[str, str]:
        """A store job: `commit_txn` of each; returns the refused ones, with why."""
        refused: dict[str, str] = {}
        for txn_id in txn_ids:
            try:  # a refusal changes nothing; any other error rolls back the whole job
                if self.commit_txn(db, txn_id):
                    _log.debug("decided", txn_id=txn_id, state=COMMITTED)
            except DecisionRefused as e:
                refused[txn_id] = str(e)
        return refused

    # --- in-doubt resolution -------------------------------------------------------

    async def in_doubt(self, older_than_s: float = 0.0) -> list[tuple[str, str]]:
        """Prepared transactions (txn id, coordinator) older than `older_than_s`, oldest
        first. The coordinator is its address, followed by the other instances' when
        several share a decision log ("a:1 b:1", space-separated)."""
        cutoff = time.time() - older_than_s
        found = await self.store.read(lambda db: table.in_doubt(db, cutoff))
        return [(x.txn_id, x.coordinator) for x in found]

    async def drain(self, timeout_s: float) -> bool:
        """Starts a graceful stop: refuses new Prepares with UNAVAILABLE and waits up
        to `timeout_s` for every prepared transaction to be decided (Commit, Abort
        and in-doubt resolution go on). Returns True if none is left in doubt; the
        others stay prepared on disk and are resolved after the restart."""
        self.draining = True
        if not self._opened.is_set():
            return True  # never opened: nothing was prepared in this run
        deadline = time.monotonic() + timeout_s
        while await self.in_doubt():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def report_in_doubt(self) -> None:
        """Tells the observers how many transactions are prepared and the age of the
        oldest (IN_DOUBT_SCANNED); the resolver does it every round."""
        now = time.time()
        found = await self.store.read(lambda db: table.in_doubt(db, now))
        age = now - found[0].prepared_at if found else 0.0
        self.observers.emit(EventKind.IN_DOUBT_SCANNED, "", count=len(found), duration_s=max(age, 0.0))

    async def resolve_in_doubt(self) -> int:
        """Asks the coordinators about every in-doubt transaction once (several
        coordinators at once, each in its own backoff while it does not answer) and
        applies what they say. Returns how many were resolved."""
        return await self._resolver.resolve(await self.in_doubt(self.config.in_doubt_after_s))

    async def purge(self) -> None:
        """Forgets decisions older than `retention_s` (the resolver does it every round)."""
        cutoff = time.time() - self.config.retention_s
        await self.store.write(functools.partial(self.purge_decided, cutoff=cutoff), durable=False)

    async def _resolve_forever(self) -> None:
        interval = self.config.resolve_interval_s
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                await self.resolve_in_doubt()
                await self.purge()
                if self.observers:
                    await self.report_in_doubt()
            except DurabilityError:
                return  # the store has stopped; the process must restart
            except Exception:  # noqa: BLE001 - the resolver must outlive one bad round
                _log.exception("resolver_failed")


def execute_purge(db: Connection, cutoff: float) -> None:
    """Deletes the transaction table's decided rows older than `cutoff`."""
    # Only decided rows have decided_at; the index makes this a range delete.
    execute(db, "DELETE FROM twopc_txn WHERE decided_at < :cutoff", {"cutoff": cutoff})


__all__ = ["OPEN_RETRY_INITIAL_S", "OPEN_RETRY_MAX_S", "ParticipantBase", "Voted", "execute_purge"]
