"""Phase-2 Commits batched per participant (CommitMany), and the fallback without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from structlog.testing import capture_logs

from tests.apps.kv import KV
from tests.conftest import FAST, INSECURE, Kv, op
from twopc import Branch, Coordinator, Outcome, Participant, ParticipantConfig, SqliteDecisionLog, rpc
from twopc.testing import query
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
    with capture_logs() as events:
        async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
            for _ in range(3):
                result = await c.run([Branch(target, op(key="x")), kv.branch()])
                assert result.outcome is Outcome.COMMITTED and result.completed
    assert len(servicer.committed) == 3 and len(kv.applied()) == 3
    # Said once, as what it is; a Commit that was never refused is no retry.
    assert [e["event"] for e in events if e["event"] in ("commit_many_unsupported", "phase2_retry")] == [
        "commit_many_unsupported"
    ]


class _Recording(Participant):
    """The real helper, recording the size of every CommitMany it serves; each takes a
    little while, as a participant under load does, so that Commits queue behind it."""

    sizes: list[int]

    async def CommitMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitManyResponse:
        self.sizes.append(len(request.txn_ids))
        await asyncio.sleep(0.05)
        return await super().CommitMany(request, context)


@pytest.fixture
async def recording(tmp_path: Path) -> AsyncIterator[tuple[str, _Recording]]:
    """A kv participant served in this process that records its CommitMany sizes."""
    config = ParticipantConfig(allow_no_coordinator=True)  # its coordinators serve no GetOutcome
    async with _Recording(KV(), tmp_path / "kv.db", credentials=INSECURE, config=config) as participant:
        participant.sizes = []
        server = rpc.server()
        participant.add_to_server(server)
        port = rpc.add_port(server, "127.0.0.1:0", INSECURE)
        await server.start()
        yield f"127.0.0.1:{port}", participant
        await server.stop(None)


async def test_commit_many_carries_at_most_max_commit_batch(tmp_path: Path, recording: tuple[str, _Recording]) -> None:
    """Twelve concurrent commits to one participant go out in CommitMany messages of at
    most `max_commit_batch` (3) transactions each, and all commit."""
    target, participant = recording
    config = replace(FAST, one_phase=False, max_commit_batch=3)
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=config) as c:
        results = await asyncio.gather(*(c.run([Branch(target, op(key=f"k{i}"))]) for i in range(12)))
    assert all(r.committed for r in results)
    assert sum(participant.sizes) == 12 and max(participant.sizes) <= 3 and len(participant.sizes) >= 4


async def test_recovery_redrives_at_most_recovery_concurrency_at_once(
    tmp_path: Path, recording: tuple[str, _Recording]
) -> None:
    """Twenty logged commits without END are re-driven by three workers, not twenty
    tasks at once: no CommitMany carries more than three, and all commit."""
    target, participant = recording
    log = SqliteDecisionLog(tmp_path / "d.db")
    await log.open()
    ids = [f"{log.id}:r{i}" for i in range(20)]
    async with grpc.aio.insecure_channel(target) as ch:
        stub = participant_pb2_grpc.ParticipantStub(ch)
        for txn_id in ids:
            packed = any_pb2.Any()
            packed.Pack(op(key=txn_id))
            await stub.Prepare(participant_pb2.PrepareRequest(txn_id=txn_id, operation=packed), timeout=5)
            await log.log_commit(txn_id, [target])
    await log.close()
    config = replace(FAST, recovery_concurrency=3)
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=config) as c:
        assert await c.wait_idle(30)
    assert sum(participant.sizes) == 20 and max(participant.sizes) <= 3
    assert len(query(tmp_path / "kv.db", "SELECT 1 FROM applied")) == 20
