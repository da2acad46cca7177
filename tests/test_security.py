"""Mutual TLS and authorization on every service, against real processes.

Every test runs the services as the README says, with a throwaway CA: "wallet",
"orders" and "shop" are the services, "operator" seeds, and "intruder" holds a
certificate the same CA signed but is named in no allowlist.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from google.protobuf import any_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cluster import Cluster
from services.order.v1 import order_pb2, order_pb2_grpc
from services.shop.v1 import shop_pb2, shop_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.conftest import Kv, op
from twopc import Branch, Coordinator, CoordinatorConfig, Credentials, Outcome, rpc
from twopc.dev.testing import ServiceProcess
from twopc.security import limits, pki
from twopc.security.auth import BAD_REQUEST, Authorizer, Policy, coordinator_rules, grant
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

pytest.importorskip("cryptography", reason="needs the cryptography package (pip install twopc[tls])")

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status an RPC ended with (OK if it returned)."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return OK


def dump(db: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a store, read as another process would."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


def packed(operation: Message) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(operation)
    return value


class As:
    """Stubs to the cluster's services, calling as one identity (or as nobody)."""

    def __init__(self, c: Cluster, credentials: Credentials) -> None:
        self.channels = {
            n: rpc.channel(p.address, credentials)
            for n, p in (("wallet", c.wallet), ("orders", c.orders), ("shop", c.shop))
        }
        self.wallet = wallet_pb2_grpc.WalletStub(self.channels["wallet"])
        self.orders = order_pb2_grpc.OrdersStub(self.channels["orders"])
        self.shop = shop_pb2_grpc.ShopStub(self.channels["shop"])
        self.wallet_2pc = participant_pb2_grpc.ParticipantStub(self.channels["wallet"])
        self.orders_2pc = participant_pb2_grpc.ParticipantStub(self.channels["orders"])
        self.outcome = coordinator_pb2_grpc.CoordinatorStub(self.channels["shop"])

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(None)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path, tls=True, identities=["intruder"]) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 5, 1_000)
        yield c


@pytest.fixture
async def callers(cluster: Cluster) -> AsyncIterator[dict[str, As]]:
    names = ("wallet", "orders", "shop", "operator", "intruder", "client")
    found = {n: As(cluster, Credentials.from_dir(cluster.pki / n)) for n in names}
    yield found
    for a in found.values():
        await a.close()


def stores(c: Cluster) -> list[dict[str, list[tuple[Any, ...]]]]:
    return [dump(db) for db in (c.wallet_db, c.orders_db, c.shop_db)]


# --- transport ------------------------------------------------------------------------


async def test_mutual_tls_accepts_a_certificate_from_the_ca(cluster: Cluster, callers: dict[str, As]) -> None:
    """A client whose certificate the CA signed reads over mutual TLS."""
    balance = await callers["operator"].wallet.GetBalance(wallet_pb2.GetBalanceRequest(account="alice"), timeout=5)
    assert balance.balance == 10_000


async def test_mutual_tls_refuses_other_ca_no_certificate_and_plaintext(cluster: Cluster, tmp_path: Path) -> None:
    """Another CA's certificate, no client certificate, and plaintext never reach a servicer."""
    other = pki.issue(tmp_path / "other-ca", ["operator"], ca_name="someone else's CA")
    ca = (cluster.pki / "ca.pem").read_bytes()
    no_cert = Credentials(channel=grpc.ssl_channel_credentials(root_certificates=ca), server=None)
    before = stores(cluster)
    for credentials in (Credentials.from_dir(other / "operator"), no_cert, Credentials.insecure()):
        async with rpc.channel(cluster.wallet.address, credentials) as ch:
            deposit = wallet_pb2.DepositRequest(account="alice", amount=1)
            assert (
                await code_of(wallet_pb2_grpc.WalletStub(ch).Deposit(deposit, timeout=5)) is grpc.StatusCode.UNAVAILABLE
            )
    assert stores(cluster) == before


