"""Which instance runs a caller's transaction id, when several share one log.

Execute is idempotent by the caller's `txn_id`, but a coordinator knows only its own
transactions: on a shared PostgreSQL log every instance names its transactions
"<instance id>:<txn_id>", so a retry that a load balancer sends to another instance
would run the same purchase again under another global id. Before running, an
instance therefore claims the caller's id in the log's database; the first claim
wins, and every other instance answers a retry from the winner's outcome instead
of running it (`twopc.coordinator.service`). An SQLite log has one owner and needs
no claims.

The claim is one row (`<schema>.execute_claims`: caller id, global id) beside the
decision log's tables, written before any Prepare is sent.
"""

from __future__ import annotations

import psycopg
import psycopg_pool

from twopc.decisions.postgres import connection_info
from twopc.errors import LogUnavailableError

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.execute_claims (
    txn_id     text PRIMARY KEY,                 -- the caller's id (Execute's txn_id)
    gid        text NOT NULL,                    -- the global id of the attempt that runs it
    claimed_at timestamptz NOT NULL DEFAULT statement_timestamp()
)
"""


class PostgresClaims:
    """Claims of caller ids in the database of a shared decision log.

    Args:
        log_url: the decision log's URL (`postgresql://...?schema=NAME`).
        op_timeout_s: the longest one claim may take before UNAVAILABLE.
    """

    def __init__(self, log_url: str, *, op_timeout_s: float = 5.0) -> None:
        url, self.schema = connection_info(log_url)
        self.op_timeout_s = op_timeout_s
        self._pool = psycopg_pool.AsyncConnectionPool(
            url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}, timeout=op_timeout_s
        )

    async def open(self) -> None:
        """Connects and creates the table if missing (the log has made the schema).

        Raises:
            LogUnavailableError: the database cannot be reached.
        """
        try:
            await self._pool.open(wait=True, timeout=self.op_timeout_s)
            async with self._pool.connection() as conn, conn.transaction():
                # One creator at a time: concurrent CREATE IF NOT EXISTS can collide.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"twopc-claims:{self.schema}",))
                await conn.execute(_DDL.format(s=self.schema).encode())
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            await self._pool.close()
            raise LogUnavailableError(f"cannot reach the decision log's database: {e}") from e

    async def close(self) -> None:
        await self._pool.close()

    async def claim(self, txn_id: str, gid: str) -> str:
        """Claims `txn_id` for the attempt `gid` unless another attempt has it;
        returns the global id of the attempt that owns it (`gid` if this one).

        Raises:
            LogUnavailableError: the database cannot be reached; nothing was run.
        """
        try:
            async with self._pool.connection(timeout=self.op_timeout_s) as conn:
                # A concurrent claim of the same id waits for the first to commit, then
                # inserts nothing; the next statement (a new snapshot) sees the winner.
                inserted = await conn.execute(
                    f"INSERT INTO {self.schema}.execute_claims (txn_id, gid) VALUES (%s, %s)"
                    " ON CONFLICT (txn_id) DO NOTHING RETURNING gid",
                    (txn_id, gid),
                )
                row = await inserted.fetchone()
                if row is None:
                    found = await conn.execute(
                        f"SELECT gid FROM {self.schema}.execute_claims WHERE txn_id = %s",
                        (txn_id,),
                    )
                    row = await found.fetchone()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise LogUnavailableError(f"cannot claim {txn_id!r} in the decision log's database: {e}") from e
        if row is None:  # claimed and purged between the two statements: an operator's doing
            raise LogUnavailableError(f"the claim of {txn_id!r} vanished; retry")
        return str(row[0])
