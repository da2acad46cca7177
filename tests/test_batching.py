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
from tests.conftest import FAST, INSECURE, Kv, eventually, listening, op, txn_state
from twopc import Branch, Coordinator, Outcome, Participant, ParticipantConfig, SqliteDecisionLog, TransactionResult
from twopc.dev.testing import query
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
    prepared: list[str]

    def __init__(self) -> None:
        self.committed = []
        self.prepared = []

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:  # noqa: N802
        self.prepared.append(request.txn_id)
        await asyncio.sleep(0.01)  # a participant's latency: concurrent Prepares queue behind it
        return participant_pb2.PrepareResponse(vote=participant_pb2.VOTE_COMMIT)

    async def Commit(self, request: Any, context: Any) -> participant_pb2.CommitResponse:  # noqa: N802
        self.committed.append(request.txn_id)
        return participant_pb2.CommitResponse()

    async def Abort(self, request: Any, context: Any) -> participant_pb2.AbortResponse:  # noqa: N802
        return participant_pb2.AbortResponse()

    CommitMany = participant_pb2_grpc.ParticipantServicer.CommitMany
    PrepareMany = participant_pb2_grpc.ParticipantServicer.PrepareMany


@pytest.fixture
async def old_participant() -> AsyncIterator[tuple[str, _NoBatching]]:
    servicer = _NoBatching()
    async with listening(lambda server: participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)) as at:
        yield at, servicer


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
        async with listening(participant.add_to_server) as address:
            yield address, participant


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


async def test_participant_without_prepare_many_gets_single_prepares(
    tmp_path: Path, old_participant: tuple[str, _NoBatching], start_kv: Callable[..., Kv]
) -> None:
    """Concurrent transactions to a participant that answers PrepareMany with
    UNIMPLEMENTED still get every Prepare, one by one, and all commit; said once."""
    target, servicer = old_participant
    kv = start_kv()
    with capture_logs() as events:
        async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
            results = await asyncio.gather(*(c.run([Branch(target, op(key="x")), kv.branch()]) for _ in range(10)))
    assert all(r.outcome is Outcome.COMMITTED and r.completed for r in results)
    assert sorted(servicer.prepared) == sorted(r.txn_id for r in results) and len(kv.applied()) == 10
    assert [e["event"] for e in events].count("prepare_many_unsupported") == 1


