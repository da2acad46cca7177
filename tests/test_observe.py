"""The observer interface: every step of a transaction reaches the listeners, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from tests.apps.kv import KV
from tests.conftest import FAST, INSECURE, Kv, eventually, listening, prepare_request
from twopc import Coordinator, Outcome, Participant, ParticipantConfig, Vote
from twopc.observe import Event, EventKind, Recorder
from twopc.v1 import participant_pb2, participant_pb2_grpc

K = EventKind


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, Recorder]]:
    recorder = Recorder()
    async with Coordinator(
        tmp_path / "decisions.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST, observers=[recorder]
    ) as c:
        yield c, recorder


async def test_a_commit_is_reported_step_by_step(
    observed: tuple[Coordinator, Recorder], start_kv: Callable[..., Kv]
) -> None:
    """A committed transaction: phase 1, both votes, decision, its durable write, both acks, END."""
    coordinator, recorder = observed
    a, b = start_kv("a"), start_kv("b")
    result = await coordinator.run([a.branch(), b.branch()])
    await eventually(lambda: K.ENDED in recorder.kinds(result.txn_id), what="ENDED")
    kinds = recorder.kinds(result.txn_id)
    assert kinds == [
        K.PHASE1_STARTED,
        K.VOTED,
        K.VOTED,
        K.DECIDED,
        K.DECISION_LOGGED,
        K.ACKNOWLEDGED,
        K.ACKNOWLEDGED,
        K.ENDED,
    ]
    events = recorder.of(result.txn_id)
    assert events[0].branches == ("a-0", "b-1")
    assert {(e.branch, e.vote) for e in events if e.kind is K.VOTED} == {("a-0", Vote.COMMIT), ("b-1", Vote.COMMIT)}
    assert {e.target for e in events if e.kind is K.ACKNOWLEDGED} == {a.target, b.target}
    assert all(e.outcome is Outcome.COMMITTED for e in events if e.kind in (K.DECIDED, K.ACKNOWLEDGED, K.ENDED))
    assert all(e.duration_s >= 0 for e in events) and events[3].duration_s > 0  # phase 1 took time
    assert [e.at for e in events] == sorted(e.at for e in events)


async def test_an_abort_is_reported_with_its_reason(
    observed: tuple[Coordinator, Recorder], start_kv: Callable[..., Kv]
) -> None:
    """A NO vote: DECIDED says ABORTED with the deciding branch's reason; no write; END of phase 2."""
    coordinator, recorder = observed
    a, b = start_kv("a"), start_kv("b")
    result = await coordinator.run([a.branch(), b.branch(behave="abort")])
    await eventually(lambda: K.ENDED in recorder.kinds(result.txn_id), what="ENDED")
    events = recorder.of(result.txn_id)
    decided = next(e for e in events if e.kind is K.DECIDED)
    assert decided.outcome is Outcome.ABORTED and "told to abort" in decided.reason
    assert K.DECISION_LOGGED not in recorder.kinds(result.txn_id)
    assert any(e.kind is K.VOTED and e.vote is Vote.ABORT and e.reason == "told to abort" for e in events)


async def test_phase2_retries_are_reported_until_the_ack(
    observed: tuple[Coordinator, Recorder], start_kv: Callable[..., Kv]
) -> None:
    """A participant killed before applying Commit: retries are reported, then its ack after restart."""
    coordinator, recorder = observed
    a, b = start_kv("a"), start_kv("b", env={"TWOPC_CRASH_AT": "participant.before_commit"})
    result = await coordinator.run([a.branch(), b.branch()])
    await eventually(lambda: any(e.kind is K.PHASE2_RETRY for e in recorder.of(result.txn_id)), what="a retry")
    b.proc.env.pop("TWOPC_CRASH_AT")
    b.proc.restart()
    await eventually(lambda: K.ENDED in recorder.kinds(result.txn_id), what="ENDED after restart")
    retry = next(e for e in recorder.of(result.txn_id) if e.kind is K.PHASE2_RETRY)
    assert retry.target == b.target and retry.attempt >= 1 and retry.reason


async def test_a_failing_observer_changes_nothing(tmp_path: Path, start_kv: Callable[..., Kv]) -> None:
    """An observer that raises is logged and skipped; the transaction commits as usual."""

    class Broken:
        def on_event(self, event: Event) -> None:
            raise RuntimeError("observer bug")

    recorder = Recorder()
    a, b = start_kv("a"), start_kv("b")
    with capture_logs() as events:
        async with Coordinator(
            tmp_path / "d.db", credentials=INSECURE, config=FAST, observers=[Broken(), recorder]
        ) as coordinator:
            result = await coordinator.run([a.branch(), b.branch()])
    assert result.committed and K.DECISION_LOGGED in recorder.kinds(result.txn_id)
    failed = [e for e in events if e["event"] == "observer_failed"]
    assert failed and all(e["observer"] == "Broken" and e["log_level"] == "error" for e in failed)


async def test_participant_reports_votes_decisions_and_in_doubt_questions(tmp_path: Path) -> None:
    """The participant helper reports its vote, the applied decision, and an unanswered in-doubt question."""
    recorder = Recorder()
    # The test drives Prepare by hand; t1 names no coordinator.
    config = ParticipantConfig(in_doubt_after_s=0.05, resolve_interval_s=0.05, allow_no_coordinator=True)
    async with (
        Participant(KV(), str(tmp_path / "kv.db"), credentials=INSECURE, config=config, observers=[recorder]) as p,
        listening(p.add_to_server) as address,
        grpc.aio.insecure_channel(address) as ch,
    ):
        stub = participant_pb2_grpc.ParticipantStub(ch)
        await stub.Prepare(prepare_request("t1"), timeout=5)
        await stub.Commit(participant_pb2.CommitRequest(txn_id="t1"), timeout=5)
        doubtful = prepare_request("t2")
        doubtful.coordinator = "127.0.0.1:1"  # nobody answers there
        await stub.Prepare(doubtful, timeout=5)
        await eventually(lambda: K.IN_DOUBT_ASKED in recorder.kinds("t2"), what="an in-doubt question")
        await eventually(
            lambda: any(e.kind is K.IN_DOUBT_SCANNED and e.count == 1 for e in recorder.events),
            what="an in-doubt scan",
        )
    assert recorder.kinds("t1") == [K.PREPARED, K.APPLIED]
    prepared, applied = recorder.of("t1")
    assert prepared.vote is Vote.COMMIT and applied.outcome is Outcome.COMMITTED
    asked = next(e for e in recorder.of("t2") if e.kind is K.IN_DOUBT_ASKED)
    assert asked.target == "127.0.0.1:1" and asked.outcome is None and "UNAVAILABLE" in asked.reason
    scan = next(e for e in recorder.events if e.kind is K.IN_DOUBT_SCANNED and e.count == 1)
    assert scan.duration_s > 0  # the age of the oldest prepared transaction
