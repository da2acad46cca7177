"""The participant helper's guarantees, seen through its RPCs and its store.

The kv participant runs in this process, served by its own gRPC server on port 0 and
called through a real channel, so a test can read the helper's store counters and
make its store fail as a disk would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from tests.apps.kv import KV
from tests.conftest import INSECURE, Served, prepare_after_its_deadline, prepare_request, serve
from twopc import Participant, ParticipantConfig
from twopc.dev.testing import query
from twopc.v1 import participant_pb2


class Local(Served):
    """A kv participant served in this process, a stub to call it, and its file."""

    @property
    def db(self) -> Path:
        return Path(self.url)

    async def syncs_of(self, call: Awaitable[object]) -> int:
        """How many synced store commits `call` cost before it answered."""
        before = self.participant.store.stats.syncs
        await call
        return self.participant.store.stats.syncs - before

    def reserved(self) -> list[tuple[object, ...]]:
        return query(self.db, "SELECT txn_id, key, amount FROM reserved")

    def txns(self) -> list[tuple[object, ...]]:
        return query(self.db, "SELECT txn_id, state FROM twopc_txn")


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    """A kv participant served in this process on port 0, with a stub connected to it."""
    db = tmp_path / "kv.db"
    config = ParticipantConfig(allow_no_coordinator=True)  # the tests drive Prepare by hand
    async with serve(Participant(KV(), str(db), credentials=INSECURE, config=config), str(db), Local) as served:
        yield served


def eio_once(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the next commit of the participant's store fail as SQLite does on EIO."""

    def fail(conn: sqlite3.Connection) -> None:
        monkeypatch.undo()  # the disk works again: the store must still refuse
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(local.participant.store, "_commit", fail)


async def test_prepare_and_commit_are_synced_abort_and_read_only_are_not(local: Local) -> None:
    """A fresh Prepare voting COMMIT and a Commit each cost one fsync before they
    answer (rules 1, 7); a repeated Prepare, a READ_ONLY vote and an Abort cost none."""
    p = local.stub
    assert await local.syncs_of(p.Prepare(prepare_request("t1"), timeout=5)) == 1
    assert await local.syncs_of(p.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)) == 1
    assert await local.syncs_of(p.Prepare(prepare_request("t2"), timeout=5)) == 1
    assert await local.syncs_of(p.Prepare(prepare_request("t2"), timeout=5)) == 0  # repeated: no work
    assert await local.syncs_of(p.Prepare(prepare_request("t3", behave="read_only"), timeout=5)) == 0
    # Presumed abort: a lost Abort only means the transaction is resolved again.
    assert await local.syncs_of(p.Abort(participant_pb2.AbortRequest(txn_id="t2"), timeout=5)) == 0
    assert await local.syncs_of(p.Abort(participant_pb2.AbortRequest(txn_id="t4"), timeout=5)) == 0  # tombstone
    assert sorted(local.txns()) == [("t1", "COMMITTED"), ("t2", "ABORTED"), ("t4", "ABORTED")]


async def test_prepare_whose_deadline_passes_in_the_store_queue_reserves_nothing(local: Local) -> None:
    """A Prepare still inside its deadline when it arrives, but queued behind slow work
    until the deadline passed, reserves nothing and records nothing."""
    await prepare_after_its_deadline(local.participant.store, local.stub)
    assert local.reserved() == [] and local.txns() == []


