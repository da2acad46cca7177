"""GetOutcome: what a participant in doubt is told, and from which log.

A coordinator answers from memory first (in flight, committed without END,
uncertain), then from its decision log (rules 5, 11 and 12 of docs/design.md).
Every answer names the log it was read from, so a participant takes a decided
answer only from the owner's log; and at start an instance asks each of its peers
the same way, refusing one that answers from another log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog

from twopc import rpc
from twopc.config import Credentials
from twopc.errors import ForeignPeerError, TwoPCError
from twopc.observe import EventKind, Observers
from twopc.security import limits
from twopc.types import Outcome
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = structlog.get_logger("twopc.coordinator.outcomes")

PB_OUTCOME = {
    Outcome.COMMITTED: coordinator_pb2.OUTCOME_COMMITTED,
    Outcome.ABORTED: coordinator_pb2.OUTCOME_ABORTED,
    Outcome.PENDING: coordinator_pb2.OUTCOME_PENDING,
}


class OutcomeServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """The Coordinator service.

    Args:
        answer: the outcome of a global id (memory, then the log).
        ready: whether the log is read (before, an ABORTED could contradict a logged COMMIT).
        log_id: the identity of the log answers are read from.
        observers: told of every answer.
    """

    def __init__(
        self,
        answer: Callable[[str], Awaitable[Outcome]],
        ready: Callable[[], bool],
        log_id: Callable[[], str],
        observers: Observers,
    ) -> None:
        self._answer = answer
        self._ready = ready
        self._log_id = log_id
        self._observers = observers

    async def GetOutcome(  # noqa: N802 - the RPC's name
        self, request: coordinator_pb2.GetOutcomeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetOutcomeResponse:
        await rpc.validate(context, lambda: limits.check_txn_id(request.txn_id))
        if not self._ready():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is starting or stopped; ask again")
        try:
            outcome = await self._answer(request.txn_id)
        except TwoPCError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the decision log cannot be read: {e}")
        _log.info("outcome_asked", txn_id=request.txn_id, outcome=coordinator_pb2.Outcome.Name(PB_OUTCOME[outcome]))
        self._observers.emit(EventKind.OUTCOME_ANSWERED, request.txn_id, outcome=outcome)
        return coordinator_pb2.GetOutcomeResponse(outcome=PB_OUTCOME[outcome], log_id=self._log_id())


async def check_peers(
    peers: Sequence[str],
    *,
    probe: str,
    log_id: str,
    credentials: Credentials,
    interceptors: Sequence[Any],
    timeout_s: float,
) -> None:
    """Rule 12: asks each peer which log it answers from, and refuses one on another
    log. A peer that does not answer now (not started yet, or not letting
    coordinators ask) is named anyway: participants check the log of every answer.

    Args:
        peers: the GetOutcome addresses to ask.
        probe: a txn id of this instance's to ask about (any answer will do).
        log_id: this coordinator's log identity.
        credentials: transport security for the calls.
        interceptors: client interceptors for the calls.
        timeout_s: the deadline of each call.

    Raises:
        ForeignPeerError: a peer answered from another log.
    """
    request = coordinator_pb2.GetOutcomeRequest(txn_id=probe)

    async def ask(peer: str) -> str | None:
        try:
            async with rpc.channel(peer, credentials, interceptors) as channel:
                reply = await coordinator_pb2_grpc.CoordinatorStub(channel).GetOutcome(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            _log.warning("peer_unverified", peer=peer, error=rpc.describe(e))
            return None
        return reply.log_id

    for peer, found in zip(peers, await asyncio.gather(*(ask(p) for p in peers)), strict=True):
        if not found:  # no answer, or a twopc that predates log ids: cannot tell
            if found == "":
                _log.warning("peer_unverified", peer=peer, error="it names no log (an older twopc)")
            continue
        if found != log_id:
            raise ForeignPeerError(
                f"peer {peer} answers from decision log {found}, this coordinator's is {log_id}:"
                " check the peer's log URL (its ?schema=)"
            )
        _log.info("peer_verified", peer=peer, log_id=found)
