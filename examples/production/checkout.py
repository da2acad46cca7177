"""A purchase through the coordinator service, under mutual TLS as identity "checkout".

    python examples/production/checkout.py ORDER_ID ACCOUNT SKU QUANTITY AMOUNT

Debits AMOUNT (minor units) at the wallet and places the order at the order service,
atomically, by one Execute call; ORDER_ID is the transaction id, so running the same
command again is a safe retry. Prints the global transaction id, then "committed" or
"aborted <reason>". COORDINATOR and CERTS in the environment override the defaults
(127.0.0.1:7000, examples/production/certs/checkout).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from services.order.v1.order_pb2 import Item, PlaceOrder
from services.wallet.v1.wallet_pb2 import Debit
from twopc import Branch, Credentials, TransactionsClient

HERE = Path(__file__).resolve().parent


async def checkout(order_id: str, account: str, sku: str, quantity: int, amount: int) -> None:
    credentials = Credentials.from_dir(os.environ.get("CERTS", HERE / "certs" / "checkout"))
    async with TransactionsClient(os.environ.get("COORDINATOR", "127.0.0.1:7000"), credentials=credentials) as client:
        place = PlaceOrder(order_id=order_id, account=account, items=[Item(sku=sku, quantity=quantity)], amount=amount)
        result = await client.execute(
            [Branch("wallet", Debit(account=account, amount=amount), name="wallet"), Branch("orders", place)],
            txn_id=order_id,
        )
    print(result.txn_id)
    print(result.outcome.value, result.reason) if result.reason else print(result.outcome.value)


if __name__ == "__main__":
    order_id, account, sku, quantity, amount = sys.argv[1:6]
    asyncio.run(checkout(order_id, account, sku, int(quantity), int(amount)))