async def test_failed_store_commit_stops_the_participant(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Prepare whose commit fails (EIO) gets UNAVAILABLE and leaves nothing on disk;
    the store then refuses all work, even once the disk answers again (rule 8)."""
    p = local.stub
    eio_once(local, monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.Prepare(prepare_request("t1"), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert local.participant.store.failed
    later: list[Awaitable[object]] = [
        p.Prepare(prepare_request("t2"), timeout=5),
        p.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5),
        p.Abort(participant_pb2.AbortRequest(txn_id="t1"), timeout=5),
        p.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t1", "t2"]), timeout=5),
        p.PrepareMany(_items(prepare_request("t3")), timeout=5),
    ]
    for call in later:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
    assert local.reserved() == [] and local.txns() == []


async def test_commit_many_is_one_synced_batch(local: Local) -> None:
    """CommitMany applies its transactions in one store batch: one fsync for them all."""
    for txn in ("t1", "t2", "t3"):
        await local.stub.Prepare(prepare_request(txn), timeout=5)
    request = participant_pb2.CommitManyRequest(txn_ids=["t1", "t2", "t3"])
    assert await local.syncs_of(local.stub.CommitMany(request, timeout=5)) == 1
    assert sorted(local.txns()) == [("t1", "COMMITTED"), ("t2", "COMMITTED"), ("t3", "COMMITTED")]


async def test_first_prepare_voting_abort_is_not_logged_as_a_repeat(local: Local) -> None:
    """The first and only Prepare of a transaction whose prepare raised VoteAbort is
    logged with repeat=False; its repetition with repeat=True."""
    with capture_logs() as events:
        for _ in range(2):
            reply = await local.stub.Prepare(prepare_request("t-no", behave="abort"), timeout=5)
            assert reply.vote == participant_pb2.VOTE_ABORT
        await local.stub.Abort(participant_pb2.AbortRequest(txn_id="t-no"), timeout=5)
        await local.stub.Prepare(prepare_request("t-no", behave="abort"), timeout=5)
    prepared = [e["repeat"] for e in events if e["event"] == "prepared"]
    assert prepared == [False, False, True]  # nothing stored by a refusal; the tombstone is


async def test_a_commit_that_raises_is_loud_and_answers_internal(local: Local) -> None:
    """A business commit that raises after a yes vote is logged at critical with its
    traceback and answered INTERNAL (documented), never UNKNOWN; nothing changes, and
    Commit and CommitMany both say so."""
    await local.stub.Prepare(prepare_request("t-bug", key="raise_on_commit"), timeout=5)
    with capture_logs() as events:
        with pytest.raises(grpc.aio.AioRpcError) as one:
            await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t-bug"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as many:
            await local.stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t-bug"]), timeout=5)
    assert one.value.code() is many.value.code() is grpc.StatusCode.INTERNAL
    loud = [e for e in events if e["log_level"] == "critical"]
    assert [e["event"] for e in loud] == ["decision_raised", "commit_raised"]
    assert all(isinstance(e["exc_info"], RuntimeError) for e in loud)
    assert local.txns() == [("t-bug", "PREPARED")] and local.reserved() == [("t-bug", "raise_on_commit", 1)]


def _items(*prepares: participant_pb2.PrepareRequest, timeout_s: float = 5.0) -> participant_pb2.PrepareManyRequest:
    """A PrepareMany of `prepares`, each with `timeout_s` left."""
    request = participant_pb2.PrepareManyRequest()
    for prepare in prepares:
        item = request.items.add(prepare=prepare)
        item.timeout.FromNanoseconds(int(timeout_s * 1e9))
    return request


async def test_prepare_many_is_one_synced_batch_with_each_item_on_its_own(local: Local) -> None:
    """PrepareMany prepares its items with one fsync; an item that votes ABORT, is
    invalid, or whose business step raises changes nothing and leaves the others
    prepared; results come back one per item, in order."""
    request = _items(
        prepare_request("m1"),
        prepare_request("m2", behave="abort"),
        prepare_request("m3", behave="invalid"),
        prepare_request("m4", behave="raise"),
        prepare_request("m5", key="k5"),
        participant_pb2.PrepareRequest(txn_id="m6"),  # no operation
    )
    with capture_logs() as events:
        call = local.stub.PrepareMany(request, timeout=5)
        assert await local.syncs_of(call) == 1
    reply = await call
    got = [(r.code, r.response.vote) for r in reply.results]
    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert got == [
        (ok, participant_pb2.VOTE_COMMIT),
        (ok, participant_pb2.VOTE_ABORT),
        (invalid, participant_pb2.VOTE_UNSPECIFIED),
        (grpc.StatusCode.INTERNAL.value[0], participant_pb2.VOTE_UNSPECIFIED),
        (ok, participant_pb2.VOTE_COMMIT),
        (invalid, participant_pb2.VOTE_UNSPECIFIED),
    ]
    assert reply.results[1].response.reason == "told to abort" and "operation is required" in reply.results[5].message
    assert sorted(local.reserved()) == [("m1", "k", 1), ("m5", "k5", 1)]
    assert sorted(local.txns()) == [("m1", "PREPARED"), ("m5", "PREPARED")]
    assert [e["txn_id"] for e in events if e["event"] == "prepare_raised"] == ["m4"]


async def test_prepare_many_items_repeat_and_expire_as_prepare_does(local: Local) -> None:
    """In PrepareMany a repeated item gets the vote it got before, an item for an
    aborted transaction votes ABORT, and an item whose own deadline has passed votes
    ABORT and reserves nothing, even though the message's deadline is far."""
    await local.stub.Prepare(prepare_request("r1"), timeout=5)
    await local.stub.Abort(participant_pb2.AbortRequest(txn_id="gone"), timeout=5)
    reply = await local.stub.PrepareMany(_items(prepare_request("r1"), prepare_request("gone")), timeout=5)
    assert [r.response.vote for r in reply.results] == [participant_pb2.VOTE_COMMIT, participant_pb2.VOTE_ABORT]
    late = await local.stub.PrepareMany(_items(prepare_request("late"), timeout_s=1e-6), timeout=5)
    assert late.results[0].response.vote == participant_pb2.VOTE_ABORT
    assert "deadline" in late.results[0].response.reason
    assert sorted(local.reserved()) == [("r1", "k", 1)]


async def test_prepare_many_refuses_bad_batches(local: Local) -> None:
    """PrepareMany with no items or more than 1000 is INVALID_ARGUMENT and changes
    nothing; an item without a timeout is refused alone."""
    for request in (_items(), _items(*(prepare_request(f"b{i}") for i in range(1001)))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await local.stub.PrepareMany(request, timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    request = participant_pb2.PrepareManyRequest(
        items=[participant_pb2.PrepareManyRequest.Item(prepare=prepare_request("nt"))]
    )
    reply = await local.stub.PrepareMany(request, timeout=5)
    assert reply.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "timeout" in reply.results[0].message
    assert local.txns() == [] and local.reserved() == []


async def test_prepare_many_whose_commit_fails_votes_for_nothing(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PrepareMany whose one store commit fails (EIO) is UNAVAILABLE for the whole
    batch and leaves none of its items on disk (rule 8)."""
    eio_once(local, monkeypatch)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await local.stub.PrepareMany(_items(prepare_request("e1"), prepare_request("e2")), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert local.participant.store.failed and local.reserved() == [] and local.txns() == []


async def test_a_draining_participant_refuses_prepare_many(local: Local) -> None:
    """Once draining, PrepareMany is UNAVAILABLE, like Prepare, and reserves nothing."""
    assert await local.participant.drain(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await local.stub.PrepareMany(_items(prepare_request("d1")), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert local.txns() == [] and local.reserved() == []
