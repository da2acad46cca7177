"""The protocol end to end: an in-process coordinator, real participant processes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from structlog.testing import capture_logs
from tenacity import stop_never

from tests.conftest import FAST, INSECURE, Kv, eventually, prepare_request
from twopc import Coordinator, CoordinatorFailedError, Outcome, Vote
from twopc.observe import EventKind, Recorder
from twopc.stores import SqliteStore
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc


def stub(kv: Kv) -> tuple[grpc.aio.Channel, participant_pb2_grpc.ParticipantAsyncStub]:
    ch = grpc.aio.insecure_channel(kv.target)
    return ch, participant_pb2_grpc.ParticipantStub(ch)


async def test_happy_path_commits_every_branch(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """Two participants vote COMMIT: both apply, nothing stays reserved, log is emptied."""
    a, b = start_kv("a"), start_kv("b")
    result = await coordinator.run([a.branch(key="x", amount=3), b.branch(key="y", amount=4)])
    assert result.outcome is Outcome.COMMITTED and result.completed
    assert [r.vote for r in result.branches] == [Vote.COMMIT, Vote.COMMIT]
    assert a.applied() == [(result.txn_id, "x", 3)] and b.applied() == [(result.txn_id, "y", 4)]
    assert a.reserved() == [] and b.reserved() == []
    assert a.state(result.txn_id) == b.state(result.txn_id) == "COMMITTED"
    await eventually(lambda: result.txn_id not in coordinator._committed, what="END")
    assert await coordinator.outcome(result.txn_id) is Outcome.COMMITTED  # the ended record is kept


async def test_one_abort_vote_aborts_all(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """One branch votes ABORT: the outcome is ABORTED with its reason, the other is released."""
    a, b = start_kv("a"), start_kv("b")
    result = await coordinator.run([a.branch(), b.branch(behave="abort")])
    assert result.outcome is Outcome.ABORTED
    assert result.branches[1].vote is Vote.ABORT and result.branches[1].reason == "told to abort"
    assert "told to abort" in result.reason
    await eventually(lambda: a.state(result.txn_id) == "ABORTED", what="Abort at a")
    assert a.reserved() == [] and a.applied() == [] and b.applied() == []


async def test_stalled_branch_past_deadline_aborts(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """A participant stopped (SIGSTOP) past the deadline: ABORTED at the deadline, and once
    it resumes it reserves nothing."""
    a, b = start_kv("a"), start_kv("b")
    assert (await coordinator.run([a.branch(), b.branch()])).committed  # connections are up
    b.proc.pause()
    try:
        started = time.monotonic()
        result = await coordinator.run([a.branch(), b.branch()], timeout_s=1.0)
        elapsed = time.monotonic() - started
        assert result.outcome is Outcome.ABORTED
        assert result.branches[1].vote is None and "DEADLINE_EXCEEDED" in result.branches[1].reason
        assert 0.9 <= elapsed < 3.0  # the 1 s deadline, not the 5 s phase-2 wait
        await eventually(lambda: a.state(result.txn_id) == "ABORTED", what="Abort at a")
        assert a.reserved() == []
    finally:
        b.proc.resume()
    # The late Prepare and the retried Abort both reach b: it must end holding nothing.
    await eventually(lambda: b.state(result.txn_id) == "ABORTED", what="Abort at the resumed branch")
    assert b.reserved() == [] and [t for t, *_ in b.applied()] != [result.txn_id]


async def test_branch_that_raises_aborts(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """A bug in one participant's prepare (an exception) is an ABORT, not a crash."""
    a, b = start_kv("a"), start_kv("b")
    result = await coordinator.run([a.branch(), b.branch(behave="raise")])
    assert result.outcome is Outcome.ABORTED
    assert result.branches[1].vote is None and "INTERNAL" in result.branches[1].reason
    await eventually(lambda: a.state(result.txn_id) == "ABORTED", what="Abort at a")
    assert b.proc.running


