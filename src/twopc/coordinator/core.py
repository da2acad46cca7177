"""The coordinator: the transaction's lifecycle, the commit point, and what it holds.

One `Coordinator` runs many transactions concurrently over reused channels. The
protocol is presumed-abort 2PC (docs/design.md); this module holds what ties the
parts together, and the parts hold the rest:

* `phase1` sends every Prepare at once under the transaction's deadline; the first
  ABORT vote, error or expired deadline decides ABORT at once.
* Here, the commit point: the forced write of the COMMIT decision, with the list of
  participants to tell, to the decision log. Nothing is sent before it. Aborts are
  not logged. Here too, what is in flight, committed and uncertain, which
  GetOutcome answers from memory before the log.
* `delivery` delivers the decision (Commits retried without end, across restarts;
  Aborts for `abort_retry_s`) and re-drives every COMMIT without END at start.
* `outcomes` serves GetOutcome: COMMITTED for a logged decision, PENDING while in
  flight here, ABORTED for its own ids otherwise, PENDING for an id of another log
  (rule 12), UNAVAILABLE until the log is read; every answer names its log.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import structlog

from twopc import rpc
from twopc.config import CoordinatorConfig, Credentials
from twopc.coordinator.channels import Channels
from twopc.coordinator.delivery import Delivery
from twopc.coordinator.outcomes import OutcomeServicer, check_peers
from twopc.coordinator.phase1 import CANCELLED, YES, Phase1, Whom
from twopc.decisions import CommitRecord, DecisionLog, SqliteDecisionLog
from twopc.errors import (
    ClosedError,
    CoordinatorFailedError,
    DuplicateTransactionError,
    DurabilityError,
    FencedError,
    LogUnavailableError,
    NotLoggedError,
)
from twopc.faults import crash_point
from twopc.observe import EventKind, Observer, Observers, health_for_serve
from twopc.security import limits
from twopc.security.auth import COORDINATOR_SERVICE, Authorizer, Policy
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote
from twopc.v1 import coordinator_pb2_grpc

_log = structlog.get_logger("twopc.coordinator.core")

_GLOBAL_ID = re.compile(r"[0-9a-f]{16}:")  # "<coordinator or instance id>:<local id>"
MAX_LOCAL_ID = 128
"""The longest local transaction id `run` accepts, in characters."""
PEER_CHECK_S = 2.0
"""How long a peer is given at start to say which log it answers from."""


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
        self._whom = Whom(address=advertise or "", peers=self._peers)  # what every Prepare says of us
        self.config = config or CoordinatorConfig()
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
        self.messages_sent = 0
        self.observers = Observers(observers)
        # The parts: channels with their batchers, phase 2 and recovery, phase 1.
        self._channels = Channels(credentials, interceptors, self.config, spawn=self._spawn, sent=self._count_message)
        self._delivery = Delivery(self.config, self._channels, self._log, self._committed, self.observers, self._spawn)
        self._phase1 = Phase1(self.config, self._channels, self._delivery, self.observers, self._whom)

    # --- lifecycle ---------------------------------------------------------------

    @property
    def id(self) -> str:
        """The coordinator's id: its decision log's, stable across restarts."""
        return self._log.id

    @property
    def address(self) -> str:
        """Where participants reach GetOutcome ("host:port"); empty if not served."""
        return self._whom.address

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
                if not self._whom.address:
                    self._whom.address = f"{self._listen.rsplit(':', 1)[0]}:{port}"
            self._whom.log_id = self._log.log_id
        except BaseException:
            await self._log.close()
            raise
        self._open = True
        self._log.watch(adopt=self._adopt, fail=self._fail)
        # Recovery runs beside new work: those transactions are already decided and
        # GetOutcome already knows them, so nothing new can contradict them.
        if pending:
            self._spawn(self._delivery.recover(pending))
        try:
            # With the lease renewed meanwhile: asking a slow peer must not cost it.
            await check_peers(
                self._peers,
                probe=f"{self.id}:peer-check",
                log_id=self._log.log_id,
                credentials=self._credentials,
                interceptors=self._interceptors,
                timeout_s=min(self.config.rpc_timeout_s, PEER_CHECK_S),
            )
        except BaseException:
            await self.close()
            raise
        _log.info("coordinator_started", id=self.id, address=self._whom.address, recovering=len(pending))
        return self

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serves GetOutcome on the caller's own server (instead of `listen`); pass
        that server's address as `advertise`. GetOutcome answers UNAVAILABLE until
        the coordinator is entered (its log read) and after it is closed."""
        servicer = OutcomeServicer(self._outcome, lambda: self._open, lambda: self._log.log_id, self.observers)
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)

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
            if not self._whom.address:
                self._whom.address = where

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
        if not self._log.available:  # a shared log's renewals failing: a failover, say
            raise LogUnavailableError("the decision log's database cannot be reached now")

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
        await self._channels.close()
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
                return await self._phase1.one_phase(gid, branches[0], timeout, log)
            votes = await self._phase1.votes(gid, branches, timeout, log)
            decision = asyncio.create_task(self._decide(gid, votes, log))
            self._decisions.add(decision)
            decision.add_done_callback(self._decisions.discard)
        except asyncio.CancelledError:
            # Abandoned before any decision: release every branch now rather than
            # leave reservations held until the participants ask GetOutcome.
            log.info("run_cancelled", branches=[b.label for b in branches])
            if not self._stopped:
                alone = len(branches) == 1 and self.config.one_phase
                named = [(b.target, b.label) for b in branches]
                self._spawn(self._delivery.finish_abort(gid, named, set(), one_phase=alone))
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
            self._spawn(self._delivery.recover(fresh))

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
            if all(v.vote in YES for v in votes):
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
                reason = next(f"{v.name}: {v.reason}" for v in votes if v.vote not in YES and v.reason != CANCELLED)
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
            task = self._spawn(self._delivery.finish_commit(gid, named, acked))
            if self.config.phase2_wait_s > 0:
                await asyncio.wait({task}, timeout=self.config.phase2_wait_s)
        else:
            self._spawn(self._delivery.finish_abort(gid, named, acked))
        results = tuple(
            BranchResult(v.name, v.target, v.vote, v.reason, v.vote is Vote.READ_ONLY or v.target in acked)
            for v in votes
        )
        return TransactionResult(gid, outcome, results, all(r.acknowledged for r in results), reason)

    # --- plumbing ------------------------------------------------------------------

    def _count_message(self) -> None:
        self.messages_sent += 1

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
