"""The coordinator: phase 1, the commit point, phase 2, recovery and GetOutcome.

One `Coordinator` runs many transactions concurrently over reused channels. The
protocol is presumed-abort 2PC (docs/design.md):

* Phase 1 sends every Prepare at once under the transaction's deadline. The first
  ABORT vote, error or expired deadline decides ABORT at once and cancels the rest.
* The commit point is the forced write of the COMMIT decision, with the list of
  participants to tell, to the decision log. Nothing is sent before it. Aborts are
  not logged.
* Phase 2 delivers the decision to every participant in parallel, retrying with
  exponential backoff and jitter; Commits are retried without end, across restarts.
* On start, every COMMIT in the log without END is delivered again (recovery).
* `GetOutcome` answers participants in doubt: COMMITTED for a logged decision,
  PENDING while the transaction is still in phase 1 here, ABORTED for its own
  ids otherwise; PENDING for an id of another log (rule 12); and UNAVAILABLE
  until the log is read. Every answer names the log it comes from.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_never, wait_random_exponential

from twopc import rpc
from twopc.config import CoordinatorConfig, Credentials
from twopc.coordinator.batching import PrepareBatcher, PrepareFailedError
from twopc.decisions import CommitRecord, DecisionLog, SqliteDecisionLog
from twopc.errors import (
    ClosedError,
    CoordinatorFailedError,
    DuplicateTransactionError,
    DurabilityError,
    FencedError,
    ForeignPeerError,
    NotLoggedError,
    OutcomeUnknownError,
    TwoPCError,
)
from twopc.faults import crash_point
from twopc.observe import EventKind, Observer, Observers, health_for_serve
from twopc.security import limits
from twopc.security.auth import COORDINATOR_SERVICE, Authorizer, Policy
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.coordinator.core")

_VOTES = {
    participant_pb2.VOTE_COMMIT: Vote.COMMIT,
    participant_pb2.VOTE_ABORT: Vote.ABORT,
    participant_pb2.VOTE_READ_ONLY: Vote.READ_ONLY,
}
_YES = (Vote.COMMIT, Vote.READ_ONLY)
_CANCELLED = "cancelled: another branch decided abort"
_PB_OUTCOME = {
    Outcome.COMMITTED: coordinator_pb2.OUTCOME_COMMITTED,
    Outcome.ABORTED: coordinator_pb2.OUTCOME_ABORTED,
    Outcome.PENDING: coordinator_pb2.OUTCOME_PENDING,
}
# A Commit answered with one of these is a participant that cannot apply what it
# prepared (a bug, corrupted state), not a passing network fault.
_BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)
_ANSWERED = {pb: outcome for outcome, pb in _PB_OUTCOME.items()}
_DELIVERED = {"Commit": Outcome.COMMITTED, "Abort": Outcome.ABORTED}
_GLOBAL_ID = re.compile(r"[0-9a-f]{16}:")  # "<coordinator or instance id>:<local id>"
MAX_LOCAL_ID = 128
"""The longest local transaction id `run` accepts, in characters."""


class _RefusedError(Exception):
    """A participant answered phase 2 with FAILED_PRECONDITION: retrying cannot help."""


class Coordinator:
    """Runs distributed transactions with two-phase commit.

    Use it as an async context manager; it owns its channels, its decision log and,
    when `listen` is given, the `GetOutcome` server that participants in doubt ask::

        async with Coordinator("decisions.db", credentials=Credentials.insecure(),
                               listen="127.0.0.1:0") as coordinator:
            result = await coordinator.run([Branch("wallet:50051", debit),
                                            Branch("orders:50052", place_order)])

    A process that serves its own API beside GetOutcome (as a shop serves Purchase)
    calls `serve` instead of giving `listen`.

    Every decision log has an id (`Coordinator.id`), and a transaction's id on the
    wire is `"<coordinator id>:<local id>"` (`TransactionResult.txn_id`): two
    coordinators can never mean different transactions by one id at a participant.

    Args:
        log: the decision log; or the path of its SQLite file (one owner: a second
            coordinator on the same file fails to start, StoreInUseError); or a
            "postgresql://" URL, a log that several coordinator instances share
            (`twopc.decisions.postgres`, the `postgres` extra).
        credentials: transport security for channels and the GetOutcome server.
        listen: address to serve GetOutcome on ("host:port", port 0 for any), on a
            server of the coordinator's own. Or serve it on yours (`serve`, or
            `add_to_server`). Either way, keep the address across restarts:
            participants in doubt ask the address they were given in Prepare.
        advertise: the address participants should use to reach GetOutcome, when
            it differs from the listening one (a public name, a proxy).
        config: timeouts, retry policy and bounds.
        interceptors: client interceptors for the channels to participants
            (tracing, auth, or fault injection in tests).
        observers: told of every step of every transaction (`twopc.observe`).
        peers: GetOutcome addresses of the other instances sharing this
            coordinator's log (or one service address in front of them all): sent
            in every Prepare, so a participant in doubt asks them when this
            instance is gone. Only a shared log has peers (ValueError on a file
            log); at start each peer that answers is asked for its log's identity,
            and one on another log is refused (ForeignPeerError).
        policy: who may ask GetOutcome on the `listen` server (`twopc.security.auth`,
            e.g. `Policy(coordinator_rules(["wallet", "orders"]))`); `serve` takes
            its own. Without one, anyone who reaches the port may ask.
    """

    def __init__(
        self,
        log: DecisionLog | str | os.PathLike[str],
        *,
        credentials: Credentials,
        listen: str | None = None,
        advertise: str | None = None,
        config: CoordinatorConfig | None = None,
        interceptors: Sequence[Any] = (),
        observers: Iterable[Observer] = (),
        peers: Sequence[str] = (),
        policy: Policy | None = None,
    ) -> None:
        self._policy = policy
        self._log: DecisionLog
        if isinstance(log, str) and log.startswith(("postgresql://", "postgres://")):
            from twopc.decisions.postgres import PostgresDecisionLog  # the postgres extra

            self._log = PostgresDecisionLog(log, address=advertise or "")
        else:
            self._log = SqliteDecisionLog(log) if isinstance(log, str | os.PathLike) else log
        self._peers = tuple(p for p in peers if p)
        if self._peers and not self._log.shared:
            # A file log has one owner: another coordinator cannot answer for it.
            raise ValueError("peers need a shared decision log (PostgreSQL); a file log has one coordinator")
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._listen = listen
        self._advertise = advertise or ""
        self.config = config or CoordinatorConfig()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, participant_pb2_grpc.ParticipantAsyncStub] = {}
        self._batchers: dict[str, _CommitBatcher] = {}
        self._prepare_batchers: dict[str, PrepareBatcher] = {}
        self._server: grpc.aio.Server | None = None
        self._in_flight: set[str] = set()  # in phase 1, or its decision being written: PENDING
        self._committed: dict[str, tuple[str, ...]] = {}  # logged, no END yet
        self._uncertain: set[str] = set()  # decision write failed: only the disk knows
        self._tasks: set[asyncio.Task[Any]] = set()  # phase 2, END, recovery: cancelled by close()
        self._decisions: set[asyncio.Task[Any]] = set()  # never cancelled: a started decision finishes
        self._quiet = asyncio.Event()  # set by close() once nothing is in phase 1 or deciding
        self._open = False  # the log is read: GetOutcome may answer
        self._closing = False  # close() has begun: run() refuses
        self._closed: asyncio.Task[None] | None = None  # close()'s work, awaited by every caller
        self._stopped = False  # background work is cancelled: nothing new may start
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        # Only RPC failures are retried: a refusal cannot change, and a cancellation
        # (close(), a cancelled caller) must propagate, not be retried.
        self._retry_on = retry_if_exception(lambda e: isinstance(e, grpc.aio.AioRpcError))
        self.messages_sent = 0
        self.observers = Observers(observers)

    # --- lifecycle ---------------------------------------------------------------

    @property
    def id(self) -> str:
        """The coordinator's id: its decision log's, stable across restarts."""
        return self._log.id

    @property
    def address(self) -> str:
        """Where participants reach GetOutcome ("host:port"); empty if not served."""
        return self._advertise

    @property
    def log_syncs(self) -> int:
        """Forced writes of the decision log so far."""
        return self._log.syncs

    @property
    def failure(self) -> BaseException | None:
        """The fatal error that stopped this coordinator (a failed decision write),
        or None. Once set, the process must restart so recovery reads the disk."""
        return self._failure

    async def wait_failed(self) -> BaseException:
        """Returns the fatal error once the coordinator has failed: an embedding
        process awaits it beside its own work and restarts when it returns
        (`serve` does this)."""
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def __aenter__(self) -> Coordinator:
        pending = await self._log.open()
        try:
            for record in pending:
                self._committed[record.txn_id] = record.targets
            if self._listen is not None:
                self._server = rpc.server([Authorizer(self._policy)] if self._policy is not None else [])
                self.add_to_server(self._server)
                port = rpc.add_port(self._server, self._listen, self._credentials)
                await self._server.start()
                if not self._advertise:
                    self._advertise = f"{self._listen.rsplit(':', 1)[0]}:{port}"
            await self._check_peers()
        except BaseException:
            if self._server is not None:
                await self._server.stop(grace=None)
            await self._log.close()
            raise
        self._open = True
        self._log.watch(adopt=self._adopt, fail=self._fail)
        # Recovery runs beside new work: those transactions are already decided and
        # GetOutcome already knows them, so nothing new can contradict them.
        if pending:
            self._spawn(self._recover(pending))
        _log.info("coordinator_started", id=self.id, address=self._advertise, recovering=len(pending))
        return self

    async def _check_peers(self) -> None:
        """Rule 12: asks each peer which log it answers from, and refuses one on
        another log. A peer that does not answer now (not started yet, or not
        letting coordinators ask) is named anyway: participants check the log of
        every answer they take."""
        probe = coordinator_pb2.GetOutcomeRequest(txn_id=f"{self.id}:peer-check")

        async def ask(peer: str) -> str | None:
            try:
                async with rpc.channel(peer, self._credentials, self._interceptors) as channel:
                    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                    reply = await stub.GetOutcome(probe, timeout=self.config.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                _log.warning("peer_unverified", peer=peer, error=rpc.describe(e))
                return None
            return reply.log_id

        for peer, log_id in zip(self._peers, await asyncio.gather(*(ask(p) for p in self._peers)), strict=True):
            if log_id is None:
                continue
            if log_id != self._log.log_id:
                raise ForeignPeerError(
                    f"peer {peer} answers from decision log {log_id or '(unnamed: an older twopc)'}, this"
                    f" coordinator's is {self._log.log_id}: check the peer's log URL (its ?schema=)"
                )
            _log.info("peer_verified", peer=peer, log_id=log_id)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serves GetOutcome on the caller's own server (instead of `listen`); pass
        that server's address as `advertise`. GetOutcome answers UNAVAILABLE until
        the coordinator is entered (its log read) and after it is closed."""
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_OutcomeServicer(self), server)

    async def serve(
        self,
        address: str,
        *,
        services: Sequence[Callable[[grpc.aio.Server], None]] = (),
        grace_s: float = 1.0,
        health: rpc.Health | None = None,
        drain: rpc.Drain | None = None,
        policy: Policy | None = None,
    ) -> None:
        """Serves GetOutcome and the caller's `services` on `address` until SIGTERM or
        SIGINT, the usual way to run a coordinator in a process of its own.

        Binds exclusively, advertises the bound address to participants (unless
        `advertise` was given), prints `READY host:port` once serving, and stops
        the server gracefully on a signal.

        Args:
            address: "host:port" to listen on (port 0 for any free one).
            services: functions that add the process's own servicers to the server
                (e.g. `lambda s: add_ShopServicer_to_server(shop, s)`).
            grace_s: on a signal, how long to drain and let in-flight RPCs finish.
            health: the standard health and reflection services (`twopc.observe.health`);
                by default one for the Coordinator service (with the `ops` extra).
                Either way it is NOT_SERVING while the decision log cannot take a
                COMMIT (a shared log out of reach, or its lease not held).
            drain: on a signal, stops the caller's services taking new work and
                waits for what they started; by default, waits for phase 2
                (`wait_idle`). What is left is on disk: recovery finishes it.
            policy: who may call what (`twopc.security.auth`), enforced under mutual TLS.

        Raises:
            CoordinatorFailedError: the decision log failed; restart the process.
        """

        def bound(where: str) -> None:
            if not self._advertise:
                self._advertise = where

        await rpc.serve(
            address,
            self._credentials,
            [self.add_to_server, *services],
            failed=self.wait_failed,
            on_bound=bound,
            grace_s=grace_s,
            health=health_for_serve(health, [COORDINATOR_SERVICE], failed=self.wait_failed, probe=self._writable),
            drain=drain or self.wait_idle,
            policy=policy,
        )

    async def _writable(self) -> None:
        """Readiness: the log could take a COMMIT now (a shared log: reachable, lease held)."""
        self._log.check_writable()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops, in an order that never contradicts the log.

        New `run`s are refused at once (ClosedError). Transactions in phase 1 finish
        it (each within its own deadline) and decide; a decision whose write has
        started always finishes, so GetOutcome can never answer ABORTED for a
        COMMIT on disk. Phase 2 then gets `shutdown_grace_s` before it is
        cancelled (logged commits resume on the next start). GetOutcome is served
        to the end; then channels and the log close.
        """
        if self._closed is None:
            self._closing = True  # at once: run() refuses from here on
            self._closed = asyncio.create_task(self._close())
        # Every caller waits for the same work: a second close() returns when the
        # first one's does, not at once while phase 1 is still finishing.
        await asyncio.shield(self._closed)

    async def _close(self) -> None:
        if self._in_flight:
            await self._quiet.wait()
        if self._tasks:
            await asyncio.wait({*self._tasks, *self._decisions}, timeout=self.config.shutdown_grace_s)
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Their phase 2 is done or cancelled: the callers get their results now.
        await asyncio.gather(*self._decisions, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=None)
        self._open = False
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        self._stubs.clear()
        await self._log.close()

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Waits until no phase-2 or recovery work is left; True if none is."""
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        while self._tasks:
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=left)
        return True

    # --- a transaction -------------------------------------------------------------

    async def run(
        self, branches: Sequence[Branch], *, timeout_s: float | None = None, txn_id: str | None = None
    ) -> TransactionResult:
        """Runs one transaction over `branches` and returns how it ended.

        Args:
            branches: one per participant (distinct targets), at least one.
            timeout_s: the phase-1 deadline; `config.prepare_timeout_s` by default.
            txn_id: the transaction's local id; a random UUID by default. Its global
                id is `"<coordinator id>:<txn_id>"`. Never reuse one: a reuse this
                coordinator can see (running, or logged COMMIT) raises
                DuplicateTransactionError, but an aborted transaction is forgotten
                (presumed abort), so its reuse cannot be detected.

        Returns:
            The outcome with each branch's vote and reason. An abort is a result.

        Raises:
            CoordinatorFailedError: the decision log failed (now or earlier); the
                coordinator sends nothing more and must be restarted to recover.
            ClosedError: the coordinator is not open, or is closing.
            DuplicateTransactionError: `txn_id` is running or was committed here.
            OutcomeUnknownError: one branch (one-phase commit) never answered and
                could not be reached to settle the outcome.
            ValueError: no branches, two branches with the same target, a bad
                timeout or txn_id.
        """
        if self._failure is not None:
            raise CoordinatorFailedError(f"decision log failed: {self._failure}")
        if self._closing or not self._open:
            raise ClosedError("the coordinator is closed" if self._closing else "enter the coordinator first")
        self._log.check_writable()  # a shared log out of reach: refuse before sending anything
        if not branches:
            raise ValueError("a transaction needs at least one branch")
        if len({b.target for b in branches}) != len(branches):
            raise ValueError("two branches name the same target; give each participant one branch")
        limits.check_count("branches", len(branches), limits.MAX_BRANCHES)
        timeout = self.config.prepare_timeout_s if timeout_s is None else timeout_s
        limits.check_timeout("timeout_s", timeout)  # NaN, infinite, negative, past the bound
        if timeout == 0:  # check_timeout lets 0 through (a request's "use the default")
            raise ValueError("timeout_s must be > 0")
        if txn_id is None:
            gid = f"{self.id}:{uuid.uuid4().hex}"
        else:
            limits.check_id("txn_id", txn_id, max_len=MAX_LOCAL_ID)
            gid = self.global_id(txn_id)
            # A caller's own id may be a retry: refuse it before any message if it
            # was decided here (the record stays on disk for the log's retention):
            # a COMMIT, or a shared log's abort marker.
            if gid not in self._in_flight and gid not in self._committed:
                decided = await self._decided(gid)
                if decided is not None:
                    raise DuplicateTransactionError(gid, decided.value)
                if self._closing:
                    # close() began during that read and saw nothing in flight: it
                    # may have closed the log and the channels already.
                    raise ClosedError("the coordinator is closed")
        if gid in self._in_flight or gid in self._uncertain:
            raise DuplicateTransactionError(gid, "running")
        if gid in self._committed:
            raise DuplicateTransactionError(gid, "committed")
        log = _log.bind(txn_id=gid)
        self._in_flight.add(gid)
        self.observers.emit(EventKind.PHASE1_STARTED, gid, branches=tuple(b.label for b in branches))
        decision: asyncio.Task[TransactionResult] | None = None
        try:
            if len(branches) == 1 and self.config.one_phase:
                return await self._one_phase(gid, branches[0], timeout, log)
            votes = await self._phase1(gid, branches, timeout, log)
            decision = asyncio.create_task(self._decide(gid, votes, log))
            self._decisions.add(decision)
            decision.add_done_callback(self._decisions.discard)
        except asyncio.CancelledError:
            # Abandoned before any decision: release every branch now rather than
            # leave reservations held until the participants ask GetOutcome.
            log.info("run_cancelled", branches=[b.label for b in branches])
            if not self._stopped:
                alone = len(branches) == 1 and self.config.one_phase
                self._spawn(self._finish_abort(gid, [(b.target, b.label) for b in branches], set(), one_phase=alone))
            raise
        finally:
            if decision is None:
                self._leave(gid)
        # The votes are in: the decision is taken and carried out even if our caller
        # goes away now. A cancelled caller must not orphan a COMMIT on its way to disk.
        return await asyncio.shield(decision)

    def global_id(self, txn_id: str) -> str:
        """The global id of a local one (`run`'s `txn_id`); a global id is returned
        as it is."""
        prefix = f"{self.id}:"
        return txn_id if txn_id.startswith(prefix) else prefix + txn_id

    async def outcome(self, txn_id: str) -> Outcome:
        """What became of a transaction, as this coordinator knows it.

        Args:
            txn_id: the global id (`TransactionResult.txn_id`) or the local one.
                With a shared log (several instances), the global id of another
                instance's transaction too: an id of the form "<16 hex digits>:..."
                is taken as global.

        Returns:
            COMMITTED if the COMMIT decision is logged: for as long as its record is
            kept (the log's retention, 7 days by default, after every participant
            acknowledged). PENDING while it is in phase 1 here, or while a failed
            decision write leaves only the disk knowing (ask after a restart).
            With a shared log, also PENDING while another instance that owns it
            may still log its COMMIT (its lease is not taken over). PENDING for an
            id whose owner the log does not know (another log's: it cannot tell).
            ABORTED otherwise: decided abort (this coordinator's own, whether or
            not it was logged), never seen, or a commit whose record is past
            retention (presumed abort).

        Raises:
            CoordinatorFailedError: the decision log failed; restart to ask again.
            LogUnavailableError: a shared log cannot be reached now.
            ClosedError: the coordinator is closed.
        """
        return await self._outcome(txn_id if _GLOBAL_ID.match(txn_id) else self.global_id(txn_id))

    async def _outcome(self, gid: str) -> Outcome:
        """Memory first, then the log (rule 5; with a shared log, its rule 4)."""
        known = self._known(gid)
        if known is not None:
            return known
        try:
            return await self._log.outcome(gid)
        except DurabilityError as e:
            self._fail(e)
            raise CoordinatorFailedError(f"decision log failed: {e}") from e

    async def _decided(self, gid: str) -> Outcome | None:
        """The decision the log holds for `gid` (a COMMIT, ended or not, or an abort
        marker), or None."""
        try:
            return await self._log.decided(gid)
        except DurabilityError as e:
            self._fail(e)
            raise CoordinatorFailedError(f"decision log failed: {e}") from e

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            self._failed.set()

    def _adopt(self, records: Sequence[CommitRecord]) -> None:
        """Commits another instance logged and can no longer deliver: ours now."""
        fresh = [r for r in records if r.txn_id not in self._committed]
        for record in fresh:
            self._committed[record.txn_id] = record.targets
        if fresh and not self._stopped:
            self._spawn(self._recover(fresh))

    def _known(self, gid: str) -> Outcome | None:
        """The outcome from memory alone, or None if only the log can tell."""
        if gid in self._committed:
            return Outcome.COMMITTED
        if gid in self._in_flight or gid in self._uncertain:
            return Outcome.PENDING
        return None

    def _leave(self, gid: str) -> None:
        """`gid` has decided: GetOutcome stops answering PENDING for it."""
        self._in_flight.discard(gid)
        if self._closing and not self._in_flight:
            self._quiet.set()

    async def _decide(self, gid: str, votes: list[BranchResult], log: Any) -> TransactionResult:
        """Makes the decision durable (for a commit) and starts phase 2."""
        reason = ""
        try:
            crash_point("coordinator.before_decision")
            if all(v.vote in _YES for v in votes):
                outcome = Outcome.COMMITTED
                targets = tuple(v.target for v in votes if v.vote is Vote.COMMIT)
                self.observers.emit(EventKind.DECIDED, gid, outcome=outcome)
                try:
                    if targets:
                        await self._log_commit(gid, targets, log)
                    log.debug("decided", outcome="commit", targets=targets)
                    crash_point("coordinator.after_commit_logged")
                except NotLoggedError as e:
                    # Certainly not logged, and now never can be: abort is the
                    # decision every instance's GetOutcome gives for it.
                    outcome, reason = Outcome.ABORTED, f"decision not logged: {e}"
                    log.warning("decided", outcome="abort", reason=reason)
                    self.observers.emit(EventKind.DECIDED, gid, outcome=outcome, reason=reason)
                    if isinstance(e, FencedError):
                        self._fail(e)
            else:
                outcome = Outcome.ABORTED
                targets = tuple(v.target for v in votes if v.vote is not Vote.READ_ONLY)
                reason = next(f"{v.name}: {v.reason}" for v in votes if v.vote not in _YES and v.reason != _CANCELLED)
                log.info("decided", outcome="abort", reason=reason)
                self.observers.emit(EventKind.DECIDED, gid, outcome=outcome, reason=reason)
        finally:
            # No await between the log write returning and this line: GetOutcome
            # moves from PENDING straight to COMMITTED.
            self._leave(gid)
        return await self._finish(gid, outcome, votes, targets, reason)

    async def _log_commit(self, gid: str, targets: tuple[str, ...], log: Any) -> None:
        try:
            fresh = await self._log.log_commit(gid, targets)
        except DurabilityError as e:
            # Rule 8: the record may or may not be on disk. Send nothing, neither
            # Commit nor Abort; GetOutcome says PENDING; a restart decides from disk.
            self._fail(e)
            self._uncertain.add(gid)
            log.critical("decision_write_failed", error=str(e))
            raise CoordinatorFailedError(f"decision log failed: {e}") from e
        if not fresh:
            # Logged before (an id reused past the checks in run()): that decision
            # stands and is delivered by whoever logged it; send nothing.
            raise DuplicateTransactionError(gid, "committed")
        self._committed[gid] = targets
        self.observers.emit(EventKind.DECISION_LOGGED, gid)

    async def _finish(
        self,
        gid: str,
        outcome: Outcome,
        votes: list[BranchResult],
        targets: tuple[str, ...],
        reason: str = "",
    ) -> TransactionResult:
        """Starts phase 2 in the background; for a commit, waits up to `phase2_wait_s`
        for it so the caller reads its own writes. An abort returns at once: the
        branches that did not answer are likely the slow ones."""
        names = {v.target: v.name for v in votes}
        named = [(t, names[t]) for t in targets]
        acked: set[str] = set()  # filled as each branch acknowledges
        if outcome is Outcome.COMMITTED:
            task = self._spawn(self._finish_commit(gid, named, acked))
            if self.config.phase2_wait_s > 0:
                await asyncio.wait({task}, timeout=self.config.phase2_wait_s)
        else:
            self._spawn(self._finish_abort(gid, named, acked))
        results = tuple(
            BranchResult(v.name, v.target, v.vote, v.reason, v.vote is Vote.READ_ONLY or v.target in acked)
            for v in votes
        )
        return TransactionResult(gid, outcome, results, all(r.acknowledged for r in results), reason)

    # --- phase 1 -------------------------------------------------------------------

    async def _phase1(self, gid: str, branches: Sequence[Branch], timeout: float, log: Any) -> list[BranchResult]:
        deadline = asyncio.get_running_loop().time() + timeout
        tasks = {
            asyncio.create_task(self._prepare(gid, b, deadline, one_phase=False)): i for i, b in enumerate(branches)
        }
        votes: list[BranchResult | None] = [None] * len(branches)
        pending = set(tasks)
        refused = False  # a branch voted ABORT or gave no vote: the rest are not awaited
        try:
            while pending and not refused:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    votes[tasks[t]] = v = t.result()
                    refused = refused or v.vote not in _YES
                    self.observers.emit(
                        EventKind.VOTED, gid, branch=v.name, target=v.target, vote=v.vote, reason=v.reason
                    )
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("prepare_cancelled", branches=[branches[tasks[t]].label for t in pending])
        return [v or BranchResult(b.label, b.target, None, _CANCELLED) for v, b in zip(votes, branches, strict=True)]

    async def _prepare(self, gid: str, branch: Branch, deadline: float, *, one_phase: bool) -> BranchResult:
        if isinstance(branch.operation, any_pb2.Any):
            operation = branch.operation  # packed already (the Transactions service relays one)
        else:
            operation = any_pb2.Any()
            operation.Pack(branch.operation)
        request = participant_pb2.PrepareRequest(
            txn_id=gid,
            coordinator=self._advertise,
            operation=operation,
            one_phase=one_phase,
            coordinators=self._peers,
            coordinator_log=self._log.log_id,
        )
        try:
            reply = await self._prepare_batcher(branch.target).prepare(request, deadline)
        except PrepareFailedError as e:
            _log.info("prepare_failed", txn_id=gid, branch=branch.label, error=str(e))
            return BranchResult(branch.label, branch.target, None, str(e))
        vote = _VOTES.get(reply.vote)
        if vote is None:
            _log.warning("prepare_bad_vote", txn_id=gid, branch=branch.label, vote=reply.vote)
            return BranchResult(branch.label, branch.target, None, f"unspecified vote {reply.vote}")
        _log.debug("voted", txn_id=gid, branch=branch.label, vote=vote.value, reason=reply.reason)
        return BranchResult(branch.label, branch.target, vote, reply.reason if vote is Vote.ABORT else "")

    # --- one-phase commit ----------------------------------------------------------

    async def _one_phase(self, gid: str, branch: Branch, timeout: float, log: Any) -> TransactionResult:
        """One branch: the participant decides alone, so nothing is logged here.

        A lost answer leaves the outcome with the participant. An Abort settles it:
        either the participant aborts (it had not committed) or it refuses because it
        already committed (FAILED_PRECONDITION), which means COMMITTED.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        vote = await self._prepare(gid, branch, deadline, one_phase=True)
        if vote.vote in _YES:
            outcome = Outcome.COMMITTED
        elif vote.vote is Vote.ABORT:
            outcome = Outcome.ABORTED
        else:
            stop = stop_after_delay(self.config.abort_retry_s)
            try:
                await self._deliver(gid, branch.target, branch.label, "Abort", stop, set(), one_phase=True)
                outcome = Outcome.ABORTED
            except _RefusedError:
                outcome = Outcome.COMMITTED
            except grpc.aio.AioRpcError as e:
                raise OutcomeUnknownError(gid, f"{vote.reason}; then {rpc.describe(e)}") from e
        log.info("decided", outcome=outcome.value, one_phase=True, reason=vote.reason)
        self.observers.emit(
            EventKind.VOTED, gid, branch=vote.name, target=vote.target, vote=vote.vote, reason=vote.reason
        )
        self.observers.emit(EventKind.DECIDED, gid, outcome=outcome, reason=vote.reason, one_phase=True)
        self.observers.emit(EventKind.ENDED, gid, outcome=outcome, one_phase=True)
        result = BranchResult(branch.label, branch.target, vote.vote, vote.reason, acknowledged=True)
        reason = f"{branch.label}: {vote.reason}" if vote.reason else ""
        return TransactionResult(gid, outcome, (result,), completed=True, reason=reason)

    # --- phase 2 -------------------------------------------------------------------

    async def _recover(self, records: Sequence[CommitRecord]) -> None:
        """Re-drives logged commits without END, `recovery_concurrency` at a time."""
        todo = iter(records)

        async def worker() -> None:
            for record in todo:  # one shared iterator: each record goes to one worker
                _log.info("recovery_redrive", txn_id=record.txn_id, targets=record.targets)
                self.observers.emit(EventKind.RECOVERING, record.txn_id, branches=record.targets)
                await self._finish_commit(record.txn_id, [(t, t) for t in record.targets], set())

        await asyncio.gather(*(worker() for _ in range(min(self.config.recovery_concurrency, len(records)))))

    async def _finish_commit(self, gid: str, targets: Sequence[tuple[str, str]], acked: set[str]) -> None:
        """Delivers Commit to every (target, name) until acknowledged, then logs END."""
        await asyncio.gather(
            *(self._deliver(gid, t, name, "Commit", stop_never, acked) for t, name in targets), return_exceptions=True
        )
        if not targets:  # every branch was read-only: nothing was logged
            self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.COMMITTED)
            return
        if len(acked) == len(targets):
            # END is not forced and nobody waits for it: it rides with the next sync.
            self._spawn(self._end(gid))
        else:
            # Only a refusal (a protocol violation, logged in _deliver) gets here.
            # The record stays: an operator must look, and recovery will try again.
            missing = sorted(name for t, name in targets if t not in acked)
            _log.error("commit_not_acknowledged", txn_id=gid, missing=missing)

    async def _end(self, gid: str) -> None:
        await self._log.log_end(gid)
        del self._committed[gid]
        self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.COMMITTED)
        _log.debug("ended", txn_id=gid)

    async def _finish_abort(
        self, gid: str, targets: Sequence[tuple[str, str]], acked: set[str], *, one_phase: bool = False
    ) -> None:
        """Delivers Abort for a while: afterwards GetOutcome's ABORTED covers it."""
        stop = stop_after_delay(self.config.abort_retry_s)
        await asyncio.gather(
            *(self._deliver(gid, t, name, "Abort", stop, acked, one_phase=one_phase) for t, name in targets),
            return_exceptions=True,
        )
        self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.ABORTED, one_phase=one_phase)

    async def _deliver(
        self, gid: str, target: str, name: str, method: str, stop: Any, acked: set[str], *, one_phase: bool = False
    ) -> None:
        """One phase-2 message, retried with exponential backoff and full jitter,
        until `stop` says enough; on success `target` joins `acked`.

        The first attempt goes out directly (batched, for a Commit); the retry
        machinery is only built once it failed, so the common case costs one RPC.

        Raises:
            _RefusedError: the participant answered FAILED_PRECONDITION.
            grpc.aio.AioRpcError: the last failure, once `stop` gives up.
        """
        stub = self._stub(target)
        timeout = self.config.rpc_timeout_s
        log = _log.bind(txn_id=gid, branch=name, method=method)
        send: Callable[[], Awaitable[object]]
        if method == "Commit":
            commit = participant_pb2.CommitRequest(txn_id=gid)
            send = lambda: stub.Commit(commit, timeout=timeout, wait_for_ready=True)  # noqa: E731
        else:
            abort = participant_pb2.AbortRequest(txn_id=gid)
            send = lambda: stub.Abort(abort, timeout=timeout, wait_for_ready=True)  # noqa: E731

        async def attempt() -> None:
            self.messages_sent += 1
            try:
                await send()
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    raise _RefusedError(rpc.describe(e)) from e
                raise

        def failed(attempt_number: int, error: BaseException | None) -> None:
            described = rpc.describe(error) if isinstance(error, grpc.aio.AioRpcError) else repr(error)
            broken = isinstance(error, grpc.aio.AioRpcError) and error.code() in _BROKEN
            if method == "Commit" and broken and attempt_number == 1:
                # The participant cannot apply a commit it voted for: the most
                # serious fault it can have. Retried, but an operator must look.
                log.error("commit_failing_at_participant", error=described)
            # The first failure at info, then at attempts 2, 4, 8, ...: a branch that
            # stays unreachable does not flood the log.
            report = log.info if attempt_number & (attempt_number - 1) == 0 else log.debug
            report("phase2_retry", attempt=attempt_number, error=described)
            self.observers.emit(
                EventKind.PHASE2_RETRY, gid, branch=name, target=target, attempt=attempt_number, reason=described
            )

        try:
            try:
                batcher = self._batcher(target) if method == "Commit" else None
                if batcher is not None and batcher.supported:
                    try:
                        await batcher.commit(gid)
                    except grpc.aio.AioRpcError as e:
                        if e.code() is not grpc.StatusCode.UNIMPLEMENTED:
                            raise
                        await attempt()  # no CommitMany there: this is the first Commit
                else:
                    await attempt()
            except grpc.aio.AioRpcError as first_error:
                failed(1, first_error)

                def before_sleep(state: Any) -> None:
                    failed(state.attempt_number + 1, state.outcome.exception() if state.outcome else None)

                async for retry in AsyncRetrying(
                    # Full jitter: concurrent retries to one recovering participant spread out.
                    wait=wait_random_exponential(multiplier=self.config.retry_initial_s, max=self.config.retry_max_s),
                    stop=stop,
                    retry=self._retry_on,
                    reraise=True,
                    before_sleep=before_sleep,
                ):
                    with retry:
                        await attempt()
        except _RefusedError as e:
            if method == "Commit":
                log.error("commit_refused", error=str(e), hint="a participant refused a logged COMMIT")
            elif one_phase:
                log.info("one_phase_already_committed", error=str(e))
            else:
                log.error("abort_refused", error=str(e), hint="a participant committed without a COMMIT decision")
            raise
        acked.add(target)
        log.debug("acknowledged")
        self.observers.emit(EventKind.ACKNOWLEDGED, gid, branch=name, target=target, outcome=_DELIVERED[method])
        if method == "Commit":
            crash_point("coordinator.after_first_commit")

    # --- plumbing ------------------------------------------------------------------

    def _stub(self, target: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        stub = self._stubs.get(target)
        if stub is None:
            self._channels[target] = rpc.channel(target, self._credentials, self._interceptors)
            stub = self._stubs[target] = participant_pb2_grpc.ParticipantStub(self._channels[target])
        return stub

    def _batcher(self, target: str) -> _CommitBatcher:
        batcher = self._batchers.get(target)
        if batcher is None:
            batcher = self._batchers[target] = _CommitBatcher(self, target)
        return batcher

    def _prepare_batcher(self, target: str) -> PrepareBatcher:
        batcher = self._prepare_batchers.get(target)
        if batcher is None:
            batcher = self._prepare_batchers[target] = PrepareBatcher(
                target,
                self._stub(target),
                limit=self.config.max_prepare_batch,
                spawn=self._spawn,
                sent=self._count_message,
                in_flight=self.config.batches_in_flight,
            )
        return batcher

    def _count_message(self) -> None:
        self.messages_sent += 1

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _answer(self, gid: str) -> coordinator_pb2.Outcome.ValueType:
        """GetOutcome's answer for a participant (rule 5): memory, then the log."""
        return _PB_OUTCOME[await self._outcome(gid)]


class _CommitBatcher:
    """Commits bound for one participant, sent as one CommitMany while earlier
    batches are in flight (`batches_in_flight` of them at most). There is no timer: a
    lone Commit goes out at once (from its caller's task, without a hand-off to a
    sender), and under load the Commits that queue meanwhile share a message (and the
    participant's fsync). A participant without CommitMany (UNIMPLEMENTED) gets Commit
    one by one.
    """

    def __init__(self, coordinator: Coordinator, target: str) -> None:
        self._coordinator = coordinator
        self._target = target
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._senders = 0  # sender tasks running
        self._sending = 0  # Commits in their messages now in flight
        self._direct = 0  # lone Commits in flight from their callers' tasks
        self._max_in_flight = coordinator.config.batches_in_flight
        self.supported = True

    def _free(self) -> bool:
        return self._senders + self._direct < self._max_in_flight

    async def commit(self, txn_id: str) -> None:
        """Returns once `txn_id` is committed at the participant.

        Raises:
            _RefusedError: the participant refused it.
            grpc.aio.AioRpcError: the batch's message failed.
        """
        if self._free() and not self._pending:
            # A slot is free: this Commit goes out now, from the caller's own task.
            self._direct += 1
            try:
                await self._send_one(txn_id)
            finally:
                self._direct -= 1
                self._spawn_sender()  # for what queued behind this one
            return
        future = self._pending.get(txn_id)
        if future is None:
            future = self._pending[txn_id] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume)
        self._spawn_sender()
        await asyncio.shield(future)

    def _spawn_sender(self) -> None:
        if self._pending and self._free():
            self._senders += 1
            self._coordinator._spawn(self._send())

    async def _send_one(self, txn_id: str) -> None:
        self._coordinator.messages_sent += 1
        try:
            reply = await self._coordinator._stub(self._target).CommitMany(
                participant_pb2.CommitManyRequest(txn_ids=[txn_id]),
                timeout=self._coordinator.config.rpc_timeout_s,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as e:
            self._unsupported(e)
            raise
        if txn_id in reply.refused:
            raise _RefusedError(reply.refused[txn_id])

    def _unsupported(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() is grpc.StatusCode.UNIMPLEMENTED and self.supported:
            self.supported = False
            _log.info("commit_many_unsupported", branch=self._target, fallback="Commit")

    async def _send(self) -> None:
        stub = self._coordinator._stub(self._target)
        batch: dict[str, asyncio.Future[None]] = {}
        try:
            while self._pending:
                # Its share of the Commits outstanding, over the messages that may be in
                # flight (as PrepareBatcher does): no one long batch beside short ones.
                share = -(-(len(self._pending) + self._sending) // self._max_in_flight)
                limit = min(self._coordinator.config.max_commit_batch, share)
                if len(self._pending) <= limit:
                    batch, self._pending = self._pending, {}
                else:  # the oldest first; the rest wait for the next message
                    batch = {t: self._pending.pop(t) for t in list(itertools.islice(self._pending, limit))}
                self._coordinator.messages_sent += 1
                request = participant_pb2.CommitManyRequest(txn_ids=list(batch))
                sending = len(batch)
                self._sending += sending
                self._spawn_sender()  # what is left goes out beside this one, if a slot is free
                try:
                    reply = await stub.CommitMany(
                        request, timeout=self._coordinator.config.rpc_timeout_s, wait_for_ready=True
                    )
                except grpc.aio.AioRpcError as e:
                    self._unsupported(e)
                    _settle(batch, e)
                    continue
                except Exception as e:  # noqa: BLE001 - every waiter hears of it
                    _settle(batch, e)
                    continue
                finally:
                    self._sending -= sending
                for txn_id, reason in reply.refused.items():
                    refused = batch.pop(txn_id, None)
                    if refused is not None:
                        _settle({txn_id: refused}, _RefusedError(reason))
                _settle(batch, None)
        finally:
            self._senders -= 1
            for future in batch.values():
                future.cancel()  # only if this was cancelled (close): settled ones are done
            if not self._senders:
                for future in self._pending.values():
                    future.cancel()


def _settle(futures: dict[str, asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures.values():
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def _consume(future: asyncio.Future[None]) -> None:
    """Marks a batch future's error as seen: its waiter may have been cancelled."""
    if not future.cancelled():
        future.exception()


class _OutcomeServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def GetOutcome(  # noqa: N802 - the RPC's name
        self, request: coordinator_pb2.GetOutcomeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetOutcomeResponse:
        await rpc.validate(context, lambda: limits.check_txn_id(request.txn_id))
        if not self._coordinator._open:
            # Before the log is read an ABORTED could contradict a logged COMMIT.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is starting or stopped; ask again")
        try:
            outcome = await self._coordinator._answer(request.txn_id)
        except TwoPCError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the decision log cannot be read: {e}")
        _log.info("outcome_asked", txn_id=request.txn_id, outcome=coordinator_pb2.Outcome.Name(outcome))
        self._coordinator.observers.emit(EventKind.OUTCOME_ANSWERED, request.txn_id, outcome=_ANSWERED[outcome])
        return coordinator_pb2.GetOutcomeResponse(outcome=outcome, log_id=self._coordinator._log.log_id)
