"""The protocol's state machine, checked exhaustively on small models (tests/model).

Each check explores every reachable state of a model by BFS: `twopc_model` (one
coordinator), `identity_model` (two coordinators, one local id), `ha_model` (two
coordinator instances sharing a decision log).
The lower bounds on explored states are about two thirds of what was measured, so
that a change which silently prunes the model (a transition that no longer fires)
fails here instead of passing vacuously.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.model import ha_model, identity_model
from tests.model.checker import Report, check, replay
from tests.model.twopc_model import (
    ABORTED,
    COMMITTED,
    DONE,
    LOG_COMMIT,
    LOG_END,
    PREPARED,
    PROMPT,
    Model,
    State,
)

CRASH_POINTS = {
    "coordinator.before_decision",
    "coordinator.after_commit_logged",
    "coordinator.after_first_commit",
    "participant.after_prepare_durable@p0",
    "participant.after_prepare_durable@p1",
}


@pytest.fixture(scope="module")
def two() -> Report[State]:
    """The real protocol with 2 participants and the default bounds."""
    return check(Model(2))


def coordinator_crashes(trace: tuple[str, ...]) -> list[int]:
    """Positions of the coordinator's crash steps in `trace`."""
    names = {"coordinator.crash", "coordinator.power_loss"} | {p for p in CRASH_POINTS if p.startswith("coordinator.")}
    return [k for k, step in enumerate(trace) if step in names]


def test_two_participants_safe_and_live(two: Report[State]) -> None:
    """2 participants: no reachable state breaks a property, and every one can terminate."""
    assert two.violation is None
    assert two.stuck is None and two.stuck_states == 0
    assert two.states > 20_000  # measured: 33,627
    assert two.terminal_states > 0


def test_two_participants_exercise_every_fault_and_outcome(two: Report[State]) -> None:
    """The search takes every crash point, power loss and outcome, and never a refused phase 2."""
    assert two.steps >= CRASH_POINTS
    assert {"coordinator.power_loss", "p0.power_loss", "coordinator.restart", "p1.restart"} <= two.steps
    assert {"p0.apply_outcome:COMMITTED", "p0.apply_outcome:ABORTED", "coordinator.outcome(p1):PENDING"} <= two.steps
    assert {"coordinator.log_end", "coordinator.abort_give_up", "p1.prepare(repeat):ABORT"} <= two.steps
    assert not {s for s in two.steps if s.endswith(":refused")}


def test_three_participants_safe_and_live() -> None:
    """3 participants (no duplication, to stay fast): no violation, every state can terminate."""
    report = check(Model(3, max_dups=0))
    assert report.violation is None
    assert report.stuck is None and report.stuck_states == 0
    assert report.states > 150_000  # measured: 220,372


def test_read_only_voter_safe_and_live() -> None:
    """A READ_ONLY voter among 3 leaves phase 2 without breaking safety or liveness."""
    report = check(Model(3, read_only=1, max_dups=0))
    assert report.violation is None and report.stuck is None
    assert report.states > 50_000  # measured: 86,463
    assert "p2.prepare:READ_ONLY" in report.steps
    assert not {s for s in report.steps if s.startswith(("p2.commit", "coordinator.retry_commit(p2)"))}


def test_commit_before_log_breaks_agreement() -> None:
    """Commit sent before the decision is durable: a participant commits what the log never held."""
    model = Model(2, bug="commit_before_log")
    v = check(model).violation
    assert v is not None and v.prop == "agreement"
    assert "coordinator.send_commits" in v.trace and "coordinator.log_commit" not in v.trace
    assert v.trace[-1] in {"p0.commit:ok", "p1.commit:ok"}
    assert not v.state.ever_logged_commit and COMMITTED in {p.row for p in v.state.parts}
    assert replay(model, v.trace) == v.state


def test_commit_before_log_crash_breaks_atomicity() -> None:
    """Commit before log, then a coordinator crash: the decision is lost and the other side aborts."""
    model = Model(2, bug="commit_before_log")
    v = check(model, properties=("atomicity",)).violation
    assert v is not None and v.prop == "atomicity"
    (crash,) = coordinator_crashes(v.trace)
    assert v.trace.index("coordinator.send_commits") < crash < v.trace.index("coordinator.restart")
    assert "coordinator.log_commit" not in v.trace[:crash]
    assert {"p0.apply_outcome:ABORTED", "p1.apply_outcome:ABORTED"} & set(v.trace)
    assert replay(model, v.trace) == v.state


