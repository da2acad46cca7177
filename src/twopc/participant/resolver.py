"""In-doubt resolution (rule 6 of docs/design.md): ask the coordinator, apply its answer.

A participant that voted COMMIT and heard nothing for `in_doubt_after_s` asks the
coordinator's GetOutcome about each such transaction, and applies COMMITTED or
ABORTED; PENDING or no answer means ask again later. The same for every kind of
participant: it gets the in-doubt list (`twopc.participant.table.in_doubt`) and a
way to apply a decision. Whom to ask, and how often, is `twopc.participant.trust`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import grpc
import structlog

from twopc import rpc
from twopc.config import Credentials, ParticipantConfig
from twopc.observe import EventKind, Observers
from twopc.participant import trust
from twopc.participant.admission import DecisionRefused
from twopc.participant.table import ABORTED, COMMITTED
from twopc.security import limits
from twopc.types import Outcome
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = structlog.get_logger("twopc.participant.resolver")

_ANSWERED = {
    coordinator_pb2.OUTCOME_COMMITTED: Outcome.COMMITTED,
    coordinator_pb2.OUTCOME_ABORTED: Outcome.ABORTED,
    coordinator_pb2.OUTCOME_PENDING: Outcome.PENDING,
}
_DECIDED = {coordinator_pb2.OUTCOME_COMMITTED: COMMITTED, coordinator_pb2.OUTCOME_ABORTED: ABORTED}

Apply = Callable[[str, str], Awaitable[None]]
"""Applies a decision (COMMITTED or ABORTED) to a txn id; raises `DecisionRefused`."""


class Resolver:
    """Asks coordinators about in-doubt transactions, over channels it keeps open.

    Args:
        config: timing, concurrency and backoff of the questions.
        credentials: transport security of the GetOutcome calls.
        observers: told of each question (IN_DOUBT_ASKED).
        apply: applies an answer.
    """

    def __init__(self, config: ParticipantConfig, credentials: Credentials, observers: Observers, apply: Apply) -> None:
        self.config = config
        self.observers = observers
        self._credentials = credentials
        self._apply = apply
        self._outreach = trust.Outreach(config)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def resolve(self, in_doubt: Iterable[tuple[str, str]]) -> int:
        """Asks about each (txn id, coordinator) once, several coordinators at once,
        each in its own backoff while it does not answer; returns how many were resolved."""
        return await self._outreach.ask(in_doubt, self._ask_coordinator)

    async def close(self) -> None:
        """Closes the channels to the coordinators."""
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close(None)

    async def _ask_coordinator(self, coordinator: str, txn_ids: list[str]) -> tuple[int, bool]:
        """Asks one coordinator about its txn ids, one by one. With several addresses
        (instances sharing a log, `in_doubt`), each txn is asked of them in order
        until one answers COMMITTED or ABORTED; an address that gave no answer is not
        asked again this time, and once none is left it stops. Returns (how many
        resolved, whether any answered)."""
        addresses, owner_log = trust.whom_to_ask(coordinator)
        if not addresses:
            for txn_id in txn_ids:
                _log.warning("in_doubt_no_coordinator", txn_id=txn_id)
            return 0, True  # nobody to ask; only with allow_no_coordinator
        resolved, answered = 0, False
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
                if reply.outcome in _DECIDED and not trust.believed(owner_log, reply.log_id):
                    # Another log's instance (a mistyped schema, a file of its own):
                    # it cannot know this outcome; ask the next.
                    log.error("in_doubt_foreign_log", answer_log=limits.clip(reply.log_id), owner_log=owner_log)
                elif reply.outcome in _DECIDED:
                    outcome = _DECIDED[reply.outcome]
                    break
            if not addresses:
                return resolved, answered
            if outcome is None:
                continue  # PENDING: ask again next round
            try:
                await self._apply(txn_id, outcome)
            except DecisionRefused as e:  # only if the protocol was broken elsewhere
                _log.error("in_doubt_refused", txn_id=txn_id, error=str(e))
                continue
            resolved += 1
        return resolved, True

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = rpc.channel(target, self._credentials)
        return self._channels[target]
