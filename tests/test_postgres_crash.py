"""Crashes on PostgreSQL: the server itself SIGKILLed under a burst of prepares, and
the prepared-transaction adapter SIGKILLed at the protocol's exact points. (The helper's
participant crashes run on both stores in test_crash.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from tests.apps import debits
from tests.conftest import FAST, INSECURE, Kv, eventually, prepare_request, txn_state
from twopc import Branch, Coordinator, Outcome
from twopc.dev.pgserver import PostgresServer, schema
from twopc.dev.testing import ServiceProcess, query
from twopc.v1 import participant_pb2, participant_pb2_grpc

COMMIT = participant_pb2.VOTE_COMMIT


async def test_postgres_killed_during_a_burst_of_prepares(
    pg_killable: PostgresServer, start_kv: Callable[..., Kv], coordinator: Coordinator
) -> None:
    """PostgreSQL SIGKILLed while 200 Prepares run against a kv participant: every
    Prepare that voted COMMIT is on disk after PostgreSQL's restart (the others
    failed or voted ABORT, never COMMIT without the row); then every transaction in
    doubt is resolved by GetOutcome and nothing stays reserved."""
    with schema(pg_killable.url) as url:
        kv = start_kv("kv", db=url, args=["--in-doubt-after-s", "2", "--resolve-interval-s", "0.3"])
        async with grpc.aio.insecure_channel(kv.target) as ch:
            stub = participant_pb2_grpc.ParticipantStub(ch)

            async def prepare(i: int) -> participant_pb2.PrepareResponse:
                request = prepare_request(coordinator.global_id(f"t{i}"))  # its own: ABORTED when asked
                request.coordinator = coordinator.address
                return await stub.Prepare(request, timeout=10)

            tasks = [asyncio.create_task(prepare(i)) for i in range(200)]

            def voted() -> int:
                return sum(t.done() and not t.exception() and t.result().vote == COMMIT for t in tasks)

            await eventually(lambda: voted() >= 30, what="the first votes")
            await asyncio.to_thread(pg_killable.kill)
            await asyncio.to_thread(pg_killable.restart)
            replies: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        yes = [
            coordinator.global_id(f"t{i}")
            for i, r in enumerate(replies)
            if isinstance(r, participant_pb2.PrepareResponse) and r.vote == COMMIT
        ]
        failed = [r for r in replies if isinstance(r, BaseException)]
        assert len(yes) >= 30
        assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() is grpc.StatusCode.UNAVAILABLE for e in failed), {
            str(e) for e in failed
        }
        # Every COMMIT vote is backed by its row on disk (PREPARED, or already resolved).
        states = dict(query(url, "SELECT txn_id, state FROM twopc_txn"))
        assert not [t for t in yes if states.get(t) not in ("PREPARED", "ABORTED")]
        # The coordinator never decided these: GetOutcome says ABORTED and all resolve.
        await eventually(
            lambda: not query(url, "SELECT 1 FROM twopc_txn WHERE state = 'PREPARED'"),
            timeout_s=30,
            what="every transaction in doubt to resolve",
        )
        assert kv.reserved() == [] and kv.applied() == []
        kv.proc.stop()


# --- the adapter (PREPARE TRANSACTION) -------------------------------------------------


class Debits:
    """A tests/apps/debits.py process on a schema of its own, account ann at 100."""

    def __init__(self, tmp_path: Path, url: str, env: dict[str, str] | None = None) -> None:
        debits.seed(url)
        self.url = url
        self.proc = ServiceProcess(
            "tests.apps.debits", ["--db", url], log_path=tmp_path / "debits.log", env=env
        ).start()

    def branch(self, amount: int) -> Branch:
        return Branch(self.proc.address, wrappers_pb2.Int64Value(value=amount), name="debits")

    def balance(self) -> int:
        return int(query(self.url, "SELECT balance FROM accounts")[0][0])

    def prepared(self) -> int:
        return len(query(self.url, "SELECT 1 FROM pg_prepared_xacts p JOIN twopc_prepared t USING (gid)"))

    def state(self, txn_id: str) -> str | None:
        return txn_state(self.url, txn_id)


async def test_adapter_killed_before_answering_rolls_back_after_asking(
    tmp_path: Path, pg_url: str, start_kv: Callable[..., Kv]
) -> None:
    """The adapter SIGKILLed right after PREPARE TRANSACTION, its vote unsent: the
    coordinator aborts; the prepared transaction survives the crash, and the
    restarted service finds it in pg_prepared_xacts, asks GetOutcome and rolls it
    back."""
    debits = Debits(tmp_path, pg_url, env={"TWOPC_CRASH_AT": "participant.after_prepare_durable"})
    kv = start_kv("kv")
    brief_abort = replace(FAST, abort_retry_s=0.3)
    try:
        async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=brief_abort) as c:
            result = await c.run([debits.branch(30), kv.branch()])
            assert result.outcome is Outcome.ABORTED
            assert debits.proc.wait(10) == -9
            assert await c.wait_idle(10)
            assert debits.prepared() == 1 and debits.balance() == 100
            debits.proc.env.pop("TWOPC_CRASH_AT")
            debits.proc.restart()
            await eventually(lambda: debits.prepared() == 0, what="the restarted adapter to roll back")
        assert debits.balance() == 100 and debits.state(result.txn_id) == "ABORTED"
    finally:
        debits.proc.stop()


async def test_adapter_killed_before_commit_commits_after_restart(
    tmp_path: Path, pg_url: str, start_kv: Callable[..., Kv], coordinator: Coordinator
) -> None:
    """The adapter SIGKILLed when the Commit arrives: restarted, the transaction is
    still prepared (the debit invisible), and the coordinator's retried Commit
    applies it once."""
    debits = Debits(tmp_path, pg_url, env={"TWOPC_CRASH_AT": "participant.before_commit"})
    kv = start_kv("kv")
    try:
        result = await coordinator.run([debits.branch(30), kv.branch()])
        assert result.committed and debits.proc.wait(10) == -9
        assert debits.prepared() == 1 and debits.balance() == 100
        debits.proc.env.pop("TWOPC_CRASH_AT")
        debits.proc.restart()
        await eventually(lambda: debits.state(result.txn_id) == "COMMITTED", what="the retried Commit")
        assert debits.balance() == 70 and debits.prepared() == 0
        async with grpc.aio.insecure_channel(debits.proc.address) as ch:  # a duplicate Commit changes nothing
            await participant_pb2_grpc.ParticipantStub(ch).Commit(
                participant_pb2.CommitRequest(txn_id=result.txn_id), timeout=5
            )
        assert debits.balance() == 70
    finally:
        debits.proc.stop()
