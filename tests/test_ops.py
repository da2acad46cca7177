"""Operating twopc: health and reflection, Prometheus metrics, graceful shutdown.

Everything is checked against the real services as separate processes, from a
client that knows nothing but their addresses.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from services.cluster import Cluster, Settings
from services.shop.v1 import shop_pb2
from tests.apps.kv import KV
from tests.conftest import INSECURE, eventually, listening, prepare_request
from twopc import Participant, ParticipantConfig
from twopc.dev.testing import query
from twopc.observe.health import PARTICIPANT_SERVICE, Health
from twopc.v1 import participant_pb2_grpc

SERVICES = {
    "wallet": {"wallet.v1.Wallet", "twopc.v1.Participant"},
    "orders": {"order.v1.Orders", "twopc.v1.Participant"},
    "shop": {"shop.v1.Shop", "twopc.v1.Coordinator"},
}
STANDARD = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path, Settings(prepare_timeout_s=3.0), metrics=True) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 100, 1_500)
        yield c


async def health_of(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_every_service_answers_health_and_reflection_from_its_address_alone(cluster: Cluster) -> None:
    """Health says SERVING for each service and overall; reflection lists every service and
    describes them well enough to call an RPC with no generated code."""
    for name, proc in (("wallet", cluster.wallet), ("orders", cluster.orders), ("shop", cluster.shop)):
        assert await health_of(proc.address) == "SERVING"
        for service in SERVICES[name]:
            assert await health_of(proc.address, service) == "SERVING", (name, service)
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name async for r in replies for s in r.list_services_response.service}
        assert listed == SERVICES[name] | STANDARD, name

    def call_get_balance_by_reflection() -> tuple[int, int]:
        with grpc.insecure_channel(cluster.wallet.address) as ch:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
            method = pool.FindServiceByName("wallet.v1.Wallet").FindMethodByName("GetBalance")
            request_type = message_factory.GetMessageClass(method.input_type)
            reply_type = message_factory.GetMessageClass(method.output_type)
            call = ch.unary_unary(
                "/wallet.v1.Wallet/GetBalance",
                request_serializer=request_type.SerializeToString,
                response_deserializer=reply_type.FromString,
            )
            reply = call(request_type(account="alice"), timeout=5)
            return reply.balance, reply.held

    assert await asyncio.to_thread(call_get_balance_by_reflection) == (10_000, 0)


async def test_health_turns_not_serving_after_a_failed_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A participant whose store commit fails as on EIO is NOT_SERVING from then on."""
    config = ParticipantConfig(allow_no_coordinator=True)  # the test drives Prepare by hand
    async with Participant(KV(), str(tmp_path / "kv.db"), credentials=INSECURE, config=config) as participant:
        health = Health([PARTICIPANT_SERVICE])
        health.watch(participant.store.wait_failed)

        def add(server: grpc.aio.Server) -> None:
            participant.add_to_server(server)
            health.add_to_server(server)

        async with listening(add) as address:
            await health.serving()
            try:
                assert await health_of(address, PARTICIPANT_SERVICE) == "SERVING"

                def eio(conn: sqlite3.Connection) -> None:
                    raise sqlite3.OperationalError("disk I/O error")

                monkeypatch.setattr(participant.store, "_commit", eio)
                async with grpc.aio.insecure_channel(address) as ch:
                    with pytest.raises(grpc.aio.AioRpcError):
                        await participant_pb2_grpc.ParticipantStub(ch).Prepare(prepare_request("t1"), timeout=5)
                assert participant.store.failed
                await eventually(lambda: health.status == "NOT_SERVING", what="NOT_SERVING")
                assert await health_of(address) == "NOT_SERVING"
                assert await health_of(address, PARTICIPANT_SERVICE) == "NOT_SERVING"
            finally:
                await health.close()


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_are_scraped_from_each_real_process(cluster: Cluster) -> None:
    """Outcomes, votes by reason class, latencies, forced writes and in-doubt gauges reach
    /metrics of the shop and the participants, with no transaction id among the labels."""
    ok = await cluster.purchase("o1", "alice", {"widget": 2})
    poor = await cluster.purchase("o2", "alice", {"widget": 50})  # 75000 > 10000: insufficient funds
    assert ok.outcome == shop_pb2.OUTCOME_COMMITTED and poor.outcome == shop_pb2.OUTCOME_ABORTED
    shop = await asyncio.to_thread(scrape, cluster.metrics_address["shop"])
    assert value(shop, "twopc_transactions_total", outcome="committed") == 1
    assert value(shop, "twopc_transactions_total", outcome="aborted") == 1
    assert value(shop, "twopc_votes_total", vote="abort", reason="business") == 1
    assert value(shop, "twopc_phase1_duration_seconds_count") == 2
    assert value(shop, "twopc_decision_write_duration_seconds_count") == 1
    assert value(shop, "twopc_decision_log_forced_writes_total") >= 1
    await eventually(
        lambda: (
            value(scrape(cluster.metrics_address["shop"]), "twopc_phase2_duration_seconds_count", outcome="committed")
            == 1
        ),
        what="phase 2 of the commit measured",
    )
    assert value(scrape(cluster.metrics_address["shop"]), "twopc_pending_commits") == 0
    wallet = await asyncio.to_thread(scrape, cluster.metrics_address["wallet"])
    assert value(wallet, "twopc_participant_votes_total", vote="commit", reason="none") == 1
    assert value(wallet, "twopc_participant_votes_total", vote="abort", reason="business") == 1
    assert value(wallet, "twopc_participant_decisions_total", outcome="committed") == 1
    assert value(wallet, "twopc_participant_forced_writes_total") >= 2
    for name in ("wallet", "orders", "shop"):
        for (_, labels), _v in scrape(cluster.metrics_address[name]).items():
            assert not {k for k, _ in labels} & {"txn_id", "txn", "transaction"}


