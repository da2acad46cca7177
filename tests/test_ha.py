"""Several coordinator instances on one PostgreSQL decision log: leases, fencing,
takeover, outcomes (rules 1-6 of tests/model/ha_model.py), on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import FAST, INSECURE, Kv, eventually
from twopc import Coordinator, Outcome
from twopc.errors import FencedError, LogUnavailableError, NotLoggedError
from twopc.testing import TcpProxy

psycopg = pytest.importorskip("psycopg", reason="needs psycopg (pip install 'twopc[postgres]')")

from twopc.postgres_decision_log import PostgresDecisionLog  # noqa: E402 - after the skip

SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable() -> bool:
    try:
        psycopg.connect(SERVER, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _reachable(), reason="needs PostgreSQL on 127.0.0.1:5432 (database test)")


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped at the end."""
    name = f"ha_{secrets.token_hex(6)}"
    yield name
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def sql(statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Runs one statement on the test server in its own transaction; its rows."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def expire(schema: str, instance: str) -> None:
    """Ages an instance's lease past its expiry, as if it stopped renewing long ago."""
    sql(f"UPDATE {schema}.instances SET expires_at = now() - interval '1 hour' WHERE id = %s", instance)


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[PostgresDecisionLog]:
    """A log opened without its background work: the test drives leases itself."""
    log = PostgresDecisionLog(url, **options)
    await log.open()
    try:
        yield log
    finally:
        await log.close()


async def test_fenced_instance_cannot_log_commit(schema: str) -> None:
    """Once another instance bumped an instance's epoch, the database refuses its
    COMMIT: FencedError, and no record is written."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        assert await a.log_commit(f"{a.id}:before", ["t1"])
        expire(schema, a.id)
        assert await b.take_over() == [a.id]
        with pytest.raises(FencedError):
            await a.log_commit(f"{a.id}:after", ["t1"])
        with pytest.raises(FencedError):
            a.check_writable()
        assert sql(f"SELECT txn_id FROM {schema}.decisions") == [(f"{a.id}:before",)]
        assert sql(f"SELECT instance, taken_by, commits FROM {schema}.ownership") == [(a.id, b.id, 1)]


async def test_outcome_is_pending_until_the_owner_is_taken_over(schema: str) -> None:
    """GetOutcome's rule 4: COMMITTED if logged; PENDING while the owner's row is not
    taken over, even past its expiry; ABORTED once taken over or never known."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        await a.log_commit(f"{a.id}:logged", ["t1"])
        assert await b.outcome(f"{a.id}:logged") is Outcome.COMMITTED
        assert await b.outcome(f"{a.id}:running") is Outcome.PENDING
        expire(schema, a.id)
        assert await b.outcome(f"{a.id}:running") is Outcome.PENDING  # expired, not fenced: it may still write
        await b.take_over()
        assert await b.outcome(f"{a.id}:running") is Outcome.ABORTED
        assert await b.outcome(f"{a.id}:logged") is Outcome.COMMITTED
        assert await b.outcome("0123456789abcdef:never") is Outcome.ABORTED


async def test_takeover_waits_for_a_commit_being_written(schema: str) -> None:
    """A takeover that meets a COMMIT write in progress (the writer's lease row held
    FOR SHARE) waits for it, then adopts the record: no COMMIT lands unseen."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        expire(schema, a.id)
        adopted: list[str] = []
        b.watch(adopt=lambda records: adopted.extend(r.txn_id for r in records), fail=lambda e: None)
        # a's own COMMIT transaction, held open between its fence check and its commit.
        async with await psycopg.AsyncConnection.connect(SERVER) as writer:
            await writer.execute(f"SELECT epoch FROM {schema}.instances WHERE id = %s FOR SHARE", (a.id,))
            await writer.execute(
                f"INSERT INTO {schema}.decisions (txn_id, owner, driver, decision, targets)"
                " VALUES (%s, %s, %s, 'commit', '[\"t1\"]')",
                (f"{a.id}:racing", a.id, a.id),
            )
            takeover = asyncio.create_task(b.take_over())
            done, _ = await asyncio.wait({takeover}, timeout=0.5)
            assert not done, "the epoch bump must wait for the COMMIT's transaction"
            await writer.commit()
        assert await takeover == [a.id]
        assert adopted == [f"{a.id}:racing"]


async def test_commit_write_lost_in_a_partition_is_read_back(schema: str) -> None:
    """A COMMIT write whose answer is cut off (rule 5) is read back once the database
    is reachable, and the log and the answer agree: logged and True, or an abort
    marker and NotLoggedError (the late write can no longer land)."""
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
    try:
        async with opened(url, lease_s=60, op_timeout_s=0.5, decision_wait_s=30) as a:
            proxy.cut()
            write = asyncio.create_task(a.log_commit(f"{a.id}:cut", ["t1"]))
            with capture_logs() as logs:
                await eventually(
                    lambda: any(e["event"] == "decision_write_unseen" for e in logs), what="the write times out"
                )
            assert not write.done(), "nothing is decided while the database cannot be read"
            proxy.heal()
            try:
                logged = await write
            except NotLoggedError:
                logged = False
            proxy.reset()  # every connection of the cut is gone: nothing more can land
            rows = sql(f"SELECT decision FROM {schema}.decisions WHERE txn_id = %s", f"{a.id}:cut")
            assert rows == [("commit",)] if logged else rows == [("abort",)]
    finally:
        await proxy.close()


async def test_unreachable_log_refuses_new_transactions_then_recovers(schema: str, start_kv: Callable[..., Kv]) -> None:
    """With the database cut off past the lease, run() refuses before sending
    anything (LogUnavailableError); once it is back, transactions commit again."""
    kv1, kv2 = start_kv("a"), start_kv("b")
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    log = PostgresDecisionLog(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}", lease_s=1)

    def writable() -> bool:
        try:
            log.check_writable()
        except LogUnavailableError:
            return False
        return True

    try:
        async with Coordinator(log, credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
            assert (await c.run([kv1.branch(), kv2.branch()])).outcome is Outcome.COMMITTED
            proxy.cut()
            await eventually(lambda: not writable(), what="the lease lapses unrenewed")
            sent = c.messages_sent
            with pytest.raises(LogUnavailableError, match="lease"):
                await c.run([kv1.branch(), kv2.branch()])
            assert c.messages_sent == sent, "a refused run sends nothing"
            proxy.heal()
            await eventually(writable, what="the lease is renewed")
            assert (await c.run([kv1.branch(), kv2.branch()])).outcome is Outcome.COMMITTED
    finally:
        await proxy.close()
