"""A coordinator over the loyalty service and the wallet: pay part in money, part
in points, atomically. Either both are taken or neither is.

    python checkout.py ACCOUNT CENTS POINTS

The addresses come from the environment: WALLET (the project's wallet service),
LOYALTY (loyalty_service.py) and OUTCOME (where this coordinator serves GetOutcome;
keep it stable across restarts so participants in doubt can ask).
"""

from __future__ import annotations

import asyncio
import os
import sys

from loyalty.v1.loyalty_pb2 import RedeemPoints

import twopc.logs
from services.wallet.v1.wallet_pb2 import Debit
from twopc import Branch, Coordinator, Credentials


async def checkout(account: str, cents: int, points: int) -> str:
    wallet = os.environ.get("WALLET", "127.0.0.1:50051")
    loyalty = os.environ.get("LOYALTY", "127.0.0.1:50061")
    outcome = os.environ.get("OUTCOME", "127.0.0.1:50060")
    async with Coordinator("checkout.db", credentials=Credentials.insecure(), listen=outcome) as coordinator:
        result = await coordinator.run(
            [
                Branch(wallet, Debit(account=account, amount=cents), name="wallet"),
                Branch(loyalty, RedeemPoints(account=account, points=points), name="loyalty"),
            ],
            timeout_s=2.0,
        )
    return f"{result.outcome.value} {result.reason}".strip()


if __name__ == "__main__":
    account, cents, points = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    twopc.logs.configure("console")  # events to standard error, at info
    print(asyncio.run(checkout(account, cents, points)))
