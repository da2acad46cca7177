"""Crashes at the protocol's exact points: real processes, SIGKILL, restart (the
participant crashes on both stores: SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import FAST, INSECURE, Kv, eventually
from twopc import Coordinator, Outcome
from twopc.dev.testing import ServiceProcess, query


@pytest.fixture
def coordinator_proc(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """A coordinator in its own process (tests/apps/coordinator.py), stopped at the end."""
    procs: list[ServiceProcess] = []

    def start(*kvs: Kv, crash_at: str = "") -> ServiceProcess:
        run = ["--run", *(f"k{i}={kv.target}" for i, kv in enumerate(kvs))]
        proc = ServiceProcess(
            "tests.apps.coordinator",
            ["--db", str(tmp_path / "decisions.db"), *run],
            log_path=tmp_path / "coordinator.log",
        )
        procs.append(proc)
        return proc.start(env={"TWOPC_CRASH_AT": crash_at} if crash_at else None)

    yield start
    for p in procs:
        p.stop()


def recover(proc: ServiceProcess) -> None:
    """Restarts a crashed coordinator without --run: it only recovers and serves."""
    proc.args = proc.args[: proc.args.index("--run")]
    proc.restart()


def logged(tmp_path: Path) -> list[str]:
    """The COMMIT records without END in the coordinator's decision log."""
    return [t for (t,) in query(tmp_path / "decisions.db", "SELECT txn_id FROM decisions WHERE ended_at IS NULL")]


def events_of(kv: Kv, event: str) -> list[dict[str, Any]]:
    """The participant process's log events named `event` (its JSON log, all runs),
    each with only its txn_id and outcome."""
    found = (json.loads(line) for line in kv.proc.log_path.read_text().splitlines() if line.startswith("{"))
    return [{k: e.get(k) for k in ("txn_id", "outcome")} for e in found if e.get("event") == event]


def txn_of(kv: Kv) -> str:
    (txn_id,) = {str(t) for t, *_ in kv.reserved()} | {str(t) for t, *_ in kv.applied()}
    return txn_id


async def test_coordinator_killed_after_logging_commit_finishes_on_restart(
    tmp_path: Path, start_kv: Callable[..., Kv], coordinator_proc: Callable[..., ServiceProcess]
) -> None:
    """Coordinator SIGKILLed after the COMMIT is durable, before any Commit: both stay
    prepared, and the restarted coordinator's recovery commits both from its log and
    ends the record."""
    # The participants would not ask GetOutcome for 10 minutes: only recovery re-driving
    # the logged decision can commit them. (Waiting while the coordinator is down is
    # pinned by test_participant_in_doubt_learns_aborted_after_coordinator_restart.)
    patient = ["--in-doubt-after-s", "600"]
    a, b = start_kv("a", args=patient), start_kv("b", args=patient)
    proc = coordinator_proc(a, b, crash_at="coordinator.after_commit_logged")
    assert proc.wait(20) == -9
    txn = txn_of(a)
    assert a.state(txn) == b.state(txn) == "PREPARED" and a.applied() == b.applied() == []
    assert logged(tmp_path) == [txn]
    recover(proc)
    await eventually(lambda: a.state(txn) == b.state(txn) == "COMMITTED", what="recovery commits both")
    assert len(a.applied()) == len(b.applied()) == 1 and a.reserved() == b.reserved() == []
    await eventually(lambda: logged(tmp_path) == [], what="END after recovery")


async def test_coordinator_killed_after_first_commit_finishes_the_rest(
    tmp_path: Path, start_kv: Callable[..., Kv], coordinator_proc: Callable[..., ServiceProcess]
) -> None:
    """Coordinator SIGKILLed once one participant acknowledged Commit: the restarted
    coordinator commits the other (atomicity across the crash)."""
    a, b = start_kv("a"), start_kv("b")
    proc = coordinator_proc(a, b, crash_at="coordinator.after_first_commit")
    assert proc.wait(20) == -9
    txn = txn_of(a)
    # Commits go out in parallel: the other may or may not have been reached. Either
    # way the decision has no END, so recovery must deliver it again.
    assert "COMMITTED" in (a.state(txn), b.state(txn))
    assert logged(tmp_path) == [txn]
    recover(proc)
    await eventually(lambda: a.state(txn) == b.state(txn) == "COMMITTED", what="recovery commits the other")
    await eventually(lambda: logged(tmp_path) == [], what="END after recovery")


async def test_participant_in_doubt_learns_aborted_after_coordinator_restart(
    start_kv: Callable[..., Kv], coordinator_proc: Callable[..., ServiceProcess]
) -> None:
    """Coordinator SIGKILLed after the votes, before deciding: the prepared participants
    wait while it is down, then learn ABORTED from GetOutcome and release."""
    a, b = start_kv("a"), start_kv("b")
    proc = coordinator_proc(a, b, crash_at="coordinator.before_decision")
    assert proc.wait(20) == -9
    txn = txn_of(a)
    await asyncio.sleep(1.5)  # past in_doubt_after_s, coordinator unreachable: keep holding
    assert a.state(txn) == b.state(txn) == "PREPARED"
    assert len(a.reserved()) == len(b.reserved()) == 1
    recover(proc)
    await eventually(lambda: a.state(txn) == b.state(txn) == "ABORTED", what="in-doubt resolution")
    assert a.reserved() == b.reserved() == [] and a.applied() == b.applied() == []


