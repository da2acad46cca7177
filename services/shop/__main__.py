"""python -m services.shop --db shop.db --wallet HOST:PORT --orders HOST:PORT --port 50050

Several shops on one PostgreSQL decision log (README, "Running several coordinators"):

    python -m services.shop --db 'postgresql://db/shop?schema=shop_log' --port 50050 \
        --peers other-shop:50050 --wallet HOST:PORT --orders HOST:PORT
"""

from __future__ import annotations

import asyncio
import signal
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from services import common
from services.common import MAX_QUANTITY, observe, parser, tracing
from services.order.v1 import order_pb2, order_pb2_grpc
from services.shop.v1 import shop_pb2, shop_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc import (
    Branch,
    Coordinator,
    CoordinatorConfig,
    CoordinatorFailedError,
    LogUnavailableError,
    Outcome,
    TransactionResult,
    TwoPCError,
    rpc,
)
from twopc.dev.testing import FaultInjector, NetFaults
from twopc.observe.health import COORDINATOR_SERVICE, Health
from twopc.observe.logconfig import configure as configure_logs
from twopc.ops import metrics
from twopc.security import limits
from twopc.security.auth import coordinator_rules, grant, operations_rules, peer_identities

_log = structlog.get_logger("services.shop")
OWNERS_CACHED = 10_000
"""Accounts whose owners the shop keeps (they never change once opened)."""
_OUTCOME = {Outcome.COMMITTED: shop_pb2.OUTCOME_COMMITTED, Outcome.ABORTED: shop_pb2.OUTCOME_ABORTED}


def check_purchase(request: shop_pb2.PurchaseRequest) -> None:
    """The bounds of a PurchaseRequest (documented in shop.proto)."""
    limits.check_id("order_id", request.order_id)
    limits.check_id("account", request.account)
    if not request.items:
        raise limits.LimitError("items are required")
    limits.check_count("items", len(request.items), limits.MAX_ITEMS)
    for item in request.items:
        limits.check_id("sku", item.sku)
        if not 0 < item.quantity <= MAX_QUANTITY:
            raise limits.LimitError(f"quantity must be from 1 to {MAX_QUANTITY}")
    limits.check_timeout("timeout_s", request.timeout_s)


def total(prices: Sequence[int], items: Sequence[order_pb2.Item]) -> int:
    """What the items cost; LimitError if it does not fit the int64 `amount`."""
    amount = sum(
        limits.checked_product("the purchase's amount", p, i.quantity) for p, i in zip(prices, items, strict=True)
    )
    return limits.checked_product("the purchase's amount", amount, 1)


