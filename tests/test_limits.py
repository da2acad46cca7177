"""Every input has a bound (twopc.security.limits), and input past it is INVALID_ARGUMENT.

The services run as real processes; each oversized or malformed request must be
refused with INVALID_ARGUMENT and a short message, change nothing in any store, and
leave no unbounded string in any log.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from services.cluster import Cluster
from services.order.v1 import order_pb2
from services.shop.v1 import shop_pb2
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.conftest import FAST, INSECURE
from tests.test_security import dump
from twopc import Branch, Coordinator, CoordinatorConfig, ParticipantConfig, rpc
from twopc.security import limits
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BIG = "x" * 1_000_000


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status and message an RPC was refused with; fails if it succeeded."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded")


async def invalid(call: Awaitable[Any]) -> None:
    """Asserts INVALID_ARGUMENT with a message that does not echo the input."""
    code, details = await refusal(call)
    assert code is INVALID, (code, details[:300])
    assert len(details) < 300, len(details)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 5, 1_000)
        await c.add_stock("gold", 5, 10**12)
        yield c


def stores(c: Cluster) -> list[dict[str, list[tuple[Any, ...]]]]:
    return [dump(db) for db in (c.wallet_db, c.orders_db, c.shop_db)]


def longest_log_line(c: Cluster) -> int:
    return max(len(line) for name in ("wallet", "orders", "shop") for line in (c.workdir / f"{name}.log").open())


def packed(type_url: str, value: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


async def test_participant_refuses_oversized_and_malformed_input(cluster: Cluster) -> None:
    """Long or odd txn ids, a huge coordinator, too many CommitMany ids, undecodable or oversized
    operations: INVALID_ARGUMENT, a short message, nothing stored, nothing long logged."""
    before = stores(cluster)
    debit = any_pb2.Any()
    debit.Pack(wallet_pb2.Debit(account="alice", amount=1))
    shop = cluster.shop.address
    async with rpc.channel(cluster.wallet.address, INSECURE) as ch:
        stub = participant_pb2_grpc.ParticipantStub(ch)

        def prepare(txn_id: str = "t", operation: any_pb2.Any = debit, coordinator: str = shop) -> Any:
            request = participant_pb2.PrepareRequest(txn_id=txn_id, operation=operation, coordinator=coordinator)
            return stub.Prepare(request, timeout=10)

        for txn_id in (BIG, "a b", "tab\there", "nul\x00", "é", "x" * (limits.MAX_TXN_ID_LEN + 1)):
            await invalid(prepare(txn_id))
            await invalid(stub.Commit(participant_pb2.CommitRequest(txn_id=txn_id), timeout=10))
            await invalid(stub.Abort(participant_pb2.AbortRequest(txn_id=txn_id), timeout=10))
        for _ in range(4):
            await invalid(stub.Abort(participant_pb2.AbortRequest(txn_id="y" * 4_000_000), timeout=10))
        await invalid(prepare(coordinator=BIG))
        await invalid(prepare(operation=packed("type.googleapis.com/wallet.v1.Debit", b"\xff\xff\xff\xff")))
        await invalid(prepare(operation=packed("type.googleapis.com/wallet.v1.Debit", b"\x00" * 70_000)))
        await invalid(prepare(operation=packed("type.googleapis.com/" + BIG, b"")))
        await invalid(prepare(operation=packed("type.googleapis.com/nope.v1.Nope", b"")))
        many = [f"t{i}" for i in range(limits.MAX_COMMIT_MANY + 1)]
        await invalid(stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=many), timeout=10))
        await invalid(stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=["ok", BIG]), timeout=10))
        # The bound itself is accepted: an id of exactly MAX_TXN_ID_LEN characters.
        vote = await prepare("z" * limits.MAX_TXN_ID_LEN)
        assert vote.vote == participant_pb2.VOTE_COMMIT
        await stub.Abort(participant_pb2.AbortRequest(txn_id="z" * limits.MAX_TXN_ID_LEN), timeout=10)
    after = stores(cluster)
    after[0]["twopc_txn"] = [r for r in after[0]["twopc_txn"] if r[0] != "z" * limits.MAX_TXN_ID_LEN]
    assert after == before
    assert longest_log_line(cluster) < 4_000


async def test_services_refuse_long_ids_and_big_orders(cluster: Cluster) -> None:
    """Wallet, orders and shop refuse ids past their bound, orders past MAX_ITEMS, and never echo them."""
    before = stores(cluster)
    wallet = cluster.wallet_api
    await invalid(wallet.OpenAccount(wallet_pb2.OpenAccountRequest(account=BIG), timeout=10))
    await invalid(wallet.Deposit(wallet_pb2.DepositRequest(account=BIG, amount=1), timeout=10))
    await invalid(wallet.GetBalance(wallet_pb2.GetBalanceRequest(account=BIG), timeout=10))
    await invalid(cluster.orders_api.AddStock(order_pb2.AddStockRequest(sku=BIG, quantity=1, unit_price=1), timeout=10))
    await invalid(cluster.orders_api.GetOrder(order_pb2.GetOrderRequest(order_id=BIG), timeout=10))
    await invalid(cluster.orders_api.ListOrders(order_pb2.ListOrdersRequest(page_token=BIG), timeout=10))
    await invalid(wallet.ListLedger(wallet_pb2.ListLedgerRequest(account="alice", page_token=BIG), timeout=10))
    items = [order_pb2.Item(sku=f"s{i}", quantity=1) for i in range(limits.MAX_ITEMS + 1)]
    place = any_pb2.Any()
    place.Pack(order_pb2.PlaceOrder(order_id="o", account="alice", items=items))
    async with rpc.channel(cluster.orders.address, INSECURE) as ch:
        request = participant_pb2.PrepareRequest(txn_id="t", operation=place, coordinator=cluster.shop.address)
        await invalid(participant_pb2_grpc.ParticipantStub(ch).Prepare(request, timeout=10))
    for order_id, account, its in ((BIG, "alice", items[:1]), ("o", BIG, items[:1]), ("o", "alice", items)):
        purchase = shop_pb2.PurchaseRequest(order_id=order_id, account=account, items=its)
        await invalid(cluster.shop_api.Purchase(purchase, timeout=10))
    async with rpc.channel(cluster.shop.address, INSECURE) as ch:
        outcome = coordinator_pb2.GetOutcomeRequest(txn_id=BIG)
        await invalid(coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(outcome, timeout=10))
    assert stores(cluster) == before
    assert longest_log_line(cluster) < 4_000


async def test_purchase_refuses_bad_timeouts_and_overflowing_amounts(cluster: Cluster) -> None:
    """NaN, infinite, negative or huge timeouts, and quantity x price past int64: INVALID_ARGUMENT, not UNKNOWN."""
    before = stores(cluster)
    one = [order_pb2.Item(sku="widget", quantity=1)]
    for timeout_s in (math.nan, math.inf, -math.inf, -1.0, limits.MAX_TIMEOUT_S + 1):
        purchase = shop_pb2.PurchaseRequest(order_id="o", account="alice", items=one, timeout_s=timeout_s)
        await invalid(cluster.shop_api.Purchase(purchase, timeout=10))
    gold = [order_pb2.Item(sku="gold", quantity=10**9)]  # 10**12 x 10**9 overflows int64
    await invalid(
        cluster.shop_api.Purchase(shop_pb2.PurchaseRequest(order_id="o", account="alice", items=gold), timeout=10)
    )
    many = [order_pb2.Item(sku="gold", quantity=5_000_000), order_pb2.Item(sku="gold2", quantity=5_000_000)]
    await cluster.add_stock("gold2", 1, 10**12)  # each line fits; their sum does not
    after_stock = stores(cluster)
    await invalid(
        cluster.shop_api.Purchase(shop_pb2.PurchaseRequest(order_id="o", account="alice", items=many), timeout=10)
    )
    assert stores(cluster) == after_stock
    assert before[0] == after_stock[0] and before[2] == after_stock[2]


async def test_the_library_refuses_out_of_bound_transactions_and_settings(tmp_path: Path) -> None:
    """Too many branches, a NaN/inf/negative deadline, a malformed txn id, NaN settings: ValueError."""
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
        branches = [Branch(f"127.0.0.1:{i + 1}", wallet_pb2.Debit()) for i in range(limits.MAX_BRANCHES + 1)]
        with pytest.raises(ValueError, match="at most"):
            await c.run(branches)
        for timeout_s in (math.nan, math.inf, -1.0, 0.0):
            with pytest.raises(ValueError, match="timeout_s"):
                await c.run(branches[:1], timeout_s=timeout_s)
        with pytest.raises(ValueError, match="txn_id"):
            await c.run(branches[:1], txn_id="has space")
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="prepare_timeout_s"):
            CoordinatorConfig(prepare_timeout_s=bad)
        with pytest.raises(ValueError, match="phase2_wait_s"):
            CoordinatorConfig(phase2_wait_s=bad)
        with pytest.raises(ValueError, match="rpc_timeout_s"):
            ParticipantConfig(rpc_timeout_s=bad)


def test_limits_check_and_clip() -> None:
    """The checks accept the bound and refuse past it; clip marks what it cut; messages never echo input."""
    limits.check_id("id", "a" * limits.MAX_ID_LEN)
    with pytest.raises(limits.LimitError) as caught:
        limits.check_id("id", "secret" * 1000)
    assert "secret" not in str(caught.value)
    with pytest.raises(limits.LimitError):
        limits.check_id("id", "")
    limits.check_id("id", "", required=False)
    assert limits.checked_product("p", 2**31, 2**31) == 2**62
    with pytest.raises(limits.LimitError):
        limits.checked_product("p", 2**32, 2**32)
    assert limits.clip("abc", 5) == "abc"
    assert limits.clip("x" * 10, 4) == "xxxx...(10 chars)"
    limits.check_timeout("t", 0.0)
    with pytest.raises(limits.LimitError):
        limits.check_timeout("t", math.nan)


async def test_requests_at_every_bound_succeed(cluster: Cluster) -> None:
    """A well-formed request just under every bound still succeeds (no bound is off by one)."""
    account = "a" * limits.MAX_ID_LEN
    await cluster.open_account(account, 5)
    async with rpc.channel(cluster.wallet.address, INSECURE) as ch:
        balance = await wallet_pb2_grpc.WalletStub(ch).GetBalance(
            wallet_pb2.GetBalanceRequest(account=account), timeout=5
        )
    assert balance.balance == 5
    purchase = shop_pb2.PurchaseRequest(
        order_id="o" * limits.MAX_ID_LEN,
        account="alice",
        items=[order_pb2.Item(sku="widget", quantity=1)],
        timeout_s=limits.MAX_TIMEOUT_S,
    )
    response = await cluster.shop_api.Purchase(purchase, timeout=20)
    assert response.outcome == shop_pb2.OUTCOME_COMMITTED
