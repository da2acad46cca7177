"""The Transactions service: `twopc.v1.Transactions/Execute` over a public `Coordinator`.

A process that cannot embed `twopc.Coordinator` (another language, or several
services that should share one coordinator) calls Execute on a `twopc coordinator`
process instead (`twopc.ops.coordinatord`). This servicer is only the boundary:
it validates the request, maps branch targets to the participants the process may
dial, calls `Coordinator.run` with the caller's transaction id, and translates the
result and the errors into the statuses transactions.proto documents. The protocol
itself stays in `Coordinator`.

Idempotency comes from the coordinator's own rules: a txn id committed here is
refused by `run` before any message (DuplicateTransactionError), and is then
answered from the log as COMMITTED; one still running answers UNAVAILABLE. With
several instances on one log, an instance first claims the id (`claims`): a retry
that reaches another instance is answered from the first attempt's outcome and is
never run twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
import structlog

from twopc import rpc
from twopc.coordinator.core import MAX_LOCAL_ID, Coordinator
from twopc.errors import DuplicateTransactionError, TwoPCError
from twopc.security import limits
from twopc.types import Branch, Outcome, TransactionResult, Vote
from twopc.v1 import coordinator_pb2, participant_pb2, transactions_pb2, transactions_pb2_grpc

TRANSACTIONS_SERVICE = transactions_pb2.DESCRIPTOR.services_by_name["Transactions"].full_name

_log = structlog.get_logger("twopc.coordinator.service")

PB_OUTCOME = {
    Outcome.COMMITTED: coordinator_pb2.OUTCOME_COMMITTED,
    Outcome.ABORTED: coordinator_pb2.OUTCOME_ABORTED,
    Outcome.PENDING: coordinator_pb2.OUTCOME_PENDING,
}
PB_VOTE = {
    None: participant_pb2.VOTE_UNSPECIFIED,
    Vote.COMMIT: participant_pb2.VOTE_COMMIT,
    Vote.ABORT: participant_pb2.VOTE_ABORT,
    Vote.READ_ONLY: participant_pb2.VOTE_READ_ONLY,
}


class Claims(Protocol):
    """Who runs a caller's txn id among instances sharing a log (`twopc.coordinator.claims`)."""

    async def claim(self, txn_id: str, gid: str) -> str:
        """The global id of the attempt that owns `txn_id`: `gid` if it is this one."""
        ...


