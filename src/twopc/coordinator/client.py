"""TransactionsClient: run a transaction on a `twopc coordinator` service.

The thin client of `twopc.v1.Transactions` (protos/twopc/v1/transactions.proto),
for a Python service that does not embed `Coordinator`::

    async with TransactionsClient("127.0.0.1:7000", credentials=Credentials.insecure()) as client:
        result = await client.execute(
            [Branch("wallet", Debit(account="ada", amount=300)), Branch("orders", place)],
            txn_id="order-1042",
        )

A branch's `target` is a participant the service is configured to dial, by name or
address. Execute is idempotent by `txn_id`, so the client retries UNAVAILABLE with
backoff until its deadline; gRPC errors become `ServiceError`, never a raw
`grpc.aio.AioRpcError`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from twopc import rpc
from twopc.config import Credentials
from twopc.errors import ServiceError
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, transactions_pb2, transactions_pb2_grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
_OUTCOMES = {
    coordinator_pb2.OUTCOME_COMMITTED: Outcome.COMMITTED,
    coordinator_pb2.OUTCOME_ABORTED: Outcome.ABORTED,
    coordinator_pb2.OUTCOME_PENDING: Outcome.PENDING,
}
_VOTES = {
    participant_pb2.VOTE_COMMIT: Vote.COMMIT,
    participant_pb2.VOTE_ABORT: Vote.ABORT,
    participant_pb2.VOTE_READ_ONLY: Vote.READ_ONLY,
}


def _retryable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.UNAVAILABLE


class TransactionsClient:
    """A channel to a coordinator service; an async context manager.

    Args:
        target: the service's address, "host:port".
        credentials: transport security (mutual TLS: a certificate whose identity
            the service's `executors` names).
        rpc_timeout_s: how long `execute` and `outcome` keep trying in all
            (retries of UNAVAILABLE included), on top of the transaction's deadline.
    """

    def __init__(self, target: str, *, credentials: Credentials, rpc_timeout_s: float = 10.0) -> None:
        self._channel = rpc.channel(target, credentials)
        self._transactions = transactions_pb2_grpc.TransactionsStub(self._channel)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self.rpc_timeout_s = rpc_timeout_s

    async def __aenter__(self) -> TransactionsClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close(None)

    async def execute(
        self, branches: Sequence[Branch], *, txn_id: str, timeout_s: float | None = None
    ) -> TransactionResult:
        """Runs one transaction on the service and returns how it ended.

        Args:
            branches: one per participant; `target` is a configured participant's
                name or address; `operation` any protobuf message.
            txn_id: your id of the transaction, unique for ever: the retry key.
            timeout_s: the phase-1 deadline; the service's default when None.

        Returns:
            The outcome with each branch's vote and reason. An abort is a result.

        Raises:
            ServiceError: the service refused the request (its status says why), or
                stayed UNAVAILABLE for `rpc_timeout_s`: then retry with the same id.
        """
        request = transactions_pb2.ExecuteRequest(txn_id=txn_id, timeout_s=timeout_s or 0.0)
        for b in branches:
            operation = any_pb2.Any()
            operation.Pack(b.operation)
            request.branches.append(transactions_pb2.BranchRequest(name=b.name, target=b.target, operation=operation))
        answer = await self._call(self._transactions.Execute, request, (timeout_s or 0.0) + self.rpc_timeout_s)
        return TransactionResult(
            txn_id=answer.txn_id,
            outcome=_OUTCOMES[answer.outcome],
            branches=tuple(BranchResult(b.name, b.target, _VOTES.get(b.vote), b.reason) for b in answer.branches),
            completed=False,  # the service answers at the commit point; phase 2 is its business
            reason=answer.reason,
        )

    async def outcome(self, txn_id: str) -> Outcome:
        """What the service's GetOutcome says of a global txn id (`TransactionResult.txn_id`)."""
        request = coordinator_pb2.GetOutcomeRequest(txn_id=txn_id)
        answer = await self._call(self._coordinator.GetOutcome, request, self.rpc_timeout_s)
        return _OUTCOMES[answer.outcome]

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request, budget_s: float
    ) -> Response:
        """`method(request)`, retried on UNAVAILABLE with backoff (every call here is
        idempotent) until `budget_s` is spent; each attempt gets what is left."""
        deadline = time.monotonic() + budget_s
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                stop=stop_after_delay(budget_s),
                reraise=True,
            ):
                with attempt:
                    return await method(request, timeout=max(0.01, deadline - time.monotonic()))
        except grpc.aio.AioRpcError as e:
            raise ServiceError(e.code().name, e.details() or "no details") from None
        raise AssertionError("unreachable: tenacity returns or raises")
