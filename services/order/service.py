"""The order service's business rules (a twopc participant handler) and its own API."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc

from services.common import (
    MAX_AMOUNT,
    MAX_QUANTITY,
    ApiAccess,
    Readers,
    api,
    buyer,
    check_amount,
    page_after,
    page_size,
    page_token,
)
from services.order.v1 import order_pb2, order_pb2_grpc
from twopc import InvalidOperation, NotFound, Participant, Vote, VoteAbort
from twopc.security import limits
from twopc.stores import Connection, execute

# One text for both stores: every type here means the same in SQLite and PostgreSQL.
SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    sku        TEXT PRIMARY KEY,
    unit_price BIGINT NOT NULL CHECK (unit_price > 0),
    on_hand    BIGINT NOT NULL CHECK (on_hand >= 0),
    reserved   BIGINT NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
    received   BIGINT NOT NULL CHECK (received >= 0),  -- all stock ever added
    sold       BIGINT NOT NULL CHECK (sold >= 0)       -- all stock shipped by confirmed orders
);
CREATE TABLE IF NOT EXISTS orders (
    order_id   TEXT PRIMARY KEY,
    account    TEXT NOT NULL,
    items      TEXT NOT NULL,  -- JSON [[sku, quantity], ...], sorted by sku
    state      TEXT NOT NULL CHECK (state IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    txn_id     TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    amount     BIGINT NOT NULL DEFAULT 0 CHECK (amount >= 0)  -- what the buyer is charged
);
CREATE INDEX IF NOT EXISTS orders_created ON orders (created_at, order_id);  -- ListOrders pages
CREATE TABLE IF NOT EXISTS buyers (  -- who bought an order (PlaceOrder.buyer): it may read it
    order_id TEXT PRIMARY KEY,
    buyer    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS buyers_buyer ON buyers (buyer);
"""

_STATES = {
    "PENDING": order_pb2.ORDER_STATE_PENDING,
    "CONFIRMED": order_pb2.ORDER_STATE_CONFIRMED,
    "CANCELLED": order_pb2.ORDER_STATE_CANCELLED,
}


def stock(db: Connection, sku: str) -> order_pb2.Stock:
    """A product's stock; NotFound if unknown."""
    limits.check_id("sku", sku)
    row = execute(
        db, "SELECT unit_price, on_hand, reserved, sold FROM products WHERE sku = :sku", {"sku": sku}
    ).fetchone()
    if row is None:
        raise NotFound(f"no product {sku!r}")
    price, on_hand, reserved, sold = row
    return order_pb2.Stock(
        sku=sku, on_hand=on_hand, reserved=reserved, available=on_hand - reserved, unit_price=price, sold=sold
    )


def _items(place: order_pb2.PlaceOrder) -> list[tuple[str, int]]:
    """The order's items validated and in a canonical order (to compare content)."""
    limits.check_id("order_id", place.order_id)
    limits.check_id("account", place.account)
    limits.check_id("buyer", place.buyer, required=False)
    if not place.items:
        raise InvalidOperation("an order needs at least one item")
    if not 0 <= place.amount <= MAX_AMOUNT:
        raise InvalidOperation(f"amount must be between 0 and {MAX_AMOUNT}, got {place.amount}")
    limits.check_count("items", len(place.items), limits.MAX_ITEMS)
    items = sorted((i.sku, i.quantity) for i in place.items)
    for sku, quantity in items:
        limits.check_id("sku", sku)
        check_amount(f"quantity of {sku}", quantity, MAX_QUANTITY)
    if len({sku for sku, _ in items}) != len(items):
        raise InvalidOperation("a sku appears twice; give one item per sku")
    return items


# An order with its buyer, in one query: what `_order_of` reads.
_COLUMNS = "o.order_id, o.account, o.items, o.state, o.txn_id, o.amount, coalesce(b.buyer, '')"
_JOINED = "orders o LEFT JOIN buyers b ON b.order_id = o.order_id"


def _order(db: Connection, order_id: str) -> order_pb2.Order:
    limits.check_id("order_id", order_id)
    one = f"SELECT {_COLUMNS} FROM {_JOINED} WHERE o.order_id = :order_id"
    row = execute(db, one, {"order_id": order_id}).fetchone()
    if row is None:
        raise NotFound(f"no order {order_id!r}")
    return _order_of(row)


