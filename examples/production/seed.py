"""Opens an account with money and puts stock on sale, as the "operator" identity.

    python examples/production/seed.py ACCOUNT CENTS SKU QUANTITY UNIT_PRICE

WALLET, ORDERS and CERTS in the environment override the defaults (127.0.0.1:7001,
127.0.0.1:7002, examples/production/certs/operator).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from services.order.v1 import order_pb2, order_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc

CERTS = Path(os.environ.get("CERTS", Path(__file__).resolve().parent / "certs" / "operator"))


def seed(account: str, cents: int, sku: str, quantity: int, unit_price: int) -> None:
    tls = grpc.ssl_channel_credentials(
        (CERTS / "ca.pem").read_bytes(), (CERTS / "key.pem").read_bytes(), (CERTS / "cert.pem").read_bytes()
    )
    with grpc.secure_channel(os.environ.get("WALLET", "127.0.0.1:7001"), tls) as channel:
        wallet = wallet_pb2_grpc.WalletStub(channel)
        wallet.OpenAccount(wallet_pb2.OpenAccountRequest(account=account), timeout=5)
        balance = wallet.Deposit(wallet_pb2.DepositRequest(account=account, amount=cents), timeout=5).balance
    with grpc.secure_channel(os.environ.get("ORDERS", "127.0.0.1:7002"), tls) as channel:
        orders = order_pb2_grpc.OrdersStub(channel)
        request = order_pb2.AddStockRequest(sku=sku, quantity=quantity, unit_price=unit_price)
        stock = orders.AddStock(request, timeout=5)
    print(f"{account}: {balance.available} cents; {sku}: {stock.available} in stock")


if __name__ == "__main__":
    account, cents, sku, quantity, unit_price = sys.argv[1:6]
    seed(account, int(cents), sku, int(quantity), int(unit_price))