@dataclass(frozen=True)
class Buyers:
    """Who may buy, beyond the Authorizer's --purchasers.

    Attributes:
        secure: mutual TLS (callers have names); under plaintext nothing here applies.
        services: identities of services, which never buy (--service-identities).
        rate: the purchase rate each identity is held to; None for no limit.
    """

    secure: bool
    services: frozenset[str]
    rate: limits.RateLimit | None

    def bought(self, order: order_pb2.Order, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """True if the caller is the order's buyer (always under plaintext)."""
        return not self.secure or order.buyer in peer_identities(context)


class Shop(shop_pb2_grpc.ShopServicer):
    """Purchase = Debit at the wallet + PlaceOrder at the order service, atomically.

    The order id makes a Purchase safe to retry: the order service keeps one order per
    id, with the transaction that placed it, so a retry is answered from what became
    of that transaction instead of charging again.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        wallet: str,
        orders: str,
        orders_api: order_pb2_grpc.OrdersAsyncStub,
        wallet_api: wallet_pb2_grpc.WalletAsyncStub,
        buyers: Buyers,
    ) -> None:
        self.coordinator, self.wallet, self.orders, self.orders_api = coordinator, wallet, orders, orders_api
        self.wallet_api, self.buyers = wallet_api, buyers
        self.owners_seen: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.draining = False
        self.in_flight = 0

    async def drain(self, timeout_s: float) -> bool:
        """Takes no new purchase; waits up to `timeout_s` for those in flight and their
        phase 2. What is left is on disk: recovery finishes it after the restart."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.in_flight:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return await self.coordinator.wait_idle(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def Purchase(  # noqa: N802 - the RPC's name
        self, request: shop_pb2.PurchaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the shop is shutting down; retry later")
        self.in_flight += 1
        try:
            return await self._purchase(request, context)
        finally:
            self.in_flight -= 1

    async def _purchase(
        self, request: shop_pb2.PurchaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse:
        await rpc.validate(context, lambda: check_purchase(request))
        await self._may_buy(request.account, context)
        earlier = await self._earlier(request, context)
        if earlier is not None:
            return earlier
        # Prices are read before the transaction: the demo's catalogue does not change.
        prices = []
        for item in request.items:
            try:
                product = await self.orders_api.GetStock(order_pb2.GetStockRequest(sku=item.sku), timeout=2.0)
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), limits.clip(e.details() or "price lookup failed"))
            prices.append(product.unit_price)
        amount = await rpc.validate(context, lambda: total(prices, request.items))
        place = order_pb2.PlaceOrder(
            order_id=request.order_id, account=request.account, items=request.items, buyer=common.buyer(context)
        )
        place.amount = amount
        branches = [
            Branch(self.wallet, wallet_pb2.Debit(account=request.account, amount=amount), name="wallet"),
            Branch(self.orders, place, name="orders"),
        ]
        try:
            result: TransactionResult = await self.coordinator.run(branches, timeout_s=request.timeout_s or None)
        except CoordinatorFailedError as e:
            # Fail-stop (docs/design.md rule 8): answer nothing more; a restart recovers from disk.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the shop's decision log failed: {e}")
        except LogUnavailableError as e:
            # A shared log out of reach: nothing was sent; another shop may serve.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the shop's decision log is unreachable: {e}")
        if result.outcome is Outcome.ABORTED:
            # A concurrent attempt with the same order id may have won the race.
            earlier = await self._earlier(request, context)
            if earlier is not None and earlier.txn_id != result.txn_id:
                return earlier
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

    async def GetPurchase(  # noqa: N802 - the RPC's name
        self, request: shop_pb2.GetPurchaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse:
        await rpc.validate(context, lambda: limits.check_id("order_id", request.order_id))
        order = await self._order(request.order_id, context)
        if order is None or not self.buyers.bought(order, context):
            # Another buyer's order reads as absent: nobody learns others' order ids.
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no purchase of order {request.order_id!r}")
        return await self._answer(order, context)

    async def _may_buy(self, account: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Refuses a caller that may not buy with `account`: a service identity, one
        over its rate, or one that does not own the account (under mutual TLS;
        plaintext callers have no names). Checked before anything is looked up."""
        if not self.buyers.secure:
            return
        caller = peer_identities(context)
        if not self.buyers.services.isdisjoint(caller):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller[0]} is a service identity: it cannot buy")
        if self.buyers.rate is not None and not self.buyers.rate.allow(caller[0]):
            _log.warning("purchase_rate_limited", identity=caller[0])
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller[0]} is over its purchase rate ({self.buyers.rate.rate_per_s:g}/s); retry later",
            )
        owners = await self._owners(account, context)
        if set(owners).isdisjoint(caller):
            _log.warning("purchase_refused_owner", identity=caller[0], account=limits.clip(account))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller[0]} does not own account {account!r}")

    async def _owners(self, account: str, context: grpc.aio.ServicerContext[Any, Any]) -> Sequence[str]:
        """Who owns `account`, from the wallet. Owners are fixed when the account is
        opened, so an answer is kept (the most recent `OWNERS_CACHED` accounts): a
        known buyer still gets its transaction, and its ABORT, while the wallet is slow."""
        if account in self.owners_seen:
            self.owners_seen.move_to_end(account)
            return self.owners_seen[account]
        try:
            found = await self.wallet_api.GetBalance(wallet_pb2.GetBalanceRequest(account=account), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"account lookup failed: {limits.clip(e.details() or '')}"
                )
            return ()  # an unknown account is owned by nobody: the same refusal, no existence leaked
        self.owners_seen[account] = tuple(found.owners)
        while len(self.owners_seen) > OWNERS_CACHED:
            self.owners_seen.popitem(last=False)
        return self.owners_seen[account]

    async def _earlier(
        self, request: shop_pb2.PurchaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse | None:
        """The answer an earlier attempt with this order id already has, if any: its
        commit again, UNAVAILABLE while it is being decided, None to try anew."""
        order = await self._order(request.order_id, context)
        if order is None:
            return None
        same = (order.account, sorted((i.sku, i.quantity) for i in order.items), order.buyer) == (
            request.account,
            sorted((i.sku, i.quantity) for i in request.items),
            common.buyer(context),
        )
        if not same:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"order {request.order_id!r} is another purchase")
        answer = await self._answer(order, context)
        if answer.outcome == shop_pb2.OUTCOME_PENDING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "an earlier attempt is being decided; retry")
        return answer if answer.outcome == shop_pb2.OUTCOME_COMMITTED else None

    async def _order(self, order_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> order_pb2.Order | None:
        try:
            return await self.orders_api.GetOrder(order_pb2.GetOrderRequest(order_id=order_id), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"order lookup failed: {limits.clip(e.details() or '')}")
            raise  # unreachable: abort raises

    async def _answer(
        self, order: order_pb2.Order, context: grpc.aio.ServicerContext[Any, Any]
    ) -> shop_pb2.PurchaseResponse:
        """What became of the purchase that placed `order`."""
        outcome = {
            order_pb2.ORDER_STATE_CONFIRMED: shop_pb2.OUTCOME_COMMITTED,
            order_pb2.ORDER_STATE_CANCELLED: shop_pb2.OUTCOME_ABORTED,
        }.get(order.state, shop_pb2.OUTCOME_PENDING)
        if outcome == shop_pb2.OUTCOME_PENDING:
            # Prepared at the order service: the decision is ours (or an earlier
            # incarnation's, in the same log) and the log knows it.
            try:
                decided = await self.coordinator.outcome(order.txn_id)
            except TwoPCError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the shop's decision log cannot be read: {e}")
            outcome = {
                Outcome.COMMITTED: shop_pb2.OUTCOME_COMMITTED,
                Outcome.ABORTED: shop_pb2.OUTCOME_ABORTED,
                Outcome.PENDING: shop_pb2.OUTCOME_PENDING,
            }[decided]
        return shop_pb2.PurchaseResponse(txn_id=order.txn_id, outcome=outcome, amount=order.amount)


async def serve(args: Any) -> None:
    credentials = common.credentials(args)
    rules = (
        coordinator_rules(args.participants)
        | grant(args.purchasers, "shop.v1.Shop", "Purchase", "GetPurchase")
        | operations_rules(args.purchasers)  # health and reflection
    )
    config = CoordinatorConfig(
        prepare_timeout_s=args.prepare_timeout_s,
        phase2_wait_s=args.phase2_wait_s,
        batches_in_flight=args.batches_in_flight,
        abort_retry_s=args.abort_retry_s,
        rpc_timeout_s=args.rpc_timeout_s,
    )
    # Under TLS each participant is an identity at an address: a bare address means
    # the service's usual name, so an impostor there fails the handshake.
    wallet, orders = (
        target if "@" in target or not credentials.secure else f"{name}@{target}"
        for name, target in (("wallet", args.wallet), ("orders", args.orders))
    )
    interceptors: list[Any] = []
    if args.net_faults:  # testing only: SIGUSR1 then loses the next reply from a participant
        faults = FaultInjector(NetFaults.parse(args.net_faults))
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, faults.arm, "lose_reply")
        interceptors.append(faults)
    traced = tracing(args)
    if traced is not None:
        interceptors.append(traced.client_interceptor())
    async with (
        Coordinator(
            args.db,
            credentials=credentials,
            config=config,
            interceptors=interceptors,
            observers=[traced] if traced else [],
            peers=args.peers,
        ) as coordinator,
        rpc.channel(orders, credentials) as orders_channel,
        rpc.channel(wallet, credentials) as wallet_channel,
    ):
        rate = limits.RateLimit(args.purchase_rate_per_s, args.purchase_burst) if args.purchase_rate_per_s > 0 else None
        buyers = Buyers(credentials.secure, args.service_identities, rate)
        shop = Shop(
            coordinator,
            wallet,
            orders,
            order_pb2_grpc.OrdersStub(orders_channel),
            wallet_pb2_grpc.WalletStub(wallet_channel),
            buyers,
        )
        health = Health([COORDINATOR_SERVICE, shop_pb2.DESCRIPTOR.services_by_name["Shop"].full_name])
        health.watch(coordinator.wait_failed)
        metrics.CoordinatorMetrics(coordinator)
        observe(coordinator.observers, args, health=health)
        try:
            await coordinator.serve(
                f"{args.host}:{args.port}",
                services=[lambda server: shop_pb2_grpc.add_ShopServicer_to_server(shop, server)],
                grace_s=args.grace_s,
                health=health,
                drain=shop.drain,
                policy=common.policy(credentials, rules),
            )
        except TwoPCError as e:
            raise SystemExit(f"the decision log failed ({e}): stopping so that a restart recovers from disk") from e


def main() -> None:
    p = parser("python -m services.shop", "The shop: coordinates purchases across wallet and orders with twopc.")
    p.add_argument(
        "--wallet",
        required=True,
        metavar="[NAME@]HOST:PORT",
        help="the wallet service: under TLS its certificate must name NAME (default wallet)",
    )
    p.add_argument(
        "--orders",
        required=True,
        metavar="[NAME@]HOST:PORT",
        help="the order service: under TLS its certificate must name NAME (default orders)",
    )
    p.add_argument(
        "--peers",
        nargs="*",
        default=[],
        metavar="HOST:PORT",
        help="the other shops sharing a postgresql:// --db: participants in doubt ask them too",
    )
    p.add_argument("--prepare-timeout-s", type=float, default=2.0, help="phase-1 deadline (default %(default)s)")
    p.add_argument(
        "--abort-retry-s",
        type=float,
        default=CoordinatorConfig.abort_retry_s,
        help="how long Abort is retried; then a participant in doubt learns ABORTED by asking (default %(default)s)",
    )
    p.add_argument(
        "--rpc-timeout-s",
        type=float,
        default=CoordinatorConfig.rpc_timeout_s,
        help="deadline of each Commit or Abort attempt (default %(default)s)",
    )
    p.add_argument(
        "--phase2-wait-s", type=float, default=5.0, help="wait this long for Commit acks (default %(default)s)"
    )
    p.add_argument(
        "--batches-in-flight",
        type=int,
        default=1,
        help="PrepareMany/CommitMany messages in flight to each service at once; 4 when they are on PostgreSQL"
        " (default %(default)s)",
    )
    g = p.add_argument_group("authorization (client certificate names; comma-separated; '*' = any)")
    g.add_argument(
        "--participants",
        type=common.identities,
        default="wallet,orders",
        help="who may ask GetOutcome (default %(default)s)",
    )
    g.add_argument(
        "--purchasers",
        type=common.identities,
        default="",
        help="who may call Purchase and GetPurchase, each only with an account it owns (default: nobody)",
    )
    g.add_argument(
        "--service-identities",
        type=common.identities,
        default="shop,wallet,orders",
        help="identities of services: never allowed to buy (default %(default)s)",
    )
    g.add_argument(
        "--purchase-rate-per-s",
        type=float,
        default=50.0,
        help="purchases per second each identity may make, sustained; past it RESOURCE_EXHAUSTED; 0: no limit"
        " (default %(default)s)",
    )
    g.add_argument(
        "--purchase-burst", type=int, default=100, help="purchases an identity may make at once (default %(default)s)"
    )
    p.add_argument(
        "--net-faults",
        default="",
        metavar="SPEC",
        help="testing only: lose/delay/duplicate messages to participants, e.g. lose_reply=0.05,delay=0.1,seed=7;"
        " SIGUSR1 then loses the next reply",
    )
    args = p.parse_args()
    configure_logs(args.log_format, level=args.log_level)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
