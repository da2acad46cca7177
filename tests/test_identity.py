"""Which transaction an id names: across coordinators, on reuse, on a repeated Prepare."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.conftest import FAST, INSECURE, Kv, eventually, prepare_request
from twopc import Coordinator, DuplicateTransactionError, Outcome, Vote
from twopc.v1 import participant_pb2, participant_pb2_grpc


async def test_two_coordinators_reusing_one_local_id_are_two_transactions(
    tmp_path: Path, start_kv: Callable[..., Kv]
) -> None:
    """Two coordinators (two logs) both run "order-42" with different operations at the
    same participants: each commits its own operation, and nothing is confused."""
    a, b = start_kv("a"), start_kv("b")
    async with (
        Coordinator(tmp_path / "one.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as one,
        Coordinator(tmp_path / "two.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as two,
    ):
        assert one.id != two.id
        first = await one.run([a.branch(key="x", amount=1), b.branch(key="x", amount=1)], txn_id="order-42")
        second = await two.run([a.branch(key="y", amount=5), b.branch(key="y", amount=5)], txn_id="order-42")
    assert first.committed and second.committed and first.txn_id != second.txn_id
    for kv in (a, b):
        assert sorted(kv.applied()) == sorted([(first.txn_id, "x", 1), (second.txn_id, "y", 5)])


async def test_repeated_prepare_with_other_content_is_refused(start_kv: Callable[..., Kv]) -> None:
    """A Prepare that repeats a prepared txn id with another operation votes ABORT with a
    reason and leaves the first reservation as it was; the same content repeats COMMIT."""
    kv = start_kv()
    async with grpc.aio.insecure_channel(kv.target) as ch:
        p = participant_pb2_grpc.ParticipantStub(ch)
        assert (await p.Prepare(prepare_request("t1", amount=3), timeout=5)).vote == participant_pb2.VOTE_COMMIT
        other = await p.Prepare(prepare_request("t1", amount=300), timeout=5)
        assert other.vote == participant_pb2.VOTE_ABORT and "another operation" in other.reason
        same = await p.Prepare(prepare_request("t1", amount=3), timeout=5)
        assert same.vote == participant_pb2.VOTE_COMMIT
    assert kv.reserved() == [("t1", "k", 3)] and kv.state("t1") == "PREPARED"


async def test_reusing_a_txn_id_is_refused_before_any_message(
    coordinator: Coordinator, start_kv: Callable[..., Kv]
) -> None:
    """A local id that this coordinator committed, or is running, is refused with
    DuplicateTransactionError (never a raw sqlite3 error), before any message is sent,
    also once the first transaction has ended and only its record on disk remembers."""
    a, b = start_kv("a"), start_kv("b")
    first = await coordinator.run([a.branch(), b.branch()], txn_id="dup")
    assert first.committed
    sent = coordinator.messages_sent
    with pytest.raises(DuplicateTransactionError, match="committed"):
        await coordinator.run([a.branch(), b.branch()], txn_id="dup")
    await eventually(lambda: first.txn_id not in coordinator._committed, what="END")
    with pytest.raises(DuplicateTransactionError, match="committed"):
        await coordinator.run([a.branch(key="other"), b.branch()], txn_id="dup")
    assert coordinator.messages_sent == sent
    b.proc.pause()
    try:
        running = asyncio.create_task(coordinator.run([a.branch(), b.branch()], txn_id="twice", timeout_s=1.0))
        await eventually(lambda: a.state(coordinator.global_id("twice")) == "PREPARED", what="a prepared")
        with pytest.raises(DuplicateTransactionError, match="running"):
            await coordinator.run([a.branch(), b.branch()], txn_id="twice")
        assert (await running).outcome is Outcome.ABORTED
    finally:
        b.proc.resume()
    assert len(a.applied()) == len(b.applied()) == 1
    assert [r.vote for r in first.branches] == [Vote.COMMIT, Vote.COMMIT]
