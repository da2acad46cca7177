"""Phase 2 and recovery: the decision delivered to every participant.

Commits are retried with exponential backoff and full jitter without end (rule 3 of
docs/design.md), across restarts through recovery, then END is logged. Aborts are
retried for `abort_retry_s`: they are not logged (presumed abort), so past that a
participant still in doubt learns ABORTED from GetOutcome, where the owner answers
it for its own ids (rule 12).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_never, wait_random_exponential

from twopc import rpc
from twopc.config import CoordinatorConfig
from twopc.coordinator.batching import RefusedError
from twopc.coordinator.channels import Channels
from twopc.decisions import CommitRecord, DecisionLog
from twopc.faults import crash_point
from twopc.observe import EventKind, Observers
from twopc.types import Outcome
from twopc.v1 import participant_pb2

_log = structlog.get_logger("twopc.coordinator.delivery")

# A Commit answered with one of these is a participant that cannot apply what it
# prepared (a bug, corrupted state), not a passing network fault.
_BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)
_DELIVERED = {"Commit": Outcome.COMMITTED, "Abort": Outcome.ABORTED}
# Only RPC failures are retried: a refusal cannot change, and a cancellation
# (close(), a cancelled caller) must propagate, not be retried.
_RETRY_ON = retry_if_exception(lambda e: isinstance(e, grpc.aio.AioRpcError))


class Delivery:
    """Delivers decisions (phase 2) and re-drives logged commits (recovery).

    Args:
        config: timeouts, retry policy, recovery concurrency.
        channels: the participant channels and their batchers.
        log: the decision log, for END.
        committed: the coordinator's logged commits without END (gid -> targets);
            END removes its entry.
        observers: told of every acknowledgement, retry and end.
        spawn: starts background work the coordinator cancels on close.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        channels: Channels,
        log: DecisionLog,
        committed: dict[str, tuple[str, ...]],
        observers: Observers,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self._config = config
        self._channels = channels
        self._log = log
        self._committed = committed
        self.observers = observers
        self._spawn = spawn

    async def recover(self, records: Sequence[CommitRecord]) -> None:
        """Re-drives logged commits without END, `recovery_concurrency` at a time."""
        todo = iter(records)

        async def worker() -> None:
            for record in todo:  # one shared iterator: each record goes to one worker
                _log.info("recovery_redrive", txn_id=record.txn_id, targets=record.targets)
                self.observers.emit(EventKind.RECOVERING, record.txn_id, branches=record.targets)
                await self.finish_commit(record.txn_id, [(t, t) for t in record.targets], set())

        await asyncio.gather(*(worker() for _ in range(min(self._config.recovery_concurrency, len(records)))))

    async def finish_commit(self, gid: str, targets: Sequence[tuple[str, str]], acked: set[str]) -> None:
        """Delivers Commit to every (target, name) until acknowledged, then logs END."""
        await asyncio.gather(
            *(self.deliver(gid, t, name, "Commit", stop_never, acked) for t, name in targets), return_exceptions=True
        )
        if not targets:  # every branch was read-only: nothing was logged
            self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.COMMITTED)
            return
        if len(acked) == len(targets):
            # END is not forced and nobody waits for it: it rides with the next sync.
            self._spawn(self._end(gid))
        else:
            # Only a refusal (a protocol violation, logged in deliver) gets here.
            # The record stays: an operator must look, and recovery will try again.
            missing = sorted(name for t, name in targets if t not in acked)
            _log.error("commit_not_acknowledged", txn_id=gid, missing=missing)

    async def _end(self, gid: str) -> None:
        await self._log.log_end(gid)
        del self._committed[gid]
        self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.COMMITTED)
        _log.debug("ended", txn_id=gid)

    async def finish_abort(
        self, gid: str, targets: Sequence[tuple[str, str]], acked: set[str], *, one_phase: bool = False
    ) -> None:
        """Delivers Abort for a while: afterwards GetOutcome's ABORTED covers it."""
        stop = stop_after_delay(self._config.abort_retry_s)
        await asyncio.gather(
            *(self.deliver(gid, t, name, "Abort", stop, acked, one_phase=one_phase) for t, name in targets),
            return_exceptions=True,
        )
        self.observers.emit(EventKind.ENDED, gid, outcome=Outcome.ABORTED, one_phase=one_phase)

    async def deliver(
        self, gid: str, target: str, name: str, method: str, stop: Any, acked: set[str], *, one_phase: bool = False
    ) -> None:
        """One phase-2 message, retried with exponential backoff and full jitter,
        until `stop` says enough; on success `target` joins `acked`.

        The first attempt goes out directly (through the channel's batcher, for a
        Commit); the retry machinery is only built once it failed, so the common
        case costs one RPC.

        Raises:
            RefusedError: the participant answered FAILED_PRECONDITION.
            grpc.aio.AioRpcError: the last failure, once `stop` gives up.
        """
        stub = self._channels.stub(target)
        timeout = self._config.rpc_timeout_s
        log = _log.bind(txn_id=gid, branch=name, method=method)
        send: Callable[[], Awaitable[object]]
        if method == "Commit":
            commit = participant_pb2.CommitRequest(txn_id=gid)
            send = lambda: stub.Commit(commit, timeout=timeout, wait_for_ready=True)  # noqa: E731
        else:
            abort = participant_pb2.AbortRequest(txn_id=gid)
            send = lambda: stub.Abort(abort, timeout=timeout, wait_for_ready=True)  # noqa: E731

        async def attempt() -> None:
            self._channels.sent()
            try:
                await send()
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    raise RefusedError(rpc.describe(e)) from e
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
                if method == "Commit":
                    await self._channels.commits(target).send(gid)
                else:
                    await attempt()
            except grpc.aio.AioRpcError as first_error:
                failed(1, first_error)

                def before_sleep(state: Any) -> None:
                    failed(state.attempt_number + 1, state.outcome.exception() if state.outcome else None)

                async for retry in AsyncRetrying(
                    # Full jitter: concurrent retries to one recovering participant spread out.
                    wait=wait_random_exponential(multiplier=self._config.retry_initial_s, max=self._config.retry_max_s),
                    stop=stop,
                    retry=_RETRY_ON,
                    reraise=True,
                    before_sleep=before_sleep,
                ):
                    with retry:
                        await attempt()
        except RefusedError as e:
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