async def test_the_server_certificate_must_come_from_the_trusted_ca(cluster: Cluster, tmp_path: Path) -> None:
    """A client that trusts another CA refuses the service's certificate."""
    other = pki.issue(tmp_path / "other-ca", ["operator"], ca_name="someone else's CA")
    mixed = Credentials.mutual_tls(
        cluster.pki / "operator" / "cert.pem", cluster.pki / "operator" / "key.pem", other / "ca.pem"
    )
    async with rpc.channel(cluster.wallet.address, mixed) as ch:
        request = wallet_pb2.GetBalanceRequest(account="alice")
        assert (
            await code_of(wallet_pb2_grpc.WalletStub(ch).GetBalance(request, timeout=5)) is grpc.StatusCode.UNAVAILABLE
        )


def test_plaintext_binds_only_loopback_unless_told(tmp_path: Path) -> None:
    """--insecure on a non-loopback address exits; --insecure-beyond-loopback allows it."""
    argv = ["--db", str(tmp_path / "w.db"), "--insecure"]
    refused = ServiceProcess("services.wallet", argv, log_path=tmp_path / "w.log", host="0.0.0.0")
    with pytest.raises(RuntimeError, match="exited"):
        refused.start()
    assert "refusing plaintext on 0.0.0.0" in (tmp_path / "w.log").read_text()
    allowed = ServiceProcess(
        "services.wallet",
        [*argv, "--insecure-beyond-loopback"],
        log_path=tmp_path / "w2.log",
        host="0.0.0.0",
    )
    try:
        allowed.start()
    finally:
        allowed.stop()


def test_a_service_needs_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    """Without --tls-* or --insecure a service refuses to start."""
    proc = ServiceProcess("services.wallet", ["--db", str(tmp_path / "w.db")], log_path=tmp_path / "w.log")
    with pytest.raises(RuntimeError, match="exited"):
        proc.start()
    assert "--insecure" in (tmp_path / "w.log").read_text()


# --- authorization --------------------------------------------------------------------


def debit(c: Cluster, txn_id: str, amount: int = 100) -> participant_pb2.PrepareRequest:
    op = packed(wallet_pb2.Debit(account="alice", amount=amount))
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=op, coordinator=c.shop.address)


async def test_only_coordinators_drive_a_participant(cluster: Cluster, callers: dict[str, As]) -> None:
    """Prepare, Commit, CommitMany and Abort: the shop may; operator, intruder and a peer participant may not."""
    for name in ("operator", "intruder", "orders"):
        a = callers[name]
        before = stores(cluster)
        assert await code_of(a.wallet_2pc.Prepare(debit(cluster, f"x-{name}"), timeout=5)) is DENIED
        assert await code_of(a.wallet_2pc.Commit(participant_pb2.CommitRequest(txn_id="t"), timeout=5)) is DENIED
        assert (
            await code_of(a.wallet_2pc.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["t"]), timeout=5))
            is DENIED
        )
        assert await code_of(a.wallet_2pc.Abort(participant_pb2.AbortRequest(txn_id="t"), timeout=5)) is DENIED
        place = packed(
            order_pb2.PlaceOrder(order_id="o1", account="alice", items=[order_pb2.Item(sku="widget", quantity=1)])
        )
        prepare = participant_pb2.PrepareRequest(txn_id="y", operation=place, coordinator=cluster.shop.address)
        assert await code_of(a.orders_2pc.Prepare(prepare, timeout=5)) is DENIED
        assert stores(cluster) == before
    shop = callers["shop"]
    vote = await shop.wallet_2pc.Prepare(debit(cluster, "by-shop"), timeout=5)
    assert vote.vote == participant_pb2.VOTE_COMMIT
    assert await code_of(shop.wallet_2pc.Abort(participant_pb2.AbortRequest(txn_id="by-shop"), timeout=5)) is OK
    log = (cluster.workdir / "wallet.log").read_text()
    assert '"identity": "intruder"' in log and '"event": "refused"' in log


