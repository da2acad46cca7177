"""twopc on a PostgreSQL cluster that loses its primary: three etcd members and three
PostgreSQL nodes under Patroni (synchronous, strict), each on a host of its own
(`twopc.dev.pgcluster`); the primary is SIGKILLed or partitioned away under load."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import failover
from services.chaos import Purchase, Result, check_client_view
from services.cluster import Cluster, Settings
from tests.conftest import INSECURE, Served, serve
from twopc import ParticipantConfig, Vote, rpc
from twopc.dev import pgcluster, pgserver
from twopc.dev.pgcluster import PgCluster
from twopc.stores import execute
from twopc.v1 import participant_pb2

psycopg = pytest.importorskip("psycopg", reason="needs psycopg (pip install 'twopc[postgres]')")

from twopc.participant.prepared import PreparedParticipant  # noqa: E402 - after the skip

LEASE_S = 30.0  # longer than a failover (about 10 s strict): no instance fences the others


@pytest.fixture(scope="module")
def pgc() -> Iterator[PgCluster]:
    """One cluster for the module; each test leaves it healthy again."""
    reason = pgcluster.missing()
    if reason:
        pytest.skip(reason)
    with PgCluster(prefix="pgt", net=236) as c:
        yield c


@contextlib.contextmanager
def restored(c: PgCluster) -> Iterator[None]:
    """Heals and restarts whatever the test broke, and waits for the cluster to be
    healthy (a leader, a synchronous standby, every node streaming) again."""
    try:
        yield
    finally:
        for node in c.nodes:
            c.heal(node)
            if not c.network.pids(node):
                c.start_node(node)
        c.wait_healthy(90)


def run_sql(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description else []


def answer(url: str, sql: str, timeout_s: float = 30.0) -> list[tuple[Any, ...]]:
    """`run_sql` once the server answers (a node Patroni is restarting does not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return run_sql(url, sql)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- coordinators and participants through the multi-host URL --------------------------


async def purchases_through_a_failover(c: PgCluster, tmp_path: Path, fault: str) -> dict[str, Any]:
    """Two shops on a decision log in the cluster, wallet and orders with their data
    in it, concurrent purchases; `fault` ("kill" or "partition") hits the primary
    once ten purchases committed. Returns what happened."""
    with contextlib.ExitStack() as stack:
        stores = {n: stack.enter_context(pgserver.schema(c.url(), prefix=n)) for n in ("wallet", "orders")}
        log_url = c.url(schema=f"log_{fault}", lease_s=str(LEASE_S))
        cluster = Cluster(
            tmp_path / "services", Settings(prepare_timeout_s=2.0), log_url=log_url, shops=2, stores=stores
        )
        async with cluster as svc:
            accounts, skus = [f"buyer{i}" for i in range(4)], [f"sku{i}" for i in range(4)]
            for account in accounts:
                await svc.open_account(account, 10_000_000)
            for sku in skus:
                await svc.add_stock(sku, 1_000_000, 100)
            stop = asyncio.Event()
            history: list[Purchase] = []
            load = asyncio.create_task(failover.buyers(svc, accounts, skus, stop, history, concurrency=4, seed=3))

            def committed() -> int:
                return sum(p.seen == "committed" for p in history)

            await wait_for(lambda: committed() >= 10, 60, "ten purchases")
            primary = c.primary()
            assert primary is not None
            health = {name: Counter[str]() for name in ("shop", "wallet")}
            watch = asyncio.create_task(watch_health(svc, health))
            at, before = time.monotonic(), committed()
            if fault == "kill":
                await asyncio.to_thread(c.kill, primary)
            else:
                c.cut(primary)
            new = await asyncio.to_thread(c.wait_primary, other_than=primary, timeout_s=60)
            await wait_for(lambda: committed() > before, 60, "a purchase on the new primary")
            first_commit_s = time.monotonic() - at
            await wait_for(lambda: committed() >= before + 10, 60, "ten purchases on the new primary")
            stop.set()
            await load
            await wait_for(lambda: all(h["last"] for h in health.values()), 30, "SERVING again")
            watch.cancel()
            if fault == "partition":
                c.heal(primary)
            final = await svc.settled(60)
            result = Result(options={})
            check_client_view(svc, history, result)
            return {
                "fault_at": at,
                "old": primary,
                "new": new,
                "first_commit_s": round(first_commit_s, 2),
                "violations": final.violations + result.violations,
                "purchases": Counter(p.seen for p in history),
                "in_doubt": final.in_doubt,
                "health": health,
            }


async def watch_health(svc: Cluster, seen: dict[str, Counter[str]]) -> None:
    """Counts each service's health answers (every 0.1 s); `last` is 1 while the
    latest was SERVING."""
    channels = {"shop": rpc.channel(svc.shop.address, svc.credentials)}
    channels["wallet"] = rpc.channel(svc.wallet.address, svc.credentials)
    stubs = {name: health_pb2_grpc.HealthStub(ch) for name, ch in channels.items()}
    try:
        while True:
            for name, stub in stubs.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    seen[name][status] += 1
                    seen[name]["last"] = int(status == "SERVING")
            await asyncio.sleep(0.1)
    finally:
        for ch in channels.values():
            await ch.close(None)


async def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_primary_killed_under_coordinators(pgc: PgCluster, tmp_path: Path) -> None:
    """SIGKILL of the primary while two shops run purchases whose log and
    participants' data are in the cluster: a new primary takes over, purchases go
    on, and once settled every purchase is all-or-nothing, every COMMIT a
    participant applied or a caller saw is in the new primary's log, nothing in doubt."""
    with restored(pgc):
        seen = await purchases_through_a_failover(pgc, tmp_path, "kill")
    print(f"primary killed under coordinators: {seen}")
    assert seen["new"] != seen["old"]
    assert seen["violations"] == [] and seen["in_doubt"] == 0
    assert seen["purchases"]["committed"] >= 20
    # NOT_SERVING while the database failed over, SERVING again after.
    assert all(h["NOT_SERVING"] > 0 and h["last"] == 1 for h in seen["health"].values()), seen["health"]


async def test_primary_partitioned_is_demoted_and_nothing_acknowledged_there_is_lost(
    pgc: PgCluster, tmp_path: Path
) -> None:
    """The primary cut off from etcd, the other nodes and every client, while shops
    run purchases and a client on the primary's own host keeps writing through its
    Unix socket: a new primary takes over, the old one is demoted once back, every
    write acknowledged on either side is on the new primary (the old one acknowledged
    nothing after the cut: with no synchronous standby it cannot), and every
    purchase is all-or-nothing."""
    with restored(pgc):
        primary = pgc.primary()
        assert primary is not None
        run_sql(pgc.url(), "CREATE TABLE IF NOT EXISTS local_writes (n int PRIMARY KEY, at double precision)")
        acknowledged: list[tuple[int, float]] = []
        stop = threading.Event()
        local = threading.Thread(target=write_locally, args=(pgc, primary, acknowledged, stop), daemon=True)
        local.start()
        await wait_for(lambda: len(acknowledged) >= 20, 30, "local writes")
        try:
            seen = await purchases_through_a_failover(pgc, tmp_path, "partition")
        finally:
            stop.set()
            local.join(30)
        await asyncio.to_thread(pgc.wait_healthy, 90)
        old = pgc.members_of()
        assert {m["name"]: m["role"] for m in old}[primary] != "leader"
        assert await asyncio.to_thread(answer, pgc.node_url(primary), "SELECT pg_is_in_recovery()") == [(True,)]
        there = {n for (n,) in run_sql(pgc.url(), "SELECT n FROM local_writes")}
        assert [n for n, _ in acknowledged if n not in there] == []
        # Half a second for a write whose standby's answer was on its way at the cut.
        assert [n for n, at in acknowledged if at > seen["fault_at"] + 0.5] == []
    print(f"primary partitioned: {seen}, {len(acknowledged)} local writes acknowledged")
    assert seen["violations"] == [] and seen["in_doubt"] == 0


def write_locally(c: PgCluster, node: str, acknowledged: list[tuple[int, float]], stop: threading.Event) -> None:
    """A client on the node's own host (its Unix socket, which no partition cuts):
    inserts rows one by one and notes each one acknowledged."""
    url = f"postgresql://postgres@/postgres?host={c.root / node}&port={pgcluster.PG_PORT}"
    n = 0
    while not stop.is_set():
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SET statement_timeout = '20s'")
                while not stop.is_set():
                    n += 1
                    conn.execute("INSERT INTO local_writes VALUES (%s, %s)", (n, time.time()))
                    acknowledged.append((n, time.monotonic()))
        except psycopg.Error:
            time.sleep(0.1)


# --- participants on PREPARE TRANSACTION ------------------------------------------------


class Entries:
    """Each transaction inserts its own row: prepared transactions that never wait
    for each other, so many are prepared at the moment of the kill."""

    operations = (wrappers_pb2.Int64Value,)
    schema = "CREATE TABLE IF NOT EXISTS entries (txn_id TEXT PRIMARY KEY, amount BIGINT NOT NULL);"

    def prepare(self, db: Any, txn_id: str, operation: Any) -> Vote:
        execute(db, "INSERT INTO entries VALUES (:t, :a)", {"t": txn_id, "a": operation.value})
        return Vote.COMMIT


def prepare(txn_id: str) -> participant_pb2.PrepareRequest:
    request = participant_pb2.PrepareRequest(txn_id=txn_id, coordinator="127.0.0.1:1")
    request.operation.Pack(wrappers_pb2.Int64Value(value=1))
    return request


async def test_primary_killed_under_prepared_transactions(pgc: PgCluster) -> None:
    """The adapter on the cluster: SIGKILL of the primary while Prepares run, then
    again while Commits and Aborts run. Every COMMIT vote is a prepared transaction
    on the new primary (`pg_prepared_xacts`), and each ends as decided: committed
    ones' rows are there, aborted ones' are not, nothing stays prepared."""
    config = ParticipantConfig(in_doubt_after_s=3600.0)  # nobody decides but this test
    with restored(pgc), pgserver.schema(pgc.url(), prefix="adapter") as url:
        adapter = PreparedParticipant(Entries(), url, credentials=INSECURE, config=config)
        async with serve(adapter, url, Served) as p:
            ids = [f"t{i}" for i in range(60)]
            first = [await p.stub.Prepare(prepare(t), timeout=60) for t in ids[:10]]
            assert {r.vote for r in first} == {participant_pb2.VOTE_COMMIT}
            old = pgc.primary()
            assert old is not None
            rest = [asyncio.ensure_future(p.stub.Prepare(prepare(t), timeout=60)) for t in ids[10:]]
            await asyncio.sleep(0.05)  # some under way, some not yet sent
            await asyncio.to_thread(pgc.kill, old)
            replies = first + list(await asyncio.gather(*rest))
            assert {r.vote for r in replies} == {participant_pb2.VOTE_COMMIT}
            new = await asyncio.to_thread(pgc.wait_primary, other_than=old)
            gids = {g for (g,) in run_sql(pgc.url(), "SELECT gid FROM pg_prepared_xacts")}
            assert {adapter.gid(t) for t in ids} <= gids
            # Again, with the decisions under way.
            await asyncio.to_thread(pgc.start_node, old)
            await asyncio.to_thread(pgc.wait_healthy, 90)
            commit = set(ids[::2])
            decisions = [
                asyncio.ensure_future(
                    p.stub.Commit(participant_pb2.CommitRequest(txn_id=t), timeout=60)
                    if t in commit
                    else p.stub.Abort(participant_pb2.AbortRequest(txn_id=t), timeout=60)
                )
                for t in ids
            ]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(pgc.kill, new)
            await asyncio.gather(*decisions)
            await asyncio.to_thread(pgc.wait_primary, other_than=new)
            rows = {t for (t,) in run_sql(url, "SELECT txn_id FROM entries")}
            left = run_sql(url, "SELECT gid FROM pg_prepared_xacts")
            states = dict(run_sql(url, "SELECT txn_id, state FROM twopc_txn"))
        assert rows == commit
        assert left == []
        assert {t for t, s in states.items() if s == "COMMITTED"} == commit
        assert {t for t, s in states.items() if s == "ABORTED"} == set(ids) - commit
