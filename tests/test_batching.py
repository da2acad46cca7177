"""Phase-2 Commits batched per participant (CommitMany), and the fallback without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from tests.conftest import FAST, INSECURE, Kv, op
from twopc import Branch, Coordinator, Outcome, rpc
from twopc.v1 import participant_pb2, participant_pb2_grpc


async def test_commit_many_commits_each_and_reports_refusals(start_kv: Callable[..., Kv]) -> None:
    """CommitMany commits every prepared txn, lists the ones Commit would refuse, and
    rejects an empty request."""
    kv = start_kv()
    async with grpc.aio.insecure_channel(kv.target) as ch:
        stub = participant_pb2_grpc.ParticipantStub(ch)
        for txn in ("t1", "t2"):
            packed = any_pb2.Any()
            packed.Pack(op(key=txn, amount=1))
            await stub.Prepare(participant_pb2.PrepareRequest(txn_id=txn, operation=packed), timeout=5)
        reply = await stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t1", "t2", "never"]), timeout=5)
        assert dict(reply.refused).keys() == {"never"} and "never prepared" in reply.refused["never"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CommitMany(participant_pb2.CommitManyRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert kv.state("t1") == kv.state("t2") == "COMMITTED" and kv.state("never") is None
    assert sorted(t for t, *_ in kv.applied()) == ["t1", "t2"]


async def test_concurrent_commits_share_messages(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """Forty concurrent transactions over two participants all commit with fewer phase-2
    messages than one per branch: Commits queued behind an in-flight batch ride together."""
    a, b = start_kv("a"), start_kv("b")
    assert (await coordinator.run([a.branch(), b.branch()])).committed  # warm the channels
    sent = coordinator.messages_sent
    results = await asyncio.gather(*(coordinator.run([a.branch(), b.branch()]) for _ in range(40)))
    assert all(r.outcome is Outcome.COMMITTED and r.completed for r in results)
    prepares = 2 * 40
    assert coordinator.messages_sent - sent - prepares < 2 * 40
    assert len(a.applied()) == len(b.applied()) == 41


class _NoBatching(participant_pb2_grpc.ParticipantServicer):
    """A participant that predates CommitMany: the generated servicer answers UNIMPLEMENTED."""

    committed: list[str]

    def __init__(self) -> None:
        self.committed = []

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:  # noqa: N802
        return participant_pb2.PrepareResponse(vote=participant_pb2.VOTE_COMMIT)

    async def Commit(self, request: Any, context: Any) -> participant_pb2.CommitResponse:  # noqa: N802
        self.committed.append(request.txn_id)
        return participant_pb2.CommitResponse()

    async def Abort(self, request: Any, context: Any) -> participant_pb2.AbortResponse:  # noqa: N802
        return participant_pb2.AbortResponse()

    CommitMany = participant_pb2_grpc.ParticipantServicer.CommitMany


@pytest.fixture
async def old_participant() -> AsyncIterator[tuple[str, _NoBatching]]:
    servicer = _NoBatching()
    server = rpc.server()
    participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)
    port = rpc.add_port(server, "127.0.0.1:0", INSECURE)
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


async def test_participant_without_commit_many_gets_single_commits(
    tmp_path: Path, old_participant: tuple[str, _NoBatching], start_kv: Callable[..., Kv]
) -> None:
    """A participant that answers CommitMany with UNIMPLEMENTED still gets every Commit,
    one by one, and the transactions commit."""
    target, servicer = old_participant
    kv = start_kv()
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
        for _ in range(3):
            result = await c.run([Branch(target, op(key="x")), kv.branch()])
            assert result.outcome is Outcome.COMMITTED and result.completed
    assert len(servicer.committed) == 3 and len(kv.applied()) == 3
