"""The floor: 2PC's message pattern with nothing else, to measure twopc against.

The server (`python -m bench.floor --port 0`) implements `twopc.v1.Participant` with
the generated code and does nothing: Prepare votes COMMIT, Commit and Abort
acknowledge, nothing is parsed, logged or stored. `FloorClient` is a minimal grpc.aio
client that sends what a coordinator sends: the Prepares in parallel, then the
Commits in parallel, on one channel per server, with a deadline on every call.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from twopc import Credentials, rpc
from twopc.v1 import participant_pb2, participant_pb2_grpc


class _Trivial(participant_pb2_grpc.ParticipantServicer):
    async def Prepare(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareResponse:
        return participant_pb2.PrepareResponse(vote=participant_pb2.VOTE_COMMIT)

    async def Commit(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitResponse:
        return participant_pb2.CommitResponse()

    async def Abort(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.AbortResponse:
        return participant_pb2.AbortResponse()

    async def CommitMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitManyResponse:
        # The floor client sends one Commit per transaction: the plain message pattern.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor does not batch")
        raise AssertionError("unreachable")

    async def PrepareMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareManyResponse:
        # The floor client sends one Prepare per branch: the plain message pattern.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor does not batch")
        raise AssertionError("unreachable")


class FloorClient:
    """Sends Prepare to every target at once, then Commit to every target at once.

    Args:
        targets: the servers' addresses.
        operation: the business message packed into every Prepare, so the floor
            carries as many bytes as the transactions it is compared with.
        timeout_s: the deadline of each call.
    """

    def __init__(self, targets: Sequence[str], operation: Message, *, timeout_s: float = 5.0) -> None:
        self._channels = [grpc.aio.insecure_channel(t) for t in targets]
        self._stubs = [participant_pb2_grpc.ParticipantStub(c) for c in self._channels]
        self._operation = any_pb2.Any()
        self._operation.Pack(operation)
        self._timeout_s = timeout_s

    async def txn(self, i: int) -> bool:
        txn_id = uuid.uuid4().hex
        prepare = participant_pb2.PrepareRequest(txn_id=txn_id, operation=self._operation)
        votes = await asyncio.gather(*(s.Prepare(prepare, timeout=self._timeout_s) for s in self._stubs))
        if any(v.vote != participant_pb2.VOTE_COMMIT for v in votes):
            return False
        commit = participant_pb2.CommitRequest(txn_id=txn_id)
        await asyncio.gather(*(s.Commit(commit, timeout=self._timeout_s) for s in self._stubs))
        return True

    async def close(self) -> None:
        for c in self._channels:
            await c.close(None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = rpc.server()
    participant_pb2_grpc.add_ParticipantServicer_to_server(_Trivial(), server)
    await rpc.serve_until_signalled(server, f"{args.host}:{args.port}", Credentials.insecure(), grace_s=0.2)


if __name__ == "__main__":
    asyncio.run(main())
