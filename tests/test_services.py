"""The wallet and order services' business rules, against real server processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from services.common import MAX_AMOUNT
from services.order.v1 import order_pb2, order_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc.dev.pgserver import PostgresServer, schema
from twopc.dev.testing import ServiceProcess
from twopc.v1 import participant_pb2, participant_pb2_grpc


class Service:
    """A service process with a channel to it."""

    def __init__(self, proc: ServiceProcess, db: str) -> None:
        self.proc, self.db = proc, db
        self.channel = grpc.aio.insecure_channel(proc.address)
        self.twopc = participant_pb2_grpc.ParticipantStub(self.channel)

    async def prepare(self, txn_id: str, operation: Message) -> participant_pb2.PrepareResponse:
        packed = any_pb2.Any()
        packed.Pack(operation)
        return await self.twopc.Prepare(participant_pb2.PrepareRequest(txn_id=txn_id, operation=packed), timeout=5)

    async def commit(self, txn_id: str) -> None:
        await self.twopc.Commit(participant_pb2.CommitRequest(txn_id=txn_id), timeout=5)

    async def abort(self, txn_id: str) -> None:
        await self.twopc.Abort(participant_pb2.AbortRequest(txn_id=txn_id), timeout=5)

    async def restart(self) -> None:
        """SIGKILL and restart on the same port and file."""
        self.proc.kill()
        self.proc.restart()
        await self.channel.close(None)
        self.channel = grpc.aio.insecure_channel(self.proc.address)
        self.twopc = participant_pb2_grpc.ParticipantStub(self.channel)


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_for(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Where a service keeps its data, as its --db: a SQLite file, or a schema of its
    own on a PostgreSQL server. Every service test runs on both: same business code."""
    if request.param == "sqlite":
        yield lambda name: str(tmp_path / f"{name}.db")
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    with contextlib.ExitStack() as schemas:
        yield lambda name: schemas.enter_context(schema(server.url, prefix=name.replace(".", "_")))


async def _service(
    module: str, tmp_path: Path, procs: list[ServiceProcess], store_for: Callable[[str], str]
) -> Service:
    db = store_for(module)
    args = ["--db", db, "--insecure", "--allow-no-coordinator"]  # the test drives Prepare by hand
    proc = ServiceProcess(module, args, log_path=tmp_path / f"{module}.log").start()
    procs.append(proc)
    return Service(proc, db)


@pytest.fixture
async def wallet(
    tmp_path: Path, procs: list[ServiceProcess], store_for: Callable[[str], str]
) -> AsyncIterator[tuple[Service, Any]]:
    s = await _service("services.wallet", tmp_path, procs, store_for)
    api = wallet_pb2_grpc.WalletStub(s.channel)
    await api.OpenAccount(wallet_pb2.OpenAccountRequest(account="bob"), timeout=5)
    await api.Deposit(wallet_pb2.DepositRequest(account="bob", amount=300), timeout=5)
    yield s, api
    await s.channel.close(None)


@pytest.fixture
async def orders(
    tmp_path: Path, procs: list[ServiceProcess], store_for: Callable[[str], str]
) -> AsyncIterator[tuple[Service, Any]]:
    s = await _service("services.order", tmp_path, procs, store_for)
    api = order_pb2_grpc.OrdersStub(s.channel)
    await api.AddStock(order_pb2.AddStockRequest(sku="pen", quantity=5, unit_price=100), timeout=5)
    await api.AddStock(order_pb2.AddStockRequest(sku="ink", quantity=1, unit_price=50), timeout=5)
    yield s, api
    await s.channel.close(None)


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


async def balance(api: Any, account: str = "bob") -> tuple[int, int, int]:
    b = await api.GetBalance(wallet_pb2.GetBalanceRequest(account=account), timeout=5)
    return b.balance, b.held, b.available


def order(order_id: str, *items: tuple[str, int], account: str = "bob") -> order_pb2.PlaceOrder:
    return order_pb2.PlaceOrder(
        order_id=order_id, account=account, items=[order_pb2.Item(sku=s, quantity=q) for s, q in items]
    )


async def stock(api: Any, sku: str) -> tuple[int, int, int]:
    s = await api.GetStock(order_pb2.GetStockRequest(sku=sku), timeout=5)
    return s.on_hand, s.reserved, s.sold


# --- wallet ------------------------------------------------------------------------


