"""The purchase scenarios of `make demo`, as building blocks that tests call too.

Each scenario runs against a live `Cluster`, injects its failure for real (SIGSTOP,
SIGKILL at a named crash point), and returns a `Step`: what was bought, the shop's
answer, the state before and after, and what happened in between. The demo prints
steps for people; the tests assert on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.cluster import Cluster
from services.shop.v1 import shop_pb2
from twopc.dev.testing import query, wait_until

ACCOUNTS = {"alice": 10_000, "bob": 300, "carol": 5_000}  # cents
PRODUCTS = {"widget": (10, 1_500), "gadget": (5, 1_200), "gizmo": (2, 700), "lamp": (1, 2_000)}  # (stock, price)
TIMEOUT_S = 20.0  # the longest a scenario waits for recovery to show


async def seed(c: Cluster) -> None:
    """Opens the accounts and stocks the products of every scenario."""
    for account, deposit in ACCOUNTS.items():
        await c.open_account(account, deposit)
    for sku, (quantity, price) in PRODUCTS.items():
        await c.add_stock(sku, quantity, price)


@dataclass(frozen=True)
class Snapshot:
    """Balances, stock and order states at one moment, read through the services' APIs."""

    balances: dict[str, tuple[int, int]]  # account -> (balance, held)
    stock: dict[str, tuple[int, int]]  # sku -> (on hand, reserved)
    orders: dict[str, str]  # order id -> state

    def describe(self) -> str:
        parts = [f"{a} {_money(b)} (held {_money(h)})" for a, (b, h) in self.balances.items()]
        parts += [f"{s}: {n} on hand, {r} reserved" for s, (n, r) in self.stock.items()]
        parts += [f"order {o} {state}" for o, state in self.orders.items()]
        return " | ".join(parts)


@dataclass
class Step:
    """One scenario's story."""

    title: str
    why: str
    action: str
    before: Snapshot
    after: Snapshot | None = None
    responses: list[shop_pb2.PurchaseResponse] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


async def snapshot(c: Cluster, accounts: list[str], skus: list[str], orders: list[str]) -> Snapshot:
    balances = {a: await c.balance(a) for a in accounts}
    stock = {s: await c.stock(s) for s in skus}
    return Snapshot(
        {a: (b.balance, b.held) for a, b in balances.items()},
        {s: (x.on_hand, x.reserved) for s, x in stock.items()},
        {o: await c.order_state(o) for o in orders},
    )


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def outcome(r: shop_pb2.PurchaseResponse) -> str:
    return shop_pb2.Outcome.Name(r.outcome).removeprefix("OUTCOME_")


async def _buy(
    c: Cluster, step: Step, order_id: str, account: str, items: Mapping[str, int], **kw: Any
) -> shop_pb2.PurchaseResponse:
    started = time.monotonic()
    response = await c.purchase(order_id, account, items, **kw)
    step.elapsed_s = time.monotonic() - started
    step.responses.append(response)
    return response


# --- the scenarios ---------------------------------------------------------------


async def happy_path(c: Cluster) -> Step:
    step = Step(
        "A purchase that commits",
        "Both services voted COMMIT; the shop made its decision durable, then both applied it.",
        "alice buys 2 widgets at 15.00",
        await snapshot(c, ["alice"], ["widget"], []),
    )
    await _buy(c, step, "order-1", "alice", {"widget": 2})
    step.after = await snapshot(c, ["alice"], ["widget"], ["order-1"])
    return step


async def insufficient_funds(c: Cluster) -> Step:
    step = Step(
        "Insufficient funds",
        "The wallet voted ABORT, so the shop decided ABORT at once: the order service released whatever it had "
        "reserved, and no money moved.",
        "bob (3.00 in his wallet) buys a gadget at 12.00",
        await snapshot(c, ["bob"], ["gadget"], []),
    )
    r = await _buy(c, step, "order-2", "bob", {"gadget": 1})
    await wait_until(lambda: _released(c, "gadget", "order-2"), TIMEOUT_S)
    step.after = await snapshot(c, ["bob"], ["gadget"], ["order-2"])
    step.events.append(f"the shop said {outcome(r)}: {r.reason}")
    return step


async def out_of_stock(c: Cluster) -> Step:
    step = Step(
        "Out of stock",
        "The order service voted ABORT, so no money moved: the wallet released its hold.",
        "carol buys 3 gizmos; 2 are in stock",
        await snapshot(c, ["carol"], ["gizmo"], []),
    )
    r = await _buy(c, step, "order-3", "carol", {"gizmo": 3})
    await wait_until(lambda: _no_hold(c, "carol"), TIMEOUT_S)
    step.after = await snapshot(c, ["carol"], ["gizmo"], ["order-3"])
    step.events.append(f"the shop said {outcome(r)}: {r.reason}")
    return step


async def slow_wallet(c: Cluster) -> Step:
    step = Step(
        "A slow wallet",
        "The wallet missed the 1 s deadline, so the shop decided ABORT without waiting longer; the order's "
        "reservation was released, and the wallet, once resumed, refused the late Prepare and reserved nothing.",
        "alice buys a widget while the wallet process is stopped (SIGSTOP)",
        await snapshot(c, ["alice"], ["widget"], []),
    )
    c.wallet.pause()
    step.events.append("wallet stopped with SIGSTOP")
    try:
        r = await _buy(c, step, "order-4", "alice", {"widget": 1}, timeout_s=1.0)
        step.events.append(f"the shop said {outcome(r)} after {step.elapsed_s:.1f} s: {r.reason}")
        await wait_until(lambda: _released(c, "widget", "order-4"), TIMEOUT_S)
        reserved = (await c.stock("widget")).reserved
        step.events.append(
            f"order service: reservation released while the wallet is still stopped ({reserved} reserved)"
        )
    finally:
        c.wallet.resume()
    step.events.append("wallet resumed with SIGCONT")
    await wait_until(lambda: _tombstoned(c, r.txn_id), TIMEOUT_S)
    step.after = await snapshot(c, ["alice"], ["widget"], ["order-4"])
    return step


