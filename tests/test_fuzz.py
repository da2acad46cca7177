"""Hypothesis against the real servers over gRPC, under mutual TLS.

Valid and invalid requests go to every RPC of the wallet, the order service and the
shop, from every identity: the ones each RPC allows and the ones it does not. After
each call: no UNKNOWN or INTERNAL for any input; a caller the policy does not allow
got PERMISSION_DENIED; a refused call changed nothing in any store. At the end: the
invariants of docs/design.md hold and every server still answers.

FUZZ_EXAMPLES sets how many calls (`make fuzz FUZZ_EXAMPLES=20000`); the default
is what CI runs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cluster import Cluster, Settings
from services.order.v1 import order_pb2, order_pb2_grpc
from services.shop.v1 import shop_pb2, shop_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.test_security import dump
from twopc import Credentials
from twopc.dev.testing import query, wait_until
from twopc.security import limits
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

pytest.importorskip("cryptography", reason="needs the cryptography package (pip install twopc[tls])")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3000"))
IDENTITIES = ("operator", "shop", "wallet", "orders", "intruder", "client")
ACCOUNTS = ("alice", "bob")
SKUS = ("widget", "gadget")
PARTICIPANT = "twopc.v1.Participant"
ANYONE = frozenset(IDENTITIES)
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class Call:
    """One fuzzed RPC: where it goes, what it carries, and who may make it."""

    service: str  # "wallet", "orders" or "shop"
    stub: str  # the stub class's attribute on `Callers`
    method: str
    request: Message
    allowed: frozenset[str]


class Callers:
    """Blocking stubs to each service as each identity (sync gRPC, for hypothesis)."""

    def __init__(self, c: Cluster) -> None:
        self.channels: list[grpc.Channel] = []
        self.stubs: dict[tuple[str, str, str], Any] = {}
        kinds = {
            "wallet": {"api": wallet_pb2_grpc.WalletStub, "twopc": participant_pb2_grpc.ParticipantStub},
            "orders": {"api": order_pb2_grpc.OrdersStub, "twopc": participant_pb2_grpc.ParticipantStub},
            "shop": {"api": shop_pb2_grpc.ShopStub, "outcome": coordinator_pb2_grpc.CoordinatorStub},
        }
        for identity in IDENTITIES:
            creds = Credentials.from_dir(c.pki / identity).channel
            assert creds is not None
            for service, proc in (("wallet", c.wallet), ("orders", c.orders), ("shop", c.shop)):
                ch = grpc.secure_channel(proc.address, creds)
                self.channels.append(ch)
                for kind, stub in kinds[service].items():
                    self.stubs[identity, service, kind] = stub(ch)

    def call(self, identity: str, call: Call) -> tuple[grpc.StatusCode, Any]:
        rpc = getattr(self.stubs[identity, call.service, call.stub], call.method)
        try:
            return grpc.StatusCode.OK, rpc(call.request, timeout=30)
        except grpc.RpcError as e:
            return e.code(), None

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


# --- strategies -------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=30),
    st.integers(0, 400_000).map(lambda n: "x" * n),
    st.text(alphabet="abc-:._", min_size=limits.MAX_ID_LEN - 2, max_size=limits.MAX_TXN_ID_LEN + 2),
)
ids = st.one_of(st.sampled_from([*ACCOUNTS, *SKUS, "o1", "o2"]), texts)
accounts = st.one_of(st.sampled_from(ACCOUNTS), ids)
skus = st.one_of(st.sampled_from(SKUS), ids)
ints = st.one_of(st.sampled_from([0, 1, 7, 100, 5_000, 10**9, 10**12, 10**12 + 1]), st.integers(-(2**63), 2**63 - 1))
small = st.one_of(st.integers(1, 3), ints)
floats = st.one_of(st.sampled_from([0.0, 2.0]), st.floats(allow_nan=True, allow_infinity=True))
items = st.lists(st.builds(order_pb2.Item, sku=skus, quantity=small), max_size=4) | st.integers(
    limits.MAX_ITEMS + 1, limits.MAX_ITEMS + 3
).map(lambda n: [order_pb2.Item(sku=f"s{i}", quantity=1) for i in range(n)])
# Every id the fuzzer prepares starts "fp-", and Commit and CommitMany ids never do:
# a coordinator committing what it never decided breaks the log invariant by its
# own hand, and a coordinator is trusted not to.
# Well-formed requests, weighted in beside the fuzzed ones, so that calls also succeed.
good_items = st.lists(
    st.builds(order_pb2.Item, sku=st.sampled_from(SKUS), quantity=st.integers(1, 3)),
    min_size=1,
    max_size=2,
    unique_by=lambda i: i.sku,
)
good_order_ids = st.text(alphabet="abcdef0123", min_size=1, max_size=8)
good_debit = st.builds(wallet_pb2.Debit, account=st.sampled_from(ACCOUNTS), amount=st.integers(1, 1_000))
good_place = st.builds(
    order_pb2.PlaceOrder, order_id=good_order_ids, account=st.sampled_from(ACCOUNTS), items=good_items
)
commit_ids = ids.filter(lambda s: not s.startswith("fp-"))
prepared_ids = itertools.count()


def packed(message: Message) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


def operations(service: str) -> st.SearchStrategy[any_pb2.Any]:
    valid = (
        st.one_of(good_debit, st.builds(wallet_pb2.Debit, account=accounts, amount=small))
        if service == "wallet"
        else st.one_of(good_place, st.builds(order_pb2.PlaceOrder, order_id=ids, account=accounts, items=items))
    )
    name = "wallet.v1.Debit" if service == "wallet" else "order.v1.PlaceOrder"
    return st.one_of(
        valid.map(packed),
        st.builds(any_pb2.Any, type_url=st.just(f"type.googleapis.com/{name}"), value=st.binary(max_size=64)),
        st.builds(any_pb2.Any, type_url=texts, value=st.binary(max_size=16)),
    )


def participant_calls(service: str, shop_address: str) -> st.SearchStrategy[Call]:
    coordinator = st.one_of(st.just(shop_address), st.just(shop_address), st.just(""), texts)
    prepare = st.builds(
        lambda txn_id, fresh, coordinator, operation, one_phase: participant_pb2.PrepareRequest(
            txn_id=f"fp-{next(prepared_ids)}" if fresh else f"fp-{txn_id}",
            coordinator=coordinator,
            operation=operation,
            one_phase=one_phase,
        ),
        ids,
        st.booleans(),
        coordinator,
        operations(service),
        st.booleans(),
    )
    shop_only = frozenset({"shop"})
    return st.one_of(
        prepare.map(lambda r: Call(service, "twopc", "Prepare", r, shop_only)),
        commit_ids.map(lambda t: Call(service, "twopc", "Commit", participant_pb2.CommitRequest(txn_id=t), shop_only)),
        ids.map(lambda t: Call(service, "twopc", "Abort", participant_pb2.AbortRequest(txn_id=t), shop_only)),
        st.lists(commit_ids, max_size=3)
        .map(lambda ts: participant_pb2.CommitManyRequest(txn_ids=ts))
        .map(lambda r: Call(service, "twopc", "CommitMany", r, shop_only)),
    )


def calls(shop_address: str) -> st.SearchStrategy[Call]:
    operators = frozenset({"operator"})
    readers = frozenset({"operator", "shop"})  # what the cluster gives --readers; owners read their own
    purchasers = frozenset({"client"})
    wallet = st.one_of(
        accounts.map(
            lambda a: Call("wallet", "api", "OpenAccount", wallet_pb2.OpenAccountRequest(account=a), operators)
        ),
        st.builds(wallet_pb2.DepositRequest, account=st.one_of(st.sampled_from(ACCOUNTS), accounts), amount=small).map(
            lambda r: Call("wallet", "api", "Deposit", r, operators)
        ),
        accounts.map(lambda a: Call("wallet", "api", "GetBalance", wallet_pb2.GetBalanceRequest(account=a), ANYONE)),
        accounts.map(lambda a: Call("wallet", "api", "ListLedger", wallet_pb2.ListLedgerRequest(account=a), ANYONE)),
    )
    orders = st.one_of(
        st.builds(order_pb2.AddStockRequest, sku=skus, quantity=small, unit_price=st.one_of(st.just(0), ints)).map(
            lambda r: Call("orders", "api", "AddStock", r, operators)
        ),
        skus.map(lambda s: Call("orders", "api", "GetStock", order_pb2.GetStockRequest(sku=s), readers)),
        ids.map(lambda o: Call("orders", "api", "GetOrder", order_pb2.GetOrderRequest(order_id=o), ANYONE)),
        st.just(Call("orders", "api", "ListOrders", order_pb2.ListOrdersRequest(), ANYONE)),
    )
    purchases = st.one_of(
        st.builds(
            shop_pb2.PurchaseRequest,
            order_id=good_order_ids,
            account=st.sampled_from(ACCOUNTS),
            items=good_items,
            timeout_s=st.sampled_from([0.0, 2.0]),
        ),
        st.builds(shop_pb2.PurchaseRequest, order_id=ids, account=accounts, items=items, timeout_s=floats),
    )
    shop = st.one_of(
        purchases.map(lambda r: Call("shop", "api", "Purchase", r, purchasers)),
        st.one_of(good_order_ids, ids).map(
            lambda o: Call("shop", "api", "GetPurchase", shop_pb2.GetPurchaseRequest(order_id=o), purchasers)
        ),
        ids.map(
            lambda t: Call(
                "shop",
                "outcome",
                "GetOutcome",
                coordinator_pb2.GetOutcomeRequest(txn_id=t),
                frozenset({"wallet", "orders"}),
            )
        ),
    )
    return st.one_of(
        wallet, orders, shop, participant_calls("wallet", shop_address), participant_calls("orders", shop_address)
    )


# --- the run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # The resolver stays out of the way while fuzzing (a transaction the fuzzer
    # prepared stays PREPARED until the end), so a store changes only by a call.
    c = Cluster(
        tmp_path_factory.mktemp("fuzz"),
        Settings(in_doubt_after_s=3600.0, resolve_interval_s=1.0, log_level="warning"),
        tls=True,
        identities=["intruder"],
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def callers(cluster: Cluster) -> Iterator[Callers]:
    found = Callers(cluster)
    for account in ACCOUNTS:
        opened = wallet_pb2.OpenAccountRequest(account=account, owners=["client"])
        found.call("operator", Call("wallet", "api", "OpenAccount", opened, ANYONE))
        found.call(
            "operator",
            Call("wallet", "api", "Deposit", wallet_pb2.DepositRequest(account=account, amount=10**6), ANYONE),
        )
    for sku in SKUS:
        found.call(
            "operator",
            Call("orders", "api", "AddStock", order_pb2.AddStockRequest(sku=sku, quantity=50, unit_price=100), ANYONE),
        )
    yield found
    found.close()


def state(c: Cluster) -> list[Any]:
    """What a refused call must not change: both participants' stores, whole, and
    the shop's decisions (without END times, which phase 2 sets in the background)."""
    return [dump(c.wallet_db), dump(c.orders_db), query(c.shop_db, "SELECT txn_id FROM decisions ORDER BY 1")]