async def test_wallet_debit_holds_then_commits_to_the_ledger(wallet: tuple[Service, Any]) -> None:
    """Prepare holds the amount (available drops, balance stays); commit debits it once."""
    svc, api = wallet
    vote = await svc.prepare("t1", wallet_pb2.Debit(account="bob", amount=120))
    assert vote.vote == participant_pb2.VOTE_COMMIT
    assert await balance(api) == (300, 120, 180)
    await svc.commit("t1")
    await svc.commit("t1")
    assert await balance(api) == (180, 0, 180)
    ledger = await api.ListLedger(wallet_pb2.ListLedgerRequest(account="bob"), timeout=5)
    assert [(e.kind, e.amount, e.txn_id) for e in ledger.entries] == [
        (wallet_pb2.ENTRY_KIND_DEPOSIT, 300, ""),
        (wallet_pb2.ENTRY_KIND_DEBIT, 120, "t1"),
    ]


async def test_wallet_abort_releases_the_hold(wallet: tuple[Service, Any]) -> None:
    """Abort after prepare releases the hold and debits nothing."""
    svc, api = wallet
    await svc.prepare("t1", wallet_pb2.Debit(account="bob", amount=200))
    await svc.abort("t1")
    assert await balance(api) == (300, 0, 300)


async def test_wallet_insufficient_funds_votes_abort_with_reason(wallet: tuple[Service, Any]) -> None:
    """Available below the amount (holds count): ABORT with a reason a person understands."""
    svc, api = wallet
    await svc.prepare("t1", wallet_pb2.Debit(account="bob", amount=200))
    vote = await svc.prepare("t2", wallet_pb2.Debit(account="bob", amount=150))
    assert vote.vote == participant_pb2.VOTE_ABORT
    assert vote.reason == "insufficient funds: available 100, needed 150"
    assert await balance(api) == (300, 200, 100)