class TransactionsServicer(transactions_pb2_grpc.TransactionsServicer):
    """Execute, over `coordinator`, with branches only to the participants it may dial.

    Args:
        coordinator: an entered `Coordinator` (its log read).
        participants: name -> target of every participant a branch may target
            (`host:port`, or `identity@host:port` to dial it bound to its
            certificate's name); a branch names one by name or by address. Nothing
            else is dialled, so a caller cannot turn the coordinator against an
            arbitrary address.
        claims: with a log shared by several instances, where the caller's ids are
            claimed (`twopc.coordinator.claims.PostgresClaims`); None for a log of
            one owner.
    """

    def __init__(
        self, coordinator: Coordinator, participants: Mapping[str, str], *, claims: Claims | None = None
    ) -> None:
        self.coordinator = coordinator
        self._claims = claims
        self._targets = {**{rpc.split_target(t)[1]: t for t in participants.values()}, **participants}
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serves Execute on `server`."""
        transactions_pb2_grpc.add_TransactionsServicer_to_server(self, server)

    async def drain(self, timeout_s: float) -> bool:
        """Takes no new Execute; waits up to `timeout_s` for those in flight and their
        phase 2. What is left is on disk: recovery finishes it after a restart."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return await self.coordinator.wait_idle(max(0.0, deadline - loop.time()))

    async def Execute(  # noqa: N802 - the RPC's name
        self, request: transactions_pb2.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> transactions_pb2.ExecuteResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down; retry")
        try:
            branches = self._branches(request)
        except _NotConfiguredError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except limits.LimitError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._execute(request, branches, context)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _execute(
        self,
        request: transactions_pb2.ExecuteRequest,
        branches: list[Branch],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> transactions_pb2.ExecuteResponse:
        log = _log.bind(txn_id=request.txn_id)
        if self._claims is not None:
            gid = self.coordinator.global_id(request.txn_id)
            try:
                owner = await self._claims.claim(request.txn_id, gid)
            except TwoPCError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{limits.clip(str(e))}; retry with the same txn_id")
            if owner != gid:  # another instance ran it: answer from its outcome, never run it again
                return await self._elsewhere(owner, branches, context)
        try:
            result = await self.coordinator.run(branches, timeout_s=request.timeout_s or None, txn_id=request.txn_id)
        except DuplicateTransactionError as e:
            if e.state == "aborted":  # an earlier attempt's COMMIT write was settled as aborted: that stands
                log.info("execute_answered_again", outcome="aborted")
                return _aborted_again(e.txn_id)
            if e.state != "committed":
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{request.txn_id} is being decided; retry")
            log.info("execute_answered_again", outcome="committed")
            return _committed_again(e.txn_id, branches)
        except TwoPCError as e:
            # Closed or closing, a failed or unreachable log, a fenced instance, a
            # one-branch outcome unknown: nothing the request did; a retry by id is safe.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{limits.clip(str(e))}; retry with the same txn_id")
        except ValueError as e:  # what `_branches` did not foresee; nothing was sent
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, limits.clip(str(e)))
        return response(result)

    async def _elsewhere(
        self, gid: str, branches: list[Branch], context: grpc.aio.ServicerContext[Any, Any]
    ) -> transactions_pb2.ExecuteResponse:
        """The answer to a retry of a txn id another instance of the log ran as `gid`."""
        try:
            outcome = await self.coordinator.outcome(gid)
        except TwoPCError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{limits.clip(str(e))}; retry with the same txn_id")
        _log.info("execute_answered_again", txn_id=gid, outcome=outcome.value)
        if outcome is Outcome.COMMITTED:
            return _committed_again(gid, branches)
        if outcome is Outcome.ABORTED:
            return _aborted_again(gid)
        # PENDING: its instance may still decide it, or decided abort (only it can tell).
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"{gid} is another instance's and not decided here yet; retry (there)"
        )
        raise AssertionError("unreachable: abort raises")

    def _branches(self, request: transactions_pb2.ExecuteRequest) -> list[Branch]:
        """The request's branches, checked against limits and the participants
        configured; LimitError (INVALID_ARGUMENT) otherwise."""
        limits.check_id("txn_id", request.txn_id, max_len=MAX_LOCAL_ID)
        if not request.branches:
            raise limits.LimitError("branches are required")
        limits.check_count("branches", len(request.branches), limits.MAX_BRANCHES)
        limits.check_timeout("timeout_s", request.timeout_s)
        branches = []
        for b in request.branches:
            limits.check_id("branch name", b.name, required=False)
            limits.check_id("branch target", b.target, max_len=limits.MAX_ADDRESS_LEN)
            if not b.HasField("operation") or not b.operation.type_url:
                raise limits.LimitError(f"branch {b.name or b.target!r} has no operation")
            if len(b.operation.value) > limits.MAX_OPERATION_BYTES:
                raise limits.LimitError(f"an operation is limited to {limits.MAX_OPERATION_BYTES} bytes")
            address = self._targets.get(b.target)
            if address is None:
                raise _NotConfiguredError(b.target)
            branches.append(Branch(address, b.operation, name=b.name or b.target))
        if len({b.target for b in branches}) != len(branches):
            raise limits.LimitError("two branches name the same target; give each participant one branch")
        return branches


class _NotConfiguredError(limits.LimitError):
    """A target outside the configured participants (FAILED_PRECONDITION)."""

    def __init__(self, target: str) -> None:
        super().__init__(f"target {limits.clip(target, 80)!r} is not a participant this coordinator may dial")


def response(result: TransactionResult) -> transactions_pb2.ExecuteResponse:
    """`result` as Execute answers it."""
    return transactions_pb2.ExecuteResponse(
        txn_id=result.txn_id,
        outcome=PB_OUTCOME[result.outcome],
        reason=result.reason,
        branches=[
            transactions_pb2.BranchResult(name=b.name, target=b.target, vote=PB_VOTE[b.vote], reason=b.reason)
            for b in result.branches
        ],
    )


def _aborted_again(txn_id: str) -> transactions_pb2.ExecuteResponse:
    """A retry of an aborted transaction."""
    reason = "an earlier attempt with this txn_id aborted"
    return transactions_pb2.ExecuteResponse(txn_id=txn_id, outcome=coordinator_pb2.OUTCOME_ABORTED, reason=reason)


def _committed_again(txn_id: str, branches: list[Branch]) -> transactions_pb2.ExecuteResponse:
    """A retry of a committed transaction: every branch voted COMMIT (or it would
    not have committed)."""
    return transactions_pb2.ExecuteResponse(
        txn_id=txn_id,
        outcome=coordinator_pb2.OUTCOME_COMMITTED,
        branches=[
            transactions_pb2.BranchResult(name=b.label, target=b.target, vote=participant_pb2.VOTE_COMMIT)
            for b in branches
        ],
    )