async def test_only_operators_move_money_and_stock(cluster: Cluster, callers: dict[str, As]) -> None:
    """OpenAccount, Deposit and AddStock (prices) only from the operator; reads only from --readers and owners."""
    before = stores(cluster)
    for name in ("shop", "intruder", "wallet"):
        a = callers[name]
        assert (
            await code_of(a.wallet.Deposit(wallet_pb2.DepositRequest(account="alice", amount=10**6), timeout=5))
            is DENIED
        )
        assert (
            await code_of(a.wallet.OpenAccount(wallet_pb2.OpenAccountRequest(account="mallory"), timeout=5)) is DENIED
        )
        reprice = order_pb2.AddStockRequest(sku="widget", quantity=0, unit_price=1)
        assert await code_of(a.orders.AddStock(reprice, timeout=5)) is DENIED
    assert stores(cluster) == before
    intruder = callers["intruder"]  # reads nothing by default: not a reader, owns nothing
    assert await code_of(intruder.wallet.GetBalance(wallet_pb2.GetBalanceRequest(account="alice"), timeout=5)) is DENIED
    for ch in intruder.channels.values():  # health checks: only whoever may read
        health = health_pb2_grpc.HealthStub(ch)
        assert await code_of(health.Check(health_pb2.HealthCheckRequest(), timeout=5)) is DENIED
    assert await code_of(intruder.orders.GetStock(order_pb2.GetStockRequest(sku="widget"), timeout=5)) is DENIED
    client = callers["client"]  # alice's owner reads alice
    assert await code_of(client.wallet.GetBalance(wallet_pb2.GetBalanceRequest(account="alice"), timeout=5)) is OK
    operator = callers["operator"]
    assert await code_of(operator.wallet.Deposit(wallet_pb2.DepositRequest(account="alice", amount=1), timeout=5)) is OK
    assert await code_of(operator.orders.AddStock(order_pb2.AddStockRequest(sku="widget", quantity=1), timeout=5)) is OK


async def test_only_participants_ask_the_coordinator(cluster: Cluster, callers: dict[str, As]) -> None:
    """GetOutcome answers the wallet and orders; the operator and an intruder are refused."""
    request = coordinator_pb2.GetOutcomeRequest(txn_id="nothing")
    for name in ("wallet", "orders"):
        assert await code_of(callers[name].outcome.GetOutcome(request, timeout=5)) is OK
    for name in ("operator", "intruder", "shop"):
        assert await code_of(callers[name].outcome.GetOutcome(request, timeout=5)) is DENIED


async def test_allowlists_are_configurable(cluster: Cluster, tmp_path: Path) -> None:
    """--readers and --purchasers narrow who may read and buy; everyone else is refused."""
    wallet = ServiceProcess(
        "services.wallet",
        ["--db", str(tmp_path / "w2.db"), "--tls-dir", str(cluster.pki / "wallet"), "--readers", "operator"],
        log_path=tmp_path / "w2.log",
    ).start()
    shop = ServiceProcess(
        "services.shop",
        ["--db", str(tmp_path / "s2.db"), "--tls-dir", str(cluster.pki / "shop"), "--purchasers", "operator"],
        log_path=tmp_path / "s2.log",
    )
    shop.args += ["--wallet", cluster.wallet.address, "--orders", cluster.orders.address]
    shop.start()
    try:
        for name, code in (("operator", grpc.StatusCode.NOT_FOUND), ("intruder", DENIED)):
            async with rpc.channel(wallet.address, Credentials.from_dir(cluster.pki / name)) as ch:
                read = wallet_pb2_grpc.WalletStub(ch).GetBalance(
                    wallet_pb2.GetBalanceRequest(account="alice"), timeout=5
                )
                assert await code_of(read) is code
        async with rpc.channel(shop.address, Credentials.from_dir(cluster.pki / "intruder")) as ch:
            buy = shop_pb2.PurchaseRequest(
                order_id="o", account="alice", items=[order_pb2.Item(sku="widget", quantity=1)]
            )
            assert await code_of(shop_pb2_grpc.ShopStub(ch).Purchase(buy, timeout=5)) is DENIED
    finally:
        wallet.stop()
        shop.stop()


def buy(order_id: str, account: str) -> shop_pb2.PurchaseRequest:
    return shop_pb2.PurchaseRequest(
        order_id=order_id, account=account, items=[order_pb2.Item(sku="widget", quantity=1)]
    )