class _GatedNoBatching(_NoBatching):
    """An old participant whose UNIMPLEMENTED answer to PrepareMany waits for a gate,
    so that more Prepares queue meanwhile; it counts the PrepareMany it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.prepare_many = 0
        self.gate = asyncio.Event()

    async def PrepareMany(self, request: Any, context: Any) -> participant_pb2.PrepareManyResponse:  # noqa: N802
        self.prepare_many += 1
        await self.gate.wait()
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("unreachable")


async def test_no_prepare_many_is_sent_after_unimplemented(tmp_path: Path) -> None:
    """Prepares that queue while the first PrepareMany is answered UNIMPLEMENTED go
    out as plain Prepares: exactly one PrepareMany is ever sent, and all commit."""
    servicer = _GatedNoBatching()
    add = lambda server: participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)  # noqa: E731
    async with (
        listening(add) as at,
        Coordinator(tmp_path / "d.db", credentials=INSECURE, config=TWO_PHASE) as c,
    ):
        first = [asyncio.create_task(c.run([Branch(at, op(key="x"))])) for _ in range(4)]
        await eventually(lambda: servicer.prepare_many == 1, what="the first PrepareMany")
        second = [asyncio.create_task(c.run([Branch(at, op(key="x"))])) for _ in range(4)]
        await eventually(lambda: queued(c, at) == 4, what="four Prepares queued behind it")
        servicer.gate.set()
        results = await asyncio.gather(*first, *second)
    assert all(r.committed for r in results)
    assert servicer.prepare_many == 1


class _Gated(Participant):
    """The real helper served in this process, recording every Prepare it is sent
    (txn ids per message, and each PrepareMany's deadlines); a message that carries
    an operation whose key names a gate ("hold", "hold2") waits until the test opens it."""

    messages: list[list[str]]
    timeouts: list[tuple[float, list[float]]]  # (the message's time left, each item's)
    gates: dict[str, asyncio.Event]

    async def _hold(self, requests: list[participant_pb2.PrepareRequest]) -> None:
        self.messages.append([r.txn_id for r in requests])
        for r in requests:
            gate = self.gates.get(op_key(r))
            if gate is not None:
                await gate.wait()

    async def Prepare(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareResponse:
        await self._hold([request])
        return await super().Prepare(request, context)

    async def PrepareMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.PrepareManyResponse:
        left = context.time_remaining()
        assert left is not None
        self.timeouts.append((left, [i.timeout.ToNanoseconds() / 1e9 for i in request.items]))
        await self._hold([i.prepare for i in request.items])
        return await super().PrepareMany(request, context)


def queued(coordinator: Coordinator, target: str) -> int:
    """How many Prepares wait for `target` behind the message in flight."""
    return coordinator._channels.prepares(target).queued


def op_key(request: participant_pb2.PrepareRequest) -> str:
    unpacked = op()
    request.operation.Unpack(unpacked)
    return str(unpacked["key"]) if "key" in unpacked else ""


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[str, _Gated]]:
    config = ParticipantConfig(allow_no_coordinator=True)  # its coordinators serve no GetOutcome
    async with _Gated(KV(), tmp_path / "gated.db", credentials=INSECURE, config=config) as participant:
        participant.messages, participant.timeouts = [], []
        participant.gates = {"hold": asyncio.Event(), "hold2": asyncio.Event()}
        async with listening(participant.add_to_server) as address:
            yield address, participant


TWO_PHASE = replace(FAST, one_phase=False)


async def test_prepares_queued_behind_one_in_flight_share_the_next_message(
    tmp_path: Path, gated: tuple[str, _Gated]
) -> None:
    """A lone Prepare goes out at once, alone; the Prepares that queue while it is in
    flight go out together as one PrepareMany (at most max_prepare_batch each), and
    every transaction commits."""
    target, participant = gated
    async with Coordinator(
        tmp_path / "d.db", credentials=INSECURE, config=replace(TWO_PHASE, max_prepare_batch=4)
    ) as c:
        first = asyncio.create_task(c.run([Branch(target, op(key="hold"))]))
        await eventually(lambda: len(participant.messages) == 1, what="the first Prepare")
        rest = [asyncio.create_task(c.run([Branch(target, op(key=f"k{i}"))])) for i in range(6)]
        await eventually(lambda: queued(c, target) == 6, what="six Prepares queued behind the first")
        participant.gates["hold"].set()
        results = await asyncio.gather(first, *rest)
    assert all(r.committed for r in results)
    assert [len(m) for m in participant.messages] == [1, 4, 2]
    assert sorted(t for m in participant.messages for t in m) == sorted(r.txn_id for r in results)


async def two_held(
    c: Coordinator, target: str, participant: _Gated
) -> tuple[asyncio.Task[TransactionResult], asyncio.Task[TransactionResult]]:
    """Two transactions whose Prepares are both at the participant, held at the
    gates "hold" and "hold2" (two messages in flight)."""
    first = asyncio.create_task(c.run([Branch(target, op(key="hold"))]))
    await eventually(lambda: len(participant.messages) == 1, what="the first Prepare")
    second = asyncio.create_task(c.run([Branch(target, op(key="hold2"))]))
    await eventually(lambda: len(participant.messages) == 2, what="the second Prepare beside the first")
    return first, second


async def test_batches_in_flight_lets_that_many_messages_go_out_before_any_returns(
    tmp_path: Path, gated: tuple[str, _Gated]
) -> None:
    """With batches_in_flight=2 a second Prepare goes out while the first is held at
    the participant (a lock wait there holds up only its own message), and a third
    queues until one of them returns, then goes out while the first is still held."""
    target, participant = gated
    async with Coordinator(
        tmp_path / "d.db", credentials=INSECURE, config=replace(TWO_PHASE, batches_in_flight=2)
    ) as c:
        first, second = await two_held(c, target, participant)
        third = asyncio.create_task(c.run([Branch(target, op(key="x"))]))
        await eventually(lambda: queued(c, target) == 1, what="the third queued behind both")
        participant.gates["hold2"].set()
        assert (await second).committed and (await third).committed
        assert not first.done()
        participant.gates["hold"].set()
        assert (await first).committed
    assert participant.messages == [[r.result().txn_id] for r in (first, second, third)]


async def test_a_freed_slot_takes_its_share_of_the_prepares_outstanding_not_the_whole_queue(
    tmp_path: Path, gated: tuple[str, _Gated]
) -> None:
    """With two messages in flight, one held and six Prepares queued, the slot that
    frees takes its share of the seven outstanding (four), not all six; the other
    two go in the next message."""
    target, participant = gated
    async with Coordinator(
        tmp_path / "d.db", credentials=INSECURE, config=replace(TWO_PHASE, batches_in_flight=2)
    ) as c:
        held, second = await two_held(c, target, participant)
        rest = [asyncio.create_task(c.run([Branch(target, op(key=f"k{i}"))])) for i in range(6)]
        await eventually(lambda: queued(c, target) == 6, what="six Prepares queued behind both")
        participant.gates["hold2"].set()
        assert all(r.committed for r in await asyncio.gather(second, *rest))
        participant.gates["hold"].set()
        assert (await held).committed
    assert [len(m) for m in participant.messages] == [1, 1, 4, 2]


async def test_a_queued_prepare_of_an_aborted_transaction_is_never_sent(
    tmp_path: Path, gated: tuple[str, _Gated], start_kv: Callable[..., Kv]
) -> None:
    """A transaction that decides ABORT (another branch voted no) while its Prepare is
    queued behind an in-flight one withdraws it: the participant never sees that
    Prepare, and gets the Abort (a tombstone)."""
    target, participant = gated
    kv = start_kv()
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=TWO_PHASE) as c:
        first = asyncio.create_task(c.run([Branch(target, op(key="hold"))]))
        await eventually(lambda: len(participant.messages) == 1, what="the first Prepare")
        refused = await c.run([Branch(target, op(key="x")), kv.branch(behave="abort")])
        assert refused.outcome is Outcome.ABORTED and "told to abort" in refused.reason
        await eventually(lambda: txn_state(tmp_path / "gated.db", refused.txn_id) == "ABORTED", what="the Abort")
        participant.gates["hold"].set()
        assert (await first).committed
        assert await c.wait_idle(10)
    assert participant.messages == [[first.result().txn_id]]


async def test_each_batched_prepare_keeps_its_own_deadline(tmp_path: Path, gated: tuple[str, _Gated]) -> None:
    """Items of one PrepareMany carry their own time left and the message the latest;
    a transaction whose deadline passes while its batch is in flight aborts at its own
    deadline, and the participant holds nothing for it, while the other commits."""
    target, participant = gated
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=TWO_PHASE) as c:
        first = asyncio.create_task(c.run([Branch(target, op(key="hold"))], timeout_s=5))
        await eventually(lambda: len(participant.messages) == 1, what="the first Prepare")
        hurried = asyncio.create_task(c.run([Branch(target, op(key="hold2"))], timeout_s=0.5))
        patient = asyncio.create_task(c.run([Branch(target, op(key="x1"))], timeout_s=5))
        await eventually(lambda: queued(c, target) == 2, what="two Prepares queued behind the first")
        participant.gates["hold"].set()
        assert (await first).committed
        late = await hurried  # answered at its own deadline, its batch still held
        assert late.outcome is Outcome.ABORTED and "DEADLINE_EXCEEDED" in late.reason
        participant.gates["hold2"].set()
        assert (await patient).committed
        assert await c.wait_idle(10)
    assert participant.messages == [[first.result().txn_id], [late.txn_id, patient.result().txn_id]]
    [(left, items)] = participant.timeouts
    assert sorted(items)[0] <= 0.5 < sorted(items)[1] <= 5 and left > 0.5
    await eventually(lambda: txn_state(tmp_path / "gated.db", late.txn_id) == "ABORTED", what="the late one refused")
    assert [t for t, *_ in query(tmp_path / "gated.db", "SELECT txn_id FROM reserved")] == []


async def test_batches_in_flight_lets_several_messages_out_to_one_participant(
    tmp_path: Path, gated: tuple[str, _Gated]
) -> None:
    """With batches_in_flight=2 a second Prepare goes out beside a first one still
    held at the participant, and only what comes after both queues (then shared
    between the freed slots); the setting must be positive."""
    target, participant = gated
    config = replace(TWO_PHASE, batches_in_flight=2)
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=config) as c:
        held = [asyncio.create_task(c.run([Branch(target, op(key=k))])) for k in ("hold", "hold2")]
        await eventually(lambda: len(participant.messages) == 2, what="two messages in flight at once")
        rest = [asyncio.create_task(c.run([Branch(target, op(key=f"k{i}"))])) for i in range(3)]
        await eventually(lambda: queued(c, target) == 3, what="the rest queued behind both")
        participant.gates["hold"].set()
        participant.gates["hold2"].set()
        results = await asyncio.gather(*held, *rest)
    assert all(r.committed for r in results)
    # The three queued go out in the freed slots, each message at most its share of
    # what is outstanding (queued and in flight, over the two slots): 2, then 1.
    assert [len(m) for m in participant.messages] == [1, 1, 2, 1]
    with pytest.raises(ValueError, match="batches_in_flight"):
        replace(TWO_PHASE, batches_in_flight=0)