def test_outcome_aborted_in_flight_breaks_atomicity() -> None:
    """GetOutcome saying ABORTED during phase 1: the asker aborts, then the coordinator commits."""
    model = Model(2, bug="outcome_aborted_in_flight")
    v = check(model).violation
    assert v is not None and v.prop == "atomicity"
    answer = next(k for k, s in enumerate(v.trace) if s.startswith("coordinator.outcome(") and s.endswith(":ABORTED"))
    assert answer < v.trace.index("coordinator.log_commit")
    assert {p.row for p in v.state.parts} == {COMMITTED, ABORTED}
    assert replay(model, v.trace) == v.state


def test_outcome_before_the_log_is_loaded_breaks_atomicity() -> None:
    """A restarted coordinator answering GetOutcome before reading its log says ABORTED
    for a logged COMMIT, which it then re-drives."""
    model = Model(2, bug="outcome_before_load")
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    t = v.trace
    assert t.index("coordinator.log_commit") < t.index("coordinator.restart")
    assert any(step.startswith("coordinator.outcome(") and step.endswith(":ABORTED") for step in t)
    assert "coordinator.log_loaded" not in t and v.state.coord.log == LOG_COMMIT
    assert replay(model, t) == v.state


def test_liveness_check_catches_a_commit_that_can_never_end() -> None:
    """The liveness pass is not vacuous: with the GetOutcome bug a refused Commit leaves COMMIT without END."""
    report = check(Model(2, bug="outcome_aborted_in_flight", max_dups=0, max_coordinator_crashes=1), properties=())
    assert report.stuck is not None and report.stuck_states > 0
    assert report.stuck.state.coord.log == LOG_COMMIT
    assert ABORTED in {p.row for p in report.stuck.state.parts}


def test_cancelled_run_keeps_every_property() -> None:
    """A caller cancelling `Coordinator.run` (in phase 1; after the votes it is shielded)
    breaks nothing, and every state can still terminate."""
    report = check(Model(2, cancel_run=True))
    assert report.violation is None and report.stuck is None
    assert report.states > 20_000


def test_orphaned_decision_on_cancel_breaks_atomicity() -> None:
    """The code before the shield: cancelling `run` during the COMMIT write orphans the
    record, GetOutcome says ABORTED, yet recovery commits."""
    model = Model(2, cancel_run=True, bug="orphan_on_cancel")
    v = check(model).violation
    assert v is not None and v.prop == "atomicity"
    cancel = v.trace.index("coordinator.run_cancelled")
    assert v.trace.index("coordinator.log_submit") < cancel and "coordinator.log_commit" not in v.trace
    assert any(s.startswith("coordinator.outcome(") and s.endswith(":ABORTED") for s in v.trace[cancel:])
    assert "coordinator.restart" in v.trace[cancel:]
    assert replay(model, v.trace) == v.state


@pytest.fixture(scope="module")
def closing() -> Report[State]:
    """The real protocol with `Coordinator.close` possible at any time."""
    return check(Model(2, shutdown=True))


def test_close_at_any_time_safe_and_live(closing: Report[State]) -> None:
    """`close` anywhere (with crashes, loss, duplication): no violation, every state can terminate."""
    assert closing.violation is None
    assert closing.stuck is None and closing.stuck_states == 0
    assert closing.states > 75_000  # measured: 112,219


def test_close_reaches_every_kind_of_stop(closing: Report[State]) -> None:
    """The search closes during phase 1, during the decision write and in phase 2, and
    a write outlasting the close leaves the decision to the next start."""
    assert {"coordinator.close", "coordinator.grace_over", "coordinator.stop"} <= closing.steps
    assert {"coordinator.log_submit", "coordinator.record_lands", "coordinator.write_outlasts_close"} <= closing.steps
    assert "coordinator.begin" in closing.steps and "coordinator.restart" in closing.steps


def test_close_cancelling_the_decision_write_breaks_atomicity() -> None:
    """The code before issue 8: close cancels the decision mid-write, the record lands,
    GetOutcome says ABORTED, a participant aborts, and recovery re-drives the COMMIT."""
    model = Model(2, shutdown=True, bug="close_cancels_write")
    v = check(model).violation
    assert v is not None and v.prop == "atomicity"
    t = v.trace
    assert t.index("coordinator.close") < t.index("coordinator.log_submit") < t.index("coordinator.grace_over")
    assert "coordinator.log_commit" not in t  # the write never returned to anyone
    aborted = next(
        k for k, step in enumerate(t) if step.startswith("coordinator.outcome(") and step.endswith("ABORTED")
    )
    assert t.index("coordinator.record_lands") < aborted < t.index("coordinator.restart")
    assert t.index("coordinator.grace_over") < aborted < t.index("coordinator.stop")
    assert {p.row for p in v.state.parts} == {COMMITTED, ABORTED} and v.state.coord.log == LOG_COMMIT
    assert replay(model, v.trace) == v.state


