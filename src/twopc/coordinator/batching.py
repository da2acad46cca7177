"""Messages bound for one participant, batched while earlier ones are in flight.

Under load most of a Python gRPC call's cost is per message, not per byte. So the
coordinator keeps at most `batches_in_flight` messages in flight to a participant
for each kind of request (Prepare, Commit), and the requests that queue meanwhile
go out together as one `PrepareMany` or `CommitMany` (and share the participant's
fsync). There is no timer: a lone request goes out at once, from its caller's own
task, so one transaction in flight pays nothing for the batching.

One `Batcher` does this for both kinds; `prepares` and `commits` give it the RPCs.
Each request keeps what it would have alone:

* its own deadline (a Prepare's item carries the time it has left, the message's
  gRPC deadline is the latest item's, and the waiter gives up at its own deadline
  whatever the batch does);
* its own answer, or its own failure (the status the single RPC would have had);
* its own early abort: a Prepare withdrawn while still queued (its transaction
  decided ABORT) is never sent. A Commit is never withdrawn: it is owed.

A participant that answers the batch RPC with UNIMPLEMENTED gets single RPCs from
then on, the requests already queued included: no second batch is sent to it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2

from twopc import rpc
from twopc.v1 import participant_pb2, participant_pb2_grpc

_log = structlog.get_logger("twopc.coordinator.batching")
_CODES = {code.value[0]: code for code in grpc.StatusCode}

Q = TypeVar("Q")  # one request: a PrepareRequest, or a Commit's txn id
A = TypeVar("A")  # its answer


class PrepareFailedError(Exception):
    """The Prepare got no vote: an RPC failure, a per-item status, or its deadline.

    The message is the one-line description the coordinator reports as the reason.
    """


class RefusedError(Exception):
    """A participant answered phase 2 with FAILED_PRECONDITION: retrying cannot help."""


@dataclass(slots=True)
class _Queued(Generic[Q, A]):
    request: Q
    deadline: float | None  # the event loop's clock; None: the message's own timeout
    future: asyncio.Future[A]


@dataclass(frozen=True)
class Rpcs(Generic[Q, A]):
    """How one kind of request reaches a participant.

    Attributes:
        name: the batch RPC's name, for the logs ("PrepareMany").
        single: sends one request alone, by its deadline.
        many: sends a batch of (request, deadline) as one message; returns each
            item's answer or its own error, in order; raises for the message.
        lone_in_batch: a lone request goes out through `many` (as a batch of one),
            not `single`: a Commit, so that CommitMany is used from the first.
        withdrawn_on_cancel: a queued request whose caller is cancelled is dropped.
        failed: what a waiter raises when the whole message failed with an RPC
            error other than UNIMPLEMENTED.
        expired: what a queued request's waiter raises at its deadline.
    """

    name: str
    single: Callable[[Q, float | None], Awaitable[A]]
    many: Callable[[list[tuple[Q, float | None]], float], Awaitable[list[A | BaseException]]]
    lone_in_batch: bool
    withdrawn_on_cancel: bool
    failed: Callable[[grpc.aio.AioRpcError], BaseException]
    expired: Callable[[], BaseException]


class Batcher(Generic[Q, A]):
    """One kind of request to one participant: at most `in_flight` messages at a time.

    Args:
        target: the participant's address, for the logs.
        rpcs: the kind (`prepares`, `commits`).
        limit: the most requests one batch carries; the oldest go first.
        in_flight: messages of this kind in flight to the participant at a time
            (`CoordinatorConfig.batches_in_flight`).
        spawn: starts a batch's sender as a task the coordinator cancels on close.
    """

    def __init__(
        self,
        target: str,
        rpcs: Rpcs[Q, A],
        *,
        limit: int,
        in_flight: int,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._target = target
        self._rpcs = rpcs
        self._limit = limit
        self._in_flight_max = in_flight
        self._spawn = spawn
        self._queue: collections.deque[_Queued[Q, A]] = collections.deque()
        self._in_flight = 0  # messages of this kind now in flight
        self._items_in_flight = 0  # the requests they carry
        self._unimplemented: grpc.aio.AioRpcError | None = None  # the participant has no batch RPC

    @property
    def supported(self) -> bool:
        """False once the participant answered the batch RPC with UNIMPLEMENTED."""
        return self._unimplemented is None

    @property
    def queued(self) -> int:
        """Requests waiting behind the messages in flight."""
        return len(self._queue)

    async def send(self, request: Q, deadline: float | None = None) -> A:
        """Returns the participant's answer to `request`, due by `deadline` (the event
        loop's clock; None: each message's own timeout).

        Raises:
            BaseException: what the kind's RPCs raise for this request (its own
                error, the message's `failed`, or `expired`).
        """
        if not self.supported:
            return await self._rpcs.single(request, deadline)
        if self._in_flight < self._in_flight_max and not self._queue:
            return await self._lone(request, deadline)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[A] = loop.create_future()
        future.add_done_callback(_consume)
        self._queue.append(_Queued(request, deadline, future))
        timer = None if deadline is None else loop.call_at(deadline, self._expire, future)
        try:
            self._next()
            return await (future if self._rpcs.withdrawn_on_cancel else asyncio.shield(future))
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED and not self.supported:
                return await self._rpcs.single(request, deadline)  # the first try of this request
            raise _mapped(self._rpcs, e)  # noqa: B904 - _mapped sets the cause, none if it is `e` itself
        finally:
            if timer is not None:
                timer.cancel()

    async def _lone(self, request: Q, deadline: float | None) -> A:
        """Nothing queued and a slot free: the request goes out now, from its caller's task."""
        self._in_flight += 1
        self._items_in_flight += 1
        try:
            if not self._rpcs.lone_in_batch:
                return await self._rpcs.single(request, deadline)
            try:
                [answer] = await self._rpcs.many([(request, deadline)], asyncio.get_running_loop().time())
            except grpc.aio.AioRpcError as e:
                if self._note_unimplemented(e):
                    return await self._rpcs.single(request, deadline)
                raise _mapped(self._rpcs, e)  # noqa: B904 - _mapped sets the cause, none if it is `e` itself
            if isinstance(answer, BaseException):
                raise answer
            return answer
        finally:
            self._in_flight -= 1
            self._items_in_flight -= 1
            self._next()

    def _next(self) -> None:
        """A message slot is free: what queued goes out now, the oldest first.

        With several messages in flight, a message carries at most its share of all
        the requests outstanding (queued and in flight, over the slots): otherwise
        the slot that frees first would take the whole queue, and its requests would
        wait for one long batch while the other slots carry one each.
        """
        if self._unimplemented is not None:
            # No batch RPC there: every queued request goes out alone, from its waiter.
            while self._queue:
                _settle(self._queue.popleft().future, self._unimplemented)
            return
        while self._queue and self._in_flight < self._in_flight_max:
            now = asyncio.get_running_loop().time()
            share = -(-(len(self._queue) + self._items_in_flight) // self._in_flight_max)  # ceiling
            limit = min(self._limit, share)
            batch: list[_Queued[Q, A]] = []
            while self._queue and len(batch) < limit:
                item = self._queue.popleft()
                if item.future.done():  # withdrawn or expired: never sent
                    continue
                if item.deadline is not None and item.deadline <= now:
                    self._expire(item.future)
                    continue
                batch.append(item)
            if batch:
                self._in_flight += 1
                self._items_in_flight += len(batch)
                self._spawn(self._send(batch, now))

    async def _send(self, batch: list[_Queued[Q, A]], now: float) -> None:
        try:
            try:
                answers = await self._rpcs.many([(i.request, i.deadline) for i in batch], now)
            except grpc.aio.AioRpcError as e:
                self._note_unimplemented(e)
                for item in batch:
                    _settle(item.future, e)  # the waiter maps it (or falls back)
                return
            except Exception as e:  # noqa: BLE001 - every waiter hears of it
                for item in batch:
                    _settle(item.future, e)
                return
            for item, answer in zip(batch, answers, strict=True):
                _settle(item.future, answer)
        finally:
            self._in_flight -= 1
            self._items_in_flight -= len(batch)
            for item in batch:
                item.future.cancel()  # only if this was cancelled (close): answered ones are done
            self._next()

    def _note_unimplemented(self, error: grpc.aio.AioRpcError) -> bool:
        if error.code() is not grpc.StatusCode.UNIMPLEMENTED:
            return False
        if self._unimplemented is None:
            self._unimplemented = error
            fallback = self._rpcs.name.removesuffix("Many")
            _log.info(f"{_snake(self._rpcs.name)}_unsupported", branch=self._target, fallback=fallback)
        return True

    def _expire(self, future: asyncio.Future[A]) -> None:
        _settle(future, self._rpcs.expired())


def _mapped(rpcs: Rpcs[Any, Any], error: grpc.aio.AioRpcError) -> BaseException:
    """What a waiter raises for a failed message (the kind's `failed`), caused by it."""
    mapped = rpcs.failed(error)
    if mapped is not error:
        mapped.__cause__ = error
    return mapped


def _snake(name: str) -> str:
    """ "PrepareMany" -> "prepare_many", for event names."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _settle(future: asyncio.Future[Any], answer: object) -> None:
    if future.done():
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


def _consume(future: asyncio.Future[Any]) -> None:
    """Marks a queued request's error as seen: its waiter may have gone away."""
    if not future.cancelled():
        future.exception()


# --- the two kinds -------------------------------------------------------------------


def prepares(
    stub: participant_pb2_grpc.ParticipantAsyncStub, sent: Callable[[], None]
) -> Rpcs[participant_pb2.PrepareRequest, participant_pb2.PrepareResponse]:
    """Prepare and PrepareMany; every failure is a PrepareFailedError (no vote)."""

    async def single(
        request: participant_pb2.PrepareRequest, deadline: float | None
    ) -> participant_pb2.PrepareResponse:
        assert deadline is not None  # a Prepare always has one
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            raise PrepareFailedError("deadline passed before Prepare was sent")
        sent()
        try:
            # wait_for_ready: a participant that just restarted is reached within the
            # deadline instead of failing fast on a channel still backing off.
            return await stub.Prepare(request, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise PrepareFailedError(rpc.describe(e)) from e

    async def many(
        batch: list[tuple[participant_pb2.PrepareRequest, float | None]], now: float
    ) -> list[participant_pb2.PrepareResponse | BaseException]:
        items = []
        for request, deadline in batch:
            assert deadline is not None
            timeout = duration_pb2.Duration()
            timeout.FromNanoseconds(int((deadline - now) * 1e9))
            items.append(participant_pb2.PrepareManyRequest.Item(prepare=request, timeout=timeout))
        sent()
        try:
            reply = await stub.PrepareMany(
                participant_pb2.PrepareManyRequest(items=items),
                timeout=max(d for _, d in batch if d is not None) - now,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError:
            raise
        except Exception as e:
            raise PrepareFailedError(f"PrepareMany failed: {e!r}") from e
        if len(reply.results) != len(batch):
            raise PrepareFailedError(f"PrepareMany answered {len(reply.results)} results for {len(batch)}")
        return [_item_answer(result) for result in reply.results]

    return Rpcs(
        name="PrepareMany",
        single=single,
        many=many,
        lone_in_batch=False,
        withdrawn_on_cancel=True,
        failed=lambda e: PrepareFailedError(rpc.describe(e)),
        expired=lambda: PrepareFailedError("DEADLINE_EXCEEDED: no answer before the deadline"),
    )


def _item_answer(
    result: participant_pb2.PrepareManyResponse.Result,
) -> participant_pb2.PrepareResponse | BaseException:
    if not result.code:
        return result.response
    code = _CODES.get(result.code)
    name = code.name if code is not None else f"status {result.code}"
    return PrepareFailedError(f"{name}: {result.message or 'no details'}")


def commits(
    stub: participant_pb2_grpc.ParticipantAsyncStub, sent: Callable[[], None], timeout_s: float
) -> Rpcs[str, None]:
    """Commit and CommitMany, each message with `timeout_s`. A refusal is a
    RefusedError; an RPC failure stays a grpc.aio.AioRpcError (phase 2 retries it)."""

    async def single(txn_id: str, deadline: float | None) -> None:
        sent()
        try:
            await stub.Commit(participant_pb2.CommitRequest(txn_id=txn_id), timeout=timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                raise RefusedError(rpc.describe(e)) from e
            raise

    async def many(batch: list[tuple[str, float | None]], now: float) -> list[BaseException | None]:
        sent()
        request = participant_pb2.CommitManyRequest(txn_ids=[t for t, _ in batch])
        reply = await stub.CommitMany(request, timeout=timeout_s, wait_for_ready=True)
        return [RefusedError(reply.refused[t]) if t in reply.refused else None for t, _ in batch]

    return Rpcs(
        name="CommitMany",
        single=single,
        many=many,
        lone_in_batch=True,
        withdrawn_on_cancel=False,
        failed=lambda e: e,
        expired=lambda: TimeoutError("never sent"),  # a Commit has no deadline of its own
    )


def batchers(
    target: str,
    stub: participant_pb2_grpc.ParticipantAsyncStub,
    *,
    max_prepare_batch: int,
    max_commit_batch: int,
    in_flight: int,
    rpc_timeout_s: float,
    spawn: Callable[[Coroutine[Any, Any, None]], object],
    sent: Callable[[], None],
) -> tuple[
    Batcher[participant_pb2.PrepareRequest, participant_pb2.PrepareResponse],
    Batcher[str, None],
]:
    """The Prepare and Commit batchers of one participant channel."""
    return (
        Batcher(target, prepares(stub, sent), limit=max_prepare_batch, in_flight=in_flight, spawn=spawn),
        Batcher(target, commits(stub, sent, rpc_timeout_s), limit=max_commit_batch, in_flight=in_flight, spawn=spawn),
    )
