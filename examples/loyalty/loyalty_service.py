"""A loyalty-points service that takes part in twopc transactions.

    python loyalty_service.py --db loyalty.db --port 50061

It serves two gRPC services on one port: `twopc.v1.Participant` (through the
`twopc.Participant` helper, around `LoyaltyHandler`) and its own `loyalty.v1.Loyalty`
API. Generate `loyalty/v1/*_pb2.py` first (see the README's "Adopting twopc").
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from typing import Any

import grpc
from loyalty.v1 import loyalty_pb2, loyalty_pb2_grpc

import twopc

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    points  INTEGER NOT NULL CHECK (points >= 0)
);
CREATE TABLE IF NOT EXISTS holds (
    txn_id  TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts,
    points  INTEGER NOT NULL CHECK (points > 0)
);
"""


def points_of(db: sqlite3.Connection, account: str) -> loyalty_pb2.Points:
    """The account's points; `twopc.NotFound` (NOT_FOUND) if it has none."""
    row = db.execute(
        "SELECT points, (SELECT coalesce(sum(points), 0) FROM holds WHERE account = ?) FROM accounts WHERE account = ?",
        (account, account),
    ).fetchone()
    if row is None:
        raise twopc.NotFound(f"no loyalty account {account!r}")
    points, held = row
    return loyalty_pb2.Points(account=account, points=points, held=held, available=points - held)


class LoyaltyHandler:
    """RedeemPoints as a twopc participant: hold on prepare, spend on commit, release
    on abort. Each method runs inside the helper's local transaction (`db`), so the
    hold and the record that the transaction is PREPARED reach the disk together."""

    operations = (loyalty_pb2.RedeemPoints,)
    schema = SCHEMA

    def prepare(self, db: sqlite3.Connection, txn_id: str, operation: Any) -> twopc.Vote:
        redeem: loyalty_pb2.RedeemPoints = operation
        if not redeem.account:
            raise twopc.InvalidOperation("account is required")
        if redeem.points <= 0:
            raise twopc.InvalidOperation(f"points must be > 0, got {redeem.points}")
        available = points_of(db, redeem.account).available
        if available < redeem.points:
            raise twopc.VoteAbort(f"not enough points: available {available}, needed {redeem.points}")
        # commit() and abort() get only the txn id: record here what they need.
        db.execute("INSERT INTO holds VALUES (?, ?, ?)", (txn_id, redeem.account, redeem.points))
        return twopc.Vote.COMMIT

    def commit(self, db: sqlite3.Connection, txn_id: str) -> None:
        account, points = db.execute("SELECT account, points FROM holds WHERE txn_id = ?", (txn_id,)).fetchone()
        db.execute("UPDATE accounts SET points = points - ? WHERE account = ?", (points, account))
        db.execute("DELETE FROM holds WHERE txn_id = ?", (txn_id,))

    def abort(self, db: sqlite3.Connection, txn_id: str) -> None:
        db.execute("DELETE FROM holds WHERE txn_id = ?", (txn_id,))


class LoyaltyApi(loyalty_pb2_grpc.LoyaltyServicer):
    """The service's own API, on the same store as the participant."""

    def __init__(self, participant: twopc.Participant) -> None:
        self.store = participant.store

    async def Award(  # noqa: N802 - the RPC's name
        self, request: loyalty_pb2.AwardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> loyalty_pb2.Points:
        if not request.account or request.points <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "account and points > 0 are required")

        def award(db: sqlite3.Connection) -> loyalty_pb2.Points:
            db.execute(
                "INSERT INTO accounts VALUES (?, ?)"
                " ON CONFLICT (account) DO UPDATE SET points = points + excluded.points",
                (request.account, request.points),
            )
            return points_of(db, request.account)

        return await self.store.write(award)

    async def GetPoints(  # noqa: N802 - the RPC's name
        self, request: loyalty_pb2.GetPointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> loyalty_pb2.Points:
        try:
            return await self.store.read(lambda db: points_of(db, request.account))
        except twopc.NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # unreachable: abort raises


async def main() -> None:
    parser = argparse.ArgumentParser(description="A loyalty-points twopc participant.")
    parser.add_argument("--db", required=True, help="SQLite file (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 for any free port")
    args = parser.parse_args()
    twopc.configure_logging("console")
    credentials = twopc.Credentials.insecure()  # loopback; pass TLS credentials in production
    async with twopc.Participant(LoyaltyHandler(), args.db, credentials=credentials) as participant:
        api = LoyaltyApi(participant)

        def add_api(server: grpc.aio.Server) -> None:
            loyalty_pb2_grpc.add_LoyaltyServicer_to_server(api, server)

        # twopc.v1.Participant and the Loyalty API on one port, until SIGTERM or Ctrl-C.
        await participant.serve(f"{args.host}:{args.port}", services=[add_api])


if __name__ == "__main__":
    asyncio.run(main())
