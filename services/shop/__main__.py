"""python -m services.shop --db shop.db --wallet HOST:PORT --orders HOST:PORT --port 50050"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from services.common import parser
from services.order.v1 import order_pb2, order_pb2_grpc
from services.shop.v1 import shop_pb2, shop_pb2_grpc
from services.wallet.v1 import wallet_pb2
from twopc import (
    Branch,
    Coordinator,
    CoordinatorConfig,
    CoordinatorFailedError,
    Credentials,
    Outcome,
    TransactionResult,
    rpc,
)
from twopc.logs import configure as configure_logs
from twopc.testing import FaultInjector, NetFaults

_OUTCOME = {Outcome.COMMITTED: shop_pb2.OUTCOME_COMMITTED, Outcome.ABORTED: shop_pb2.OUTCOME_ABORTED}


class Shop(shop_pb2_grpc.ShopServicer):
    """Purchase = Debit at the wallet + PlaceOrder at the order service, atomically."""

    def __init__(
        self, coordinator: Coordinator, wallet: str, orders: str, orders_api: order_pb2_grpc.OrdersAsyncStub
    ) -> None:
        self.coordinator, self.wallet, self.orders, self.orders_api = coordinator, wallet, orders, orders_api
        self.failed = asyncio.Event()

    async def Purchase(  # noqa: N802 - the RPC's name
        self, request: shop_pb2.PurchaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse:
        if not request.order_id or not request.account or not request.items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "order_id, account and items are required")
        # Prices are read before the transaction: the demo's catalogue does not change.
        amount = 0
        for item in request.items:
            try:
                product = await self.orders_api.GetStock(order_pb2.GetStockRequest(sku=item.sku), timeout=2.0)
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "price lookup failed")
            amount += product.unit_price * item.quantity
        branches = [
            Branch(self.wallet, wallet_pb2.Debit(account=request.account, amount=amount), name="wallet"),
            Branch(
                self.orders,
                order_pb2.PlaceOrder(order_id=request.order_id, account=request.account, items=request.items),
                name="orders",
            ),
        ]
        try:
            result: TransactionResult = await self.coordinator.run(branches, timeout_s=request.timeout_s or None)
        except CoordinatorFailedError as e:
            # Fail-stop (DESIGN.md rule 8): answer nothing more; a restart recovers from disk.
            self.failed.set()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the shop's decision log failed: {e}")
        return shop_pb2.PurchaseResponse(
            txn_id=result.txn_id,
            outcome=_OUTCOME[result.outcome],
            reason=result.reason,
            amount=amount,
            branches=[
                shop_pb2.BranchVote(name=b.name, vote=b.vote.value if b.vote else "", reason=b.reason)
                for b in result.branches
            ],
        )


async def serve(args: Any) -> None:
    credentials = Credentials.insecure()  # loopback demo; pass TLS credentials in production
    server = grpc.aio.server()
    port = rpc.add_port(server, f"{args.host}:{args.port}", credentials)
    address = f"{args.host}:{port}"
    config = CoordinatorConfig(prepare_timeout_s=args.prepare_timeout_s, phase2_wait_s=args.phase2_wait_s)
    interceptors = [FaultInjector(NetFaults.parse(args.net_faults))] if args.net_faults else []
    async with (
        Coordinator(
            args.db, credentials=credentials, advertise=address, config=config, interceptors=interceptors
        ) as coordinator,
        rpc.channel(args.orders, credentials) as orders_channel,
    ):
        coordinator.add_to_server(server)
        shop = Shop(coordinator, args.wallet, args.orders, order_pb2_grpc.OrdersStub(orders_channel))
        shop_pb2_grpc.add_ShopServicer_to_server(shop, server)
        await server.start()
        rpc.announce_ready(address)
        signalled = asyncio.create_task(rpc.until_signalled())
        failed = asyncio.create_task(shop.failed.wait())
        await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        failed.cancel()
        await server.stop(grace=1.0)
    if shop.failed.is_set():
        raise SystemExit("the decision log failed: stopping so that a restart recovers from disk")


def main() -> None:
    p = parser("python -m services.shop", "The shop: coordinates purchases across wallet and orders with twopc.")
    p.add_argument("--wallet", required=True, help="address of the wallet service")
    p.add_argument("--orders", required=True, help="address of the order service")
    p.add_argument("--prepare-timeout-s", type=float, default=2.0, help="phase-1 deadline (default %(default)s)")
    p.add_argument(
        "--phase2-wait-s", type=float, default=5.0, help="wait this long for Commit acks (default %(default)s)"
    )
    p.add_argument(
        "--net-faults",
        default="",
        metavar="SPEC",
        help="testing only: lose/delay/duplicate messages to participants, e.g. lose_reply=0.05,delay=0.1,seed=7",
    )
    args = p.parse_args()
    configure_logs(args.log_format, level=args.log_level)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