async def participant_crash(c: Cluster) -> Step:
    step = Step(
        "The order service crashes after voting yes",
        "A prepared participant may not decide alone: after its restart it still held the reservation on disk, "
        "and applied the COMMIT the shop kept re-sending.",
        "alice buys a gadget; the order service is SIGKILLed when the Commit arrives",
        await snapshot(c, ["alice"], ["gadget"], []),
    )
    await asyncio.to_thread(c.orders.restart, env={"TWOPC_CRASH_AT": "participant.before_commit"})
    purchase = asyncio.create_task(_buy(c, step, "order-5", "alice", {"gadget": 1}))
    await asyncio.to_thread(c.orders.wait, 20)
    state = query(c.orders_db, "SELECT state FROM orders WHERE order_id = 'order-5'")
    step.events.append(f"order service killed (SIGKILL) after voting yes; on its disk the order is {state[0][0]}")
    await asyncio.to_thread(c.orders.restart)
    step.events.append("order service restarted")
    r = await purchase
    step.events.append(f"the shop said {outcome(r)} after {step.elapsed_s:.1f} s")
    await wait_until(lambda: _order_is(c, "order-5", "confirmed"), TIMEOUT_S)
    step.after = await snapshot(c, ["alice"], ["gadget"], ["order-5"])
    return step


async def coordinator_crash(c: Cluster) -> Step:
    step = Step(
        "The shop (coordinator) crashes after logging COMMIT",
        "The decision was durable before the crash, so the restarted shop read it from its log and finished the "
        "commit at both services. The buyer's request itself got no answer; retrying it with the same order id "
        "is safe: the shop answers from the order it placed, and charges nothing more.",
        "alice buys a gizmo; the shop is SIGKILLed right after writing its COMMIT decision",
        await snapshot(c, ["alice"], ["gizmo"], []),
    )
    await asyncio.to_thread(c.shop.restart, env={"TWOPC_CRASH_AT": "coordinator.after_commit_logged"})
    try:
        await _buy(c, step, "order-6", "alice", {"gizmo": 1})
        step.events.append("unexpected: the shop answered")
    except grpc.aio.AioRpcError as e:
        step.events.append(f"the buyer's request failed: {e.code().name} (the shop died)")
    await asyncio.to_thread(c.shop.wait, 20)
    held = (await c.balance("alice")).held
    step.events.append(f"meanwhile: alice has {_money(held)} held, order-6 is {await c.order_state('order-6')}")
    await asyncio.to_thread(c.shop.restart)
    step.events.append("shop restarted: recovery re-drives the logged COMMIT")
    await wait_until(lambda: _order_is(c, "order-6", "confirmed"), TIMEOUT_S)
    await wait_until(lambda: _no_hold(c, "alice"), TIMEOUT_S)
    retry = await c.purchase("order-6", "alice", {"gizmo": 1})
    step.responses.append(retry)
    said = f"the shop said {outcome(retry)}, {_money(retry.amount)} charged once"
    step.events.append(f"the buyer retried order-6: {said}")
    step.after = await snapshot(c, ["alice"], ["gizmo"], ["order-6"])
    return step


async def race_for_last_unit(c: Cluster) -> Step:
    step = Step(
        "Two buyers race for the last lamp",
        "Both Prepares reached the order service at once; the first reserved the lamp, the second found none "
        "available and voted ABORT. Exactly one purchase committed.",
        "alice and carol each buy the one lamp in stock, concurrently",
        await snapshot(c, ["alice", "carol"], ["lamp"], []),
    )
    started = time.monotonic()
    results = await asyncio.gather(
        c.purchase("order-7a", "alice", {"lamp": 1}), c.purchase("order-7c", "carol", {"lamp": 1})
    )
    step.elapsed_s = time.monotonic() - started
    step.responses.extend(results)
    for who, r in zip(("alice", "carol"), results, strict=True):
        step.events.append(f"{who}: {outcome(r)}{': ' + r.reason if r.reason else ''}")
    await wait_until(lambda: _no_hold(c, "alice"), TIMEOUT_S)
    await wait_until(lambda: _no_hold(c, "carol"), TIMEOUT_S)
    step.after = await snapshot(c, ["alice", "carol"], ["lamp"], ["order-7a", "order-7c"])
    return step


SCENARIOS: list[Callable[[Cluster], Awaitable[Step]]] = [
    happy_path,
    insufficient_funds,
    out_of_stock,
    slow_wallet,
    participant_crash,
    coordinator_crash,
    race_for_last_unit,
]


# --- conditions the scenarios wait for (bounded) -----------------------------------


async def _released(c: Cluster, sku: str, order_id: str) -> bool:
    return (await c.stock(sku)).reserved == 0 and await c.order_state(order_id) in ("cancelled", "absent")


async def _no_hold(c: Cluster, account: str) -> bool:
    return (await c.balance(account)).held == 0


async def _order_is(c: Cluster, order_id: str, state: str) -> bool:
    try:
        return await c.order_state(order_id) == state
    except grpc.aio.AioRpcError:
        return False  # restarting


async def _tombstoned(c: Cluster, txn_id: str) -> bool:
    rows = query(c.wallet_db, "SELECT state FROM twopc_txn WHERE txn_id = :txn_id", txn_id=txn_id)
    return bool(rows) and rows[0][0] == "ABORTED"
