"""The invariants of docs/design.md, checked from the services' own stores and the log.

It reads the stores directly, read-only, as an auditor would (SQLite files, where WAL
lets it read while the services run, or PostgreSQL schemas): the wallet's accounts,
holds and ledger, the order service's products and orders, both participants' twopc
transaction tables, and the shop's decision log. Every purchase is one transaction
with a wallet branch and an order branch, so atomicity is: a transaction debited the
wallet exactly when its order was confirmed.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twopc.dev.testing import snapshot
from twopc.stores import execute


@dataclass
class Report:
    """What the check found: totals for people, and every violation."""

    deposited: int = 0
    balances: int = 0
    spent: int = 0
    held: int = 0
    received: int = 0
    on_hand: int = 0
    sold: int = 0
    committed: int = 0
    in_doubt: int = 0
    violations: list[str] = field(default_factory=list)
    heuristic: list[str] = field(default_factory=list)  # operators' decisions (`twopc resolve`) and what they broke

    @property
    def ok(self) -> bool:
        return not self.violations


def logged_commits(log: Path | str) -> dict[str, bool]:
    """The shop's COMMIT records, txn id -> ended: from its SQLite file, or from a
    PostgreSQL log that several shops share (a postgresql:// URL)."""
    if isinstance(log, str) and log.startswith(("postgresql://", "postgres://")):
        from twopc.decisions.postgres import read_commits  # the postgres extra

        return read_commits(log)
    with snapshot(log) as db:
        return {t: e is not None for t, e in db.execute("SELECT txn_id, ended_at FROM decisions")}


def check(wallet_db: Path | str, orders_db: Path | str, log_db: Path | str, *, quiescent: bool = True) -> Report:
    """Checks every invariant; `quiescent` adds "nothing left in doubt" (use it once
    every process is back and recovery had its time). `log_db` is the shop's log
    file or a postgresql:// URL."""
    r = Report()
    bad = r.violations.append
    with snapshot(wallet_db) as w, snapshot(orders_db) as o:
        # Conservation and no negatives: money.
        r.deposited = _one(w, "SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind = 'deposit'")
        r.spent = _one(w, "SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind = 'debit'")
        r.balances = _one(w, "SELECT coalesce(sum(balance), 0) FROM accounts")
        r.held = _one(w, "SELECT coalesce(sum(amount), 0) FROM holds")
        if r.deposited != r.balances + r.spent:
            bad(f"money not conserved: deposited {r.deposited} != balances {r.balances} + spent {r.spent}")
        for account, balance, held in execute(
            w,
            "SELECT a.account, a.balance, coalesce(sum(h.amount), 0) FROM accounts a"
            " LEFT JOIN holds h ON h.account = a.account GROUP BY a.account",
        ):
            if balance < 0 or balance - held < 0:
                bad(f"negative money at {account}: balance {balance}, held {held}")
        # Conservation and no negatives: stock.
        r.received = _one(o, "SELECT coalesce(sum(received), 0) FROM products")
        r.on_hand = _one(o, "SELECT coalesce(sum(on_hand), 0) FROM products")
        r.sold = _one(o, "SELECT coalesce(sum(sold), 0) FROM products")
        for sku, on_hand, reserved, received, sold in execute(
            o, "SELECT sku, on_hand, reserved, received, sold FROM products"
        ):
            if received != on_hand + sold:
                bad(f"stock of {sku} not conserved: received {received} != on hand {on_hand} + sold {sold}")
            if on_hand < 0 or reserved < 0 or reserved > on_hand:
                bad(f"negative stock of {sku}: on hand {on_hand}, reserved {reserved}")
        # Heuristic decisions were taken by an operator, not the protocol: what they
        # break is reported as theirs, not as a protocol violation.
        heuristic = {
            t: f"{name} {d.lower()}" for name, db in (("wallet", w), ("orders", o)) for t, d in _heuristics(db)
        }
        for t, what in sorted(heuristic.items()):
            r.heuristic.append(f"txn {t}: heuristic decision at {what}")

        def bad_unless_heuristic(t: str, message: str) -> None:
            if t in heuristic:
                r.heuristic.append(f"{message} (heuristic: {heuristic[t]})")
            else:
                bad(message)

        # Atomicity: a debit exactly for each confirmed order.
        debited = {t for (t,) in execute(w, "SELECT txn_id FROM ledger WHERE kind = 'debit'")}
        confirmed = {t for (t,) in execute(o, "SELECT txn_id FROM orders WHERE state = 'CONFIRMED'")}
        r.committed = len(debited & confirmed)
        for t in sorted(debited - confirmed):
            bad_unless_heuristic(t, f"txn {t}: wallet debited, order {_order_state(o, t)}")
        for t in sorted(confirmed - debited):
            bad_unless_heuristic(t, f"txn {t}: order confirmed, wallet {_txn_state(w, t)}")
        # Agreement with the log: a participant committed only what the shop logged.
        participant_commits = [
            (name, t)
            for name, db in (("wallet", w), ("orders", o))
            for (t,) in execute(db, "SELECT txn_id FROM twopc_txn WHERE state = 'COMMITTED'")
        ]
        # Read after the participants: a record they acted on is in the log by then.
        commits = logged_commits(log_db)
        for name, t in participant_commits:
            if t not in commits:
                bad_unless_heuristic(t, f"txn {t}: {name} committed, but the coordinator never logged COMMIT")
        # Liveness after healing: nothing in doubt, no reservation left behind.
        prepared = {t for db in (w, o) for (t,) in execute(db, "SELECT txn_id FROM twopc_txn WHERE state = 'PREPARED'")}
        r.in_doubt = len(prepared)
        if quiescent:
            for t in sorted(prepared):
                bad(f"txn {t} still in doubt (PREPARED) after recovery")
            if r.held:
                bad(f"{r.held} still held in the wallet after recovery")
            pending = _one(o, "SELECT count(*) FROM orders WHERE state = 'PENDING'")
            if pending:
                bad(f"{pending} orders still PENDING after recovery")
            open_commits = {t for t, ended in commits.items() if not ended}
            for t in sorted(open_commits & heuristic.keys()):
                r.heuristic.append(f"txn {t}: logged COMMIT never acknowledged (heuristic: {heuristic[t]})")
            if open_commits - heuristic.keys():
                bad(f"{len(open_commits - heuristic.keys())} logged commits not yet acknowledged by every participant")
    return r


def _heuristics(db: Any) -> list[tuple[str, str]]:
    """(txn id, decision) of each heuristic decision in a participant's store."""
    exists = (
        "SELECT 1 FROM sqlite_master WHERE name = 'twopc_heuristic'"
        if isinstance(db, sqlite3.Connection)
        else "SELECT to_regclass('twopc_heuristic')"
    )
    if execute(db, exists).fetchone() in (None, (None,)):
        return []
    return [(t, d) for t, d in execute(db, "SELECT txn_id, decision FROM twopc_heuristic ORDER BY at")]


def _one(db: Any, sql: str) -> int:
    (value,) = execute(db, sql).fetchone()
    return int(value)


def _order_state(o: Any, txn_id: str) -> str:
    row = execute(o, "SELECT state FROM orders WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
    return row[0].lower() if row else "absent"


def _txn_state(w: Any, txn_id: str) -> str:
    row = execute(w, "SELECT state FROM twopc_txn WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
    return f"{row[0].lower()}, not debited" if row else "not debited"