@pytest.mark.parametrize(
    ("debit", "code"),
    [
        (wallet_pb2.Debit(account="bob", amount=0), grpc.StatusCode.INVALID_ARGUMENT),
        (wallet_pb2.Debit(account="bob", amount=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (wallet_pb2.Debit(account="bob", amount=MAX_AMOUNT + 1), grpc.StatusCode.INVALID_ARGUMENT),
        (wallet_pb2.Debit(account="bob", amount=2**63 - 1), grpc.StatusCode.INVALID_ARGUMENT),
        (wallet_pb2.Debit(account="", amount=5), grpc.StatusCode.INVALID_ARGUMENT),
        (wallet_pb2.Debit(account="nobody", amount=5), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_wallet_bad_debit_is_refused_and_changes_nothing(
    wallet: tuple[Service, Any], debit: wallet_pb2.Debit, code: grpc.StatusCode
) -> None:
    """Zero, negative, oversized amounts and unknown accounts: a clear status, nothing held."""
    svc, api = wallet
    assert await status_of(svc.prepare("t1", debit)) is code
    assert await balance(api) == (300, 0, 300)


async def test_wallet_api_rejects_bad_input(wallet: tuple[Service, Any]) -> None:
    """Duplicate or empty accounts, bad or overflowing deposits, unknown accounts."""
    _, api = wallet
    assert (
        await status_of(api.OpenAccount(wallet_pb2.OpenAccountRequest(account="bob"))) is grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        await status_of(api.OpenAccount(wallet_pb2.OpenAccountRequest(account=""))) is grpc.StatusCode.INVALID_ARGUMENT
    )
    for amount in (0, -1, MAX_AMOUNT + 1, 2**63 - 1):
        code = await status_of(api.Deposit(wallet_pb2.DepositRequest(account="bob", amount=amount)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(api.Deposit(wallet_pb2.DepositRequest(account="x", amount=1))) is grpc.StatusCode.NOT_FOUND
    assert await status_of(api.GetBalance(wallet_pb2.GetBalanceRequest(account="x"))) is grpc.StatusCode.NOT_FOUND
    assert await balance(api) == (300, 0, 300)


async def test_wallet_restart_keeps_balances_and_prepared_holds(wallet: tuple[Service, Any]) -> None:
    """SIGKILL after prepare: the restarted wallet still holds, and commits when told."""
    svc, _ = wallet
    await svc.prepare("t1", wallet_pb2.Debit(account="bob", amount=250))
    await svc.restart()
    api = wallet_pb2_grpc.WalletStub(svc.channel)
    assert await balance(api) == (300, 250, 50)
    await svc.commit("t1")
    assert await balance(api) == (50, 0, 50)


# --- orders ------------------------------------------------------------------------


async def test_order_reserves_every_item_then_ships_on_commit(orders: tuple[Service, Any]) -> None:
    """Several items: all reserved on prepare; commit ships them and confirms the order."""
    svc, api = orders
    vote = await svc.prepare("t1", order("o1", ("pen", 2), ("ink", 1)))
    assert vote.vote == participant_pb2.VOTE_COMMIT
    assert await stock(api, "pen") == (5, 2, 0) and await stock(api, "ink") == (1, 1, 0)
    pending = await api.GetOrder(order_pb2.GetOrderRequest(order_id="o1"), timeout=5)
    assert pending.state == order_pb2.ORDER_STATE_PENDING and pending.txn_id == "t1"
    await svc.commit("t1")
    assert await stock(api, "pen") == (3, 0, 2) and await stock(api, "ink") == (0, 0, 1)
    confirmed = await api.GetOrder(order_pb2.GetOrderRequest(order_id="o1"), timeout=5)
    assert confirmed.state == order_pb2.ORDER_STATE_CONFIRMED


async def test_order_abort_releases_and_cancels(orders: tuple[Service, Any]) -> None:
    """Abort releases every reservation and cancels the order."""
    svc, api = orders
    await svc.prepare("t1", order("o1", ("pen", 2), ("ink", 1)))
    await svc.abort("t1")
    assert await stock(api, "pen") == (5, 0, 0) and await stock(api, "ink") == (1, 0, 0)
    got = await api.GetOrder(order_pb2.GetOrderRequest(order_id="o1"), timeout=5)
    assert got.state == order_pb2.ORDER_STATE_CANCELLED


async def test_order_short_of_one_item_reserves_nothing(orders: tuple[Service, Any]) -> None:
    """All or nothing: one item short votes ABORT with the reason, nothing is reserved."""
    svc, api = orders
    vote = await svc.prepare("t1", order("o1", ("pen", 2), ("ink", 2)))
    assert vote.vote == participant_pb2.VOTE_ABORT
    assert vote.reason == "out of stock: ink available 1, needed 2"
    assert await stock(api, "pen") == (5, 0, 0) and await stock(api, "ink") == (1, 0, 0)
    assert await status_of(api.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))) is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("place", "code"),
    [
        (order("o9", ("nope", 1)), grpc.StatusCode.NOT_FOUND),
        (order("o9", ("pen", 0)), grpc.StatusCode.INVALID_ARGUMENT),
        (order("o9", ("pen", -3)), grpc.StatusCode.INVALID_ARGUMENT),
        (order("o9"), grpc.StatusCode.INVALID_ARGUMENT),
        (order("", ("pen", 1)), grpc.StatusCode.INVALID_ARGUMENT),
        (order("o9", ("pen", 1), account=""), grpc.StatusCode.INVALID_ARGUMENT),
        (order("o9", ("pen", 1), ("pen", 1)), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_order_bad_input_is_refused_and_changes_nothing(
    orders: tuple[Service, Any], place: order_pb2.PlaceOrder, code: grpc.StatusCode
) -> None:
    """Unknown SKU, quantity <= 0, missing fields, repeated SKU: a clear status, nothing reserved."""
    svc, api = orders
    assert await status_of(svc.prepare("t1", place)) is code
    assert await stock(api, "pen") == (5, 0, 0)
    listed = await api.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
    assert list(listed.orders) == []


async def test_order_id_reused_with_other_content_is_refused(orders: tuple[Service, Any]) -> None:
    """A second transaction for an order id: other content is INVALID_ARGUMENT, the same
    content is an ABORT vote (no double order), and neither changes anything."""
    svc, api = orders
    await svc.prepare("t1", order("o1", ("pen", 1)))
    await svc.commit("t1")
    assert await status_of(svc.prepare("t2", order("o1", ("pen", 2)))) is grpc.StatusCode.INVALID_ARGUMENT
    again = await svc.prepare("t3", order("o1", ("pen", 1)))
    assert again.vote == participant_pb2.VOTE_ABORT and "already confirmed" in again.reason
    assert await stock(api, "pen") == (4, 0, 1)


async def test_order_api_rejects_bad_stock(orders: tuple[Service, Any]) -> None:
    """AddStock: empty sku, negative quantity, new product without price are refused."""
    _, api = orders
    for request in (
        order_pb2.AddStockRequest(sku="", quantity=1, unit_price=1),
        order_pb2.AddStockRequest(sku="pen", quantity=-1),
        order_pb2.AddStockRequest(sku="new", quantity=1),
    ):
        assert await status_of(api.AddStock(request)) is grpc.StatusCode.INVALID_ARGUMENT
    assert await stock(api, "pen") == (5, 0, 0)
    assert await status_of(api.GetStock(order_pb2.GetStockRequest(sku="new"))) is grpc.StatusCode.NOT_FOUND


async def test_order_restart_keeps_stock_and_reservations(orders: tuple[Service, Any]) -> None:
    """SIGKILL after prepare: the restarted service still reserves, and aborts when told."""
    svc, _ = orders
    await svc.prepare("t1", order("o1", ("pen", 3)))
    await svc.restart()
    api = order_pb2_grpc.OrdersStub(svc.channel)
    assert await stock(api, "pen") == (5, 3, 0)
    await svc.abort("t1")
    assert await stock(api, "pen") == (5, 0, 0)


# --- paged lists ---------------------------------------------------------------------


async def test_ledger_pages_through_more_entries_than_one_page(wallet: tuple[Service, Any]) -> None:
    """ListLedger serves 250 entries in pages of the default 100, oldest first, each once."""
    svc, api = wallet
    await asyncio.gather(
        *(api.Deposit(wallet_pb2.DepositRequest(account="bob", amount=1), timeout=10) for _ in range(249))
    )
    await svc.prepare("t1", wallet_pb2.Debit(account="bob", amount=7))
    await svc.commit("t1")  # the 251st entry: a debit after the deposits
    pages: list[int] = []
    entries: list[Any] = []
    token = ""
    while True:
        page = await api.ListLedger(wallet_pb2.ListLedgerRequest(account="bob", page_token=token), timeout=5)
        pages.append(len(page.entries))
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            break
    assert pages == [100, 100, 51]
    assert [e.amount for e in entries] == [300] + [1] * 249 + [7]
    assert entries[-1].txn_id == "t1"
    small = await api.ListLedger(wallet_pb2.ListLedgerRequest(account="bob", page_size=7), timeout=5)
    assert len(small.entries) == 7 and small.next_page_token
    huge = await api.ListLedger(wallet_pb2.ListLedgerRequest(account="bob", page_size=10**6), timeout=5)
    assert len(huge.entries) == 251 and not huge.next_page_token


async def test_ledger_refuses_bad_paging_input(wallet: tuple[Service, Any]) -> None:
    """A negative page_size, a made-up token or another account's token is INVALID_ARGUMENT."""
    _, api = wallet
    await api.OpenAccount(wallet_pb2.OpenAccountRequest(account="eve"), timeout=5)
    await api.Deposit(wallet_pb2.DepositRequest(account="bob", amount=5), timeout=5)
    first = await api.ListLedger(wallet_pb2.ListLedgerRequest(account="bob", page_size=1), timeout=5)
    bad = [
        wallet_pb2.ListLedgerRequest(account="bob", page_size=-1),
        wallet_pb2.ListLedgerRequest(account="bob", page_token="not-a-token"),
        wallet_pb2.ListLedgerRequest(account="eve", page_token=first.next_page_token),
    ]
    for request in bad:
        assert await status_of(api.ListLedger(request, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_orders_page_through_more_orders_than_one_page(orders: tuple[Service, Any]) -> None:
    """ListOrders serves 130 orders in pages, in placing order, each once; bad paging input is refused."""
    svc, api = orders
    await api.AddStock(order_pb2.AddStockRequest(sku="pen", quantity=1000), timeout=5)
    for i in range(130):  # one by one: the order of placing is the order listed
        await svc.prepare(f"t{i}", order(f"o{i}", ("pen", 1)))
    await asyncio.gather(*(svc.commit(f"t{i}") for i in range(0, 130, 2)))
    listed: list[Any] = []
    token = ""
    while True:
        page = await api.ListOrders(order_pb2.ListOrdersRequest(page_size=50, page_token=token), timeout=5)
        assert len(page.orders) <= 50
        listed.extend(page.orders)
        token = page.next_page_token
        if not token:
            break
    assert [o.order_id for o in listed] == [f"o{i}" for i in range(130)]
    confirmed = [o.order_id for o in listed if o.state == order_pb2.ORDER_STATE_CONFIRMED]
    assert confirmed == [f"o{i}" for i in range(0, 130, 2)]
    first = await api.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
    assert len(first.orders) == 100 and first.next_page_token
    for request in [order_pb2.ListOrdersRequest(page_size=-5), order_pb2.ListOrdersRequest(page_token="eA==")]:
        assert await status_of(api.ListOrders(request, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_buyers_racing_for_the_last_item_exactly_one_reserves(orders: tuple[Service, Any]) -> None:
    """Two Prepares for the last unit of a product, at once (ten times over): exactly one
    reserves it; the other votes ABORT with a reason, never an error."""
    svc, api = orders
    for round_ in range(10):
        sku = f"lamp{round_}"
        await api.AddStock(order_pb2.AddStockRequest(sku=sku, quantity=1, unit_price=10), timeout=5)
        votes = await asyncio.gather(
            svc.prepare(f"t{round_}a", order(f"o{round_}a", (sku, 1), account="ann")),
            svc.prepare(f"t{round_}b", order(f"o{round_}b", (sku, 1), account="ben")),
        )
        assert sorted(v.vote for v in votes) == [participant_pb2.VOTE_COMMIT, participant_pb2.VOTE_ABORT]
        loser = next(v for v in votes if v.vote == participant_pb2.VOTE_ABORT)
        assert "out of stock" in loser.reason or "conflict" in loser.reason, loser.reason
        assert await stock(api, sku) == (1, 1, 0)