def settle(c: Cluster, response: Any) -> None:
    """After a purchase, waits until both participants have the decision (an abort
    reaches them after the shop answers)."""
    txn_id = getattr(response, "txn_id", "")
    if not txn_id:
        return

    def decided(db: Path | str) -> bool:
        rows = query(db, "SELECT state FROM twopc_txn WHERE txn_id = ?", txn_id)
        return bool(rows) and rows[0][0] != "PREPARED"

    settled = asyncio.run(wait_until(lambda: decided(c.wallet_db) and decided(c.orders_db), 20.0, interval_s=0.01))
    assert settled, f"the participants never learned the decision of {txn_id}"


def test_fuzzed_requests_from_every_identity(cluster: Cluster, callers: Callers) -> None:
    """Valid and invalid requests to every RPC from allowed and refused identities: never UNKNOWN or
    INTERNAL, refused callers get PERMISSION_DENIED, refused calls change nothing, invariants hold."""
    seen: dict[tuple[str, str], int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(call=calls(cluster.shop.address), identity=st.sampled_from(IDENTITIES))
    def one(call: Call, identity: str) -> None:
        if isinstance(call.request, participant_pb2.PrepareRequest) and identity == "shop":
            call.request.one_phase = False  # one-phase by hand commits outside the shop's log (see commit_ids)
        before = state(cluster)
        code, response = callers.call(identity, call)
        seen[call.method, code.name] = seen.get((call.method, code.name), 0) + 1
        assert code not in BAD_CODES, (call.method, identity, code)
        if identity not in call.allowed:
            assert code is grpc.StatusCode.PERMISSION_DENIED, (call.method, identity, code)
        if code is not grpc.StatusCode.OK:
            assert state(cluster) == before, (call.method, identity, code)
        elif call.method == "Purchase":
            settle(cluster, response)

    one()
    # The fuzzer's own prepared transactions: the shop never decided them, so the
    # coordinator's answer is abort (presumed abort); send it as the shop would.
    for db, service in ((cluster.wallet_db, "wallet"), (cluster.orders_db, "orders")):
        for (txn_id,) in query(db, "SELECT txn_id FROM twopc_txn WHERE state = 'PREPARED'"):
            code, _ = callers.call(
                "shop", Call(service, "twopc", "Abort", participant_pb2.AbortRequest(txn_id=txn_id), ANYONE)
            )
            assert code is grpc.StatusCode.OK
    report = cluster.check()
    assert report.ok, report.violations
    for service, stub, method, request in (
        ("wallet", "api", "GetBalance", wallet_pb2.GetBalanceRequest(account="alice")),
        ("orders", "api", "GetStock", order_pb2.GetStockRequest(sku="widget")),
        ("shop", "outcome", "GetOutcome", coordinator_pb2.GetOutcomeRequest(txn_id="t")),
    ):
        identity = "wallet" if service == "shop" else "operator"
        assert callers.call(identity, Call(service, stub, method, request, ANYONE))[0] is grpc.StatusCode.OK
    assert len({m for m, _ in seen}) >= 12, seen  # every RPC was exercised
    print("fuzz:", EXAMPLES, "examples;", dict(sorted(seen.items())))


# --- raw bytes: frames that do not parse, to every RPC of the three services ------------------

SERVICES = {
    "wallet": [
        participant_pb2.DESCRIPTOR.services_by_name["Participant"],
        wallet_pb2.DESCRIPTOR.services_by_name["Wallet"],
    ],
    "orders": [
        participant_pb2.DESCRIPTOR.services_by_name["Participant"],
        order_pb2.DESCRIPTOR.services_by_name["Orders"],
    ],
    "shop": [coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"], shop_pb2.DESCRIPTOR.services_by_name["Shop"]],
}
ALLOWED = {  # who the cluster's policies let through (before any parsing), by method name
    "Prepare": {"shop"},
    "PrepareMany": {"shop"},
    "Commit": {"shop"},
    "CommitMany": {"shop"},
    "Abort": {"shop"},
    "OpenAccount": {"operator"},
    "Deposit": {"operator"},
    "AddStock": {"operator"},
    "GetStock": {"operator", "shop"},
    "GetBalance": set(IDENTITIES),
    "ListLedger": set(IDENTITIES),
    "GetOrder": set(IDENTITIES),
    "ListOrders": set(IDENTITIES),
    "GetOutcome": {"wallet", "orders"},
    "Purchase": {"client"},
    "GetPurchase": {"client"},
}
NOT_PROTOBUF = (b"\xff", b"\x0a\xff\xff\xff\xff", b"\x08", b"\x12\x05ab", b"\x80" * 11, b"\x0f")
"""Frames no message parses: a bad tag, a truncated length, a missing varint, a short
string, an overlong varint, an end-group tag without a start."""


def raw_calls() -> list[tuple[str, str, str]]:
    """(service process, full method path, method name) for every RPC of the three services."""
    return [
        (process, f"/{service.full_name}/{method.name}", method.name)
        for process, services in SERVICES.items()
        for service in services
        for method in service.methods
    ]


def test_raw_bytes_to_every_rpc(cluster: Cluster, callers: Callers) -> None:
    """Frames that are not protobuf, to every RPC from every identity: a refused caller gets
    PERMISSION_DENIED (authorization comes before parsing), an allowed one INVALID_ARGUMENT
    with the fixed message; never UNKNOWN or INTERNAL, and nothing changes."""
    from twopc.security.auth import BAD_REQUEST

    assert {name for _, _, name in raw_calls()} == set(ALLOWED)  # a new RPC must be added above
    addresses = {"wallet": cluster.wallet.address, "orders": cluster.orders.address, "shop": cluster.shop.address}
    before = state(cluster)
    seen: dict[str, int] = {}
    for identity in IDENTITIES:
        creds = Credentials.from_dir(cluster.pki / identity).channel
        assert creds is not None
        for process, path, name in raw_calls():
            with grpc.secure_channel(addresses[process], creds) as ch:
                send = ch.unary_unary(path)  # type: ignore[call-arg]  # bytes as they are
                for frame in NOT_PROTOBUF:
                    try:
                        send(frame, timeout=10)
                        code, details = grpc.StatusCode.OK, ""
                    except grpc.RpcError as e:
                        code, details = e.code(), e.details() or ""
                    seen[code.name] = seen.get(code.name, 0) + 1
                    assert code not in BAD_CODES, (path, identity, frame, details)
                    if identity in ALLOWED[name]:
                        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST), (path, identity)
                    else:
                        assert code is grpc.StatusCode.PERMISSION_DENIED, (path, identity, code)
    assert state(cluster) == before
    print("raw bytes:", dict(sorted(seen.items())))


@given(frame=st.binary(max_size=256), target=st.sampled_from(raw_calls()), identity=st.sampled_from(IDENTITIES))
@settings(
    max_examples=max(EXAMPLES // 10, 50),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_fuzzed_raw_bytes_never_answer_unknown(
    cluster: Cluster, callers: Callers, frame: bytes, target: tuple[str, str, str], identity: str
) -> None:
    """Arbitrary bytes to any RPC as any identity: never UNKNOWN or INTERNAL; a refused caller
    gets PERMISSION_DENIED whatever the bytes."""
    process, path, name = target
    address = {"wallet": cluster.wallet.address, "orders": cluster.orders.address, "shop": cluster.shop.address}
    creds = Credentials.from_dir(cluster.pki / identity).channel
    assert creds is not None
    with grpc.secure_channel(address[process], creds) as ch:
        try:
            ch.unary_unary(path)(frame, timeout=30)  # type: ignore[call-arg]  # bytes as they are
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    assert code not in BAD_CODES, (path, identity, frame)
    if identity not in ALLOWED[name]:
        assert code is grpc.StatusCode.PERMISSION_DENIED, (path, identity, code)
