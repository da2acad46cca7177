"""A participant over PostgreSQL prepared transactions (`twopc.participant.prepared`): a debit.

The operation is a `google.protobuf.Int64Value`, the amount to take from account
"ann"; the business SQL is one conditional UPDATE, run as it is inside the
transaction that PREPARE TRANSACTION ends. Tests read `accounts` and
`pg_prepared_xacts` directly.

Run: python -m tests.apps.debits --db postgresql://... --port 0
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import wrappers_pb2

from tests.apps.kv import arguments, serve
from twopc import Credentials, Vote, VoteAbort
from twopc.participant.prepared import PreparedParticipant
from twopc.stores import execute


class Debits:
    """The service's own SQL, as it is: debit ann if the balance allows."""

    operations = (wrappers_pb2.Int64Value,)
    schema = "CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY, balance BIGINT NOT NULL);"

    def prepare(self, db: Any, txn_id: str, operation: Any) -> Vote:
        done = execute(
            db,
            "UPDATE accounts SET balance = balance - :amount WHERE account = 'ann' AND balance >= :amount",
            {"amount": operation.value},
        )
        if done.rowcount != 1:
            raise VoteAbort(f"insufficient funds for {operation.value}")
        return Vote.COMMIT


def seed(url: str) -> None:
    """Creates the service's table in the schema of `url`, with ann at 100."""
    import psycopg  # the PostgreSQL extra: imported by the tests that have it

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(Debits.schema.encode())
        conn.execute("INSERT INTO accounts VALUES ('ann', 100)")


async def main() -> None:
    args, config = arguments(__doc__)
    async with PreparedParticipant(Debits(), args.db, credentials=Credentials.insecure(), config=config) as p:
        await serve(p, args)


if __name__ == "__main__":
    asyncio.run(main())