async def test_only_an_account_s_owner_buys_with_it_and_sees_its_orders(tmp_path: Path) -> None:
    """A purchaser buys only with an account it owns; a service identity never buys, even when
    listed; another buyer's purchase and order read as absent, and a non-owner reads no ledger."""
    shop_args = ["--purchasers", "client,intruder,orders"]
    async with Cluster(tmp_path, tls=True, identities=["intruder"], shop_args=shop_args) as c:
        await c.open_account("alice", 10_000)  # owned by "client"
        await c.open_account("mallory", 10_000, owners=["intruder"])
        await c.add_stock("widget", 5, 1_000)
        callers = {n: As(c, Credentials.from_dir(c.pki / n)) for n in ("client", "intruder", "orders")}
        try:
            before = stores(c)
            intruder, orders, client = callers["intruder"], callers["orders"], callers["client"]
            assert await code_of(intruder.shop.Purchase(buy("stolen", "alice"), timeout=10)) is DENIED
            assert await code_of(orders.shop.Purchase(buy("by-service", "alice"), timeout=10)) is DENIED
            assert await code_of(client.shop.Purchase(buy("not-mine", "mallory"), timeout=10)) is DENIED
            assert await code_of(client.shop.Purchase(buy("nobody-s", "no-such"), timeout=10)) is DENIED
            assert stores(c) == before  # refused before any transaction: nothing held, logged or ordered
            bought = await client.shop.Purchase(buy("mine", "alice"), timeout=10)
            assert bought.outcome == shop_pb2.OUTCOME_COMMITTED, bought.reason
            assert (await c.balance("alice")).balance == 9_000 and (await c.balance("mallory")).balance == 10_000
            not_found = grpc.StatusCode.NOT_FOUND
            see = shop_pb2.GetPurchaseRequest(order_id="mine")
            assert await code_of(client.shop.GetPurchase(see, timeout=5)) is OK
            assert await code_of(intruder.shop.GetPurchase(see, timeout=5)) is not_found
            assert await code_of(intruder.orders.GetOrder(order_pb2.GetOrderRequest(order_id="mine"), timeout=5)) is (
                not_found
            )
            assert (await client.orders.GetOrder(order_pb2.GetOrderRequest(order_id="mine"), timeout=5)).buyer == (
                "client"
            )
            listed = await intruder.orders.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
            assert list(listed.orders) == []
            ledger = wallet_pb2.ListLedgerRequest(account="alice")
            assert await code_of(intruder.wallet.ListLedger(ledger, timeout=5)) is DENIED
            assert len((await client.wallet.ListLedger(ledger, timeout=5)).entries) == 2  # deposit, debit
            again = await code_of(intruder.shop.Purchase(buy("mine", "mallory"), timeout=10))
            assert again is grpc.StatusCode.ALREADY_EXISTS  # another's order id is not a way in
        finally:
            for a in callers.values():
                await a.close()


async def test_purchases_are_rate_limited_per_identity(tmp_path: Path) -> None:
    """Past its burst a purchaser gets RESOURCE_EXHAUSTED and nothing is written; another
    identity still buys."""
    shop_args = ["--purchasers", "client,intruder", "--purchase-rate-per-s", "0.01", "--purchase-burst", "2"]
    async with Cluster(tmp_path, tls=True, identities=["intruder"], shop_args=shop_args) as c:
        await c.open_account("alice", 10_000)
        await c.open_account("mallory", 10_000, owners=["intruder"])
        await c.add_stock("widget", 5, 1_000)
        for i in range(2):
            assert (await c.purchase(f"o{i}", "alice", {"widget": 1})).outcome == shop_pb2.OUTCOME_COMMITTED
        before = stores(c)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await c.purchase("o2", "alice", {"widget": 1})
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "purchase rate" in (refused.value.details() or "")
        assert stores(c) == before
        intruder = As(c, Credentials.from_dir(c.pki / "intruder"))
        try:
            assert (await intruder.shop.Purchase(buy("m", "mallory"), timeout=10)).outcome == (
                shop_pb2.OUTCOME_COMMITTED
            )
        finally:
            await intruder.close()
    assert '"event": "purchase_rate_limited"' in (tmp_path / "shop.log").read_text()


