"""What happens to each transaction, told to whoever listens.

The coordinator and the participant helper report every step of the protocol as an
`Event` to the `Observer`s they were given (`observers=`). Metrics, traces and the web
console are observers; the protocol code does not know which, or whether anyone
listens. With no observer, a report is one method call that returns at once.

An observer's `on_event` runs on the event loop, inline with the protocol: it must
be quick and must not block or raise (an exception is logged and dropped, so a
broken observer never changes what the protocol does). Hand slow work to a queue.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from twopc.types import Outcome, Vote

_log = structlog.get_logger("twopc.observe")

MAX_OPEN = 65_536
"""Transactions timed at once; past it the oldest is forgotten (bounded memory)."""


class EventKind(enum.Enum):
    """The steps an observer hears about, in protocol order.

    Coordinator side: PHASE1_STARTED, VOTED (one per branch), DECIDED,
    DECISION_LOGGED (a commit's forced write), ACKNOWLEDGED (one per branch in phase 2),
    PHASE2_RETRY, ENDED, and RECOVERING for a logged commit re-driven at start,
    OUTCOME_ANSWERED for a GetOutcome question. Participant side: PREPARED (its own
    vote), APPLIED (a decision applied), IN_DOUBT_ASKED (the coordinator's answer to
    an in-doubt question, or why there was none), IN_DOUBT_SCANNED (how many are
    prepared and the age of the oldest, each resolver round), HEURISTIC (an operator
    decided alone).
    """

    PHASE1_STARTED = "phase1_started"
    VOTED = "voted"
    DECIDED = "decided"
    DECISION_LOGGED = "decision_logged"
    ACKNOWLEDGED = "acknowledged"
    PHASE2_RETRY = "phase2_retry"
    ENDED = "ended"
    RECOVERING = "recovering"
    OUTCOME_ANSWERED = "outcome_answered"
    PREPARED = "prepared"
    APPLIED = "applied"
    IN_DOUBT_ASKED = "in_doubt_asked"
    IN_DOUBT_SCANNED = "in_doubt_scanned"
    HEURISTIC = "heuristic"


@dataclass(frozen=True, slots=True)
class Event:
    """One step of one transaction.

    Attributes:
        kind: which step.
        txn_id: the transaction ("" for IN_DOUBT_SCANNED, which is about many).
        branch: the branch's label (coordinator side), or the participant's name.
        target: the participant's address (coordinator side) or the coordinator's
            address (participant side, in-doubt questions).
        branches: PHASE1_STARTED and RECOVERING: the labels of every branch.
        vote: VOTED, PREPARED: the vote, or None when the branch never voted.
        reason: why a branch voted ABORT or did not vote, why a retry happened, why
            a transaction aborted.
        outcome: DECIDED, ACKNOWLEDGED, APPLIED, OUTCOME_ANSWERED, IN_DOUBT_ASKED,
            HEURISTIC: what was decided, delivered or answered (PENDING for a
            coordinator that cannot tell yet; None when there was no answer).
        duration_s: VOTED: since phase 1 started; DECIDED: phase 1 (votes and
            decision); DECISION_LOGGED: the forced write; ACKNOWLEDGED, PHASE2_RETRY,
            ENDED: phase 2 so far, since the decision was durable (or taken, for an
            abort); IN_DOUBT_SCANNED: age of the oldest prepared transaction.
        attempt: PHASE2_RETRY, ACKNOWLEDGED: which attempt (1 is the first).
        count: IN_DOUBT_SCANNED: how many transactions are prepared.
        one_phase: the transaction went through one-phase commit.
        at: wall-clock time of the event (unix seconds).
    """

    kind: EventKind
    txn_id: str
    branch: str = ""
    target: str = ""
    branches: tuple[str, ...] = ()
    vote: Vote | None = None
    reason: str = ""
    outcome: Outcome | None = None
    duration_s: float = 0.0
    attempt: int = 0
    count: int = 0
    one_phase: bool = False
    at: float = 0.0


class Observer(Protocol):
    """Anything that wants to hear about transactions."""

    def on_event(self, event: Event) -> None:
        """Called inline on the event loop for every event; must not block."""
        ...


class Observers:
    """The observers of one coordinator or participant, and how they are told.

    `emit` is what the protocol code calls; with nobody listening it returns before
    building the event, which is what keeps an unobserved transaction at its cost.
    """

    __slots__ = ("_marks", "_observers")

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = tuple(observers)
        # txn id -> (phase 1 started, decided), monotonic: the durations of a
        # transaction are measured here, so the protocol code takes no timestamps.
        self._marks: dict[str, tuple[float, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: Observer) -> None:
        """Adds a listener after construction (e.g. a console attached later)."""
        self._observers = (*self._observers, observer)

    def emit(self, kind: EventKind, txn_id: str, **fields: object) -> None:
        """Tells every observer; `fields` are `Event` attributes."""
        if not self._observers:
            return
        if "duration_s" not in fields and txn_id:
            fields["duration_s"] = self._clock(kind, txn_id)
        event = Event(kind, txn_id, at=time.time(), **fields)  # type: ignore[arg-type]
        for observer in self._observers:
            try:
                observer.on_event(event)
            except Exception:  # noqa: BLE001 - a broken observer must not change the protocol
                _log.exception("observer_failed", observer=type(observer).__name__, kind=kind.value)

    def _clock(self, kind: EventKind, txn_id: str) -> float:
        """The event's duration: VOTED and DECIDED since phase 1 started, later
        coordinator steps since the decision (or since the restart, in recovery)."""
        now = time.monotonic()
        if kind in (EventKind.PHASE1_STARTED, EventKind.RECOVERING):
            if len(self._marks) >= MAX_OPEN:  # a transaction that never reported END (its coordinator failed)
                del self._marks[next(iter(self._marks))]
            self._marks[txn_id] = (now, now)
            return 0.0
        started, decided = self._marks.get(txn_id, (now, now))
        if kind is EventKind.VOTED:
            return now - started
        if kind in (EventKind.DECIDED, EventKind.DECISION_LOGGED):
            self._marks[txn_id] = (started, now)  # phase 2 is timed from the durable decision
            return now - (started if kind is EventKind.DECIDED else decided)
        if kind is EventKind.ENDED:
            self._marks.pop(txn_id, None)
        elif kind not in (EventKind.ACKNOWLEDGED, EventKind.PHASE2_RETRY):
            return 0.0
        return now - decided


class Recorder:
    """An observer that keeps every event in a list, for tests and tools."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def of(self, txn_id: str) -> list[Event]:
        """The events of one transaction, in order."""
        return [e for e in self.events if e.txn_id == txn_id]

    def kinds(self, txn_id: str) -> list[EventKind]:
        return [e.kind for e in self.of(txn_id)]


def to_json(event: Event) -> dict[str, object]:
    """The event as plain JSON values (enums by value, None kept)."""
    return {
        "kind": event.kind.value,
        "txn_id": event.txn_id,
        "branch": event.branch,
        "target": event.target,
        "branches": list(event.branches),
        "vote": event.vote.value if event.vote else None,
        "reason": event.reason,
        "outcome": event.outcome.value if event.outcome else None,
        "duration_s": event.duration_s,
        "attempt": event.attempt,
        "count": event.count,
        "one_phase": event.one_phase,
        "at": event.at,
    }


class JsonLines:
    """An observer that appends each event as one JSON line to a file, flushed at
    once, so another process (the web console) can follow it across restarts.

    Args:
        path: the file; created if missing, appended to otherwise.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the process's life

    def on_event(self, event: Event) -> None:
        self._file.write(json.dumps(to_json(event), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
