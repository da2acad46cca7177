"""A coordinator over the loyalty service and the wallet: pay part in money, part
in points, atomically. Either both are taken or neither is.

    python checkout.py ACCOUNT CENTS POINTS   # prints the txn id, then the outcome
    python checkout.py outcome TXN_ID         # what became of it, read from the log

The addresses come from the environment: WALLET (the project's wallet service),
LOYALTY (loyalty_service.py) and OUTCOME (where this coordinator serves GetOutcome;
keep it stable across restarts so participants in doubt can ask). The decision log
is checkout.db in the working directory: keep it, it is the commit point.
"""

from __future__ import annotations

import asyncio
import os
import sys

from loyalty.v1.loyalty_pb2 import RedeemPoints

from services.wallet.v1.wallet_pb2 import Debit
from twopc import Branch, Coordinator, Credentials, configure_logging

LOG = "checkout.db"


async def checkout(account: str, cents: int, points: int) -> None:
    wallet = os.environ.get("WALLET", "127.0.0.1:50051")
    loyalty = os.environ.get("LOYALTY", "127.0.0.1:50061")
    outcome = os.environ.get("OUTCOME", "127.0.0.1:50060")
    async with Coordinator(LOG, credentials=Credentials.insecure(), listen=outcome) as coordinator:
        result = await coordinator.run(
            [
                Branch(wallet, Debit(account=account, amount=cents), name="wallet"),
                Branch(loyalty, RedeemPoints(account=account, points=points), name="loyalty"),
            ],
            timeout_s=2.0,
        )
    print(result.txn_id)
    print(f"{result.outcome.value} {result.reason}".strip())  # an abort is a result, with its reason


async def outcome_of(txn_id: str) -> None:
    # A caller that lost run()'s answer asks the log; no server needed for that.
    async with Coordinator(LOG, credentials=Credentials.insecure()) as coordinator:
        print((await coordinator.outcome(txn_id)).value)


if __name__ == "__main__":
    configure_logging("console")  # events to standard error, at info
    if sys.argv[1:2] == ["outcome"]:
        asyncio.run(outcome_of(sys.argv[2]))
    else:
        asyncio.run(checkout(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
