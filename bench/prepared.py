"""The wallet and order services' business as PostgreSQL prepared transactions.

`python -m bench.prepared --service wallet|order --db postgresql://...` serves a
`twopc.participant.prepared.PreparedParticipant` over the wallet's or the order service's own
tables (created and seeded by those services): a Debit is one conditional UPDATE and
a ledger row, a PlaceOrder a conditional UPDATE per item and a confirmed order, run
as they are and ended by PREPARE TRANSACTION. For the benchmark's adapter rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.plain import service_parser
from services.order.v1 import order_pb2
from services.wallet.v1 import wallet_pb2
from twopc import Credentials, Vote, VoteAbort
from twopc.observe.logconfig import configure as configure_logs
from twopc.participant.prepared import PreparedParticipant
from twopc.stores import execute


class Debits:
    operations = (wallet_pb2.Debit,)

    def prepare(self, db: Any, txn_id: str, operation: Any) -> Vote:
        debit: wallet_pb2.Debit = operation
        args = {"account": debit.account, "amount": debit.amount, "txn_id": txn_id, "at": time.time()}
        done = execute(
            db,
            "UPDATE accounts SET balance = balance - :amount WHERE account = :account AND balance >= :amount",
            args,
        )
        if done.rowcount != 1:
            raise VoteAbort(f"insufficient funds in {debit.account}")
        execute(
            db,
            "INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES (:account, 'debit', :amount, :txn_id, :at)",
            args,
        )
        return Vote.COMMIT


class Orders:
    operations = (order_pb2.PlaceOrder,)

    def prepare(self, db: Any, txn_id: str, operation: Any) -> Vote:
        place: order_pb2.PlaceOrder = operation
        items = sorted((i.sku, i.quantity) for i in place.items)
        for sku, quantity in items:
            done = execute(
                db,
                "UPDATE products SET on_hand = on_hand - :q, sold = sold + :q"
                " WHERE sku = :sku AND on_hand - reserved >= :q",
                {"sku": sku, "q": quantity},
            )
            if done.rowcount != 1:
                raise VoteAbort(f"out of stock: {sku}")
        execute(
            db,
            "INSERT INTO orders VALUES (:order_id, :account, :items, 'CONFIRMED', :txn_id, :at, :amount)",
            {
                "order_id": place.order_id,
                "account": place.account,
                "items": json.dumps(items),
                "txn_id": txn_id,
                "at": time.time(),
                "amount": place.amount,
            },
        )
        return Vote.COMMIT


async def main() -> None:
    p = service_parser(__doc__)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--insecure", action="store_true", help="plaintext (the benchmark's loopback)")
    args = p.parse_args()
    configure_logs("json", level=args.log_level)
    handler = Debits() if args.service == "wallet" else Orders()
    async with PreparedParticipant(handler, args.db, credentials=Credentials.insecure(), pool_size=32) as participant:
        await participant.serve(f"{args.host}:{args.port}")


if __name__ == "__main__":
    asyncio.run(main())
