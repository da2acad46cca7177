"""pg-plain: the purchase as a team writes it before it needs twopc, the anchor of
the PostgreSQL rows.

`python -m bench.plain --service wallet|order --db postgresql://...` serves one
unary RPC over the wallet's or the order service's own tables (created and seeded by
those services): `Debit` (a conditional UPDATE of the balance and a ledger row) or
`PlaceOrder` (a conditional UPDATE per item and a confirmed order), each one ordinary
PostgreSQL transaction through psycopg's async pool, with no atomicity across the
two. `PlainShop` calls both at once, as the shop would. It costs one round trip and
one WAL flush per service: what two-phase commit can beat only by batching.

The service is a generic gRPC handler (`/bench.plain.v1.Plain/Debit`, `/PlaceOrder`)
on the services' own messages, so the bench needs no proto of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import empty_pb2

from services.order.v1 import order_pb2
from services.wallet.v1 import wallet_pb2
from twopc import Credentials, rpc

if TYPE_CHECKING:  # psycopg only in the server process: the bench runs without it
    import psycopg
    import psycopg_pool

SERVICE = "bench.plain.v1.Plain"
TIMEOUT_S = 5.0


class _Plain:
    """The two RPCs, each one PostgreSQL transaction on a pooled connection."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def debit(self, debit: wallet_pb2.Debit, context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        async with self.pool.connection() as conn, conn.transaction():
            done = await conn.execute(
                "UPDATE accounts SET balance = balance - %(amount)s WHERE account = %(account)s"
                " AND balance >= %(amount)s",
                {"amount": debit.amount, "account": debit.account},
            )
            if done.rowcount != 1:
                raise _RefusedError(f"insufficient funds in {debit.account}")
            await conn.execute(
                "INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES (%s, 'debit', %s, NULL, %s)",
                (debit.account, debit.amount, time.time()),
            )
        return empty_pb2.Empty()

    async def place_order(
        self, place: order_pb2.PlaceOrder, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        items = sorted((i.sku, i.quantity) for i in place.items)
        async with self.pool.connection() as conn, conn.transaction():
            for sku, quantity in items:
                done = await conn.execute(
                    "UPDATE products SET on_hand = on_hand - %(q)s, sold = sold + %(q)s"
                    " WHERE sku = %(sku)s AND on_hand - reserved >= %(q)s",
                    {"sku": sku, "q": quantity},
                )
                if done.rowcount != 1:
                    raise _RefusedError(f"out of stock: {sku}")
            await conn.execute(
                "INSERT INTO orders VALUES (%s, %s, %s, 'CONFIRMED', %s, %s, %s)",
                (place.order_id, place.account, json.dumps(items), place.order_id, time.time(), place.amount),
            )
        return empty_pb2.Empty()


class _RefusedError(Exception):
    """A business refusal: the transaction rolled back."""


def _handler(
    method: Any, request_type: type[Any]
) -> grpc.RpcMethodHandler[Any, Any]:  # the generic handler's types are loose
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        try:
            return await method(request, context)  # type: ignore[no-any-return]
        except _RefusedError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            raise AssertionError("unreachable") from None

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=request_type.FromString, response_serializer=empty_pb2.Empty.SerializeToString
    )


class PlainShop:
    """Buys as `bench.shop.Shop` does, with the two plain RPCs sent at once.

    Args:
        wallet: the plain wallet's address.
        orders: the plain order service's address.
        shop: the purchases to make (its accounts, products and order ids).
    """

    def __init__(self, wallet: str, orders: str, shop: Any) -> None:
        self._channels = [grpc.aio.insecure_channel(wallet), grpc.aio.insecure_channel(orders)]
        self._debit = self._channels[0].unary_unary(
            f"/{SERVICE}/Debit",
            request_serializer=wallet_pb2.Debit.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self._place = self._channels[1].unary_unary(
            f"/{SERVICE}/PlaceOrder",
            request_serializer=order_pb2.PlaceOrder.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self._shop = shop

    async def purchase(self, i: int) -> bool:
        debit, order = (b.operation for b in self._shop.purchase(i))
        try:
            await asyncio.gather(self._debit(debit, timeout=TIMEOUT_S), self._place(order, timeout=TIMEOUT_S))
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return False
            raise
        return True

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


def service_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of a bench server for the wallet's or the order service's
    business on PostgreSQL (this one and `bench.prepared`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", choices=["wallet", "order"], required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    return p


async def main() -> None:
    p = service_parser(__doc__)
    p.add_argument("--pool-size", type=int, default=16, help="connections (default %(default)s, as PostgresStore)")
    args = p.parse_args()
    import psycopg_pool

    pool = psycopg_pool.AsyncConnectionPool(
        args.db,
        min_size=args.pool_size,
        max_size=args.pool_size,
        open=False,
        kwargs={"autocommit": True},  # conn.transaction() is the one BEGIN ... COMMIT
        configure=_read_committed,
    )
    await pool.open(wait=True)
    plain = _Plain(pool)
    methods = (
        {"Debit": _handler(plain.debit, wallet_pb2.Debit)}
        if args.service == "wallet"
        else {"PlaceOrder": _handler(plain.place_order, order_pb2.PlaceOrder)}
    )
    server = rpc.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, methods)])
    try:
        await rpc.serve_until_signalled(server, f"{args.host}:{args.port}", Credentials.insecure(), grace_s=0.2)
    finally:
        await pool.close()


async def _read_committed(conn: psycopg.AsyncConnection[Any]) -> None:
    import psycopg

    await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)


if __name__ == "__main__":
    asyncio.run(main())
