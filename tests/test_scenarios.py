"""The demo's seven scenarios, each on a fresh cluster of real processes, asserted."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services import scenarios
from services.cluster import Cluster
from services.scenarios import Step, outcome
from services.shop.v1 import shop_pb2
from twopc.dev.testing import query


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path) as c:
        await scenarios.seed(c)
        yield c


async def assert_invariants(c: Cluster) -> None:
    report = await c.settled()
    assert report.violations == []
    assert report.deposited == sum(scenarios.ACCOUNTS.values())


def after(step: Step) -> scenarios.Snapshot:
    assert step.after is not None
    return step.after


async def test_purchase_commits_at_both_services(cluster: Cluster) -> None:
    """Happy path: money debited, stock shipped, order confirmed."""
    step = await scenarios.happy_path(cluster)
    assert [outcome(r) for r in step.responses] == ["COMMITTED"]
    assert after(step).balances["alice"] == (10_000 - 3_000, 0)
    assert after(step).stock["widget"] == (8, 0) and after(step).orders == {"order-1": "confirmed"}
    await assert_invariants(cluster)


async def test_insufficient_funds_changes_nothing(cluster: Cluster) -> None:
    """The wallet votes ABORT with its reason; stock and money are unchanged."""
    step = await scenarios.insufficient_funds(cluster)
    (r,) = step.responses
    assert outcome(r) == "ABORTED" and r.reason == "wallet: insufficient funds: available 300, needed 1200"
    assert after(step).balances == step.before.balances and after(step).stock == step.before.stock
    assert after(step).orders["order-2"] in ("cancelled", "absent")
    await assert_invariants(cluster)


async def test_out_of_stock_moves_no_money(cluster: Cluster) -> None:
    """The order service votes ABORT with its reason; no money moves, nothing stays held."""
    step = await scenarios.out_of_stock(cluster)
    (r,) = step.responses
    assert outcome(r) == "ABORTED" and r.reason == "orders: out of stock: gizmo available 2, needed 3"
    assert after(step).balances == step.before.balances == {"carol": (5_000, 0)}
    await assert_invariants(cluster)


async def test_slow_wallet_aborts_at_the_deadline(cluster: Cluster) -> None:
    """A SIGSTOPped wallet misses the 1 s deadline: ABORTED in about that time, the order's
    reservation released, and the resumed wallet holds nothing."""
    step = await scenarios.slow_wallet(cluster)
    (r,) = step.responses
    assert outcome(r) == "ABORTED" and "DEADLINE_EXCEEDED" in r.reason
    assert 0.9 < step.elapsed_s < 4.0  # the deadline, not a retry schedule or a hang
    assert after(step).balances == step.before.balances and after(step).stock == step.before.stock
    await assert_invariants(cluster)


async def test_order_service_killed_after_voting_yes_still_commits(cluster: Cluster) -> None:
    """SIGKILL of the order service after its yes vote: it restarts holding the
    reservation, and the purchase completes as COMMITTED at both services."""
    step = await scenarios.participant_crash(cluster)
    (r,) = step.responses
    assert outcome(r) == "COMMITTED"
    assert any("on its disk the order is PENDING" in e for e in step.events)
    assert after(step).balances["alice"] == (10_000 - 1_200, 0) and after(step).stock["gadget"] == (4, 0)
    await assert_invariants(cluster)


async def test_coordinator_killed_after_logging_commit_is_finished_by_restart(cluster: Cluster) -> None:
    """SIGKILL of the shop right after its COMMIT is durable: the client sees no answer,
    the restarted shop commits at both services."""
    step = await scenarios.coordinator_crash(cluster)
    assert any("UNAVAILABLE" in e for e in step.events)
    assert any("alice has 7.00 held, order-6 is pending" in e for e in step.events)
    assert after(step).balances["alice"] == (10_000 - 700, 0) and after(step).orders == {"order-6": "confirmed"}
    (retry,) = step.responses  # the buyer's retry: the same answer, no second charge
    ((placed_by,),) = query(cluster.orders_db, "SELECT txn_id FROM orders WHERE order_id = 'order-6'")
    assert outcome(retry) == "COMMITTED" and retry.amount == 700 and retry.txn_id == placed_by
    looked_up = await cluster.shop_api.GetPurchase(shop_pb2.GetPurchaseRequest(order_id="order-6"), timeout=5)
    assert looked_up == retry
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await cluster.shop_api.GetPurchase(shop_pb2.GetPurchaseRequest(order_id="order-404"), timeout=5)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    await assert_invariants(cluster)


async def test_two_buyers_race_for_the_last_unit(cluster: Cluster) -> None:
    """Two concurrent purchases of the last unit: exactly one commits."""
    step = await scenarios.race_for_last_unit(cluster)
    assert sorted(outcome(r) for r in step.responses) == ["ABORTED", "COMMITTED"]
    assert after(step).stock["lamp"] == (0, 0)
    assert sorted(after(step).orders.values()) in (["absent", "confirmed"], ["cancelled", "confirmed"])
    await assert_invariants(cluster)


async def test_invariant_checker_reports_each_broken_rule(cluster: Cluster) -> None:
    """The checker is not blind: tampering with a store (a debit without an order, an
    unlogged participant commit, a transaction left prepared) is reported."""
    await scenarios.happy_path(cluster)
    assert (await cluster.settled()).ok
    cluster.stop()
    with sqlite3.connect(cluster.wallet_db) as w:
        w.execute("INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES ('bob', 'debit', 100, 'ghost', 0)")
        w.execute("UPDATE accounts SET balance = balance - 100 WHERE account = 'bob'")
        w.execute("INSERT INTO twopc_txn (txn_id, state, prepared_at, decided_at) VALUES ('ghost', 'COMMITTED', 0, 0)")
        w.execute("INSERT INTO twopc_txn (txn_id, state, prepared_at) VALUES ('stuck', 'PREPARED', 0)")
    with sqlite3.connect(cluster.orders_db) as o:
        o.execute("UPDATE products SET on_hand = on_hand + 1 WHERE sku = 'widget'")
    found = "\n".join(cluster.check().violations)
    assert "txn ghost: wallet debited, order absent" in found
    assert "txn ghost: wallet committed, but the coordinator never logged COMMIT" in found
    assert "txn stuck still in doubt" in found
    assert "stock of widget not conserved" in found