def test_only_serving_identities_get_server_certificates(tmp_path: Path) -> None:
    """`operator` and `client` get client-only certificates without host names; services get both."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root = pki.issue(tmp_path / "pki", ["shop", "operator", "client"])

    def of(name: str) -> tuple[set[str], list[Any]]:
        cert = x509.load_pem_x509_certificate((root / name / "cert.pem").read_bytes())
        uses = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {u.dotted_string for u in uses}, [str(n.value) for n in alt]

    server, client = ExtendedKeyUsageOID.SERVER_AUTH.dotted_string, ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string
    assert of("shop") == ({server, client}, ["shop", "127.0.0.1", "::1"])
    for name in ("operator", "client"):
        assert of(name) == ({client}, [name])


async def test_a_purchase_commits_over_mutual_tls(cluster: Cluster) -> None:
    """The whole protocol runs under mutual TLS and authorization: a purchase commits at both services."""
    response = await cluster.purchase("o-1", "alice", {"widget": 2})
    assert response.outcome == shop_pb2.OUTCOME_COMMITTED, response.reason
    report = await cluster.settled()
    assert report.ok, report.violations
    assert (await cluster.balance("alice")).balance == 8_000


# --- the interceptor itself, on a server of our own -------------------------------------


async def serve_demo(root: Path, credentials: Credentials) -> tuple[grpc.aio.Server, int, list[bytes]]:
    """A server of our own with a streaming and a unary RPC, only "reader" allowed."""
    served: list[bytes] = []

    async def numbers(request: bytes, context: Any) -> AsyncIterator[bytes]:
        served.append(request)
        for i in range(3):
            yield bytes([i])

    async def echo(request: bytes, context: Any) -> bytes:
        served.append(request)
        return request

    handlers = {
        "Numbers": grpc.unary_stream_rpc_method_handler(numbers),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    server = rpc.server([Authorizer(Policy(grant(["reader"], "test.v1.Demo", "Numbers", "Echo")))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.v1.Demo", handlers)])
    port = rpc.add_port(server, "127.0.0.1:0", credentials)
    await server.start()
    return server, port, served


async def call_demo(port: int, credentials: Credentials) -> tuple[grpc.StatusCode, list[bytes], grpc.StatusCode]:
    """(status of the stream, its items, status of the unary call)."""
    async with rpc.channel(f"127.0.0.1:{port}", credentials) as ch:
        stream = ch.unary_stream("/test.v1.Demo/Numbers")(b"n", timeout=5)  # type: ignore[call-arg]  # bytes as they are
        try:
            items = [item async for item in stream]
            stream_code = OK
        except grpc.aio.AioRpcError as e:
            items, stream_code = [], e.code()
        unary = ch.unary_unary("/test.v1.Demo/Echo")(b"e", timeout=5)  # type: ignore[call-arg]  # bytes as they are
        return stream_code, items, await code_of(unary)


async def test_authorizer_guards_streaming_rpcs_too(tmp_path: Path) -> None:
    """A streaming RPC is authorized like a unary one: the allowed name streams, another is refused."""
    root = pki.issue(tmp_path / "pki", ["server", "reader", "intruder"])
    server, port, served = await serve_demo(root, Credentials.from_dir(root / "server"))
    try:
        assert await call_demo(port, Credentials.from_dir(root / "reader")) == (OK, [b"\x00", b"\x01", b"\x02"], OK)
        assert await call_demo(port, Credentials.from_dir(root / "intruder")) == (DENIED, [], DENIED)
    finally:
        await server.stop(None)
    assert served == [b"n", b"e"]  # only the reader's calls reached a handler


async def test_a_caller_without_a_verified_name_is_unauthenticated(tmp_path: Path) -> None:
    """Server-only TLS (no client certificates): every caller is UNAUTHENTICATED and reaches nothing."""
    root = pki.issue(tmp_path / "pki", ["server", "reader"])
    chain, key = (root / "server" / "cert.pem").read_bytes(), (root / "server" / "key.pem").read_bytes()
    ca = (root / "ca.pem").read_bytes()
    server_only = Credentials(channel=None, server=grpc.ssl_server_credentials([(key, chain)]))
    server, port, served = await serve_demo(root, server_only)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    try:
        for credentials in (
            Credentials.from_dir(root / "reader"),  # presented, but never requested nor verified
            Credentials(channel=grpc.ssl_channel_credentials(root_certificates=ca), server=None),
        ):
            assert await call_demo(port, credentials) == (unauthenticated, [], unauthenticated)
    finally:
        await server.stop(None)
    assert served == []


async def test_a_coordinators_own_get_outcome_server_takes_a_policy(tmp_path: Path) -> None:
    """`Coordinator(listen=..., policy=...)`: only the participants it names may ask
    GetOutcome on the coordinator's own server; another identity of the same CA is
    refused with PERMISSION_DENIED."""
    root = pki.issue(tmp_path / "pki", ["coordinator", "wallet", "intruder"])
    policy = Policy(coordinator_rules(["wallet"]))
    async with Coordinator(
        tmp_path / "d.db", credentials=Credentials.from_dir(root / "coordinator"), listen="127.0.0.1:0", policy=policy
    ) as c:
        ask = coordinator_pb2.GetOutcomeRequest(txn_id=f"{c.id}:nothing")
        for who, expected in (("wallet", OK), ("intruder", DENIED)):
            async with rpc.channel(c.address, Credentials.from_dir(root / who)) as ch:
                assert await code_of(coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(ask, timeout=5)) == expected


async def test_bytes_that_do_not_parse_are_invalid_argument_under_plaintext_too(
    start_kv: Callable[..., Kv],
) -> None:
    """Without TLS (no policy) a frame that is not protobuf still gets INVALID_ARGUMENT with the
    fixed message, never UNKNOWN naming the parser's exception."""
    kv = start_kv()
    async with rpc.channel(kv.target, Credentials.insecure()) as ch:
        send = ch.unary_unary("/twopc.v1.Participant/Prepare")  # type: ignore[call-arg]  # bytes as they are
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(b"\xff", timeout=5)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST)