async def crash_shop_after_commit_logged(cluster: Cluster, order_id: str) -> None:
    """Buys through a shop that dies right after logging COMMIT: both participants are
    left prepared, and nobody answers GetOutcome until the shop restarts."""
    await asyncio.to_thread(cluster.shop.restart, env={"TWOPC_CRASH_AT": "coordinator.after_commit_logged"})
    with pytest.raises(grpc.aio.AioRpcError):
        await cluster.purchase(order_id, "alice", {"widget": 1})
    assert held(cluster)


async def test_in_doubt_gauges_show_a_stuck_participant(cluster: Cluster) -> None:
    """A participant left prepared (its coordinator dead) shows one transaction in doubt, its
    age and unanswered questions; after the coordinator's restart, none."""
    await crash_shop_after_commit_logged(cluster, "o3")

    def gauges() -> tuple[float, float]:
        s = scrape(cluster.metrics_address["wallet"])
        return (
            value(s, "twopc_participant_in_doubt_transactions"),
            value(s, "twopc_participant_in_doubt_oldest_age_seconds"),
        )

    await eventually(lambda: gauges()[0] == 1 and gauges()[1] > 1.0, what="one in doubt for over a second")
    s = scrape(cluster.metrics_address["wallet"])
    assert value(s, "twopc_participant_in_doubt_questions_total", answer="unreachable") >= 1
    await asyncio.to_thread(cluster.shop.restart)
    await eventually(lambda: gauges() == (0, 0), what="resolved after the shop's restart")


async def test_sigterm_drains_a_participant_then_exits_zero(cluster: Cluster) -> None:
    """SIGTERM with a transaction prepared: NOT_SERVING, new Prepares UNAVAILABLE, and the
    Commit that arrives while draining is applied before the process exits 0."""
    await crash_shop_after_commit_logged(cluster, "o4")
    cluster.wallet.signal(signal.SIGTERM)
    await eventually(lambda: _status(cluster.wallet.address) == "NOT_SERVING", what="NOT_SERVING while draining")
    async with grpc.aio.insecure_channel(cluster.wallet.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await participant_pb2_grpc.ParticipantStub(ch).Prepare(prepare_request("late"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert cluster.wallet.running  # still draining: the prepared transaction is not decided yet
    await asyncio.to_thread(cluster.shop.restart)  # recovery re-sends Commit to the draining wallet
    assert await asyncio.to_thread(cluster.wallet.wait, 10) == 0
    assert not held(cluster)
    assert await cluster.order_state("o4") == "confirmed"


async def test_sigterm_under_load_loses_nothing(cluster: Cluster) -> None:
    """Purchases run while the wallet and then the shop get SIGTERM and restart: each exits 0,
    every purchase answered COMMITTED is confirmed, and the invariants hold."""
    committed: list[str] = []
    stop = asyncio.Event()

    async def buyer(b: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            order = f"b{b}-{i}"
            try:
                r = await cluster.purchase(order, "alice", {"widget": 1})
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)  # the shop is restarting: try again
                continue
            if r.outcome == shop_pb2.OUTCOME_COMMITTED:
                committed.append(order)
            else:
                await asyncio.sleep(0.05)  # the wallet is restarting

    async def five_more() -> None:
        n = len(committed)
        await eventually(lambda: len(committed) >= n + 5, what="five more purchases committed")

    await cluster.deposit("alice", 1_000_000)
    buyers = [asyncio.create_task(buyer(b)) for b in range(4)]
    try:
        for proc in (cluster.wallet, cluster.shop):
            await five_more()
            proc.signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
            await asyncio.to_thread(proc.restart)
        await five_more()
    finally:
        stop.set()
        await asyncio.gather(*buyers)
    for order in committed:
        assert await cluster.order_state(order) == "confirmed", order
    await eventually(lambda: cluster.check().ok, timeout_s=20, what="quiescent invariants")
    report = cluster.check()
    assert report.ok, report.violations
    assert report.committed >= len(committed)


def held(cluster: Cluster) -> list[tuple[object, ...]]:
    """The wallet's holds, read from its file."""
    return query(cluster.wallet_db, "SELECT txn_id, amount FROM holds")


def _status(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        reply: health_pb2.HealthCheckResponse = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
