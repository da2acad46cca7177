"""The participant helper on PostgreSQL: every rule it keeps on SQLite, on a real server.

The kv participant runs in this process on a `PostgresStore` (a schema of its own on
a private PostgreSQL server), served by a gRPC server on port 0; tests read the
database through another connection, as an auditor would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest
import sqlalchemy
from google.protobuf import any_pb2

from services.order.service import OrderHandler
from services.order.v1 import order_pb2
from services.wallet.service import WalletHandler
from services.wallet.v1 import wallet_pb2
from tests.apps.kv import KV
from tests.conftest import INSECURE, Kv, Served, eventually, prepare_after_its_deadline, prepare_request, serve
from twopc import Coordinator, Outcome, Participant, ParticipantConfig
from twopc.dev.testing import query
from twopc.stores import ConflictError, execute, open_store
from twopc.stores.postgres import PostgresStore
from twopc.v1 import participant_pb2

BY_HAND = ParticipantConfig(allow_no_coordinator=True)  # tests drive Prepare with no coordinator


class Local(Served):
    """A kv participant on PostgreSQL served in this process."""

    @property
    def store(self) -> PostgresStore:
        assert isinstance(self.participant.store, PostgresStore)
        return self.participant.store

    def reserved(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT txn_id, key, amount FROM reserved ORDER BY txn_id")

    def applied(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT txn_id, key, amount FROM applied ORDER BY txn_id")

    def txns(self) -> list[tuple[Any, ...]]:
        return self.rows("SELECT txn_id, state FROM twopc_txn ORDER BY txn_id")


@pytest.fixture
async def local(pg_url: str) -> AsyncIterator[Local]:
    """A kv participant whose store is a fresh PostgreSQL schema, chosen by URL."""
    async with serve(Participant(KV(), pg_url, credentials=INSECURE, config=BY_HAND), pg_url, Local) as served:
        yield served


def commit(txn_id: str) -> participant_pb2.CommitRequest:
    return participant_pb2.CommitRequest(txn_id=txn_id)


def abort(txn_id: str) -> participant_pb2.AbortRequest:
    return participant_pb2.AbortRequest(txn_id=txn_id)


async def test_url_picks_postgres_and_prepare_is_committed_before_the_vote(local: Local) -> None:
    """A `postgresql://` URL gives a PostgresStore; when Prepare votes COMMIT, the
    PREPARED row and the reservation are both committed (another connection sees them);
    a prepare that raises leaves neither."""
    assert isinstance(local.participant.store, PostgresStore)
    before = local.store.stats.syncs
    reply = await local.stub.Prepare(prepare_request("t1", amount=5), timeout=5)
    assert reply.vote == participant_pb2.VOTE_COMMIT
    assert local.store.stats.syncs == before + 1
    assert local.txns() == [("t1", "PREPARED")] and local.reserved() == [("t1", "k", 5)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await local.stub.Prepare(prepare_request("t2", behave="raise"), timeout=5)
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert local.txns() == [("t1", "PREPARED")] and local.reserved() == [("t1", "k", 5)]


async def test_repeated_prepare_tombstones_and_idempotent_decisions(local: Local) -> None:
    """Repeated Prepare reserves once (the same id with another operation votes ABORT);
    Abort of an unknown txn leaves a tombstone that refuses a late Prepare; Commit and
    Abort twice apply once; Commit after Abort or of a never prepared txn is
    FAILED_PRECONDITION (rules 2, 7)."""
    p = local.stub
    for _ in range(2):
        assert (await p.Prepare(prepare_request("t1", amount=7), timeout=5)).vote == participant_pb2.VOTE_COMMIT
    assert local.reserved() == [("t1", "k", 7)]
    await p.Prepare(prepare_request("t2"), timeout=5)
    for _ in range(2):
        await p.Commit(commit("t1"), timeout=5)
        await p.Abort(abort("t2"), timeout=5)
    await p.Abort(abort("late"), timeout=5)
    late = await p.Prepare(prepare_request("late"), timeout=5)
    assert late.vote == participant_pb2.VOTE_ABORT and "aborted" in late.reason
    other = await p.Prepare(prepare_request("t1", amount=8), timeout=5)  # the same id, another operation
    assert other.vote == participant_pb2.VOTE_ABORT and "another operation" in other.reason
    for txn in ("t2", "never"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.Commit(commit(txn), timeout=5)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.Abort(abort("t1"), timeout=5)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert local.applied() == [("t1", "k", 7)] and local.reserved() == []
    assert local.txns() == [("late", "ABORTED"), ("t1", "COMMITTED"), ("t2", "ABORTED")]


async def test_commit_many_commits_in_one_transaction_and_reports_refusals(local: Local) -> None:
    """CommitMany applies its prepared transactions in one local transaction and lists
    the ones it refuses, changing nothing for them."""
    for txn in ("t1", "t2"):
        await local.stub.Prepare(prepare_request(txn), timeout=5)
    await local.stub.Abort(abort("gone"), timeout=5)
    before = local.store.stats.syncs
    reply = await local.stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t1", "t2", "gone"]), timeout=5)
    assert local.store.stats.syncs == before + 1
    assert set(reply.refused) == {"gone"}
    assert local.txns() == [("gone", "ABORTED"), ("t1", "COMMITTED"), ("t2", "COMMITTED")]
    assert [t for t, *_ in local.applied()] == ["t1", "t2"]


async def test_prepare_whose_deadline_passes_waiting_for_a_connection_reserves_nothing(pg_url: str) -> None:
    """With every pooled connection busy, a Prepare that gets one only after its
    deadline reserves nothing and records nothing."""
    store = open_store(pg_url, pool_size=1)
    async with serve(Participant(KV(), store, credentials=INSECURE, config=BY_HAND), pg_url, Local) as local:
        await prepare_after_its_deadline(store, local.stub)
        assert local.reserved() == [] and local.txns() == []


async def test_lock_wait_past_the_timeout_votes_abort_with_a_reason(pg_url: str) -> None:
    """A Prepare blocked on a row another transaction holds votes ABORT with a reason
    after `lock_timeout_s`, reserves nothing, and answers no error status."""
    store = open_store(pg_url, lock_timeout_s=0.2)
    async with serve(Participant(KV(), store, credentials=INSECURE, config=BY_HAND), pg_url, Local) as local:
        with psycopg.connect(pg_url) as holder:  # an uncommitted row with the same key
            holder.execute("INSERT INTO reserved VALUES ('t1', 'other', 1)")
            reply = await local.stub.Prepare(prepare_request("t1"), timeout=5)
            holder.rollback()
        assert reply.vote == participant_pb2.VOTE_ABORT
        assert reply.reason == "conflict: lock wait timed out"
        assert local.reserved() == [] and local.txns() == []


async def test_serialization_failures_are_retried_then_reported(pg_url: str) -> None:
    """Concurrent read-then-write jobs that conflict are retried until each commits on
    a fresh snapshot; with no retries left, ConflictError says what it lost to."""
    async with PostgresStore(pg_url, "CREATE TABLE n (id INT PRIMARY KEY, v INT); INSERT INTO n VALUES (1, 0)") as s:

        def bump(db: Any) -> None:
            (v,) = execute(db, "SELECT v FROM n WHERE id = 1").fetchone()
            time.sleep(0.01)  # widen the window so the jobs overlap
            execute(db, "UPDATE n SET v = :v WHERE id = 1", {"v": v + 1})

        await asyncio.gather(*(s.write(bump) for _ in range(8)))
        assert await s.read(lambda db: execute(db, "SELECT v FROM n").fetchone()[0]) == 8
    async with PostgresStore(pg_url, retries=1) as once:
        results = await asyncio.gather(*(once.write(bump) for _ in range(4)), return_exceptions=True)
    lost = [r for r in results if isinstance(r, BaseException)]
    assert lost and all(isinstance(e, ConflictError) and "serialization failure" in str(e) for e in lost)
    assert query(pg_url, "SELECT v FROM n") == [(8 + len(results) - len(lost),)]


async def test_a_jobs_own_unique_violation_at_read_committed_is_raised_after_a_few_reruns(pg_url: str) -> None:
    """At READ COMMITTED a unique violation reruns the job (a concurrent insert of the
    same key would be seen then), but a duplicate of the job's own comes back each
    run and is raised as it is after three reruns; an unknown level is refused."""
    with pytest.raises(ValueError, match="isolation"):
        PostgresStore(pg_url, isolation="READ UNCOMMITTED")
    schema = "CREATE TABLE u (id INT PRIMARY KEY); INSERT INTO u VALUES (1)"
    async with PostgresStore(pg_url, schema, isolation="READ COMMITTED") as s:
        runs: list[int] = []

        def duplicate(db: Any) -> None:
            runs.append(1)
            execute(db, "INSERT INTO u VALUES (1)")

        with pytest.raises(sqlalchemy.exc.IntegrityError):
            await s.write(duplicate)
        assert len(runs) == 4
    assert query(pg_url, "SELECT id FROM u") == [(1,)]


async def test_broken_connection_before_commit_is_retried_on_a_new_one(local: Local, pg_url: str) -> None:
    """Every pooled connection killed by the server (pg_terminate_backend): the next
    Prepare runs on a new connection and votes COMMIT, with its row written once."""
    await local.stub.Prepare(prepare_request("warm", behave="read_only"), timeout=5)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    reply = await local.stub.Prepare(prepare_request("t1"), timeout=5)
    assert reply.vote == participant_pb2.VOTE_COMMIT
    assert local.txns() == [("t1", "PREPARED")] and local.reserved() == [("t1", "k", 1)]


async def test_in_doubt_resolver_and_purge(pg_url: str, coordinator: Coordinator) -> None:
    """A transaction prepared too long is resolved by asking the coordinator's
    GetOutcome (one of its ids it never logged: ABORTED, rules 6 and 12); decided
    rows past their retention are purged."""
    config = ParticipantConfig(in_doubt_after_s=0.2, resolve_interval_s=0.1, retention_s=0.5)
    async with serve(Participant(KV(), pg_url, credentials=INSECURE, config=config), pg_url, Local) as local:
        gid = coordinator.global_id("t-doubt")
        request = prepare_request(gid)
        request.coordinator = coordinator.address
        assert (await local.stub.Prepare(request, timeout=5)).vote == participant_pb2.VOTE_COMMIT
        await eventually(lambda: local.txns() == [(gid, "ABORTED")], what="the resolver to abort")
        assert local.reserved() == []
        await eventually(lambda: local.txns() == [], what="the purge of the decided row")


async def test_kv_processes_on_postgres_commit_and_abort_through_a_coordinator(
    pg_server: Any, coordinator: Coordinator, start_kv: Callable[..., Kv]
) -> None:
    """Two kv processes started with `--db postgresql://...` (a schema each): a
    transaction commits at both; one ABORT vote aborts both."""
    from twopc.dev.pgserver import schema

    with schema(pg_server.url) as url_a, schema(pg_server.url) as url_b:
        a, b = start_kv("a", db=url_a), start_kv("b", db=url_b)
        ok = await coordinator.run([a.branch(amount=3), b.branch(amount=4)])
        assert ok.outcome is Outcome.COMMITTED
        await eventually(lambda: a.state(ok.txn_id) == b.state(ok.txn_id) == "COMMITTED", what="both commit")
        no = await coordinator.run([a.branch(), b.branch(behave="abort")])
        assert no.outcome is Outcome.ABORTED and "told to abort" in no.reason
        await eventually(lambda: a.state(no.txn_id) == "ABORTED", what="a aborts")
        assert a.applied() == [(ok.txn_id, "k", 3)] and b.applied() == [(ok.txn_id, "k", 4)]
        assert a.reserved() == [] == b.reserved()
        a.proc.stop()
        b.proc.stop()


# --- concurrency at READ COMMITTED: the wallet and order handlers lock their rows ---


def _pack(operation: Any, txn_id: str) -> participant_pb2.PrepareRequest:
    packed = any_pb2.Any()
    packed.Pack(operation)
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=packed)


def _seed_accounts(db: Any, n: int) -> None:
    for i in range(n):
        execute(db, "INSERT INTO accounts VALUES (:a, 5)", {"a": f"acct-{i}"})


def _seed_products(db: Any, n: int) -> None:
    for i in range(n):
        execute(db, "INSERT INTO products VALUES (:s, 1, 5, 0, 5, 0)", {"s": f"sku-{i}"})


def _debit(i: int) -> Any:
    return wallet_pb2.Debit(account=f"acct-{i}", amount=1)


def _order(i: int) -> Any:
    return order_pb2.PlaceOrder(order_id=f"o-{i}", account="ann", items=[order_pb2.Item(sku=f"sku-{i}", quantity=1)])


def test_wallet_and_order_handlers_ask_for_read_committed(pg_url: str) -> None:
    """Given a URL, a wallet or order participant runs its jobs at READ COMMITTED."""
    for handler in (WalletHandler(), OrderHandler()):
        store = Participant(handler, pg_url, credentials=INSECURE).store
        assert isinstance(store, PostgresStore) and store.isolation == "READ COMMITTED"


@pytest.mark.parametrize(
    ("handler", "seed", "operation"),
    [(WalletHandler(), _seed_accounts, _debit), (OrderHandler(), _seed_products, _order)],
    ids=["wallet", "order"],
)
async def test_concurrent_prepares_on_different_rows_all_vote_commit(
    pg_url: str, handler: Any, seed: Callable[[Any, int], None], operation: Callable[[int], Any]
) -> None:
    """64 concurrent Prepares, each on an account (or product) of its own, all vote
    COMMIT at the first try: with one try, any serialization failure or deadlock
    between them would vote ABORT (at SERIALIZABLE, predicate locks on the small
    tables make them fail each other)."""
    n = 64
    store = open_store(pg_url, isolation=handler.isolation, retries=1, pool_size=16)
    async with serve(Participant(handler, store, credentials=INSECURE, config=BY_HAND), pg_url, Local) as local:
        await store.write(lambda db: seed(db, n))
        replies = await asyncio.gather(
            *(local.stub.Prepare(_pack(operation(i), f"t{i}"), timeout=30) for i in range(n))
        )
        assert [(r.vote, r.reason) for r in replies] == [(participant_pb2.VOTE_COMMIT, "")] * n
        assert local.rows("SELECT count(*) FROM twopc_txn WHERE state = 'PREPARED'") == [(n,)]


async def test_concurrent_prepares_on_one_account_never_overdraw_it(pg_url: str) -> None:
    """40 concurrent Prepares debiting 1 from an account holding 10: exactly 10 vote
    COMMIT, the rest ABORT for insufficient funds, and the holds add up to 10."""
    store = open_store(pg_url, isolation="READ COMMITTED", lock_timeout_s=10)
    async with serve(Participant(WalletHandler(), store, credentials=INSECURE, config=BY_HAND), pg_url, Local) as w:
        await store.write(lambda db: execute(db, "INSERT INTO accounts VALUES ('acct-0', 10)"))
        replies = await asyncio.gather(*(w.stub.Prepare(_pack(_debit(0), f"t{i}"), timeout=30) for i in range(40)))
        commits = [r for r in replies if r.vote == participant_pb2.VOTE_COMMIT]
        refused = [r.reason for r in replies if r.vote == participant_pb2.VOTE_ABORT]
        assert len(commits) == 10 and len(refused) == 30
        assert all(reason.startswith("insufficient funds: available 0") for reason in refused), refused
        assert w.rows("SELECT sum(amount), count(*) FROM holds WHERE account = 'acct-0'") == [(10, 10)]


async def test_racing_commit_and_abort_of_one_transaction_apply_it_once(pg_url: str) -> None:
    """Commits and Aborts of one prepared debit sent together at READ COMMITTED: one
    decision wins (its row locked), and the account is debited once or not at all."""
    async with serve(Participant(WalletHandler(), pg_url, credentials=INSECURE, config=BY_HAND), pg_url, Local) as w:
        await w.participant.store.write(lambda db: execute(db, "INSERT INTO accounts VALUES ('acct-0', 10)"))
        for round_ in range(5):
            txn = f"t{round_}"
            assert (await w.stub.Prepare(_pack(_debit(0), txn), timeout=5)).vote == participant_pb2.VOTE_COMMIT
            commits = [w.stub.Commit(commit(txn), timeout=5) for _ in range(4)]
            aborts = [w.stub.Abort(abort(txn), timeout=5) for _ in range(4)]
            answers = await asyncio.gather(*commits, *aborts, return_exceptions=True)
            # One decision wins: the other is refused, never applied as well.
            won = {kind for kind, a in zip("CCCCAAAA", answers, strict=True) if not isinstance(a, BaseException)}
            assert len(won) == 1, answers
        committed = w.rows("SELECT count(*) FROM twopc_txn WHERE state = 'COMMITTED'")[0][0]
        assert w.rows("SELECT count(*) FROM ledger WHERE kind = 'debit'") == [(committed,)]
        assert w.rows("SELECT balance FROM accounts") == [(10 - committed,)]
        assert w.rows("SELECT count(*) FROM holds") == [(0,)]


async def test_duplicate_prepares_racing_at_read_committed_answer_alike(pg_url: str) -> None:
    """Eight copies of one Prepare at once (READ COMMITTED: the losers' insert of the
    same txn row is a unique violation, rerun on a fresh snapshot): all vote COMMIT,
    and the hold is written once."""
    async with serve(Participant(WalletHandler(), pg_url, credentials=INSECURE, config=BY_HAND), pg_url, Local) as w:
        await w.participant.store.write(lambda db: execute(db, "INSERT INTO accounts VALUES ('acct-0', 10)"))
        replies = await asyncio.gather(*(w.stub.Prepare(_pack(_debit(0), "t1"), timeout=5) for _ in range(8)))
        assert {(r.vote, r.reason) for r in replies} == {(participant_pb2.VOTE_COMMIT, "")}
        assert w.rows("SELECT txn_id, amount FROM holds") == [("t1", 1)]