async def test_participant_killed_before_answering_resolves_to_abort(
    tmp_path: Path, start_kv: Callable[..., Kv], kv_store: Callable[[], str | None]
) -> None:
    """Participant SIGKILLed with its prepare durable but its vote unsent: the
    coordinator aborts and soon stops sending Abort; the restarted participant still
    holds the reservation until GetOutcome tells it ABORTED."""
    a = start_kv("a", db=kv_store())
    b = start_kv("b", env={"TWOPC_CRASH_AT": "participant.after_prepare_durable"}, db=kv_store())
    brief_abort = replace(FAST, abort_retry_s=0.3)  # Abort must not outlive b's restart
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0", config=brief_abort) as c:
        result = await c.run([a.branch(), b.branch()])
        assert result.outcome is Outcome.ABORTED and result.branches[1].vote is None
        assert b.proc.wait(10) == -9
        assert await c.wait_idle(10), "the coordinator kept retrying Abort"
        assert b.state(result.txn_id) == "PREPARED"
        b.proc.env.pop("TWOPC_CRASH_AT")
        b.proc.restart()  # no Abort will come now: only asking GetOutcome resolves it
        await eventually(lambda: b.state(result.txn_id) == "ABORTED", what="in-doubt resolution at b")
    assert b.reserved() == [] and b.applied() == []
    # ABORTED because GetOutcome said so, not presumed by b on its own.
    assert {"txn_id": result.txn_id, "outcome": "OUTCOME_ABORTED"} in events_of(b, "in_doubt_asked")


async def test_participant_killed_after_voting_yes_commits_after_restart(
    start_kv: Callable[..., Kv], coordinator: Coordinator, kv_store: Callable[[], str | None]
) -> None:
    """Participant SIGKILLed after its COMMIT vote reached the coordinator: restarted, it
    still holds the reservation, and commits when the coordinator's Commit arrives."""
    a, b = start_kv("a", db=kv_store()), start_kv("b", db=kv_store())
    assert (await coordinator.run([a.branch(), b.branch()])).committed  # connections are up
    b.proc.pause()  # keeps phase 1 open while a is killed and restarted
    with capture_logs() as events:
        run = asyncio.create_task(coordinator.run([a.branch(amount=5), b.branch()], timeout_s=20.0))
        try:
            await eventually(
                lambda: any(e["event"] == "voted" and e.get("branch") == a.name for e in events),
                what="a's vote at the coordinator",
            )
            a.proc.kill()
            a.proc.restart()
            txn = next(e["txn_id"] for e in events if e["event"] == "voted")
            assert a.state(txn) == "PREPARED" and (txn, "k", 5) in a.reserved()
        finally:
            b.proc.resume()
        result = await run
    assert result.outcome is Outcome.COMMITTED
    await eventually(lambda: a.state(txn) == "COMMITTED", what="Commit at the restarted participant")
    assert (txn, "k", 5) in a.applied() and a.reserved() == []


async def test_commit_is_retried_until_a_crashed_participant_acknowledges(
    tmp_path: Path, start_kv: Callable[..., Kv]
) -> None:
    """Participant SIGKILLed when Commit arrives, before applying it: the coordinator
    retries Commit until the restarted participant acknowledges, then forgets it."""
    a = start_kv("a")
    # After its restart b would not ask GetOutcome for 10 minutes: only a retried
    # Commit can finish it.
    b = start_kv("b", env={"TWOPC_CRASH_AT": "participant.before_commit"}, args=["--in-doubt-after-s", "600"])
    at_commit_point = replace(FAST, phase2_wait_s=0)  # run returns before the Commits are answered
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, config=at_commit_point) as c:
        result = await c.run([a.branch(), b.branch()])
        assert result.outcome is Outcome.COMMITTED
        await eventually(lambda: not b.proc.running, what="b killed by the first Commit")
        assert b.proc.wait(0) == -9 and b.state(result.txn_id) == "PREPARED"
        b.proc.env.pop("TWOPC_CRASH_AT")
        b.proc.restart()
        await eventually(lambda: b.state(result.txn_id) == "COMMITTED", what="retried Commit at b")
        assert await c.wait_idle(10), "Commit delivery did not finish"
    assert a.state(result.txn_id) == "COMMITTED" and len(b.applied()) == 1 and b.reserved() == []


def test_crash_points_refuse_unknown_names(tmp_path: Path) -> None:
    """A misspelt TWOPC_CRASH_AT fails loudly instead of silently never crashing."""
    proc = ServiceProcess("tests.apps.kv", ["--db", str(tmp_path / "x.db")], log_path=tmp_path / "x.log")
    with pytest.raises(RuntimeError, match="exited"):
        proc.start(env={"TWOPC_CRASH_AT": "participant.after_prepare_durible"})
    assert "unknown crash points" in (tmp_path / "x.log").read_text()