def test_cancelled_phase1_releases_reservations_without_a_query() -> None:
    """Fault-free, a run cancelled in phase 1 (by its caller or by close) sends Abort to
    every branch: no participant keeps a reservation until its in-doubt query."""
    report = check(Model(2, cancel_run=True, shutdown=True, faults=False), properties=(PROMPT,))
    assert report.violation is None and report.stuck is None
    assert {"coordinator.run_cancelled", "coordinator.grace_over"} <= report.steps
    assert report.states > 1_000  # measured: 1,768


def test_silent_cancel_holds_reservations_until_the_query() -> None:
    """The code before issue 8 sends nothing on a cancelled phase 1: safe and live, but a
    prepared participant waits for its in-doubt query."""
    assert check(Model(2, cancel_run=True, bug="silent_cancel")).problems() == []
    model = Model(2, cancel_run=True, faults=False, bug="silent_cancel")
    v = check(model, properties=(PROMPT,), liveness=False).violation
    assert v is not None and v.prop == PROMPT
    assert "coordinator.run_cancelled" in v.trace and v.trace[-1].endswith(".prepare:COMMIT")
    assert v.state.coord.pc == DONE and PREPARED in {p.row for p in v.state.parts}
    assert replay(model, v.trace) == v.state


def test_model_refuses_unknown_settings() -> None:
    """A misspelt bug or property fails loudly instead of checking the real protocol by mistake."""
    with pytest.raises(ValueError, match="unknown bug"):
        Model(2, bug="commit_before_logg")
    with pytest.raises(ValueError, match="unknown properties"):
        check(Model(2), properties=("atomicty",))
    with pytest.raises(ValueError, match="n_participants"):
        Model(1)


def test_two_coordinators_with_one_local_id_safe_and_live() -> None:
    """Namespaced ids and the operation digest: A's and B's "order-42" at the same
    participants never meet; every state can terminate."""
    report = check(identity_model.SMALL)
    assert report.violation is None and report.stuck is None
    assert {"A.log_end", "B.log_end", "A.abort_give_up", "B.timeout"} <= report.steps
    assert {"p0.prepare(A):COMMIT", "p0.prepare(B):COMMIT", "p1.commit(B):ok"} <= report.steps
    assert report.states > 23_000  # measured: 35,344


def test_local_ids_commit_one_coordinators_decision_on_the_others_operation() -> None:
    """Keyed by the local id, a repeated Prepare with B's operation finds A's row and
    votes COMMIT: B ends COMMITTED while A's operation was applied in its place."""
    model = dataclasses.replace(identity_model.SMALL, bug="local_ids")
    v = check(model, properties=("applied",), liveness=False).violation
    assert v is not None and v.prop == "applied"
    assert {"p0.prepare(B,repeat):COMMIT", "p0.prepare(A,repeat):COMMIT"} & set(v.trace)
    ended = next(x for x, c in enumerate(v.state.coords) if c.log == LOG_END)
    assert (COMMITTED, 1 - ended) in {row for table in v.state.rows for row in table}  # the other's operation
    assert replay(model, v.trace) == v.state
    v = check(model, liveness=False).violation  # and a participant commits what its coordinator never logged
    assert v is not None and v.prop == "agreement"
    assert replay(model, v.trace) == v.state


def test_digest_without_namespace_lets_one_coordinator_abort_the_others_row() -> None:
    """The digest alone refuses B's Prepare, but A's Abort of "order-42" still lands on
    B's row while B commits the other one: only the namespace separates coordinators."""
    model = dataclasses.replace(identity_model.SMALL, bug="local_ids_digest")
    assert check(model, properties=("applied",), liveness=False).violation is None
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    assert any(step.startswith("p0.abort(A)") or step.startswith("p1.abort(A)") for step in v.trace)
    assert {row[0] for table in v.state.rows for row in table if row[1] == 1} == {COMMITTED, ABORTED}
    assert replay(model, v.trace) == v.state


@pytest.fixture(scope="module")
def ha() -> Report[ha_model.State]:
    """Two coordinator instances sharing one decision log, with the rules of issue 11."""
    return check(ha_model.Model())


def test_two_instances_with_leases_and_fencing_safe_and_live(ha: Report[ha_model.State]) -> None:
    """Lease expiry, takeover, fencing, a crash, partitions from the database, an
    instance on another log among those asked: no violation, and every state can
    terminate (a live owner's lease expiring only as a fault)."""
    assert ha.violation is None and ha.stuck is None
    assert ha.states > 80_000  # measured: 114,972


