"""The coordinator: phase 1, the commit point, phase 2, recovery and GetOutcome.

One `Coordinator` runs many transactions concurrently over reused channels. The
protocol is presumed-abort 2PC (DESIGN.md):

* Phase 1 sends every Prepare at once under the transaction's deadline. The first
  ABORT vote, error or expired deadline decides ABORT at once and cancels the rest.
* The commit point is the forced write of the COMMIT decision, with the list of
  participants to tell, to the decision log. Nothing is sent before it. Aborts are
  not logged.
* Phase 2 delivers the decision to every participant in parallel, retrying with
  exponential backoff and jitter; Commits are retried without end, across restarts.
* On start, every COMMIT in the log without END is delivered again (recovery).
* `GetOutcome` answers participants in doubt: COMMITTED for a logged decision,
  PENDING while the transaction is still in phase 1 here, ABORTED otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_never, wait_random_exponential

from twopc import rpc
from twopc.config import CoordinatorConfig, Credentials
from twopc.errors import CoordinatorFailedError, DurabilityError, OutcomeUnknownError
from twopc.faults import crash_point
from twopc.log import DecisionLog, SqliteDecisionLog
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.coordinator")

_VOTES = {
    participant_pb2.VOTE_COMMIT: Vote.COMMIT,
    participant_pb2.VOTE_ABORT: Vote.ABORT,
    participant_pb2.VOTE_READ_ONLY: Vote.READ_ONLY,
}
_YES = (Vote.COMMIT, Vote.READ_ONLY)
_CANCELLED = "cancelled: another branch decided abort"


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

    Args:
        log: the decision log, or the path of its SQLite file.
        credentials: transport security for channels and the GetOutcome server.
        listen: address to serve GetOutcome on ("host:port", port 0 for any), on a
            server of the coordinator's own. Or serve it on yours (`add_to_server`).
            Either way, keep the address across restarts: participants in doubt
            ask the address they were given in Prepare.
        advertise: the address participants should use to reach GetOutcome, when
            it differs from the listening one (a public name, a proxy).
        config: timeouts and retry policy.
        interceptors: client interceptors for the channels to participants
            (tracing, auth, or fault injection in tests).
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
    ) -> None:
        self._log: DecisionLog = SqliteDecisionLog(log) if isinstance(log, str | os.PathLike) else log
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._listen = listen
        self._advertise = advertise or ""
        self.config = config or CoordinatorConfig()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, participant_pb2_grpc.ParticipantAsyncStub] = {}
        self._batchers: dict[str, _CommitBatcher] = {}
        self._server: grpc.aio.Server | None = None
        self._in_flight: set[str] = set()  # in phase 1 here: GetOutcome says PENDING
        self._committed: dict[str, tuple[str, ...]] = {}  # logged, no END yet
        self._uncertain: set[str] = set()  # decision write failed: only the disk knows
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failed: BaseException | None = None
        # Only RPC failures are retried: a refusal cannot change, and a cancellation
        # (close(), a cancelled caller) must propagate, not be retried.
        self._retry_on = retry_if_exception(lambda e: isinstance(e, grpc.aio.AioRpcError))
        self.messages_sent = 0

    # --- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where participants reach GetOutcome ("host:port"); empty if not served."""
        return self._advertise

    @property
    def log_syncs(self) -> int:
        """Forced writes of the decision log so far."""
        return self._log.syncs

    async def __aenter__(self) -> Coordinator:
        pending = await self._log.open()
        for record in pending:
            self._committed[record.txn_id] = record.targets
        if self._listen is not None:
            self._server = grpc.aio.server()
            self.add_to_server(self._server)
            port = rpc.add_port(self._server, self._listen, self._credentials)
            await self._server.start()
            if not self._advertise:
                self._advertise = f"{self._listen.rsplit(':', 1)[0]}:{port}"
        # Recovery runs beside new work: those transactions are already decided and
        # GetOutcome already knows them, so nothing new can contradict them.
        for record in pending:
            _log.info("recovery_redrive", txn_id=record.txn_id, targets=record.targets)
            self._spawn(self._finish_commit(record.txn_id, record.targets))
        _log.info("coordinator_started", address=self._advertise, recovering=len(pending))
        return self

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serves GetOutcome on the caller's own server (instead of `listen`); pass
        that server's address as `advertise`. Call it after entering the context,
        so the log is read before the first question is answered."""
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_OutcomeServicer(self), server)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops: lets phase 2 finish for up to `shutdown_grace_s`, then cancels it
        (logged commits resume on the next start), and closes channels and the log."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_grace_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=None)
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
            txn_id: the transaction's id; a random UUID by default. Never reuse one.

        Returns:
            The outcome with each branch's vote and reason. An abort is a result.

        Raises:
            CoordinatorFailedError: the decision log failed (now or earlier); the
                coordinator sends nothing more and must be restarted to recover.
            OutcomeUnknownError: one branch (one-phase commit) never answered and
                could not be reached to settle the outcome.
            ValueError: no branches, or two branches with the same target.
        """
        if self._failed is not None:
            raise CoordinatorFailedError(f"decision log failed: {self._failed}")
        if not branches:
            raise ValueError("a transaction needs at least one branch")
        if len({b.target for b in branches}) != len(branches):
            raise ValueError("two branches name the same target; give each participant one branch")
        txn_id = txn_id or uuid.uuid4().hex
        timeout = self.config.prepare_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be > 0")
        log = _log.bind(txn_id=txn_id)
        self._in_flight.add(txn_id)
        decision: asyncio.Task[TransactionResult] | None = None
        try:
            if len(branches) == 1 and self.config.one_phase:
                return await self._one_phase(txn_id, branches[0], timeout, log)
            votes = await self._phase1(txn_id, branches, timeout, log)
            decision = self._spawn(self._decide(txn_id, votes, log))
        finally:
            if decision is None:
                self._in_flight.discard(txn_id)
        # The votes are in: the decision is taken and carried out even if our caller
        # goes away now. A cancelled caller must not orphan a COMMIT on its way to disk.
        return await asyncio.shield(decision)

    async def _decide(self, txn_id: str, votes: list[BranchResult], log: Any) -> TransactionResult:
        """Makes the decision durable (for a commit) and starts phase 2."""
        reason = ""
        try:
            crash_point("coordinator.before_decision")
            if all(v.vote in _YES for v in votes):
                outcome = Outcome.COMMITTED
                targets = tuple(v.target for v in votes if v.vote is Vote.COMMIT)
                if targets:
                    await self._log_commit(txn_id, targets, log)
                log.debug("decided", outcome="commit", targets=targets)
                crash_point("coordinator.after_commit_logged")
            else:
                outcome = Outcome.ABORTED
                targets = tuple(v.target for v in votes if v.vote is not Vote.READ_ONLY)
                reason = next(f"{v.name}: {v.reason}" for v in votes if v.vote not in _YES and v.reason != _CANCELLED)
                log.info("decided", outcome="abort", reason=reason)
        finally:
            # No await between the log write returning and this line: GetOutcome
            # moves from PENDING straight to COMMITTED.
            self._in_flight.discard(txn_id)
        return await self._finish(txn_id, outcome, votes, targets, reason)

    async def _log_commit(self, txn_id: str, targets: tuple[str, ...], log: Any) -> None:
        try:
            await self._log.log_commit(txn_id, targets)
        except DurabilityError as e:
            # Rule 8: the record may or may not be on disk. Send nothing, neither
            # Commit nor Abort; GetOutcome says PENDING; a restart decides from disk.
            self._failed = e
            self._uncertain.add(txn_id)
            log.critical("decision_write_failed", error=str(e))
            raise CoordinatorFailedError(f"decision log failed: {e}") from e
        self._committed[txn_id] = targets

    async def _finish(
        self,
        txn_id: str,
        outcome: Outcome,
        votes: list[BranchResult],
        targets: tuple[str, ...],
        reason: str = "",
    ) -> TransactionResult:
        """Starts phase 2 in the background; for a commit, waits up to `phase2_wait_s`
        for it so the caller reads its own writes. An abort returns at once: the
        branches that did not answer are likely the slow ones."""
        if outcome is Outcome.COMMITTED:
            task = self._spawn(self._finish_commit(txn_id, targets))
        else:
            task = self._spawn(self._finish_abort(txn_id, targets))
        acked: set[str] = set()
        if outcome is Outcome.COMMITTED and self.config.phase2_wait_s > 0:
            done, _ = await asyncio.wait({task}, timeout=self.config.phase2_wait_s)
            if done and not task.cancelled() and task.exception() is None:
                acked = task.result()
        results = tuple(
            BranchResult(v.name, v.target, v.vote, v.reason, v.vote is Vote.READ_ONLY or v.target in acked)
            for v in votes
        )
        return TransactionResult(txn_id, outcome, results, all(r.acknowledged for r in results), reason)

    # --- phase 1 -------------------------------------------------------------------

    async def _phase1(self, txn_id: str, branches: Sequence[Branch], timeout: float, log: Any) -> list[BranchResult]:
        deadline = asyncio.get_running_loop().time() + timeout
        tasks = {
            asyncio.create_task(self._prepare(txn_id, b, deadline, one_phase=False)): i for i, b in enumerate(branches)
        }
        votes: list[BranchResult | None] = [None] * len(branches)
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    votes[tasks[t]] = t.result()
                if any(v is not None and v.vote not in _YES for v in votes):
                    break
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("prepare_cancelled", branches=[branches[tasks[t]].label for t in pending])
        return [v or BranchResult(b.label, b.target, None, _CANCELLED) for v, b in zip(votes, branches, strict=True)]

    async def _prepare(self, txn_id: str, branch: Branch, deadline: float, *, one_phase: bool) -> BranchResult:
        operation = any_pb2.Any()
        operation.Pack(branch.operation)
        request = participant_pb2.PrepareRequest(
            txn_id=txn_id, coordinator=self._advertise, operation=operation, one_phase=one_phase
        )
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            return BranchResult(branch.label, branch.target, None, "deadline passed before Prepare was sent")
        self.messages_sent += 1
        try:
            reply = await self._stub(branch.target).Prepare(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            _log.info("prepare_failed", txn_id=txn_id, branch=branch.label, error=rpc.describe(e))
            return BranchResult(branch.label, branch.target, None, rpc.describe(e))
        vote = _VOTES.get(reply.vote)
        if vote is None:
            _log.warning("prepare_bad_vote", txn_id=txn_id, branch=branch.label, vote=reply.vote)
            return BranchResult(branch.label, branch.target, None, f"unspecified vote {reply.vote}")
        _log.debug("voted", txn_id=txn_id, branch=branch.label, vote=vote.value, reason=reply.reason)
        return BranchResult(branch.label, branch.target, vote, reply.reason if vote is Vote.ABORT else "")

    # --- one-phase commit ----------------------------------------------------------

    async def _one_phase(self, txn_id: str, branch: Branch, timeout: float, log: Any) -> TransactionResult:
        """One branch: the participant decides alone, so nothing is logged here.

        A lost answer leaves the outcome with the participant. An Abort settles it:
        either the participant aborts (it had not committed) or it refuses because it
        already committed (FAILED_PRECONDITION), which means COMMITTED.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        vote = await self._prepare(txn_id, branch, deadline, one_phase=True)
        if vote.vote in _YES:
            outcome = Outcome.COMMITTED
        elif vote.vote is Vote.ABORT:
            outcome = Outcome.ABORTED
        else:
            try:
                await self._deliver(txn_id, branch.target, "Abort", stop_after_delay(self.config.abort_retry_s))
                outcome = Outcome.ABORTED
            except _RefusedError:
                outcome = Outcome.COMMITTED
            except grpc.aio.AioRpcError as e:
                raise OutcomeUnknownError(txn_id, f"{vote.reason}; then {rpc.describe(e)}") from e
        log.info("decided", outcome=outcome.value, one_phase=True, reason=vote.reason)
        result = BranchResult(branch.label, branch.target, vote.vote, vote.reason, acknowledged=True)
        reason = f"{branch.label}: {vote.reason}" if vote.reason else ""
        return TransactionResult(txn_id, outcome, (result,), completed=True, reason=reason)

    # --- phase 2 -------------------------------------------------------------------

    async def _finish_commit(self, txn_id: str, targets: Sequence[str]) -> set[str]:
        """Delivers Commit to every target until acknowledged, then logs END."""
        results = await asyncio.gather(
            *(self._deliver(txn_id, t, "Commit", stop_never) for t in targets), return_exceptions=True
        )
        acked = {t for t, r in zip(targets, results, strict=True) if r is None}
        if not targets:  # every branch was read-only: nothing was logged
            return acked
        if len(acked) == len(targets):
            # END is not forced and nobody waits for it: it rides with the next sync.
            self._spawn(self._end(txn_id))
        else:
            # Only a refusal (a protocol violation, logged in _deliver) gets here.
            # The record stays: an operator must look, and recovery will try again.
            _log.error("commit_not_acknowledged", txn_id=txn_id, missing=sorted(set(targets) - acked))
        return acked

    async def _end(self, txn_id: str) -> None:
        await self._log.log_end(txn_id)
        del self._committed[txn_id]
        _log.debug("ended", txn_id=txn_id)

    async def _finish_abort(self, txn_id: str, targets: Sequence[str]) -> set[str]:
        """Delivers Abort for a while: afterwards GetOutcome's ABORTED covers it."""
        stop = stop_after_delay(self.config.abort_retry_s)
        results = await asyncio.gather(
            *(self._deliver(txn_id, t, "Abort", stop) for t in targets), return_exceptions=True
        )
        return {t for t, r in zip(targets, results, strict=True) if r is None}

    async def _deliver(self, txn_id: str, target: str, method: str, stop: Any) -> None:
        """One phase-2 message, retried with exponential backoff and full jitter.

        The first attempt goes out directly; the retry machinery is only built once
        it failed, so the common case costs one RPC and nothing else.

        Raises:
            _RefusedError: the participant answered FAILED_PRECONDITION.
            grpc.aio.AioRpcError: the last failure, once `stop` gives up.
        """
        stub = self._stub(target)
        timeout = self.config.rpc_timeout_s
        send: Callable[[], Awaitable[object]]
        if method == "Commit":
            commit = participant_pb2.CommitRequest(txn_id=txn_id)
            send = lambda: stub.Commit(commit, timeout=timeout)  # noqa: E731
        else:
            abort = participant_pb2.AbortRequest(txn_id=txn_id)
            send = lambda: stub.Abort(abort, timeout=timeout)  # noqa: E731

        async def attempt() -> None:
            self.messages_sent += 1
            try:
                await send()
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    # A refused Commit is a protocol violation; a refused Abort is
                    # how a one-phase participant says it already committed.
                    report = _log.error if method == "Commit" else _log.info
                    report("phase2_refused", txn_id=txn_id, branch=target, method=method, error=rpc.describe(e))
                    raise _RefusedError(rpc.describe(e)) from e
                raise

        first = attempt
        if method == "Commit":
            batcher = self._batchers.get(target)
            if batcher is None:
                batcher = self._batchers[target] = _CommitBatcher(self, target)
            if batcher.supported:
                first = functools.partial(batcher.commit, txn_id)
        try:
            await first()
        except grpc.aio.AioRpcError as first_error:
            log = _log.bind(txn_id=txn_id, branch=target, method=method)
            log.info("phase2_retry", attempt=1, error=rpc.describe(first_error))

            def before_sleep(state: Any) -> None:
                error = state.outcome.exception() if state.outcome else None
                described = rpc.describe(error) if isinstance(error, grpc.aio.AioRpcError) else repr(error)
                log.info("phase2_retry", attempt=state.attempt_number + 1, error=described)

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
        _log.debug("acknowledged", txn_id=txn_id, branch=target, method=method)
        if method == "Commit":
            crash_point("coordinator.after_first_commit")

    # --- plumbing ------------------------------------------------------------------

    def _stub(self, target: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        stub = self._stubs.get(target)
        if stub is None:
            self._channels[target] = rpc.channel(target, self._credentials, self._interceptors)
            stub = self._stubs[target] = participant_pb2_grpc.ParticipantStub(self._channels[target])
        return stub

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def outcome(self, txn_id: str) -> coordinator_pb2.Outcome.ValueType:
        """What GetOutcome answers for `txn_id` (DESIGN.md rule 5)."""
        if txn_id in self._committed:
            return coordinator_pb2.OUTCOME_COMMITTED
        if txn_id in self._in_flight or txn_id in self._uncertain:
            return coordinator_pb2.OUTCOME_PENDING
        return coordinator_pb2.OUTCOME_ABORTED


class _CommitBatcher:
    """Commits bound for one participant, sent as one CommitMany while an earlier
    batch is in flight. There is no timer: a lone Commit goes out at once, and under
    load the Commits that queue meanwhile share a message (and the participant's
    fsync). A participant without CommitMany (UNIMPLEMENTED) gets Commit one by one.
    """

    def __init__(self, coordinator: Coordinator, target: str) -> None:
        self._coordinator = coordinator
        self._target = target
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._sender: asyncio.Task[None] | None = None
        self.supported = True

    async def commit(self, txn_id: str) -> None:
        """Returns once `txn_id` is committed at the participant.

        Raises:
            _RefusedError: the participant refused it.
            grpc.aio.AioRpcError: the batch's message failed.
        """
        future = self._pending.get(txn_id)
        if future is None:
            future = self._pending[txn_id] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume)
        if self._sender is None:
            self._sender = self._coordinator._spawn(self._send())
        await asyncio.shield(future)

    async def _send(self) -> None:
        stub = self._coordinator._stub(self._target)
        batch: dict[str, asyncio.Future[None]] = {}
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                self._coordinator.messages_sent += 1
                request = participant_pb2.CommitManyRequest(txn_ids=list(batch))
                try:
                    reply = await stub.CommitMany(request, timeout=self._coordinator.config.rpc_timeout_s)
                except grpc.aio.AioRpcError as e:
                    self.supported = e.code() is not grpc.StatusCode.UNIMPLEMENTED
                    _settle(batch, e)
                    continue
                except Exception as e:  # noqa: BLE001 - every waiter hears of it
                    _settle(batch, e)
                    continue
                for txn_id, reason in reply.refused.items():
                    refused = batch.pop(txn_id, None)
                    if refused is not None:
                        _log.error("phase2_refused", txn_id=txn_id, branch=self._target, method="Commit", error=reason)
                        _settle({txn_id: refused}, _RefusedError(reason))
                _settle(batch, None)
        finally:
            self._sender = None
            for future in (*batch.values(), *self._pending.values()):
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
        if not request.txn_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "txn_id is required")
        outcome = self._coordinator.outcome(request.txn_id)
        _log.info("outcome_asked", txn_id=request.txn_id, outcome=coordinator_pb2.Outcome.Name(outcome))
        return coordinator_pb2.GetOutcomeResponse(outcome=outcome)
