"""A trivial but durable participant: every prepare and commit is really written and
fsync'd by `twopc.Participant`, and the business part is one row.

The operation is a `google.protobuf.Struct` {"amount": n}: prepare records a
reservation, commit moves it to `applied`, abort deletes it. Nothing can fail, so the
benchmark measures the protocol and the store, not business rules.

Run: python -m bench.durable --db p.db --port 0   (the benchmark runs it under bench.probe)
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from typing import Any

from google.protobuf import struct_pb2

from twopc import Credentials, Participant, ParticipantConfig, Vote, VoteAbort
from twopc.observe import logconfig


class Reserve:
    """The business part: one row per transaction."""

    operations = (struct_pb2.Struct,)
    schema = """
    CREATE TABLE IF NOT EXISTS reserved (txn_id TEXT PRIMARY KEY, amount INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS applied (txn_id TEXT PRIMARY KEY, amount INTEGER NOT NULL);
    """

    def prepare(self, db: sqlite3.Connection, txn_id: str, operation: Any) -> Vote:
        vote = operation["vote"] if "vote" in operation else "commit"  # noqa: SIM401 - Struct has no .get
        if vote == "read_only":
            return Vote.READ_ONLY
        if vote == "abort":
            raise VoteAbort("told to abort")
        db.execute("INSERT INTO reserved VALUES (?, ?)", (txn_id, int(operation["amount"])))
        return Vote.COMMIT

    def commit(self, db: sqlite3.Connection, txn_id: str) -> None:
        db.execute("INSERT INTO applied SELECT * FROM reserved WHERE txn_id = ?", (txn_id,))
        db.execute("DELETE FROM reserved WHERE txn_id = ?", (txn_id,))

    def abort(self, db: sqlite3.Connection, txn_id: str) -> None:
        db.execute("DELETE FROM reserved WHERE txn_id = ?", (txn_id,))


def operation(amount: int = 1, vote: str = "commit") -> struct_pb2.Struct:
    """The operation a `Reserve` participant accepts; `vote` may be "read_only" or
    "abort" to take those paths of the protocol."""
    op = struct_pb2.Struct()
    op.update({"amount": amount, "vote": vote})
    return op


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args()
    logconfig.configure("json", level=args.log_level)
    credentials = Credentials.insecure()
    config = ParticipantConfig(allow_no_coordinator=True)  # the bench drives Prepare by hand
    async with Participant(Reserve(), args.db, credentials=credentials, config=config) as participant:
        await participant.serve(f"{args.host}:{args.port}", grace_s=0.5)


if __name__ == "__main__":
    asyncio.run(main())
