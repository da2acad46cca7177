"""A coordinator's life around its transactions: start, shutdown, failure, cancellation.

Participants are real kv processes; the coordinator runs in this process so a test
can slow its decision log down or make it fail as a disk would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from tests.conftest import FAST, INSECURE, Kv, eventually, listening, prepare_request
from twopc import (
    ClosedError,
    Coordinator,
    CoordinatorFailedError,
    DurabilityError,
    Outcome,
    SqliteDecisionLog,
    SqliteStore,
    StoreInUseError,
    rpc,
)
from twopc.observe import EventKind, Recorder
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2_grpc


def slow_log_commits(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every store commit in this process takes `seconds` on the store's thread, as a
    slow disk's fsync would (the participants are other processes: unaffected)."""
    real = SqliteStore._commit

    def slow(self: SqliteStore, conn: sqlite3.Connection) -> None:
        time.sleep(seconds)
        real(self, conn)

    monkeypatch.setattr(SqliteStore, "_commit", slow)


async def ask(address: str, txn_id: str) -> str:
    """GetOutcome as a participant asks it: the answer's name, or the status code's."""
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            reply = await coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(
                coordinator_pb2.GetOutcomeRequest(txn_id=txn_id), timeout=5
            )
        except grpc.aio.AioRpcError as e:
            return e.code().name
    return coordinator_pb2.Outcome.Name(reply.outcome)


