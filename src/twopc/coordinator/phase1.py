"""Phase 1: every Prepare at once under the transaction's deadline, and the
one-phase commit of a single branch.

The first ABORT vote, error or expired deadline decides ABORT at once: the Prepares
still out are cancelled (a queued one is never sent). Each Prepare names where to
ask for the outcome (this coordinator, its peers) and whose log owns it (rule 12
of docs/design.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from tenacity import stop_after_delay

from twopc import rpc
from twopc.config import CoordinatorConfig
from twopc.coordinator.batching import PrepareFailedError, RefusedError
from twopc.coordinator.channels import Channels
from twopc.coordinator.delivery import Delivery
from twopc.errors import OutcomeUnknownError
from twopc.observe import EventKind, Observers
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote
from twopc.v1 import participant_pb2

_log = structlog.get_logger("twopc.coordinator.phase1")

_VOTES = {
    participant_pb2.VOTE_COMMIT: Vote.COMMIT,
    participant_pb2.VOTE_ABORT: Vote.ABORT,
    participant_pb2.VOTE_READ_ONLY: Vote.READ_ONLY,
}
YES = (Vote.COMMIT, Vote.READ_ONLY)
CANCELLED = "cancelled: another branch decided abort"


@dataclass
class Whom:
    """What every Prepare says about the coordinator (set once it is serving).

    Attributes:
        address: where GetOutcome is served ("" if nowhere).
        peers: the other instances of a shared log.
        log_id: the identity of the log that owns the transactions.
    """

    address: str = ""
    peers: tuple[str, ...] = ()
    log_id: str = ""


class Phase1:
    """Sends a transaction's Prepares and gathers its votes.

    Args:
        config: the one-phase setting and Abort's retry bound.
        channels: the participant channels; Prepares go through their batchers.
        delivery: for the Abort that settles a one-phase commit left unanswered.
        observers: told of every vote.
        whom: what each Prepare says about the coordinator.
    """

    def __init__(
        self, config: CoordinatorConfig, channels: Channels, delivery: Delivery, observers: Observers, whom: Whom
    ) -> None:
        self._config = config
        self._channels = channels
        self._delivery = delivery
        self.observers = observers
        self.whom = whom

    async def votes(self, gid: str, branches: Sequence[Branch], timeout: float, log: Any) -> list[BranchResult]:
        """Every branch's vote, or why it has none (an ABORT elsewhere cancels the rest)."""
        deadline = asyncio.get_running_loop().time() + timeout
        tasks = {
            asyncio.create_task(self.prepare(gid, b, deadline, one_phase=False)): i for i, b in enumerate(branches)
        }
        votes: list[BranchResult | None] = [None] * len(branches)
        pending = set(tasks)
        refused = False  # a branch voted ABORT or gave no vote: the rest are not awaited
        try:
            while pending and not refused:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    votes[tasks[t]] = v = t.result()
                    refused = refused or v.vote not in YES
                    self.observers.emit(
                        EventKind.VOTED, gid, branch=v.name, target=v.target, vote=v.vote, reason=v.reason
                    )
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("prepare_cancelled", branches=[branches[tasks[t]].label for t in pending])
        return [v or BranchResult(b.label, b.target, None, CANCELLED) for v, b in zip(votes, branches, strict=True)]

    async def prepare(self, gid: str, branch: Branch, deadline: float, *, one_phase: bool) -> BranchResult:
        """One branch's Prepare, through its channel's batcher, and its vote."""
        if isinstance(branch.operation, any_pb2.Any):
            operation = branch.operation  # packed already (the Transactions service relays one)
        else:
            operation = any_pb2.Any()
            operation.Pack(branch.operation)
        request = participant_pb2.PrepareRequest(
            txn_id=gid,
            coordinator=self.whom.address,
            operation=operation,
            one_phase=one_phase,
            coordinators=self.whom.peers,
            coordinator_log=self.whom.log_id,
        )
        try:
            reply = await self._channels.prepares(branch.target).send(request, deadline)
        except PrepareFailedError as e:
            _log.info("prepare_failed", txn_id=gid, branch=branch.label, error=str(e))
            return BranchResult(branch.label, branch.target, None, str(e))
        vote = _VOTES.get(reply.vote)
        if vote is None:
            _log.warning("prepare_bad_vote", txn_id=gid, branch=branch.label, vote=reply.vote)
            return BranchResult(branch.label, branch.target, None, f"unspecified vote {reply.vote}")
        _log.debug("voted", txn_id=gid, branch=branch.label, vote=vote.value, reason=reply.reason)
        return BranchResult(branch.label, branch.target, vote, reply.reason if vote is Vote.ABORT else "")

    async def one_phase(self, gid: str, branch: Branch, timeout: float, log: Any) -> TransactionResult:
        """One branch: the participant decides alone, so nothing is logged here.

        A lost answer leaves the outcome with the participant. An Abort settles it:
        either the participant aborts (it had not committed) or it refuses because it
        already committed (FAILED_PRECONDITION), which means COMMITTED.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        vote = await self.prepare(gid, branch, deadline, one_phase=True)
        if vote.vote in YES:
            outcome = Outcome.COMMITTED
        elif vote.vote is Vote.ABORT:
            outcome = Outcome.ABORTED
        else:
            stop = stop_after_delay(self._config.abort_retry_s)
            try:
                await self._delivery.deliver(gid, branch.target, branch.label, "Abort", stop, set(), one_phase=True)
                outcome = Outcome.ABORTED
            except RefusedError:
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