def test_two_instances_reach_every_fault_and_answer(ha: Report[ha_model.State]) -> None:
    """The search fences a write, re-drives after takeover, loses a write to a
    partition, settles a write it saw no result of, and answers GetOutcome every
    way from both instances."""
    assert {"I1.takeover(I0)", "I1.takeover(I0):redrive", "db.commit_write:fenced", "db.drop_write"} <= ha.steps
    assert {"I0.crash", "I0.cut", "I1.cut", "I0.write_returns:fenced", "I1.log_end"} <= ha.steps
    assert {"I0.read_back:ABORT", "I0.read_back:COMMIT", "db.commit_write:conflict"} <= ha.steps
    answers = {f"I{j}.outcome(p0):{a}" for j in (0, 1) for a in ("PENDING", "ABORTED", "COMMITTED", "UNAVAILABLE")}
    assert answers <= ha.steps
    assert {"p0.ask_outcome(F)", "F.outcome(p0):PENDING"} <= ha.steps
    assert {"p0.apply_outcome(I1):COMMITTED", "p1.apply_outcome(I1):ABORTED"} <= ha.steps


def test_without_fencing_a_paused_owner_commits_after_takeover() -> None:
    """The write trusts the owner's own view of its lease: I1 takes over, a participant
    learns ABORTED, then the paused owner's COMMIT lands."""
    model = ha_model.Model(bug="no_fencing")
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    t = v.trace
    answer = next(k for k, step in enumerate(t) if step.endswith(":ABORTED") and ".outcome(" in step)
    assert t.index("I0.log_submit") < t.index("lease(I0).expires") < t.index("I1.takeover(I0)") < answer
    assert answer < t.index("db.commit_write")
    assert v.state.db.epoch == 1 and v.state.db.log == LOG_COMMIT
    assert replay(model, t) == v.state


def test_aborted_on_expiry_before_the_epoch_moves_breaks_atomicity() -> None:
    """GetOutcome saying ABORTED for an expired but unfenced owner: the owner still logs COMMIT."""
    model = ha_model.Model(bug="aborted_on_expiry")
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    assert not any(step.startswith("I1.takeover") for step in v.trace) and v.state.db.epoch == 0
    assert replay(model, v.trace) == v.state


def test_reading_back_without_settling_aborts_a_commit_still_pending() -> None:
    """A writer that saw no result reads "no record" while its write is still pending,
    aborts, and the write lands: rule 5 settles it with an ABORT record instead."""
    model = ha_model.Model(bug="read_back_without_tombstone")
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    t = v.trace
    assert t.index("I0.log_submit") < t.index("I0.read_back:none") < t.index("db.commit_write")
    assert replay(model, t) == v.state


def test_reading_records_before_the_bump_leaves_a_commit_without_end() -> None:
    """A taker that reads the owner's records before bumping the epoch misses a COMMIT
    landing in between: safe, but once the owner is gone no one drives it to END."""
    report = check(ha_model.Model(bug="redrive_before_fence", max_partitions=0))
    assert report.violation is None and report.stuck is not None
    t = report.stuck.trace
    assert t.index("I1.read_records(I0)") < t.index("db.commit_write") and "I0.crash" in t
    assert report.stuck.state.db.log == LOG_COMMIT


def test_aborted_for_an_unknown_owner_believed_breaks_atomicity() -> None:
    """An instance on another log answering ABORTED for an owner it never knew, to a
    participant that believes any log: it aborts while the owner commits."""
    model = ha_model.Model(bug="aborted_for_unknown_owner", check_log=False)
    v = check(model, liveness=False).violation
    assert v is not None and v.prop == "atomicity"
    t = v.trace
    assert t.index("F.outcome(p0):ABORTED") < t.index("p0.apply_outcome(F):ABORTED") < t.index("db.commit_write")
    assert replay(model, t) == v.state


@pytest.mark.parametrize(
    "model",
    [ha_model.Model(bug="aborted_for_unknown_owner"), ha_model.Model(check_log=False)],
    ids=["participant_checks_the_log", "foreign_answers_pending"],
)
def test_either_defence_of_rule_12_alone_keeps_every_property(model: ha_model.Model) -> None:
    """The foreign instance's ABORTED refused by the participant, or never given:
    each alone leaves no violation and nothing stuck."""
    report = check(model)
    assert report.violation is None and report.stuck is None


def test_an_owner_pending_for_its_own_aborts_holds_a_participant_for_ever() -> None:
    """The owner answering PENDING for an abort it never logged (as the PostgreSQL log
    did): an Abort lost past its retries leaves a participant PREPARED while the
    owner lives; the liveness check finds it, now that a live owner's lease only
    expires as a fault."""
    report = check(ha_model.Model(bug="owner_pending_for_its_aborts"))
    assert report.violation is None and report.stuck is not None
    t = report.stuck.trace
    assert "I0.abort_give_up" in t and any(step.startswith("net.lose Abort") for step in t)
    assert "I0.crash" not in t and "lease(I0).expires" not in t
    assert PREPARED in report.stuck.state.rows