async def test_shutdown_during_the_decision_write_finishes_the_decision(
    tmp_path: Path, start_kv: Callable[..., Kv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while the COMMIT record is being written (slow disk, a grace shorter
    than the write): the write finishes, run() returns COMMITTED to its caller instead
    of CancelledError, GetOutcome never answers ABORTED (participants ask it while the
    write is slow), no participant aborts, and the next start delivers the commit."""
    a, b = start_kv("a"), start_kv("b")
    config = replace(FAST, shutdown_grace_s=0.1)
    log = tmp_path / "d.db"
    answers: list[str] = []
    recorder = Recorder()
    async with Coordinator(log, credentials=INSECURE, listen="127.0.0.1:0", config=config, observers=[recorder]) as c:
        address = c.address
        slow_log_commits(monkeypatch, 2.0)  # kv asks GetOutcome after 1 s in doubt
        run = asyncio.create_task(c.run([a.branch(), b.branch()], txn_id="t-close"))
        t = c.global_id("t-close")
        await eventually(lambda: a.state(t) == b.state(t) == "PREPARED", what="both prepared")
        # Decided, and its COMMIT record now being written (2 s), not yet logged.
        await eventually(lambda: EventKind.DECIDED in recorder.kinds(t), what="the decision")
        assert EventKind.DECISION_LOGGED not in recorder.kinds(t)
        closing = asyncio.create_task(c.close())
        while not closing.done():
            answers.append(await ask(address, t))
            await asyncio.sleep(0.2)
        await closing
        result = await run
    monkeypatch.undo()
    assert result.outcome is Outcome.COMMITTED
    assert "OUTCOME_ABORTED" not in answers and "OUTCOME_PENDING" in answers, answers
    assert a.state(t) != "ABORTED" and b.state(t) != "ABORTED"
    async with Coordinator(log, credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as again:
        assert await again.outcome(t) is Outcome.COMMITTED
        await eventually(lambda: a.state(t) == b.state(t) == "COMMITTED", what="recovery delivers the commit")


async def test_close_refuses_new_transactions(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """A run() after close(), or before the coordinator is entered, is ClosedError and
    sends nothing."""
    kv = start_kv()
    c = Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST)
    with pytest.raises(ClosedError, match="enter"):
        await c.run([kv.branch()])
    async with c:
        assert (await c.run([kv.branch()])).committed
    with pytest.raises(ClosedError, match="closed"):
        await c.run([kv.branch()])
    assert len(kv.applied()) == 1


async def test_get_outcome_is_unavailable_until_the_log_is_read(tmp_path: Path) -> None:
    """GetOutcome served before the coordinator is entered answers UNAVAILABLE, not the
    ABORTED that would contradict a COMMIT already in the log; once entered, COMMITTED."""
    path = tmp_path / "d.db"
    log = SqliteDecisionLog(path)
    await log.open()
    gid = f"{log.id}:t-logged"
    assert await log.log_commit(gid, ["127.0.0.1:1"])
    await log.close()
    coordinator = Coordinator(path, credentials=INSECURE, config=FAST)
    async with listening(coordinator.add_to_server) as address:
        assert await ask(address, gid) == "UNAVAILABLE"
        async with coordinator:
            assert await ask(address, gid) == "OUTCOME_COMMITTED"
        assert await ask(address, gid) == "UNAVAILABLE"


async def test_one_log_one_coordinator_and_one_port_one_server(tmp_path: Path) -> None:
    """A second coordinator on a log in use fails to start (StoreInUseError), and a
    second server cannot bind a port in use (no SO_REUSEPORT)."""
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
        with pytest.raises(StoreInUseError):
            async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST):
                pass
        with pytest.raises(OSError, match="cannot bind"):
            rpc.add_port(rpc.server(), c.address, INSECURE)
        assert await ask(c.address, f"{c.id}:nothing") == "OUTCOME_ABORTED"


async def test_run_cancelled_in_phase_one_aborts_every_branch(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """A caller that gives up during phase 1 (its RPC cancelled) gets CancelledError, and
    Abort goes to every branch at once: the prepared one releases its reservation long
    before its own in-doubt resolver would ask (60 s here), and the stalled one aborts
    once it resumes."""
    a = start_kv("a", args=["--in-doubt-after-s", "60"])
    b = start_kv("b", args=["--in-doubt-after-s", "60"])
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
        b.proc.pause()
        try:
            run = asyncio.create_task(c.run([a.branch(), b.branch()], txn_id="t-gone", timeout_s=30))
            t = c.global_id("t-gone")
            await eventually(lambda: a.state(t) == "PREPARED", what="a prepared")
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            await eventually(lambda: a.state(t) == "ABORTED", timeout_s=5, what="Abort at the prepared branch")
            assert a.reserved() == []
        finally:
            b.proc.resume()
        await eventually(lambda: b.state(t) == "ABORTED", timeout_s=10, what="Abort at the resumed branch")
        assert b.reserved() == []


async def test_a_failed_decision_write_is_signalled_to_the_embedding_process(
    tmp_path: Path, start_kv: Callable[..., Kv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision write that fails (EIO) reaches whoever waits on wait_failed(), not
    only the next caller of run(), and Coordinator.serve() ends by raising it."""
    a, b = start_kv("a"), start_kv("b")

    def eio(self: SqliteStore, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
        serving = asyncio.create_task(c.serve("127.0.0.1:0"))
        await eventually(lambda: bool(c.address), what="serving")
        watcher = asyncio.create_task(c.wait_failed())
        monkeypatch.setattr(SqliteStore, "_commit", eio)
        with pytest.raises(CoordinatorFailedError):
            await c.run([a.branch(), b.branch()])
        assert isinstance(await asyncio.wait_for(watcher, 5), DurabilityError)
        assert c.failure is watcher.result()
        with pytest.raises(DurabilityError):
            await asyncio.wait_for(serving, 10)


async def test_refused_abort_in_two_phase_commit_is_an_error_event(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """A participant that refuses an Abort in two-phase commit has committed on its own:
    that is reported as the error `abort_refused`, not as one-phase's info event."""
    a, b = start_kv("a"), start_kv("b")
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
        t = c.global_id("t-rogue")
        # The transaction committed at `a` alone (a one-phase Prepare of the same
        # operation), as a participant that broke the protocol would have.
        rogue = prepare_request(t)
        rogue.one_phase = True
        async with grpc.aio.insecure_channel(a.target) as ch:
            await participant_pb2_grpc.ParticipantStub(ch).Prepare(rogue, timeout=5)
        assert a.state(t) == "COMMITTED"
        with capture_logs() as events:
            result = await c.run([a.branch(), b.branch(behave="abort")], txn_id="t-rogue")
            assert result.outcome is Outcome.ABORTED
            await eventually(lambda: any(e["event"] == "abort_refused" for e in events), what="the refusal")
        refused = [e for e in events if e["event"] == "abort_refused"]
        assert refused[0]["log_level"] == "error" and refused[0]["branch"] == "a-0"
        assert not [e for e in events if e["event"] == "one_phase_already_committed"]


class _GatedLog(SqliteDecisionLog):
    """The real file log, whose duplicate-id read returns only once the test opens a
    gate: it holds `run` in the await before it registers the id, where close() may
    come."""

    reading: asyncio.Event
    gate: asyncio.Event

    async def decided(self, txn_id: str) -> Outcome | None:
        found = await super().decided(txn_id)
        self.reading.set()
        await self.gate.wait()  # the read is done; its answer is on its way back
        return found


async def test_close_during_the_duplicate_id_check_sends_nothing(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """close() that comes while run(txn_id=...) reads the log for a duplicate id
    finds nothing in flight and closes; the run then refuses (ClosedError) instead
    of preparing both branches with no decision and no Abort to follow."""
    a, b = start_kv("a"), start_kv("b")
    log = _GatedLog(tmp_path / "d.db")
    log.reading, log.gate = asyncio.Event(), asyncio.Event()
    c = Coordinator(log, credentials=INSECURE, config=FAST)
    await c.__aenter__()
    run = asyncio.create_task(c.run([a.branch(), b.branch()], txn_id="mine"))
    await log.reading.wait()
    await c.close()
    log.gate.set()
    with pytest.raises(ClosedError):
        await run
    assert c.messages_sent == 0
    assert a.reserved() == b.reserved() == []


async def test_a_second_close_waits_like_the_first(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """Two close() calls while a transaction is in phase 1: neither returns before
    that transaction decided."""
    a, b = start_kv("a"), start_kv("b")
    c = Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST)
    await c.__aenter__()
    run = asyncio.create_task(c.run([a.branch(), b.branch(delay_s=1)]))
    await eventually(lambda: len(a.reserved()) == 1, what="phase 1 under way")
    first = asyncio.create_task(c.close())
    await asyncio.sleep(0)  # the first close has begun
    await c.close()
    assert run.done() and (await run).outcome is Outcome.COMMITTED
    await first
