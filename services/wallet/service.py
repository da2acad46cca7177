"""The wallet's business rules (a twopc participant handler) and its own API."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import grpc

from services.common import (
    MAX_AMOUNT,
    MAX_BALANCE,
    AlreadyExists,
    ApiAccess,
    api,
    check_amount,
    page_after,
    page_size,
    page_token,
)
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc import InvalidOperation, NotFound, Participant, Vote, VoteAbort, limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS holds (
    txn_id  TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts,
    amount  INTEGER NOT NULL CHECK (amount > 0)
);
CREATE INDEX IF NOT EXISTS holds_account ON holds (account);
CREATE TABLE IF NOT EXISTS ledger (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL REFERENCES accounts,
    kind    TEXT NOT NULL CHECK (kind IN ('deposit', 'debit')),
    amount  INTEGER NOT NULL CHECK (amount > 0),
    txn_id  TEXT UNIQUE,  -- a debit's transaction: at most one debit per transaction
    at      REAL NOT NULL
);
"""


def balance(db: sqlite3.Connection, account: str) -> wallet_pb2.Balance:
    """The account's balance, holds and available money; NotFound if unknown."""
    limits.check_id("account", account)
    row = db.execute(
        "SELECT balance, (SELECT coalesce(sum(amount), 0) FROM holds WHERE account = ?) FROM accounts"
        " WHERE account = ?",
        (account, account),
    ).fetchone()
    if row is None:
        raise NotFound(f"no account {account!r}")
    total, held = row
    return wallet_pb2.Balance(account=account, balance=total, held=held, available=total - held)


class WalletHandler:
    """Debit as a 2PC participant: hold on prepare, debit on commit, release on abort."""

    operations = (wallet_pb2.Debit,)
    schema = SCHEMA

    def prepare(self, db: sqlite3.Connection, txn_id: str, operation: Any) -> Vote:
        debit: wallet_pb2.Debit = operation
        limits.check_id("account", debit.account)
        check_amount("amount", debit.amount, MAX_AMOUNT)
        available = balance(db, debit.account).available
        if available < debit.amount:
            raise VoteAbort(f"insufficient funds: available {available}, needed {debit.amount}")
        db.execute("INSERT INTO holds VALUES (?, ?, ?)", (txn_id, debit.account, debit.amount))
        return Vote.COMMIT

    def commit(self, db: sqlite3.Connection, txn_id: str) -> None:
        account, amount = db.execute("SELECT account, amount FROM holds WHERE txn_id = ?", (txn_id,)).fetchone()
        db.execute("UPDATE accounts SET balance = balance - ? WHERE account = ?", (amount, account))
        db.execute(
            "INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES (?, 'debit', ?, ?, ?)",
            (account, amount, txn_id, time.time()),
        )
        db.execute("DELETE FROM holds WHERE txn_id = ?", (txn_id,))

    def abort(self, db: sqlite3.Connection, txn_id: str) -> None:
        db.execute("DELETE FROM holds WHERE txn_id = ?", (txn_id,))


class WalletApi(wallet_pb2_grpc.WalletServicer):
    """The wallet's own API: accounts, deposits, balances, ledger."""

    def __init__(self, participant: Participant) -> None:
        self.store = participant.store

    async def OpenAccount(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.OpenAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.OpenAccountResponse:
        def open_account(db: sqlite3.Connection) -> None:
            limits.check_id("account", request.account)
            if db.execute("SELECT 1 FROM accounts WHERE account = ?", (request.account,)).fetchone():
                raise AlreadyExists(f"account {request.account!r} exists")
            db.execute("INSERT INTO accounts VALUES (?, 0)", (request.account,))

        await api(context, self.store.write(open_account))
        return wallet_pb2.OpenAccountResponse()

    async def Deposit(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.DepositRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.DepositResponse:
        def deposit(db: sqlite3.Connection) -> wallet_pb2.Balance:
            limits.check_id("account", request.account)
            check_amount("amount", request.amount, MAX_AMOUNT)
            before = balance(db, request.account)
            if before.balance + request.amount > MAX_BALANCE:
                raise InvalidOperation(f"balance would exceed {MAX_BALANCE}")
            db.execute("UPDATE accounts SET balance = balance + ? WHERE account = ?", (request.amount, request.account))
            db.execute(
                "INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES (?, 'deposit', ?, NULL, ?)",
                (request.account, request.amount, time.time()),
            )
            return balance(db, request.account)

        return wallet_pb2.DepositResponse(balance=await api(context, self.store.write(deposit)))

    async def GetBalance(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.Balance:
        return await api(context, self.store.read(lambda db: balance(db, request.account)))

    async def ListLedger(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.ListLedgerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.ListLedgerResponse:
        kinds = {"deposit": wallet_pb2.ENTRY_KIND_DEPOSIT, "debit": wallet_pb2.ENTRY_KIND_DEBIT}

        def ledger(db: sqlite3.Connection) -> wallet_pb2.ListLedgerResponse:
            size = page_size(request.page_size)
            after = page_after("ledger", request.page_token)
            if after is not None and (len(after) != 2 or after[0] != request.account or not isinstance(after[1], int)):
                raise InvalidOperation("page_token is not one this list handed out for this account")
            balance(db, request.account)  # NotFound for an unknown account
            rows = db.execute(
                "SELECT seq, kind, amount, coalesce(txn_id, ''), at FROM ledger WHERE account = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (request.account, after[1] if after else 0, size + 1),
            ).fetchall()
            more = len(rows) > size
            rows = rows[:size]
            return wallet_pb2.ListLedgerResponse(
                entries=[
                    wallet_pb2.LedgerEntry(kind=kinds[k], amount=a, txn_id=t, at_unix_s=at) for _, k, a, t, at in rows
                ],
                next_page_token=page_token("ledger", request.account, rows[-1][0]) if more else "",
            )

        return await api(context, self.store.read(ledger))


ACCESS = ApiAccess(wallet_pb2.DESCRIPTOR.services_by_name["Wallet"], reads=frozenset({"GetBalance", "ListLedger"}))
"""Reads are open to --readers; every other RPC of the API (writes) needs --operators."""
