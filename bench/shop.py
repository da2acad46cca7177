"""Purchases through the real wallet and order services: a debit and an order.

Each caller `i` is its own customer (account `acct-i`) buying its own product
(`sku-i`), so callers do not contend for one row, as in a shop with many customers.
Accounts and stock are seeded far beyond what a run can spend, so every purchase
commits; order ids are unique per run.
"""

from __future__ import annotations

import importlib.util
import itertools
import uuid

import grpc

from services.order.v1 import order_pb2, order_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc import Branch

PRICE_CENTS = 100
SEED_CENTS = 1_000_000_000  # ten million purchases per account
SEED_STOCK = 1_000_000_000


def missing() -> str:
    """Why the services cannot run here, or "" if they can."""
    absent = [f"services/{m}/__main__.py" for m in ("wallet", "order") if not _has_main(f"services.{m}")]
    return f"not found: {', '.join(absent)}" if absent else ""


def _has_main(package: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.__main__") is not None
    except ImportError:
        return False


class Shop:
    """Builds purchase transactions against a wallet and an order service.

    Args:
        wallet: the wallet service's address.
        orders: the order service's address.
    """

    def __init__(self, wallet: str, orders: str) -> None:
        self.wallet, self.orders = wallet, orders
        self._customers = 0
        self._run = uuid.uuid4().hex[:8]
        self._order_ids = itertools.count()

    async def seed(self, customers: int) -> None:
        """Opens accounts with plenty of money and stocks products for `customers`
        callers (only those not seeded already)."""
        async with grpc.aio.insecure_channel(self.wallet) as wc, grpc.aio.insecure_channel(self.orders) as oc:
            wallet = wallet_pb2_grpc.WalletStub(wc)
            orders = order_pb2_grpc.OrdersStub(oc)
            for i in range(self._customers, customers):
                try:
                    await wallet.OpenAccount(wallet_pb2.OpenAccountRequest(account=f"acct-{i}"), timeout=5)
                except grpc.aio.AioRpcError as e:  # a reused --workdir
                    if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                await wallet.Deposit(wallet_pb2.DepositRequest(account=f"acct-{i}", amount=SEED_CENTS), timeout=5)
                await orders.AddStock(
                    order_pb2.AddStockRequest(sku=f"sku-{i}", quantity=SEED_STOCK, unit_price=PRICE_CENTS), timeout=5
                )
        self._customers = max(self._customers, customers)

    def purchase(self, i: int) -> list[Branch]:
        """Caller `i` buys one unit of its product: debit its account, place an order."""
        debit = wallet_pb2.Debit(account=f"acct-{i}", amount=PRICE_CENTS)
        order = order_pb2.PlaceOrder(
            order_id=f"{self._run}-{next(self._order_ids)}",
            account=f"acct-{i}",
            items=[order_pb2.Item(sku=f"sku-{i}", quantity=1)],
        )
        return [Branch(self.wallet, debit, name="wallet"), Branch(self.orders, order, name="order")]
