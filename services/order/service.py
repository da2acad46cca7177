"""The order service's business rules (a twopc participant handler) and its own API."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import grpc

from services.common import MAX_AMOUNT, MAX_QUANTITY, ApiAccess, api, check_amount, page_after, page_size, page_token
from services.order.v1 import order_pb2, order_pb2_grpc
from twopc import InvalidOperation, NotFound, Participant, Vote, VoteAbort, limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    sku        TEXT PRIMARY KEY,
    unit_price INTEGER NOT NULL CHECK (unit_price > 0),
    on_hand    INTEGER NOT NULL CHECK (on_hand >= 0),
    reserved   INTEGER NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
    received   INTEGER NOT NULL CHECK (received >= 0),  -- all stock ever added
    sold       INTEGER NOT NULL CHECK (sold >= 0)       -- all stock shipped by confirmed orders
);
CREATE TABLE IF NOT EXISTS orders (
    order_id   TEXT PRIMARY KEY,
    account    TEXT NOT NULL,
    items      TEXT NOT NULL,  -- JSON [[sku, quantity], ...], sorted by sku
    state      TEXT NOT NULL CHECK (state IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    txn_id     TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    amount     INTEGER NOT NULL DEFAULT 0 CHECK (amount >= 0)  -- what the buyer is charged
);
CREATE INDEX IF NOT EXISTS orders_created ON orders (created_at, order_id);  -- ListOrders pages
"""

_STATES = {
    "PENDING": order_pb2.ORDER_STATE_PENDING,
    "CONFIRMED": order_pb2.ORDER_STATE_CONFIRMED,
    "CANCELLED": order_pb2.ORDER_STATE_CANCELLED,
}


def stock(db: sqlite3.Connection, sku: str) -> order_pb2.Stock:
    """A product's stock; NotFound if unknown."""
    limits.check_id("sku", sku)
    row = db.execute("SELECT unit_price, on_hand, reserved, sold FROM products WHERE sku = ?", (sku,)).fetchone()
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


def _order(db: sqlite3.Connection, order_id: str) -> order_pb2.Order:
    limits.check_id("order_id", order_id)
    row = db.execute(
        "SELECT account, items, state, txn_id, amount FROM orders WHERE order_id = ?", (order_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no order {order_id!r}")
    account, items, state, txn_id, amount = row
    return order_pb2.Order(
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

    def prepare(self, db: sqlite3.Connection, txn_id: str, operation: Any) -> Vote:
        place: order_pb2.PlaceOrder = operation
        items = _items(place)
        blob = json.dumps(items)
        known = db.execute("SELECT account, items, state FROM orders WHERE order_id = ?", (place.order_id,)).fetchone()
        if known is not None:
            account, old_items, state = known
            if (account, old_items) != (place.account, blob):
                raise InvalidOperation(f"order {place.order_id!r} exists with other content")
            if state != "CANCELLED":
                raise VoteAbort(f"order {place.order_id!r} is already {state.lower()}")
            db.execute("DELETE FROM orders WHERE order_id = ?", (place.order_id,))  # a retry after a cancel
        short = []
        for sku, quantity in items:
            available = stock(db, sku).available
            if available < quantity:
                short.append(f"{sku} available {available}, needed {quantity}")
        if short:
            raise VoteAbort("out of stock: " + "; ".join(short))
        for sku, quantity in items:
            db.execute("UPDATE products SET reserved = reserved + ? WHERE sku = ?", (quantity, sku))
        db.execute(
            "INSERT INTO orders VALUES (?, ?, ?, 'PENDING', ?, ?, ?)",
            (place.order_id, place.account, blob, txn_id, time.time(), place.amount),
        )
        return Vote.COMMIT

    def _items_of(self, db: sqlite3.Connection, txn_id: str) -> list[tuple[str, int]]:
        (blob,) = db.execute("SELECT items FROM orders WHERE txn_id = ?", (txn_id,)).fetchone()
        return [(s, q) for s, q in json.loads(blob)]

    def commit(self, db: sqlite3.Connection, txn_id: str) -> None:
        for sku, quantity in self._items_of(db, txn_id):
            db.execute(
                "UPDATE products SET on_hand = on_hand - ?, reserved = reserved - ?, sold = sold + ? WHERE sku = ?",
                (quantity, quantity, quantity, sku),
            )
        db.execute("UPDATE orders SET state = 'CONFIRMED' WHERE txn_id = ?", (txn_id,))

    def abort(self, db: sqlite3.Connection, txn_id: str) -> None:
        for sku, quantity in self._items_of(db, txn_id):
            db.execute("UPDATE products SET reserved = reserved - ? WHERE sku = ?", (quantity, sku))
        db.execute("UPDATE orders SET state = 'CANCELLED' WHERE txn_id = ?", (txn_id,))


class OrdersApi(order_pb2_grpc.OrdersServicer):
    """The order service's own API: stock and orders."""

    def __init__(self, participant: Participant) -> None:
        self.store = participant.store

    async def AddStock(  # noqa: N802 - the RPC's name
        self, request: order_pb2.AddStockRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.Stock:
        def add(db: sqlite3.Connection) -> order_pb2.Stock:
            limits.check_id("sku", request.sku)
            if not 0 <= request.quantity <= MAX_QUANTITY:
                raise InvalidOperation(f"quantity must be between 0 and {MAX_QUANTITY}, got {request.quantity}")
            if not 0 <= request.unit_price <= MAX_AMOUNT:
                raise InvalidOperation(f"unit_price must be between 0 and {MAX_AMOUNT}, got {request.unit_price}")
            q, price = request.quantity, request.unit_price
            if db.execute("SELECT 1 FROM products WHERE sku = ?", (request.sku,)).fetchone() is None:
                if price == 0:
                    raise InvalidOperation(f"new product {request.sku!r} needs a unit_price")
                db.execute("INSERT INTO products VALUES (?, ?, ?, 0, ?, 0)", (request.sku, price, q, q))
            else:
                db.execute(
                    "UPDATE products SET on_hand = on_hand + ?, received = received + ?,"
                    " unit_price = CASE WHEN ? > 0 THEN ? ELSE unit_price END WHERE sku = ?",
                    (q, q, price, price, request.sku),
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
        return await api(context, self.store.read(lambda db: _order(db, request.order_id)))

    async def ListOrders(  # noqa: N802 - the RPC's name
        self, request: order_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> order_pb2.ListOrdersResponse:
        def orders(db: sqlite3.Connection) -> order_pb2.ListOrdersResponse:
            size = page_size(request.page_size)
            after = page_after("orders", request.page_token)
            if after is not None and (len(after) != 2 or not isinstance(after[0], float | int)):
                raise InvalidOperation("page_token is not one this list handed out")
            rows = db.execute(
                "SELECT created_at, order_id FROM orders WHERE (created_at, order_id) > (?, ?)"
                " ORDER BY created_at, order_id LIMIT ?",
                (*(after or (float("-inf"), "")), size + 1),
            ).fetchall()
            more = len(rows) > size
            rows = rows[:size]
            return order_pb2.ListOrdersResponse(
                orders=[_order(db, i) for _, i in rows],
                next_page_token=page_token("orders", *rows[-1]) if more else "",
            )

        return await api(context, self.store.read(orders))


ACCESS = ApiAccess(
    order_pb2.DESCRIPTOR.services_by_name["Orders"], reads=frozenset({"GetStock", "GetOrder", "ListOrders"})
)
"""Reads are open to --readers; every other RPC of the API (writes) needs --operators."""