async def test_a_coordinator_names_tls_mistakes_instead_of_timing_out(
    tmp_path: Path, start_kv: Callable[..., Kv]
) -> None:
    """A branch served in plaintext, and one whose certificate comes from another CA: the
    transaction aborts with each branch's TLS failure named (not DEADLINE_EXCEEDED), and
    `tls_failed` is logged for each target."""
    root = pki.issue(tmp_path / "pki", ["shop"])
    other = pki.issue(tmp_path / "other-ca", ["wallet"], ca_name="someone else's CA")
    plain = start_kv()
    foreign = ServiceProcess(
        "tests.apps.impostor", ["--tls-dir", str(other / "wallet")], log_path=tmp_path / "foreign.log"
    ).start()
    try:
        credentials = Credentials.from_dir(root / "shop")
        config = CoordinatorConfig(one_phase=False, abort_retry_s=0.5)  # two-phase: an abort, not an unknown
        reasons = {}
        async with Coordinator(tmp_path / "d.db", credentials=credentials, config=config) as c:
            with structlog.testing.capture_logs() as logs:
                for name, target in (("plain", plain.target), ("foreign", f"wallet@{foreign.address}")):
                    result = await c.run([Branch(target, op(key="k", amount=1), name=name)], timeout_s=3.0)
                    assert result.outcome is Outcome.ABORTED
                    reasons[name] = result.branches[0].reason
    finally:
        foreign.stop()
    assert "does not speak TLS" in reasons["plain"], reasons
    assert "not signed by a trusted CA" in reasons["foreign"], reasons
    assert "DEADLINE_EXCEEDED" not in str(reasons)
    named = {e["target"] for e in logs if e["event"] == "tls_failed"}
    assert named == {plain.target, f"wallet@{foreign.address}"}


