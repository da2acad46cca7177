"""Gives an account money at the wallet and points at the loyalty service, through
their own APIs, so that checkout.py has something to spend.

    python seed.py ACCOUNT CENTS POINTS

WALLET and LOYALTY in the environment are the services' addresses, as for checkout.py.
"""

from __future__ import annotations

import os
import sys

import grpc
from loyalty.v1 import loyalty_pb2, loyalty_pb2_grpc

from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc


def seed(account: str, cents: int, points: int) -> None:
    with grpc.insecure_channel(os.environ.get("WALLET", "127.0.0.1:50051")) as channel:
        wallet = wallet_pb2_grpc.WalletStub(channel)
        try:
            wallet.OpenAccount(wallet_pb2.OpenAccountRequest(account=account), timeout=5)
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise
        balance = wallet.Deposit(wallet_pb2.DepositRequest(account=account, amount=cents), timeout=5).balance
    with grpc.insecure_channel(os.environ.get("LOYALTY", "127.0.0.1:50061")) as channel:
        loyalty = loyalty_pb2_grpc.LoyaltyStub(channel)
        awarded = loyalty.Award(loyalty_pb2.AwardRequest(account=account, points=points), timeout=5)
    print(f"{account}: {balance.available} cents, {awarded.available} points")


if __name__ == "__main__":
    seed(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
