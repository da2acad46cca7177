"""The wallet's business rules (a twopc participant handler) and its own API."""

from __future__ import annotations

import time
from typing import Any

import grpc

from services.common import (
    MAX_AMOUNT,
    MAX_BALANCE,
    MAX_OWNERS,
    AlreadyExists,
    ApiAccess,
    Readers,
    api,
    check_amount,
    page_after,
    page_size,
    page_token,
)
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc import InvalidOperation, NotFound, Participant, Vote, VoteAbort, rpc
from twopc.security import limits
from twopc.stores import Connection, execute, lock_rows

_TABLES = """
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    balance BIGINT NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS holds (
    txn_id  TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts,
    amount  BIGINT NOT NULL CHECK (amount > 0)
);
CREATE INDEX IF NOT EXISTS holds_account ON holds (account);
CREATE TABLE IF NOT EXISTS owners (  -- who may buy with an account and read it
    account TEXT NOT NULL REFERENCES accounts,
    owner   TEXT NOT NULL,
    PRIMARY KEY (account, owner)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq     {seq},
    account TEXT NOT NULL REFERENCES accounts,
    kind    TEXT NOT NULL CHECK (kind IN ('deposit', 'debit')),
    amount  BIGINT NOT NULL CHECK (amount > 0),
    txn_id  TEXT UNIQUE,  -- a debit's transaction: at most one debit per transaction
    at      DOUBLE PRECISION NOT NULL
);
"""
# The DDL differs only in how the ledger numbers its entries; the business SQL is one.
SCHEMA = {
    "sqlite": _TABLES.format(seq="INTEGER PRIMARY KEY AUTOINCREMENT"),
    "postgresql": _TABLES.format(seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
}


def balance(db: Connection, account: str) -> wallet_pb2.Balance:
    """The account's balance, holds and available money; NotFound if unknown."""
    limits.check_id("account", account)
    row = execute(
        db,
        "SELECT balance, (SELECT CAST(coalesce(sum(amount), 0) AS BIGINT) FROM holds WHERE account = :account)"
        " FROM accounts WHERE account = :account",
        {"account": account},
    ).fetchone()
    if row is None:
        raise NotFound(f"no account {account!r}")
    total, held = row
    return wallet_pb2.Balance(
        account=account, balance=total, held=held, available=total - held, owners=owners_of(db, account)
    )


def owners_of(db: Connection, account: str) -> list[str]:
    """The identities `account` belongs to (OpenAccount's owners)."""
    rows = execute(db, "SELECT owner FROM owners WHERE account = :account ORDER BY owner", {"account": account})
    return [owner for (owner,) in rows.fetchall()]


class WalletHandler:
    """Debit as a 2PC participant: hold on prepare, debit on commit, release on abort."""

    operations = (wallet_pb2.Debit,)
    schema = SCHEMA
    isolation = "READ COMMITTED"  # PostgreSQL: prepare locks the account it checks

    def prepare(self, db: Connection, txn_id: str, operation: Any) -> Vote:
        debit: wallet_pb2.Debit = operation
        limits.check_id("account", debit.account)
        check_amount("amount", debit.amount, MAX_AMOUNT)
        # Holds on one account queue here; the balance is read after the lock, so it
        # counts every hold committed before (a statement's snapshot starts with it).
        lock_rows(db, "accounts", "account", [debit.account])
        available = balance(db, debit.account).available
        if available < debit.amount:
            raise VoteAbort(f"insufficient funds: available {available}, needed {debit.amount}")
        execute(
            db,
            "INSERT INTO holds VALUES (:txn_id, :account, :amount)",
            {"txn_id": txn_id, "account": debit.account, "amount": debit.amount},
        )
        return Vote.COMMIT

    def commit(self, db: Connection, txn_id: str) -> None:
        # The hold is taken and read in one statement (RETURNING: both stores have it).
        ((account, amount),) = execute(
            db, "DELETE FROM holds WHERE txn_id = :txn_id RETURNING account, amount", {"txn_id": txn_id}
        ).fetchall()
        execute(
            db,
            "UPDATE accounts SET balance = balance - :amount WHERE account = :account",
            {"amount": amount, "account": account},
        )
        execute(
            db,
            "INSERT INTO ledger (account, kind, amount, txn_id, at) VALUES (:account, 'debit', :amount, :txn_id, :at)",
            {"account": account, "amount": amount, "txn_id": txn_id, "at": time.time()},
        )

    def abort(self, db: Connection, txn_id: str) -> None:
        execute(db, "DELETE FROM holds WHERE txn_id = :txn_id", {"txn_id": txn_id})


class WalletApi(wallet_pb2_grpc.WalletServicer):
    """The wallet's own API: accounts, deposits, balances, ledger."""

    def __init__(self, participant: Participant, readers: Readers) -> None:
        self.store = participant.store
        self.readers = readers

    async def _readable(self, context: grpc.aio.ServicerContext[Any, Any], account: str) -> None:
        """PERMISSION_DENIED unless the caller reads everything or owns `account`
        (an unknown account reads as not owned: nobody learns which exist)."""
        if self.readers.reads_everything(context):
            return
        await rpc.validate(context, lambda: limits.check_id("account", account))
        owners = await self.store.read(lambda db: owners_of(db, account))
        if not self.readers.may_read(context, owners):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the account's owners may read it")

    async def OpenAccount(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.OpenAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.OpenAccountResponse:
        def open_account(db: Connection) -> None:
            limits.check_id("account", request.account)
            limits.check_count("owners", len(request.owners), MAX_OWNERS)
            for owner in request.owners:
                limits.check_id("owner", owner)
            account = {"account": request.account}
            if execute(db, "SELECT 1 FROM accounts WHERE account = :account", account).fetchone():
                raise AlreadyExists(f"account {request.account!r} exists")
            execute(db, "INSERT INTO accounts VALUES (:account, 0)", account)
            for owner in dict.fromkeys(request.owners):
                execute(db, "INSERT INTO owners VALUES (:account, :owner)", {**account, "owner": owner})

        await api(context, self.store.write(open_account))
        return wallet_pb2.OpenAccountResponse()

    async def Deposit(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.DepositRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.DepositResponse:
        def deposit(db: Connection) -> wallet_pb2.Balance:
            limits.check_id("account", request.account)
            check_amount("amount", request.amount, MAX_AMOUNT)
            before = balance(db, request.account)
            if before.balance + request.amount > MAX_BALANCE:
                raise InvalidOperation(f"balance would exceed {MAX_BALANCE}")
            entry = {"account": request.account, "amount": request.amount, "at": time.time()}
            execute(db, "UPDATE accounts SET balance = balance + :amount WHERE account = :account", entry)
            execute(
                db,
                "INSERT INTO ledger (account, kind, amount, txn_id, at)"
                " VALUES (:account, 'deposit', :amount, NULL, :at)",
                entry,
            )
            return balance(db, request.account)

        return wallet_pb2.DepositResponse(balance=await api(context, self.store.write(deposit)))

    async def GetBalance(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.Balance:
        await self._readable(context, request.account)
        return await api(context, self.store.read(lambda db: balance(db, request.account)))

    async def ListLedger(  # noqa: N802 - the RPC's name
        self, request: wallet_pb2.ListLedgerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wallet_pb2.ListLedgerResponse:
        await self._readable(context, request.account)
        kinds = {"deposit": wallet_pb2.ENTRY_KIND_DEPOSIT, "debit": wallet_pb2.ENTRY_KIND_DEBIT}

        def ledger(db: Connection) -> wallet_pb2.ListLedgerResponse:
            size = page_size(request.page_size)
            after = page_after("ledger", request.page_token)
            if after is not None and (len(after) != 2 or after[0] != request.account or not isinstance(after[1], int)):
                raise InvalidOperation("page_token is not one this list handed out for this account")
            balance(db, request.account)  # NotFound for an unknown account
            rows = execute(
                db,
                "SELECT seq, kind, amount, coalesce(txn_id, ''), at FROM ledger"
                " WHERE account = :account AND seq > :after ORDER BY seq LIMIT :limit",
                {"account": request.account, "after": after[1] if after else 0, "limit": size + 1},
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


ACCESS = ApiAccess(
    wallet_pb2.DESCRIPTOR.services_by_name["Wallet"],
    reads=frozenset({"GetBalance", "ListLedger"}),
    owned=frozenset({"GetBalance", "ListLedger"}),
)
"""Reads are open to --readers and to an account's owners for their own account;
every other RPC of the API (writes) needs --operators."""