def _order_of(row: Any) -> order_pb2.Order:
    """A `_COLUMNS` row as the API's message."""
    order_id, account, items, state, txn_id, amount, bought = row
    return order_pb2.Order(
        buyer=bought,
        order_id=order_id,
        account=account,
        items=[order_pb2.Item(sku=s, quantity=q) for s, q in json.loads(items)],
        state=_STATES[state],
        txn_id=txn_id,
        amount=amount,
    )


class OrderHandler:
    """PlaceOrder as a 2PC participant: reserve on prepare, ship on commit, release on abort."""

    operations = (order_pb2.PlaceOrder,)
    schema = SCHEMA
    isolation = "READ COMMITTED"  # PostgreSQL: prepare locks the products it checks

    def prepare(self, db: Connection, txn_id: str, operation: Any) -> Vote:
        place: order_pb2.PlaceOrder = operation
        items = _items(place)
        blob = json.dumps(items)
        # One statement per item reserves it if enough is available. Orders sharing a
        # product queue on its row (in sku order); PostgreSQL evaluates the condition
        # again on the row's latest version once it holds the lock, so two buyers of
        # the last item cannot both reserve it. What a refusal raises rolls it back.
        short = [
            sku
            for sku, quantity in items
            if execute(
                db,
                "UPDATE products SET reserved = reserved + :q WHERE sku = :sku AND on_hand - reserved >= :q",
                {"q": quantity, "sku": sku},
            ).rowcount
            != 1
        ]
        order = {
            "order_id": place.order_id,
            "account": place.account,
            "items": blob,
            "txn_id": txn_id,
            "at": time.time(),
            "amount": place.amount,
        }
        insert = "INSERT INTO orders VALUES (:order_id, :account, :items, 'PENDING', :txn_id, :at, :amount)"
        if not short and execute(db, f"{insert} ON CONFLICT (order_id) DO NOTHING", order).rowcount == 1:
            self._bought(db, place)
            return Vote.COMMIT
        # The rare paths: an order id seen before, then short stock or an unknown product.
        known = execute(db, "SELECT account, items, state FROM orders WHERE order_id = :order_id", order).fetchone()
        if known is not None:
            account, old_items, state = known
            if (account, old_items) != (place.account, blob):
                raise InvalidOperation(f"order {place.order_id!r} exists with other content")
            if state != "CANCELLED":
                raise VoteAbort(f"order {place.order_id!r} is already {state.lower()}")
        if short:
            shortages = []
            for sku in short:
                quantity = dict(items)[sku]
                shortages.append(f"{sku} available {stock(db, sku).available}, needed {quantity}")  # or NotFound
            raise VoteAbort("out of stock: " + "; ".join(shortages))
        execute(db, "DELETE FROM orders WHERE order_id = :order_id", order)  # a retry after a cancel
        execute(db, "DELETE FROM buyers WHERE order_id = :order_id", order)
        execute(db, insert, order)
        self._bought(db, place)
        return Vote.COMMIT

    @staticmethod
    def _bought(db: Connection, place: order_pb2.PlaceOrder) -> None:
        """Records who bought the order (it may read it), if a buyer was named."""
        if place.buyer:
            bought = {"order_id": place.order_id, "buyer": place.buyer}
            execute(db, "INSERT INTO buyers VALUES (:order_id, :buyer)", bought)

    def _decide(self, db: Connection, txn_id: str, state: str) -> list[tuple[str, int]]:
        """Sets the order's state and returns its items, in one statement."""
        update = "UPDATE orders SET state = :state WHERE txn_id = :txn_id RETURNING items"
        ((blob,),) = execute(db, update, {"state": state, "txn_id": txn_id}).fetchall()
        return [(s, q) for s, q in json.loads(blob)]

    def commit(self, db: Connection, txn_id: str) -> None:
        for sku, quantity in self._decide(db, txn_id, "CONFIRMED"):
            execute(
                db,
                "UPDATE products SET on_hand = on_hand - :q, reserved = reserved - :q, sold = sold + :q"
                " WHERE sku = :sku",
                {"q": quantity, "sku": sku},
            )

    def abort(self, db: Connection, txn_id: str) -> None:
        for sku, quantity in self._decide(db, txn_id, "CANCELLED"):
            execute(db, "UPDATE products SET reserved = reserved - :q WHERE sku = :sku", {"q": quantity, "sku": sku})