async def test_early_abort_cancels_outstanding_prepares(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """The first ABORT vote decides at once: a stalled branch is cancelled, not waited for."""
    a, b = start_kv("a"), start_kv("b")
    b.proc.pause()
    try:
        started = time.monotonic()
        result = await coordinator.run([a.branch(behave="abort"), b.branch()], timeout_s=30.0)
        assert time.monotonic() - started < 15.0  # well before the 30 s deadline
    finally:
        b.proc.resume()
    assert result.outcome is Outcome.ABORTED
    assert result.branches[1].vote is None
    assert "CANCELLED" in result.branches[1].reason or "cancelled" in result.branches[1].reason
    await eventually(lambda: b.state(result.txn_id) == "ABORTED", what="Abort at the stalled branch")
    assert b.reserved() == []


async def test_commit_and_abort_are_idempotent(start_kv: Callable[..., Kv]) -> None:
    """Commit twice and Abort twice both succeed and apply once."""
    kv = start_kv()
    ch, p = stub(kv)
    async with ch:
        for txn in ("t-commit", "t-abort"):
            reply = await p.Prepare(prepare_request(txn), timeout=5)
            assert reply.vote == participant_pb2.VOTE_COMMIT
        await p.Commit(participant_pb2.CommitRequest(txn_id="t-commit"), timeout=5)
        await p.Commit(participant_pb2.CommitRequest(txn_id="t-commit"), timeout=5)
        await p.Abort(participant_pb2.AbortRequest(txn_id="t-abort"), timeout=5)
        await p.Abort(participant_pb2.AbortRequest(txn_id="t-abort"), timeout=5)
        again = await p.Prepare(prepare_request("t-commit"), timeout=5)
    assert again.vote == participant_pb2.VOTE_COMMIT
    assert kv.applied() == [("t-commit", "k", 1)] and kv.reserved() == []
    assert kv.state("t-abort") == "ABORTED"


async def test_repeated_prepare_does_the_work_once(start_kv: Callable[..., Kv]) -> None:
    """A Prepare repeated for a prepared txn returns the same vote and reserves once."""
    kv = start_kv()
    ch, p = stub(kv)
    async with ch:
        first = await p.Prepare(prepare_request("t1", amount=7), timeout=5)
        second = await p.Prepare(prepare_request("t1", amount=7), timeout=5)
    assert first.vote == second.vote == participant_pb2.VOTE_COMMIT
    assert kv.reserved() == [("t1", "k", 7)]


async def test_abort_of_unknown_txn_leaves_tombstone_refusing_late_prepare(start_kv: Callable[..., Kv]) -> None:
    """Abort of an unknown txn succeeds; a Prepare for it arriving later is refused and
    reserves nothing (a message delayed on the network)."""
    kv = start_kv()
    ch, p = stub(kv)
    async with ch:
        await p.Abort(participant_pb2.AbortRequest(txn_id="late"), timeout=5)
        reply = await p.Prepare(prepare_request("late"), timeout=5)
    assert reply.vote == participant_pb2.VOTE_ABORT and "aborted" in reply.reason
    assert kv.reserved() == [] and kv.state("late") == "ABORTED"


async def test_commit_after_abort_is_failed_precondition(start_kv: Callable[..., Kv]) -> None:
    """Commit of an aborted txn, or of one never prepared, is FAILED_PRECONDITION and
    changes nothing."""
    kv = start_kv()
    ch, p = stub(kv)
    async with ch:
        await p.Prepare(prepare_request("t1"), timeout=5)
        await p.Abort(participant_pb2.AbortRequest(txn_id="t1"), timeout=5)
        for txn in ("t1", "never"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await p.Commit(participant_pb2.CommitRequest(txn_id=txn), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert kv.applied() == [] and kv.reserved() == []
    assert kv.state("t1") == "ABORTED" and kv.state("never") is None


async def test_bad_requests_get_invalid_argument_and_change_nothing(start_kv: Callable[..., Kv]) -> None:
    """Missing txn id, missing or unknown operation type, malformed operation:
    INVALID_ARGUMENT, nothing recorded."""
    kv = start_kv()
    unknown = any_pb2.Any()
    unknown.Pack(wrappers_pb2.StringValue(value="x"))
    bad = [
        prepare_request(""),
        participant_pb2.PrepareRequest(txn_id="t1"),
        participant_pb2.PrepareRequest(txn_id="t2", operation=unknown),
        prepare_request("t3", behave="invalid"),
    ]
    ch, p = stub(kv)
    async with ch:
        for request in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await p.Prepare(request, timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, request
        for call in (p.Commit(participant_pb2.CommitRequest()), p.Abort(participant_pb2.AbortRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert kv.reserved() == [] and kv.state("t1") is kv.state("t2") is kv.state("t3") is None


async def test_prepare_past_its_deadline_reserves_nothing(start_kv: Callable[..., Kv]) -> None:
    """End to end, a Prepare that reaches a stalled participant after its deadline reserves
    nothing (gRPC drops it before dispatch; the helper's own check, for one that expires
    in the store's queue, is pinned in test_participant.py)."""
    kv = start_kv()
    ch, p = stub(kv)
    async with ch:
        await p.Prepare(prepare_request("warm-up", behave="read_only"), timeout=5)  # connect first
        kv.proc.pause()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.Prepare(prepare_request("t-late"), timeout=0.3)
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.3)
        kv.proc.resume()
        # Any later request is served after the late one: by then it was handled.
        await p.Prepare(prepare_request("after", behave="read_only"), timeout=5)
    assert kv.reserved() == [] and kv.state("t-late") is None


async def test_one_phase_commit_writes_no_decision(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """One branch: one-phase commit, committed by one message, no decision log write."""
    kv = start_kv()
    before, sent = coordinator.log_syncs, coordinator.messages_sent
    result = await coordinator.run([kv.branch(amount=9)])
    assert result.outcome is Outcome.COMMITTED
    assert coordinator.log_syncs == before and coordinator.messages_sent == sent + 1
    assert kv.applied() == [(result.txn_id, "k", 9)] and kv.state(result.txn_id) == "COMMITTED"
    refused = await coordinator.run([kv.branch(behave="abort")])
    assert refused.outcome is Outcome.ABORTED and refused.reason.endswith("told to abort")


async def test_read_only_branch_leaves_phase_two(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """A READ_ONLY branch gets no phase-2 message; all read-only means nothing is logged."""
    a, b = start_kv("a"), start_kv("b")
    sent = coordinator.messages_sent
    result = await coordinator.run([a.branch(), b.branch(behave="read_only")])
    assert result.outcome is Outcome.COMMITTED and result.completed
    assert coordinator.messages_sent - sent == 3  # two Prepares, one Commit
    assert a.state(result.txn_id) == "COMMITTED" and b.state(result.txn_id) is None
    syncs = coordinator.log_syncs
    all_read = await coordinator.run([a.branch(behave="read_only"), b.branch(behave="read_only")])
    assert all_read.outcome is Outcome.COMMITTED and coordinator.log_syncs == syncs


async def test_failed_decision_fsync_sends_no_commit(
    tmp_path: Path, start_kv: Callable[..., Kv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision write whose fsync fails (EIO) sends no Commit and no Abort: the
    participants stay prepared, GetOutcome says PENDING, the coordinator refuses work."""
    a, b = start_kv("a"), start_kv("b")

    def eio(self: SqliteStore, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")  # what SQLite raises on EIO

    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
        monkeypatch.setattr(SqliteStore, "_commit", eio)
        with pytest.raises(CoordinatorFailedError):
            await c.run([a.branch(), b.branch()])
        ((t, *_),) = a.reserved()
        await asyncio.sleep(0.5)  # time for a wrongly sent Commit or Abort to land
        assert a.state(t) == b.state(t) == "PREPARED"
        assert a.applied() == [] and b.applied() == []
        async with grpc.aio.insecure_channel(c.address) as ch:
            reply = await coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(
                coordinator_pb2.GetOutcomeRequest(txn_id=t), timeout=5
            )
        assert reply.outcome == coordinator_pb2.OUTCOME_PENDING
        with pytest.raises(CoordinatorFailedError):
            await c.run([a.branch(), b.branch()])


async def test_get_outcome_answers_per_rule_5(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """GetOutcome: PENDING during phase 1, ABORTED for unknown txns, INVALID_ARGUMENT
    without an id."""
    a, b = start_kv("a"), start_kv("b")
    async with grpc.aio.insecure_channel(coordinator.address) as ch:
        get = coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome
        b.proc.pause()
        t = coordinator.global_id("t-pending")
        run = asyncio.create_task(coordinator.run([a.branch(), b.branch()], txn_id="t-pending", timeout_s=2.0))
        try:
            await eventually(lambda: a.state(t) == "PREPARED", what="a prepared")
            pending = await get(coordinator_pb2.GetOutcomeRequest(txn_id=t), timeout=5)
            assert pending.outcome == coordinator_pb2.OUTCOME_PENDING
            result = await run  # b stays stopped past the deadline
        finally:
            run.cancel()  # a no-op once it has ended; otherwise a check failed
            await asyncio.gather(run, return_exceptions=True)
            b.proc.resume()
        assert result.outcome is Outcome.ABORTED
        after = await get(coordinator_pb2.GetOutcomeRequest(txn_id=t), timeout=5)
        assert after.outcome == coordinator_pb2.OUTCOME_ABORTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(coordinator_pb2.GetOutcomeRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_participant_in_doubt_keeps_asking_while_the_outcome_is_pending(
    coordinator: Coordinator, start_kv: Callable[..., Kv]
) -> None:
    """A participant in doubt that hears PENDING (the other branch has not voted) holds
    its reservation and asks again; it commits when the decision comes (rule 6)."""
    a, b = start_kv("a"), start_kv("b")
    b.proc.pause()
    t = coordinator.global_id("t-wait")
    with capture_logs() as events:
        run = asyncio.create_task(coordinator.run([a.branch(), b.branch()], txn_id="t-wait", timeout_s=20.0))
        try:
            await eventually(lambda: a.state(t) == "PREPARED", what="a prepared")

            def answers() -> list[str]:
                return [e["outcome"] for e in events if e["event"] == "outcome_asked" and e["txn_id"] == t]

            # kv asks once prepared for 1 s, then every 0.3 s or so. A second question
            # means the answer to the first was applied: by holding on.
            await eventually(lambda: len(answers()) >= 2 or a.state(t) != "PREPARED", what="a to ask GetOutcome twice")
            assert answers()[:2] == ["OUTCOME_PENDING", "OUTCOME_PENDING"]
            assert a.state(t) == "PREPARED" and len(a.reserved()) == 1
        except BaseException:
            run.cancel()  # a failed check must not leave the transaction running
            raise
        finally:
            b.proc.resume()
            await asyncio.gather(run, return_exceptions=True)
    assert run.result().outcome is Outcome.COMMITTED
    await eventually(lambda: a.state(t) == b.state(t) == "COMMITTED", what="both commit")


async def test_run_rejects_misuse(coordinator: Coordinator, start_kv: Callable[..., Kv]) -> None:
    """No branches, or two branches for one target, is a ValueError before any message."""
    kv = start_kv()
    with pytest.raises(ValueError, match="at least one branch"):
        await coordinator.run([])
    with pytest.raises(ValueError, match="same target"):
        await coordinator.run([kv.branch(), kv.branch()])
    assert coordinator.messages_sent == 0


async def test_caller_cancelled_during_the_decision_write_still_commits(
    coordinator: Coordinator, start_kv: Callable[..., Kv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that goes away while the COMMIT record is being written (its RPC was
    cancelled) must not orphan the decision: it reaches disk, so the coordinator still
    delivers it, and GetOutcome never answers ABORTED for it."""
    # The participants would not ask GetOutcome for 10 minutes: only the coordinator
    # delivering the decision itself can commit them.
    patient = ["--in-doubt-after-s", "600"]
    a, b = start_kv("a", args=patient), start_kv("b", args=patient)
    recorder = Recorder()
    coordinator.observers.add(recorder)
    slow_commit = SqliteStore._commit

    def slow(self: SqliteStore, conn: sqlite3.Connection) -> None:
        time.sleep(0.5)  # on the store's thread: the fsync takes a while
        slow_commit(self, conn)

    monkeypatch.setattr(SqliteStore, "_commit", slow)
    t = coordinator.global_id("t-cancel")
    run = asyncio.create_task(coordinator.run([a.branch(), b.branch()], txn_id="t-cancel"))
    await eventually(lambda: a.state(t) == b.state(t) == "PREPARED", what="both prepared")
    # Decided, and its COMMIT record now being written (0.5 s), not yet logged.
    await eventually(lambda: EventKind.DECIDED in recorder.kinds(t), what="the decision")
    assert EventKind.DECISION_LOGGED not in recorder.kinds(t)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await coordinator.outcome(t) is not Outcome.ABORTED
    await eventually(lambda: a.state(t) == b.state(t) == "COMMITTED", what="commit delivered")


async def test_cancelling_a_phase_two_retry_propagates(tmp_path: Path) -> None:
    """A cancellation that lands inside a retried Commit (close(), shutdown) ends the
    delivery instead of being retried like an RPC failure. A stub stands in for the
    participant only to hold the second attempt open at the moment of the cancel."""
    release = asyncio.Event()

    class FlakyThenStuck:
        calls = 0

        async def CommitMany(self, request: object, timeout: float, wait_for_ready: bool) -> None:  # noqa: N802
            unimplemented = grpc.StatusCode.UNIMPLEMENTED
            raise grpc.aio.AioRpcError(unimplemented, grpc.aio.Metadata(), grpc.aio.Metadata(), "", None)

        async def Commit(self, request: object, timeout: float, wait_for_ready: bool) -> None:  # noqa: N802
            FlakyThenStuck.calls += 1
            code = grpc.StatusCode.UNAVAILABLE if FlakyThenStuck.calls == 1 else grpc.StatusCode.FAILED_PRECONDITION
            if FlakyThenStuck.calls > 1:
                await release.wait()  # held open until the test is over
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "stub", None)

    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=FAST) as c:
        c._channels.stubs["stuck:1"] = FlakyThenStuck()  # type: ignore[assignment]
        delivery = asyncio.create_task(c._delivery.deliver("t1", "stuck:1", "stuck", "Commit", stop_never, set()))
        try:
            await eventually(lambda: FlakyThenStuck.calls == 2, what="the retried attempt")
            delivery.cancel()
            done, _ = await asyncio.wait({delivery}, timeout=5.0)
            assert done and delivery.cancelled(), "the cancelled delivery went on retrying"
            assert FlakyThenStuck.calls == 2
        finally:
            release.set()  # ends a wrongly retried delivery
            await asyncio.gather(delivery, return_exceptions=True)


async def test_branches_that_acknowledged_before_run_returned_are_reported(
    tmp_path: Path, start_kv: Callable[..., Kv]
) -> None:
    """One branch dies on Commit (crash point) while the other acknowledges: run()
    returns after phase2_wait_s with the fast branch acknowledged and the dead one not;
    the commit completes once the dead branch is back."""
    a = start_kv("a")
    b = start_kv("b", env={"TWOPC_CRASH_AT": "participant.before_commit"})
    config = replace(FAST, phase2_wait_s=1.0)
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=config) as c:
        result = await c.run([a.branch(), b.branch()])
        assert result.committed and not result.completed
        assert [(r.name, r.acknowledged) for r in result.branches] == [("a-0", True), ("b-1", False)]
        b.proc.restart(env={"TWOPC_CRASH_AT": ""})
        await eventually(lambda: b.state(result.txn_id) == "COMMITTED", what="the commit at b after its restart")


async def test_a_participant_that_cannot_commit_is_reported_once_and_retried(
    coordinator: Coordinator, start_kv: Callable[..., Kv]
) -> None:
    """A participant whose business commit raises answers INTERNAL: the coordinator
    reports `commit_failing_at_participant` once at error level, keeps retrying with
    backoff, and logs those retries sparsely (attempts 1, 2, 4, 8, ... at info)."""
    a, b = start_kv("a"), start_kv("b")
    with capture_logs() as events:
        result = await coordinator.run([a.branch(), b.branch(key="raise_on_commit")])
        assert result.committed and not result.completed
        await eventually(
            lambda: sum(e["event"] == "phase2_retry" for e in events) >= 9, timeout_s=20, what="nine retries"
        )
    failing = [e for e in events if e["event"] == "commit_failing_at_participant"]
    assert len(failing) == 1 and failing[0]["log_level"] == "error" and failing[0]["branch"] == "b-1"
    assert "INTERNAL" in failing[0]["error"]
    retries = [(e["attempt"], e["log_level"]) for e in events if e["event"] == "phase2_retry"][:9]
    assert [n for n, level in retries if level == "info"] == [1, 2, 4, 8]
    assert b.state(result.txn_id) == "PREPARED" and a.state(result.txn_id) == "COMMITTED"


async def test_prepare_waits_for_a_restarted_participant_within_its_deadline(
    coordinator: Coordinator, start_kv: Callable[..., Kv]
) -> None:
    """After a participant was down long enough for the channel to back off, a Prepare
    sent right after it is back waits for the connection (wait-for-ready) and commits,
    instead of failing fast on the channel still backing off."""
    a, b = start_kv("a"), start_kv("b")
    assert (await coordinator.run([a.branch(), b.branch()])).committed
    b.proc.kill()
    for _ in range(4):  # each failed attempt grows the channel's reconnect backoff
        down = await coordinator.run([a.branch(), b.branch()], timeout_s=0.5)
        assert down.outcome is Outcome.ABORTED
    b.proc.restart()
    result = await coordinator.run([a.branch(), b.branch()], timeout_s=4.0)
    assert result.committed, result.reason
