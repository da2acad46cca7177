"""Prepares bound for one participant, batched while an earlier message is in flight.

Under load most of a Python gRPC call's cost is per message, not per byte. So the
coordinator sends a participant one Prepare at a time, and the Prepares that queue
for it while that message is in flight go out together as one `PrepareMany` (and
share the participant's fsync). There is no timer: a lone Prepare goes out at once,
as a plain `Prepare`, so one transaction in flight pays nothing for the batching.

Each transaction keeps what it has with a plain Prepare:

* its own deadline: the item carries the time it has left (the participant checks
  it), the message's gRPC deadline is the latest item's, and the waiter gives up at
  its own deadline whatever the batch does;
* its own vote, or its own failure (the status Prepare would have answered);
* its own early abort: a transaction that decides ABORT while its Prepare is still
  queued is never sent (its waiter is cancelled, and with it the queued item); one
  already in flight is aborted as with a plain Prepare, by the Abort that follows.

A participant without PrepareMany (UNIMPLEMENTED) gets plain Prepares from then on.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2

from twopc import rpc
from twopc.v1 import participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.coordinator.core")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class PrepareFailedError(Exception):
    """The Prepare got no vote: an RPC failure, a per-item status, or its deadline.

    The message is the one-line description the coordinator reports as the reason.
    """


@dataclass(slots=True)
class _Queued:
    request: participant_pb2.PrepareRequest
    deadline: float  # the event loop's clock
    future: asyncio.Future[participant_pb2.PrepareResponse]


class PrepareBatcher:
    """The Prepares for one participant: `in_flight` messages in flight at a time.

    Args:
        target: the participant's address, for the logs.
        stub: the participant's stub (the coordinator's, reused).
        limit: the most items one PrepareMany carries; the oldest go first.
        spawn: starts the sender as a background task the owner cancels on close.
        sent: called once for every message sent (the coordinator's count).
        in_flight: messages (Prepare or PrepareMany) in flight to it at once.
    """

    def __init__(
        self,
        target: str,
        stub: participant_pb2_grpc.ParticipantAsyncStub,
        *,
        limit: int,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        sent: Callable[[], None],
        in_flight: int = 1,
    ) -> None:
        self._target = target
        self._stub = stub
        self._limit = limit
        self._spawn = spawn
        self._sent = sent
        self._max_in_flight = in_flight
        self._queue: collections.deque[_Queued] = collections.deque()
        self._in_flight = 0  # messages to this participant now in flight
        self._items_in_flight = 0  # the Prepares they carry
        self.supported = True  # False once the participant answered UNIMPLEMENTED

    async def prepare(
        self, request: participant_pb2.PrepareRequest, deadline: float
    ) -> participant_pb2.PrepareResponse:
        """Returns the participant's answer to `request`, due by `deadline` (the event
        loop's clock). Cancelling the caller withdraws a queued item.

        Raises:
            PrepareFailedError: no vote came back in time, or the participant
                answered this item with an error status.
        """
        if not self.supported:
            return await self._unary(request, deadline)
        if self._in_flight < self._max_in_flight and not self._queue:
            self._in_flight += 1
            self._items_in_flight += 1
            try:
                return await self._unary(request, deadline)
            finally:
                self._in_flight -= 1
                self._items_in_flight -= 1
                self._next()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[participant_pb2.PrepareResponse] = loop.create_future()
        self._queue.append(_Queued(request, deadline, future))
        timer = loop.call_at(deadline, _expire, future)
        try:
            self._next()
            return await future
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED and not self.supported:
                return await self._unary(request, deadline)  # no PrepareMany there: this is the first try
            raise PrepareFailedError(rpc.describe(e)) from e
        finally:
            timer.cancel()

    async def _unary(self, request: participant_pb2.PrepareRequest, deadline: float) -> participant_pb2.PrepareResponse:
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            raise PrepareFailedError("deadline passed before Prepare was sent")
        self._sent()
        try:
            # wait_for_ready: a participant that just restarted is reached within the
            # deadline instead of failing fast on a channel still backing off.
            return await self._stub.Prepare(request, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise PrepareFailedError(rpc.describe(e)) from e

    def _next(self) -> None:
        """A message slot is free: what queued goes out now, the oldest first.

        With several messages in flight, a message carries at most its share of all
        the Prepares outstanding (queued and in flight, over the slots): otherwise the
        slot that frees first would take the whole queue, and its items would wait
        for one long batch while the other slots carry one item each.
        """
        while self._queue and self._in_flight < self._max_in_flight:
            now = asyncio.get_running_loop().time()
            share = -(-(len(self._queue) + self._items_in_flight) // self._max_in_flight)
            limit = min(self._limit, share)
            batch: list[_Queued] = []
            while self._queue and len(batch) < limit:
                item = self._queue.popleft()
                if item.future.done():  # withdrawn (decided abort) or expired: never sent
                    continue
                if item.deadline <= now:
                    _expire(item.future)
                    continue
                batch.append(item)
            if batch:
                self._in_flight += 1
                self._items_in_flight += len(batch)
                self._spawn(self._send(batch, now))

    async def _send(self, batch: list[_Queued], now: float) -> None:
        try:
            await self._send_batch(batch, now)
        finally:
            self._in_flight -= 1
            self._items_in_flight -= len(batch)
            for item in batch:
                item.future.cancel()  # only if this was cancelled (close): answered ones are done
            self._next()

    async def _send_batch(self, batch: list[_Queued], now: float) -> None:
        items = []
        for item in batch:
            timeout = duration_pb2.Duration()
            timeout.FromNanoseconds(int((item.deadline - now) * 1e9))
            items.append(participant_pb2.PrepareManyRequest.Item(prepare=item.request, timeout=timeout))
        self._sent()
        try:
            reply = await self._stub.PrepareMany(
                participant_pb2.PrepareManyRequest(items=items),
                timeout=max(item.deadline for item in batch) - now,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED and self.supported:
                self.supported = False
                _log.info("prepare_many_unsupported", branch=self._target, fallback="Prepare")
            _fail(batch, e)
            return
        except Exception as e:  # noqa: BLE001 - every waiter hears of it
            _fail(batch, PrepareFailedError(f"PrepareMany failed: {e!r}"))
            return
        if len(reply.results) != len(batch):
            _fail(batch, PrepareFailedError(f"PrepareMany answered {len(reply.results)} results for {len(batch)}"))
            return
        for item, result in zip(batch, reply.results, strict=True):
            if item.future.done():
                continue
            if result.code:
                code = _CODES.get(result.code)
                name = code.name if code is not None else f"status {result.code}"
                item.future.set_exception(PrepareFailedError(f"{name}: {result.message or 'no details'}"))
            else:
                item.future.set_result(result.response)


def _fail(batch: list[_Queued], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _expire(future: asyncio.Future[participant_pb2.PrepareResponse]) -> None:
    if not future.done():
        future.set_exception(PrepareFailedError("DEADLINE_EXCEEDED: no answer before the deadline"))