class OrdersApi(order_pb2_grpc.OrdersServicer):
    """The order service's own API: stock and orders."""

    def __init__(self, participant: Participant, readers: Readers) -> None:
        self.store = participant.store
        self.readers = readers

    async def AddStock(  # noqa: N802 - the RPC's name
        self, request: order_pb2.AddStockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.Stock:
        def add(db: Connection) -> order_pb2.Stock:
            limits.check_id("sku", request.sku)
            if not 0 <= request.quantity <= MAX_QUANTITY:
                raise InvalidOperation(f"quantity must be between 0 and {MAX_QUANTITY}, got {request.quantity}")
            if not 0 <= request.unit_price <= MAX_AMOUNT:
                raise InvalidOperation(f"unit_price must be between 0 and {MAX_AMOUNT}, got {request.unit_price}")
            args = {"sku": request.sku, "q": request.quantity, "price": request.unit_price}
            if execute(db, "SELECT 1 FROM products WHERE sku = :sku", args).fetchone() is None:
                if request.unit_price == 0:
                    raise InvalidOperation(f"new product {request.sku!r} needs a unit_price")
                execute(db, "INSERT INTO products VALUES (:sku, :price, :q, 0, :q, 0)", args)
            else:
                execute(
                    db,
                    "UPDATE products SET on_hand = on_hand + :q, received = received + :q,"
                    " unit_price = CASE WHEN :price > 0 THEN :price ELSE unit_price END WHERE sku = :sku",
                    args,
                )
            return stock(db, request.sku)

        return await api(context, self.store.write(add))

    async def GetStock(  # noqa: N802 - the RPC's name
        self, request: order_pb2.GetStockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.Stock:
        return await api(context, self.store.read(lambda db: stock(db, request.sku)))

    async def GetOrder(  # noqa: N802 - the RPC's name
        self, request: order_pb2.GetOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.Order:
        order = await api(context, self.store.read(lambda db: _order(db, request.order_id)))
        if not self.readers.may_read(context, [order.buyer] if order.buyer else []):
            # The same answer as for an order that does not exist: nobody learns others' order ids.
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.order_id!r}")
        return order

    async def ListOrders(  # noqa: N802 - the RPC's name
        self, request: order_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.ListOrdersResponse:
        # Who does not read everything lists only the orders it bought.
        mine = "" if self.readers.reads_everything(context) else buyer(context) or "\x00"

        def orders(db: Connection) -> order_pb2.ListOrdersResponse:
            size = page_size(request.page_size)
            after = page_after("orders", request.page_token)
            if after is not None and (len(after) != 2 or not isinstance(after[0], float | int)):
                raise InvalidOperation("page_token is not one this list handed out")
            created_at, order_id = after or (float("-inf"), "")
            # One query for the page, not one per order.
            rows = execute(
                db,
                f"SELECT o.created_at, {_COLUMNS} FROM {_JOINED}"
                " WHERE (o.created_at, o.order_id) > (:created_at, :order_id) AND (:mine = '' OR b.buyer = :mine)"
                " ORDER BY o.created_at, o.order_id LIMIT :limit",
                {"created_at": created_at, "order_id": order_id, "limit": size + 1, "mine": mine},
            ).fetchall()
            more = len(rows) > size
            rows = rows[:size]
            return order_pb2.ListOrdersResponse(
                orders=[_order_of(row[1:]) for row in rows],
                next_page_token=page_token("orders", *rows[-1][:2]) if more else "",
            )

        return await api(context, self.store.read(orders))


ACCESS = ApiAccess(
    order_pb2.DESCRIPTOR.services_by_name["Orders"],
    reads=frozenset({"GetStock", "GetOrder", "ListOrders"}),
    owned=frozenset({"GetOrder", "ListOrders"}),
)
"""Reads are open to --readers, and a buyer's own orders to it; every other RPC of
the API (writes) needs --operators."""
