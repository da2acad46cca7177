"""The PostgreSQL two-phase adapter: PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED.

A debit participant whose business SQL is one UPDATE runs in this process over a
schema of its own on a private PostgreSQL server (max_prepared_transactions > 0);
tests read `pg_prepared_xacts` and the tables from another connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2

from tests.apps.debits import Debits, seed
from tests.conftest import INSECURE, Served, eventually, serve
from twopc import Coordinator, ParticipantConfig
from twopc.dev.pgserver import PostgresServer, schema
from twopc.observe import EventKind, Recorder
from twopc.participant.prepared import PreparedParticipant, PreparedTransactionsDisabledError
from twopc.v1 import participant_pb2


class Local(Served):
    @property
    def adapter(self) -> PreparedParticipant:
        assert isinstance(self.participant, PreparedParticipant)
        return self.participant

    def balance(self) -> int:
        return int(self.rows("SELECT balance FROM accounts WHERE account = 'ann'")[0][0])

    def prepared(self) -> list[str]:
        return [g for (g,) in self.rows("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'twopc_%' ORDER BY gid")]

    def txns(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT txn_id, state FROM twopc_txn ORDER BY txn_id")


def debit(txn_id: str, amount: int, coordinator: str = "") -> participant_pb2.PrepareRequest:
    operation = any_pb2.Any()
    operation.Pack(wrappers_pb2.Int64Value(value=amount))
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=operation, coordinator=coordinator)


def adapter(url: str, **options: Any) -> PreparedParticipant:
    """The adapter, accepting Prepares with no coordinator (the tests drive it by hand)."""
    options.setdefault("config", ParticipantConfig(allow_no_coordinator=True))
    return PreparedParticipant(Debits(), url, credentials=INSECURE, lock_timeout_s=0.3, **options)


@pytest.fixture
async def local(pg_url: str) -> AsyncIterator[Local]:
    seed(pg_url)
    async with serve(adapter(pg_url), pg_url, Local) as served:
        yield served


async def test_prepare_holds_the_work_in_a_prepared_transaction_until_commit(local: Local) -> None:
    """A Prepare leaves a prepared transaction (the debit invisible); Commit makes it
    visible with its COMMITTED row; a second Commit succeeds and changes nothing."""
    reply = await local.stub.Prepare(debit("t1", 30), timeout=5)
    assert reply.vote == participant_pb2.VOTE_COMMIT
    assert local.prepared() == [local.adapter.gid("t1")] and local.balance() == 100 and local.txns() == []
    for _ in range(2):
        await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
    assert local.prepared() == [] and local.balance() == 70 and local.txns() == [("t1", "COMMITTED")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await local.stub.Abort(participant_pb2.AbortRequest(txn_id="t1"), timeout=5)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert local.balance() == 70


async def test_abort_rolls_back_and_leaves_a_tombstone(local: Local) -> None:
    """Abort rolls the prepared transaction back and leaves a tombstone: a late Prepare
    votes ABORT, Commit is FAILED_PRECONDITION, Abort again succeeds; an Abort of an
    unknown transaction leaves a tombstone too."""
    await local.stub.Prepare(debit("t1", 30), timeout=5)
    for _ in range(2):
        await local.stub.Abort(participant_pb2.AbortRequest(txn_id="t1"), timeout=5)
    await local.stub.Abort(participant_pb2.AbortRequest(txn_id="late"), timeout=5)
    for txn in ("t1", "late"):
        reply = await local.stub.Prepare(debit(txn, 10), timeout=5)
        assert reply.vote == participant_pb2.VOTE_ABORT and "aborted" in reply.reason
    for txn in ("t1", "never"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await local.stub.Commit(participant_pb2.CommitRequest(txn_id=txn), timeout=5)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert local.prepared() == [] and local.balance() == 100
    assert local.txns() == [("late", "ABORTED"), ("t1", "ABORTED")]


async def test_repeated_prepare_and_refusals_prepare_nothing_more(local: Local) -> None:
    """A repeated Prepare votes COMMIT without a second debit; the same id with
    another operation votes ABORT; a refused debit leaves no prepared transaction."""
    for _ in range(2):
        assert (await local.stub.Prepare(debit("t1", 30), timeout=5)).vote == participant_pb2.VOTE_COMMIT
    other = await local.stub.Prepare(debit("t1", 31), timeout=5)
    assert other.vote == participant_pb2.VOTE_ABORT and "another operation" in other.reason
    poor = await local.stub.Prepare(debit("t2", 500), timeout=5)
    assert poor.vote == participant_pb2.VOTE_ABORT and "insufficient funds" in poor.reason
    assert local.prepared() == [local.adapter.gid("t1")]
    await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
    assert local.balance() == 70


async def test_a_row_held_by_a_prepared_transaction_makes_others_vote_abort(local: Local) -> None:
    """Locks are held across phases: a second debit of the same row, while the first
    is prepared, waits `lock_timeout_s` and votes ABORT with a reason; after Commit
    it goes through."""
    await local.stub.Prepare(debit("t1", 30), timeout=5)
    blocked = await local.stub.Prepare(debit("t2", 10), timeout=5)
    assert blocked.vote == participant_pb2.VOTE_ABORT and blocked.reason == "conflict: lock wait timed out"
    await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
    assert (await local.stub.Prepare(debit("t3", 10), timeout=5)).vote == participant_pb2.VOTE_COMMIT
    await local.stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t3"]), timeout=5)
    assert local.balance() == 60 and local.prepared() == []


async def test_commit_many_spread_over_connections_commits_each_and_reports_every_refusal(local: Local) -> None:
    """A CommitMany's COMMIT PREPAREDs run on several connections at once: the prepared
    one commits, and the refusals of every lane come back (an aborted one, one never
    prepared), each with its reason."""
    await local.stub.Abort(participant_pb2.AbortRequest(txn_id="t0"), timeout=5)
    await local.stub.Prepare(debit("t1", 30), timeout=5)
    reply = await local.stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t0", "t1", "never"]), timeout=5)
    assert dict(reply.refused) == {
        "t0": "cannot commit t0: already aborted",
        "never": "cannot commit never: never prepared here",
    }
    assert local.balance() == 70 and local.prepared() == []


async def test_in_doubt_prepared_transactions_are_resolved_by_asking(pg_url: str, coordinator: Coordinator) -> None:
    """A prepared transaction left undecided is found in pg_prepared_xacts (and
    reported to observers), the coordinator is asked (its own id, never logged: ABORTED)
    and it is rolled back."""
    seed(pg_url)
    config = ParticipantConfig(in_doubt_after_s=0.2, resolve_interval_s=0.1)
    recorder = Recorder()
    gid = coordinator.global_id("t-doubt")
    async with serve(adapter(pg_url, config=config, observers=[recorder]), pg_url, Local) as local:
        await local.stub.Prepare(debit(gid, 30, coordinator.address), timeout=5)
        assert await local.adapter.in_doubt() == [(gid, coordinator.address)]
        await local.adapter.report_in_doubt()
        scanned = [e for e in recorder.events if e.kind is EventKind.IN_DOUBT_SCANNED]
        assert scanned and scanned[-1].count == 1
        await eventually(lambda: local.prepared() == [], what="the resolver to roll back")
        assert local.txns() == [(gid, "ABORTED")] and local.balance() == 100


async def test_prepared_transaction_survives_a_postgres_crash(pg_killable: PostgresServer) -> None:
    """PostgreSQL SIGKILLed with a transaction prepared: restarted, the transaction is
    still prepared (its debit still invisible), and Commit applies it once."""
    with schema(pg_killable.url) as url:
        seed(url)
        async with serve(adapter(url), url, Local) as local:
            await local.stub.Prepare(debit("t1", 30), timeout=5)
            pg_killable.kill()
            pg_killable.restart()
            assert local.prepared() == [local.adapter.gid("t1")] and local.balance() == 100
            await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
            await local.stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
            assert local.balance() == 70 and local.txns() == [("t1", "COMMITTED")]


async def test_server_without_prepared_transactions_is_refused_at_start() -> None:
    """On a server with max_prepared_transactions = 0 the adapter does not start, and
    says which setting to change."""
    from twopc.dev import pgserver

    reason = pgserver.missing()
    if reason:
        pytest.skip(reason)
    with (
        PostgresServer(max_prepared_transactions=0) as server,
        pytest.raises(PreparedTransactionsDisabledError, match="max_prepared_transactions = 0"),
    ):
        async with adapter(server.url):
            pass