async def test_servers_bound_the_streams_and_window_one_connection_gets(cluster: Cluster) -> None:
    """Every server advertises at most 1000 concurrent streams per connection and the default
    64 KiB stream window (no growth), so 200 connections x 200 half-sent streams cannot make it
    hold what a 4 MiB window lets them send (figures in docs/security.md)."""
    from tests.apps import halfopen

    for proc, name in ((cluster.wallet, "wallet"), (cluster.orders, "orders"), (cluster.shop, "shop")):
        conn = await asyncio.to_thread(halfopen.connect, proc.address, cluster.pki / "client", name)
        try:
            settings = await asyncio.to_thread(halfopen.server_settings, conn)
        finally:
            conn.close()
        assert settings.get(halfopen.MAX_CONCURRENT_STREAMS) == rpc.MAX_STREAMS_PER_CONNECTION == 1000, settings
        assert settings.get(halfopen.INITIAL_WINDOW_SIZE, 65_535) <= 65_535, settings


async def test_the_console_refuses_cross_site_requests_and_foreign_hosts(tmp_path: Path) -> None:
    """The demo console: a text/plain or form POST from any page is 415, a JSON POST from
    another Origin or without the session token is 403, a request naming another Host
    (DNS rebinding) is 403 even for reading; nothing is bought or paused. Its own page's
    request, with the token, is served."""
    import aiohttp

    console = ServiceProcess(
        "services.console", ["--demo", "--workdir", str(tmp_path / "console")], log_path=tmp_path / "console.log"
    )
    console.start(timeout_s=60)
    base, own = f"http://{console.address}", {"Origin": f"http://{console.address}"}
    buy = json.dumps({"account": "alice", "items": {"widget": 1}})
    pause = json.dumps({"kind": "pause", "service": "wallet"})
    try:
        async with aiohttp.ClientSession() as http:
            token = (await (await http.get(f"{base}/api/catalogue")).json())["token"]
            attempts = [
                ("/api/purchase", buy, {"Content-Type": "text/plain", "Origin": "http://evil.example"}, 415),
                ("/api/fault", pause, {"Content-Type": "text/plain", **own, "X-Console-Token": token}, 415),
                ("/api/purchase", buy, {"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
                ("/api/fault", pause, {"Content-Type": "application/json", "X-Console-Token": token}, 403),
                ("/api/purchase", buy, {"Content-Type": "application/json", **own}, 403),
                ("/api/purchase", buy, {"Content-Type": "application/json", **own, "X-Console-Token": "guess"}, 403),
            ]
            for path, body, headers, code in attempts:
                async with http.post(f"{base}{path}", data=body, headers=headers) as r:
                    assert r.status == code, (path, headers, r.status, await r.text())
            rebound = {"Host": f"evil.example:{console.port}"}
            async with http.get(f"{base}/api/state", headers=rebound) as r:
                assert r.status == 403
            state = await (await http.get(f"{base}/api/state")).json()
            assert all(s["running"] for s in state["services"].values())  # nothing paused
            alice = next(b for b in state["buyers"] if b["account"] == "alice")
            headers = {"Content-Type": "application/json", **own, "X-Console-Token": token}
            async with http.post(f"{base}/api/purchase", data=buy, headers=headers) as r:
                assert r.status == 200 and (await r.json())["outcome"] == "COMMITTED"
            after = await (await http.get(f"{base}/api/state")).json()
            assert next(b for b in after["buyers"] if b["account"] == "alice")["balance"] < alice["balance"]
    finally:
        console.stop(timeout_s=20)


def test_the_rate_limit_refills_per_identity_and_forgets_the_oldest() -> None:
    """A bucket per identity: `burst` at once, then `rate_per_s`; identities past the bound
    are forgotten oldest first (a forgotten one starts full again)."""
    now = [0.0]
    rate = limits.RateLimit(2.0, 3, max_identities=2, clock=lambda: now[0])
    assert [rate.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("b")  # another identity has its own bucket
    now[0] = 0.5  # one token back for "a"
    assert [rate.allow("a"), rate.allow("a")] == [True, False]
    rate.allow("c")  # a third identity: "b", the least recent, is forgotten
    assert set(rate._buckets) == {"a", "c"}
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        limits.RateLimit(0.0, 1)
