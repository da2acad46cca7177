"""An explicit-state model of twopc's own protocol, checked by breadth-first search.

The model is the protocol of `src/twopc` (coordinator.py, participant.py, decision_log.py)
for one transaction, one coordinator and `n_participants` participants, reduced to
the steps that matter for correctness. `check` explores every reachable state by
BFS (as TLC checks Lamport's TwoPhase spec) and checks, in every state:

* ``atomicity``: never one participant COMMITTED while another is ABORTED;
* ``agreement``: a participant is COMMITTED only if the coordinator logged COMMIT at
  some point (ghost variable ``ever_logged_commit``, kept across crashes);
* ``validity``: the coordinator decides COMMIT only if every participant voted yes
  (COMMIT or READ_ONLY; ghost set of the participants that ever sent a yes vote).

It then checks a liveness property: from every reachable state, once faults stop
(no more loss, duplication or crash; crashed processes restart; retries, timeouts
and in-doubt queries go on), a state is reachable where no participant is PREPARED
and the log holds no COMMIT without END. This is computed backwards: the fault-free
edges met during the BFS are kept, and a reverse BFS from the terminal states marks
every state that can reach one; the rest are "stuck".

A safety violation stops the search; its trace is rebuilt from BFS parent pointers,
so it is a shortest one: the step names from the initial state to a bad state.

What is modelled
----------------
Coordinator (`CoordState`), program counter ``pc``:

* ``init`` --"coordinator.begin"--> ``phase1``: Prepare goes to every participant
  at once (`Coordinator._phase1`); the transaction is in flight (`_in_flight`).
* ``phase1``: the first Vote of each participant is recorded (one RPC per branch).
  An ABORT vote, or "coordinator.timeout" (the deadline, or an RPC error such as a
  participant killed mid-Prepare: any time in phase 1) decides ABORT at once: Abort
  goes to every branch that did not vote READ_ONLY, including those that never
  answered (``aborting``). Aborts are not logged. When every vote is yes: ``voted``.
* ``voted``: all votes in, nothing logged. "coordinator.log_commit" forces COMMIT
  with its targets (the COMMIT voters) to the log: ``logged``. If every vote was
  READ_ONLY nothing is logged or sent and the coordinator is ``done``.
* ``logged`` --"coordinator.send_commits"--> ``phase2``: Commit to each target,
  retried ("coordinator.retry_commit(pN)", `stop_never`) until acknowledged or
  refused; once every target acknowledged, "coordinator.log_end" writes END and the
  coordinator forgets the transaction (``done``). A refused target is never retried
  in this incarnation and END is never written (`commit_not_acknowledged`).
* ``aborting``: Abort retried; "coordinator.abort_give_up" at any time is
  `abort_retry_s` running out (``done``; GetOutcome's ABORTED covers the rest).
* A crash ("coordinator.crash" or a crash point name, below) loses the volatile
  state (pc, votes, acks, in-flight set); the log is kept. "coordinator.restart"
  re-drives a COMMIT without END (Commit to all its targets again, `__aenter__`)
  or else knows nothing of the transaction (presumed abort). END is not forced
  (`log_end(durable=False)`): "coordinator.power_loss" after END takes it back.
* GetOutcome: COMMITTED if the log holds COMMIT without END; PENDING if the
  transaction is in phase 1 in this incarnation (``phase1``, ``voted``); ABORTED
  otherwise (also after END, when every target has acknowledged).

Participants (`PartState`), a durable row: none, PREPARED, COMMITTED, ABORTED:

* Prepare with no row: a read-write participant votes COMMIT (the PREPARED row is
  durable before the vote) or ABORT (business refusal or deadline passed: nothing is
  written, the local transaction rolls back); a read-only participant (the last
  ``read_only`` ones) votes READ_ONLY or ABORT and writes nothing. With a row, a
  repeated Prepare answers from it: COMMIT for PREPARED/COMMITTED, ABORT for
  ABORTED (the tombstone of an Abort that came first).
* Commit: PREPARED -> COMMITTED (forced); COMMITTED acknowledges again; none or
  ABORTED is refused (FAILED_PRECONDITION) and changes nothing.
* Abort: none -> ABORTED (tombstone), PREPARED -> ABORTED, ABORTED acknowledges;
  COMMITTED is refused. An abort is not forced to disk (`Participant.apply`):
  "pN.power_loss" brings the previous row back (PREPARED, or none for a tombstone).
* In doubt: a PREPARED participant may ask GetOutcome ("pN.ask_outcome") at any
  time (no clocks: `in_doubt_after_s` is "any time") and applies COMMITTED/ABORTED
  as a Commit/Abort; PENDING means ask again later.
* Crash: "participant.after_prepare_durable@pN" (the PREPARED row is durable, the
  vote is never sent) and "pN.power_loss"; "pN.restart" brings the process back
  with its rows. A SIGKILL anywhere else loses nothing (every write survives a
  process crash, forced or not) and is already covered by "takes no step for a
  while" plus message loss, so it is not a separate step.

Network: a bag (multiset) of messages; any message in it may be delivered next
(reordering), lost ("net.lose ...") or duplicated ("net.dup ...").

Bounds and abstractions
-----------------------
* ``max_coordinator_crashes`` (default 2) and ``max_participant_crashes`` (default
  1 each; power losses count) bound crashes; ``max_dups`` (default 1) bounds
  duplications over a run; ``bag_cap`` (default 2) caps the copies of one message
  in flight (a copy beyond it is as if lost). Loss is unbounded.
* A retry (Commit, Abort, GetOutcome) is enabled only when neither the request nor
  its answer is in flight. A retry racing a copy still in flight gives the same
  state as a duplication, which ``max_dups`` covers.
* Messages that can no longer have an effect leave the bag at once: answers to a
  crashed coordinator (its connections died with it), anything to a crashed
  participant (the caller sees an error and retries), votes once phase 1 is over,
  Commit answers already counted, outcome answers to a participant no longer
  PREPARED (a no-op or a refusal), Abort to an ABORTED row. The answer to an Abort
  only stops its retries, so it is dropped too: Abort may be retried after it
  succeeded, which changes nothing.
* One transaction; no one-phase commit (``n_participants >= 2``); no clocks, so no
  purge of old rows (`retention_s`); no fsync failure (rule 8).

Measured on the 2-core development machine (``python -m tests.model.twopc_model``,
CPU time, as the wall time depends on what else runs): 2 participants with the
defaults, 33,627 states in about 1.3 s; 3 participants need ``max_dups=0`` (the
bound the tests and the command line use for 3): 220,372 states in about 10 s.
3 participants with ``max_dups=1`` and ``max_coordinator_crashes=1`` is about 1.2
million states and over a minute, too slow for the test suite.

Crash points and step names
---------------------------
A step named after a crash point of `twopc.faults` is that process SIGKILLed
exactly there (``TWOPC_CRASH_AT=<name>``), so a trace can be replayed against real
processes:

* "coordinator.before_decision": every vote in, nothing logged (``voted``). On the
  abort path the code passes this point too, but there the model decides ABORT and
  sends the Aborts in one step, so a crash before it is "coordinator.crash" in
  ``phase1``, which reaches the same state.
* "coordinator.after_commit_logged": COMMIT durable, no Commit sent (``logged``).
* "coordinator.after_first_commit": right after the first Commit was answered.
* "participant.after_prepare_durable@pN": participant N, its PREPARED row durable,
  its vote not sent.
* "coordinator.crash": a coordinator crash anywhere else.

"coordinator.power_loss" and "pN.power_loss" are machine crashes that take back a
write that was not forced (END; a participant's abort). `replay` follows a trace
through the model again, step name by step name.

Other steps: "coordinator.<action>", "coordinator.recv <message>",
"coordinator.outcome(pN):<answer>", "pN.<action>:<result>", "net.lose <message>",
"net.dup <message>"; messages print as ``Kind(pN)`` or ``Kind(pN,value)``.

Broken variants (``bug=``)
--------------------------
* ``"commit_before_log"``: in ``voted`` the coordinator sends Commit
  ("coordinator.send_commits") before "coordinator.log_commit"; a crash in between
  loses the decision while a participant may already be COMMITTED.
* ``"outcome_aborted_in_flight"``: GetOutcome answers ABORTED, not PENDING, for a
  transaction still in phase 1.

Cancelling `Coordinator.run` (``cancel_run=True``)
---------------------------------------------------
The caller may cancel `Coordinator.run` (a task cancelled, a timeout around it, the
RPC that called it cancelled). With ``cancel_run`` the COMMIT write takes two steps,
"coordinator.log_submit" (the job is queued on the store's thread, ``logging``) and
"coordinator.log_commit", and "coordinator.run_cancelled" may come in ``phase1``
(`_phase1` cancels its Prepares, no Abort is sent; GetOutcome then says ABORTED).
Once the votes are in, the code runs the decision in a task the caller only awaits
through `asyncio.shield`, so a cancellation then changes nothing and is not modelled.
* ``bug="orphan_on_cancel"`` (with ``cancel_run``) is the code before that fix: a
  cancellation in ``logging`` lets the store's thread commit the record while
  `_in_flight` is cleared and no phase 2 starts, so GetOutcome answers ABORTED for a
  logged COMMIT, which the next restart re-drives: an atomicity violation.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Participant rows.
NONE, PREPARED, COMMITTED, ABORTED = "none", "PREPARED", "COMMITTED", "ABORTED"
# Votes.
COMMIT, ABORT, READ_ONLY = "COMMIT", "ABORT", "READ_ONLY"
_YES = (COMMIT, READ_ONLY)
# GetOutcome answers (COMMITTED and ABORTED are spelt as the rows).
PENDING = "PENDING"
# Coordinator program counter.
INIT, PHASE1, VOTED, SENT_UNLOGGED, LOGGING, ORPHANED, LOGGED, PHASE2, ABORTING, DONE, DOWN = (
    "init",
    "phase1",
    "voted",
    "sent_unlogged",
    "logging",
    "orphaned",
    "logged",
    "phase2",
    "aborting",
    "done",
    "down",
)
_IN_FLIGHT = (PHASE1, VOTED, SENT_UNLOGGED, LOGGING)  # `Coordinator._in_flight`: GetOutcome says PENDING
# Decision log.
LOG_NONE, LOG_COMMIT, LOG_END = "none", "COMMIT", "END"

BUGS = ("commit_before_log", "outcome_aborted_in_flight", "orphan_on_cancel")
PROPERTIES = ("atomicity", "agreement", "validity")

Msg = tuple[str, int, str]
"""A message: (kind, participant index, value). Kinds to a participant: Prepare,
Commit, Abort, Outcome (value: the answer); to the coordinator: Vote (value: the
vote), Ack (value: "Commit:ok", "Commit:refused", "Abort:ok", "Abort:refused"),
GetOutcome."""

Bag = frozenset[tuple[Msg, int]]
"""The network: each distinct message in flight with its number of copies."""

_TO_PARTICIPANT = frozenset({"Prepare", "Commit", "Abort", "Outcome"})


class CoordState(NamedTuple):
    """The coordinator: volatile program counter and phase state, durable log.

    Attributes:
        pc: where the coordinator is (see the module docstring).
        votes: per participant, the vote received in phase 1, or None.
        acks: targets that acknowledged Commit.
        refused: targets that refused Commit (FAILED_PRECONDITION).
        targets: the COMMIT voters, durable with the log record once logged; or,
            in ``aborting``, the branches that Abort goes to.
        log: the decision log: none, COMMIT, or END.
        crashes: crashes so far (bounded).
    """

    pc: str = INIT
    votes: tuple[str | None, ...] = ()
    acks: frozenset[int] = frozenset()
    refused: frozenset[int] = frozenset()
    targets: frozenset[int] = frozenset()
    log: str = LOG_NONE
    crashes: int = 0


class PartState(NamedTuple):
    """A participant: its durable row for the transaction, and whether it runs.

    Attributes:
        row: none, PREPARED, COMMITTED or ABORTED.
        up: False between a crash and the restart.
        crashes: crashes so far (bounded).
        unsynced: the row a power loss would bring back, when the last change was
            an Abort, which is not forced to disk (`Participant.apply`); "" when
            the row is on disk.
    """

    row: str = NONE
    up: bool = True
    crashes: int = 0
    unsynced: str = ""


class State(NamedTuple):
    """One global state: processes, network, and ghost variables for the properties.

    Attributes:
        coord: the coordinator.
        parts: the participants, p0 first.
        bag: the messages in flight.
        dups: duplications so far (bounded).
        yes_voters: ghost: participants that ever sent a COMMIT or READ_ONLY vote.
        ever_decided_commit: ghost: the coordinator decided COMMIT (logged it, or
            sent a Commit) at some point.
        ever_logged_commit: ghost: the log held COMMIT at some point.
    """

    coord: CoordState
    parts: tuple[PartState, ...]
    bag: Bag = frozenset()
    dups: int = 0
    yes_voters: frozenset[int] = frozenset()
    ever_decided_commit: bool = False
    ever_logged_commit: bool = False

    def describe(self) -> str:
        """A one-line human reading of the state."""
        c = self.coord
        rows = " ".join(f"p{i}={p.row}{'' if p.up else '(down)'}" for i, p in enumerate(self.parts))
        msgs = ", ".join(f"{fmt_msg(m)}x{n}" if n > 1 else fmt_msg(m) for m, n in sorted(self.bag))
        return f"coordinator={c.pc} log={c.log} | {rows} | net=[{msgs}]"


Step = tuple[str, State, bool]
"""A transition: (step name, next state, whether it is a fault)."""


def fmt_msg(msg: Msg) -> str:
    """Formats a message as ``Kind(pN)`` or ``Kind(pN,value)``."""
    kind, p, value = msg
    return f"{kind}(p{p},{value})" if value else f"{kind}(p{p})"


@dataclass(frozen=True)
class Model:
    """The protocol's transition system, with its bounds and an optional bug.

    Attributes:
        n_participants: participants in the transaction (>= 2).
        read_only: how many of them (the last ones) are read-only voters.
        bug: None for the real protocol, or one of `BUGS`.
        max_coordinator_crashes: crashes of the coordinator over a run.
        max_participant_crashes: crashes of each participant over a run.
        max_dups: message duplications over a run.
        bag_cap: copies of one message the network holds at most.
        cancel_run: the caller may cancel `Coordinator.run` (see the module
            docstring); off by default, as the code does not survive it.
    """

    n_participants: int = 2
    read_only: int = 0
    bug: str | None = None
    max_coordinator_crashes: int = 2
    max_participant_crashes: int = 1
    max_dups: int = 1
    bag_cap: int = 2
    cancel_run: bool = False

    def __post_init__(self) -> None:
        if self.n_participants < 2:
            raise ValueError("n_participants must be >= 2 (one branch is one-phase commit, not modelled)")
        if not 0 <= self.read_only <= self.n_participants:
            raise ValueError("read_only must be between 0 and n_participants")
        if self.bug is not None and self.bug not in BUGS:
            raise ValueError(f"unknown bug {self.bug!r}; known: {', '.join(BUGS)}")

    # --- states ------------------------------------------------------------------

    def initial(self) -> State:
        """The state before `Coordinator.run`: nothing sent, nothing written."""
        return State(CoordState(), tuple(PartState() for _ in range(self.n_participants)))

    def is_read_only(self, p: int) -> bool:
        """Whether participant `p` is a read-only voter."""
        return p >= self.n_participants - self.read_only

    def violations(self, s: State, properties: Iterable[str] = PROPERTIES) -> list[str]:
        """The safety properties that `s` violates, in the order given."""
        rows = {p.row for p in s.parts}
        broken = {
            "atomicity": COMMITTED in rows and ABORTED in rows,
            "agreement": COMMITTED in rows and not s.ever_logged_commit,
            "validity": s.ever_decided_commit and len(s.yes_voters) < self.n_participants,
        }
        return [name for name in properties if broken[name]]

    def is_terminal(self, s: State) -> bool:
        """Liveness goal: nobody in doubt, and no COMMIT left without END."""
        return s.coord.log != LOG_COMMIT and all(p.row != PREPARED for p in s.parts)

    def _freeze(
        self,
        s: State,
        coord: CoordState | None = None,
        parts: tuple[PartState, ...] | None = None,
        bag: dict[Msg, int] | None = None,
        *,
        dups: int | None = None,
        yes_voters: frozenset[int] | None = None,
        decided: bool | None = None,
        logged: bool | None = None,
    ) -> State:
        """Builds the next state, dropping the messages that can no longer matter."""
        c = s.coord if coord is None else coord
        ps = s.parts if parts is None else parts
        items = s.bag if bag is None else bag.items()
        kept = frozenset((m, n) for m, n in items if n > 0 and _useful(m, c, ps))
        return State(
            c,
            ps,
            kept,
            s.dups if dups is None else dups,
            s.yes_voters if yes_voters is None else yes_voters,
            s.ever_decided_commit if decided is None else decided,
            s.ever_logged_commit if logged is None else logged,
        )

    def _send(self, bag: dict[Msg, int], *msgs: Msg) -> None:
        for m in msgs:
            bag[m] = min(bag.get(m, 0) + 1, self.bag_cap)

    # --- transitions ---------------------------------------------------------------

    def successors(self, s: State) -> list[Step]:
        """Every transition enabled in `s`."""
        out: list[Step] = []
        self._coordinator_steps(s, out)
        for i in range(self.n_participants):
            self._participant_steps(s, i, out)
        self._network_steps(s, out)
        return out

    def _coordinator_steps(self, s: State, out: list[Step]) -> None:
        c = s.coord
        if c.pc == DOWN:
            bag = dict(s.bag)
            if c.log == LOG_COMMIT:  # recovery: re-drive the COMMIT without END
                self._send(bag, *(("Commit", p, "") for p in sorted(c.targets)))
                nc = CoordState(PHASE2, targets=c.targets, log=c.log, crashes=c.crashes)
            else:
                nc = CoordState(DONE, log=c.log, crashes=c.crashes)
            out.append(("coordinator.restart", self._freeze(s, nc, bag=bag), False))
            return
        n = self.n_participants
        if c.pc == INIT:
            bag = dict(s.bag)
            self._send(bag, *(("Prepare", p, "") for p in range(n)))
            out.append(("coordinator.begin", self._freeze(s, c._replace(pc=PHASE1, votes=(None,) * n), bag=bag), False))
            return
        if c.pc == PHASE1:
            out.append(("coordinator.timeout", self._decide_abort(s), False))
        elif c.pc == VOTED:
            targets = frozenset(p for p, v in enumerate(c.votes) if v == COMMIT)
            if not targets:  # every branch read-only: nothing to log, nothing to send
                nc = CoordState(DONE, log=c.log, crashes=c.crashes)
                out.append(("coordinator.decide_commit(read_only)", self._freeze(s, nc, decided=True), False))
            elif self.bug == "commit_before_log":
                bag = dict(s.bag)
                self._send(bag, *(("Commit", p, "") for p in sorted(targets)))
                nc = c._replace(pc=SENT_UNLOGGED, votes=(), targets=targets)
                out.append(("coordinator.send_commits", self._freeze(s, nc, bag=bag, decided=True), False))
            elif self.cancel_run:  # the write is on the store's queue; `run` awaits it
                nc = c._replace(pc=LOGGING, votes=(), targets=targets)
                out.append(("coordinator.log_submit", self._freeze(s, nc), False))
            else:
                nc = c._replace(pc=LOGGED, votes=(), targets=targets, log=LOG_COMMIT)
                out.append(("coordinator.log_commit", self._freeze(s, nc, decided=True, logged=True), False))
        elif c.pc == LOGGING:
            nc = c._replace(pc=LOGGED, log=LOG_COMMIT)
            out.append(("coordinator.log_commit", self._freeze(s, nc, decided=True, logged=True), False))
        elif c.pc == SENT_UNLOGGED:
            nc = c._replace(pc=PHASE2, log=LOG_COMMIT)
            out.append(("coordinator.log_commit", self._freeze(s, nc, logged=True), False))
        elif c.pc == LOGGED:
            bag = dict(s.bag)
            self._send(bag, *(("Commit", p, "") for p in sorted(c.targets)))
            out.append(("coordinator.send_commits", self._freeze(s, c._replace(pc=PHASE2), bag=bag), False))
        elif c.pc == PHASE2:
            if c.acks == c.targets:
                nc = CoordState(DONE, targets=c.targets, log=LOG_END, crashes=c.crashes)
                out.append(("coordinator.log_end", self._freeze(s, nc), False))
            for p in sorted(c.targets - c.acks - c.refused):
                if not _in_flight(s.bag, ("Commit", p), ("Ack", p, "Commit")):
                    bag = dict(s.bag)
                    self._send(bag, ("Commit", p, ""))
                    out.append((f"coordinator.retry_commit(p{p})", self._freeze(s, bag=bag), False))
        elif c.pc == ABORTING:
            out.append(("coordinator.abort_give_up", self._freeze(s, CoordState(DONE, crashes=c.crashes)), False))
            for p in sorted(c.targets):
                if not _in_flight(s.bag, ("Abort", p), ("Ack", p, "Abort")):
                    bag = dict(s.bag)
                    self._send(bag, ("Abort", p, ""))
                    out.append((f"coordinator.retry_abort(p{p})", self._freeze(s, bag=bag), False))
        for m, _ in s.bag:
            if m[0] not in _TO_PARTICIPANT:
                out.append(self._coordinator_receives(s, m))
        # `run` can be cancelled at its awaits: in phase 1, and while the COMMIT write is
        # queued (`store.write` queues the job before its first await).
        if self.cancel_run and (c.pc == PHASE1 or (c.pc == LOGGING and self.bug == "orphan_on_cancel")):
            if c.pc == LOGGING:  # the store's thread still commits the record; nobody knows
                nc = CoordState(ORPHANED, targets=c.targets, log=LOG_COMMIT, crashes=c.crashes)
                cancelled = self._freeze(s, nc, decided=True, logged=True)
            else:  # `_phase1` cancels its Prepares; no Abort is sent
                cancelled = self._freeze(s, CoordState(DONE, log=c.log, crashes=c.crashes))
            out.append(("coordinator.run_cancelled", cancelled, True))
        if c.crashes < self.max_coordinator_crashes:
            if c.pc != DONE:
                targets = c.targets if c.log == LOG_COMMIT else frozenset()
                nc = CoordState(DOWN, targets=targets, log=c.log, crashes=c.crashes + 1)
                out.append((_crash_name(c), self._freeze(s, nc), True))
            elif c.log == LOG_END:  # END is not forced: a power loss may take it back
                nc = CoordState(DOWN, targets=c.targets, log=LOG_COMMIT, crashes=c.crashes + 1)
                out.append(("coordinator.power_loss", self._freeze(s, nc), True))

    def _decide_abort(self, s: State, bag: dict[Msg, int] | None = None) -> State:
        """ABORT: Abort to every branch that did not vote READ_ONLY, nothing logged."""
        c = s.coord
        bag = dict(s.bag) if bag is None else bag
        targets = frozenset(p for p, v in enumerate(c.votes) if v != READ_ONLY)
        self._send(bag, *(("Abort", p, "") for p in sorted(targets)))
        nc = CoordState(ABORTING, targets=targets, log=c.log, crashes=c.crashes)
        return self._freeze(s, nc, bag=bag)

    def _coordinator_receives(self, s: State, m: Msg) -> Step:
        c = s.coord
        kind, p, value = m
        bag = _take(s.bag, m)
        name = f"coordinator.recv {fmt_msg(m)}"
        if kind == "Vote":  # only useful ones are in the bag: phase 1, first vote of p
            if value == ABORT:
                return name, self._decide_abort(s, bag), False
            votes = (*c.votes[:p], value, *c.votes[p + 1 :])
            pc = VOTED if all(v is not None for v in votes) else PHASE1
            return name, self._freeze(s, c._replace(pc=pc, votes=votes), bag=bag), False
        if kind == "Ack":
            result = value.split(":")[1]
            # Only Commit answers are in the bag (see `_useful`).
            nc = c._replace(acks=c.acks | {p}) if result == "ok" else c._replace(refused=c.refused | {p})
            return name, self._freeze(s, nc, bag=bag), False
        # GetOutcome, answered from memory (`_committed`, `_in_flight`), which knows
        # the log's COMMIT except in ``orphaned``.
        if c.log == LOG_COMMIT and c.pc != ORPHANED:
            answer = COMMITTED
        elif c.pc in _IN_FLIGHT and self.bug != "outcome_aborted_in_flight":
            answer = PENDING
        else:
            answer = ABORTED
        if answer != PENDING:
            self._send(bag, ("Outcome", p, answer))
        return f"coordinator.outcome(p{p}):{answer}", self._freeze(s, bag=bag), False

    def _participant_steps(self, s: State, i: int, out: list[Step]) -> None:
        part = s.parts[i]
        if not part.up:
            out.append((f"p{i}.restart", self._freeze(s, parts=_set(s.parts, i, part._replace(up=True))), False))
            return
        if part.unsynced and part.crashes < self.max_participant_crashes:
            lost = PartState(part.unsynced, up=False, crashes=part.crashes + 1)
            out.append((f"p{i}.power_loss", self._freeze(s, parts=_set(s.parts, i, lost)), True))
        for m, _ in s.bag:
            if m[1] == i and m[0] in _TO_PARTICIPANT:
                self._participant_receives(s, i, m, out)
        if part.row == PREPARED and s.coord.pc != DOWN and not _in_flight(s.bag, ("GetOutcome", i), ("Outcome", i)):
            bag = dict(s.bag)
            self._send(bag, ("GetOutcome", i, ""))
            out.append((f"p{i}.ask_outcome", self._freeze(s, bag=bag), False))

    def _participant_receives(self, s: State, i: int, m: Msg, out: list[Step]) -> None:
        part = s.parts[i]
        kind, _, value = m
        bag = _take(s.bag, m)
        if kind == "Prepare":
            if part.row != NONE:  # a repeated Prepare: the same answer from the row, no work
                vote = ABORT if part.row == ABORTED else COMMIT
                self._reply_vote(s, i, bag, vote, f"p{i}.prepare(repeat):{vote}", out)
                return
            if self.is_read_only(i):
                self._reply_vote(s, i, bag, READ_ONLY, f"p{i}.prepare:{READ_ONLY}", out)
            else:
                parts = _set(s.parts, i, part._replace(row=PREPARED))
                self._reply_vote(s, i, bag, COMMIT, f"p{i}.prepare:{COMMIT}", out, parts)
                if part.crashes < self.max_participant_crashes:
                    dead = _set(s.parts, i, PartState(PREPARED, up=False, crashes=part.crashes + 1))
                    out.append((f"participant.after_prepare_durable@p{i}", self._freeze(s, parts=dead, bag=bag), True))
            self._reply_vote(s, i, bag, ABORT, f"p{i}.prepare:{ABORT}", out)
            return
        if kind == "Outcome":  # only useful ones are in the bag: the participant is PREPARED
            if value == COMMITTED:
                parts = _set(s.parts, i, part._replace(row=COMMITTED, unsynced=""))
            else:
                parts = _set(s.parts, i, part._replace(row=ABORTED, unsynced=PREPARED))
            out.append((f"p{i}.apply_outcome:{value}", self._freeze(s, parts=parts, bag=bag), False))
            return
        # Commit or Abort: idempotent, refused (unchanged) when the row forbids it.
        # A commit is forced to disk (and with it any earlier write); an abort is not.
        if kind == "Commit":
            ok = part.row in (PREPARED, COMMITTED)
            new = part._replace(row=COMMITTED, unsynced="") if ok else part
        else:
            ok = part.row != COMMITTED
            new = part if not ok or part.row == ABORTED else part._replace(row=ABORTED, unsynced=part.row)
        result = "ok" if ok else "refused"
        self._send(bag, ("Ack", i, f"{kind}:{result}"))
        parts = _set(s.parts, i, new)
        out.append((f"p{i}.{kind.lower()}:{result}", self._freeze(s, parts=parts, bag=bag), False))

    def _reply_vote(
        self,
        s: State,
        i: int,
        bag: dict[Msg, int],
        vote: str,
        name: str,
        out: list[Step],
        parts: tuple[PartState, ...] | None = None,
    ) -> None:
        bag = dict(bag)
        self._send(bag, ("Vote", i, vote))
        yes = s.yes_voters | {i} if vote in _YES else s.yes_voters
        out.append((name, self._freeze(s, parts=parts, bag=bag, yes_voters=yes), False))

    def _network_steps(self, s: State, out: list[Step]) -> None:
        for m, n in sorted(s.bag):
            out.append((f"net.lose {fmt_msg(m)}", self._freeze(s, bag=_take(s.bag, m)), True))
            if s.dups < self.max_dups and n < self.bag_cap:
                bag = dict(s.bag)
                bag[m] = n + 1
                out.append((f"net.dup {fmt_msg(m)}", self._freeze(s, bag=bag, dups=s.dups + 1), True))


def _crash_name(c: CoordState) -> str:
    """The crash point a coordinator crash in state `c` is at (see module docstring)."""
    if c.pc == VOTED:
        return "coordinator.before_decision"
    if c.pc == LOGGED:
        return "coordinator.after_commit_logged"
    if c.pc in (PHASE2, SENT_UNLOGGED) and len(c.acks) == 1:
        return "coordinator.after_first_commit"
    return "coordinator.crash"


def _useful(m: Msg, c: CoordState, parts: tuple[PartState, ...]) -> bool:
    """Whether message `m` can still have an effect (else the bag drops it)."""
    kind, p, value = m
    if kind in _TO_PARTICIPANT:
        part = parts[p]
        if not part.up:
            return False
        if kind == "Abort":  # Abort of an aborted transaction changes nothing
            return part.row != ABORTED
        return kind != "Outcome" or part.row == PREPARED
    if c.pc == DOWN:
        return False
    if kind == "Vote":
        return c.pc == PHASE1 and c.votes[p] is None
    if kind == "Ack":
        # An Abort's answer only stops its retries: dropped, so Abort may be retried
        # after it succeeded (harmless: Abort is idempotent).
        return value.startswith("Commit") and c.pc in (PHASE2, SENT_UNLOGGED) and p not in (c.acks | c.refused)
    return True  # GetOutcome to a running coordinator


def _in_flight(bag: Bag, *prefixes: tuple[object, ...]) -> bool:
    """Whether a message starting with one of `prefixes` is in the bag."""
    return any(m[: len(pre)] == pre for m, _ in bag for pre in prefixes)


def _take(bag: Bag, m: Msg) -> dict[Msg, int]:
    d = dict(bag)
    d[m] -= 1
    return d


def _set(parts: tuple[PartState, ...], i: int, part: PartState) -> tuple[PartState, ...]:
    return (*parts[:i], part, *parts[i + 1 :])


# --- the checker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """A counterexample: a shortest trace from the initial state to a bad state.

    Attributes:
        prop: the violated property ("atomicity", "agreement", "validity", or
            "liveness" for a state from which no fault-free path terminates).
        trace: the step names, first step first.
        state: the state the trace ends in.
    """

    prop: str
    trace: tuple[str, ...]
    state: State

    def render(self) -> str:
        """The trace, one numbered step per line, then the final state."""
        lines = [f"violated: {self.prop} ({len(self.trace)} steps)"]
        lines += [f"  {k:2d}. {step}" for k, step in enumerate(self.trace, 1)]
        lines.append(f"  => {self.state.describe()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """What `check` found.

    Attributes:
        states: distinct reachable states explored.
        transitions: transitions followed (fault and fault-free).
        violation: the first safety violation (a shortest trace), or None.
        stuck: a shallowest state that cannot terminate once faults stop, or None.
        stuck_states: how many reachable states cannot terminate.
        terminal_states: how many reachable states are terminal.
        steps: the distinct step names taken anywhere in the search.
        seconds: wall time of the check.
        cpu_seconds: CPU time of the check (the wall time is noisy on a busy machine).
    """

    states: int
    transitions: int
    violation: Violation | None
    stuck: Violation | None
    stuck_states: int
    terminal_states: int
    steps: frozenset[str]
    seconds: float
    cpu_seconds: float

    def summary(self) -> str:
        """One line: counts and times."""
        return (
            f"{self.states} states, {self.transitions} transitions, {self.terminal_states} terminal, "
            f"{self.stuck_states} stuck; {self.seconds:.1f} s ({self.cpu_seconds:.1f} s CPU)"
        )


def check(model: Model, *, properties: Sequence[str] = PROPERTIES, liveness: bool = True) -> Report:
    """Explores every reachable state of `model` by BFS and checks it.

    Args:
        model: the transition system.
        properties: the safety properties to check in every state (a subset of
            `PROPERTIES`).
        liveness: also check that every reachable state can terminate once faults
            stop (not done when a safety property fails).

    Returns:
        The number of states explored, the first violation if any, and the result
        of the liveness check.

    Raises:
        ValueError: an unknown property name.
    """
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"unknown properties {sorted(unknown)}; known: {', '.join(PROPERTIES)}")
    enabled = gc.isenabled()
    gc.disable()  # millions of tuples and no cycles: the collector would only rescan them
    try:
        return _Search(model, properties, liveness).run()
    finally:
        if enabled:
            gc.enable()


class _Search:
    """One BFS over a model's states, then the backward liveness pass."""

    def __init__(self, model: Model, properties: Sequence[str], liveness: bool) -> None:
        self.model = model
        self.properties = tuple(properties)
        self.liveness = liveness
        self.states: list[State] = []
        self.parent = array("q")  # BFS tree: the index of the state each was found from
        self.via: list[str] = []  # ... and the step that found it
        self.src = array("q")  # fault-free edges, for the liveness pass
        self.dst = array("q")
        self.steps: set[str] = set()
        self.transitions = 0
        self.start = time.monotonic()
        self.cpu_start = time.process_time()

    def run(self) -> Report:
        model, states = self.model, self.states
        init = model.initial()
        index = {init: 0}
        states.append(init)
        self.parent.append(-1)
        self.via.append("")
        if model.violations(init, self.properties):
            return self._report(violation=self._violation(0))
        k = 0
        while k < len(states):
            for name, t, fault in model.successors(states[k]):
                self.transitions += 1
                self.steps.add(name)
                j = index.get(t)
                if j is None:
                    j = len(states)
                    index[t] = j
                    states.append(t)
                    self.parent.append(k)
                    self.via.append(name)
                    if model.violations(t, self.properties):
                        return self._report(violation=self._violation(j))
                if self.liveness and not fault:
                    self.src.append(k)
                    self.dst.append(j)
            k += 1
        if not self.liveness:
            return self._report()
        return self._liveness()

    def _liveness(self) -> Report:
        """Backward reachability from the terminal states over fault-free edges."""
        n = len(self.states)
        starts = array("q", [0]) * (n + 1)  # predecessors of b: preds[starts[b]:starts[b + 1]]
        for b in self.dst:
            starts[b + 1] += 1
        for b in range(n):
            starts[b + 1] += starts[b]
        fill = array("q", starts)
        preds = array("q", [0]) * len(self.dst)
        for a, b in zip(self.src, self.dst, strict=True):
            preds[fill[b]] = a
            fill[b] += 1
        can_end = bytearray(n)
        frontier = [j for j, t in enumerate(self.states) if self.model.is_terminal(t)]
        terminal = len(frontier)
        for j in frontier:
            can_end[j] = 1
        while frontier:
            found: list[int] = []
            for b in frontier:
                for a in preds[starts[b] : starts[b + 1]]:
                    if not can_end[a]:
                        can_end[a] = 1
                        found.append(a)
            frontier = found
        stuck_states = n - sum(can_end)
        stuck = None
        if stuck_states:
            first = can_end.index(0)  # states are in BFS order: a shallowest stuck one
            stuck = Violation("liveness", self._trace(first), self.states[first])
        return self._report(stuck=stuck, stuck_states=stuck_states, terminal_states=terminal)

    def _trace(self, k: int) -> tuple[str, ...]:
        steps: list[str] = []
        while self.parent[k] >= 0:
            steps.append(self.via[k])
            k = self.parent[k]
        return tuple(reversed(steps))

    def _violation(self, k: int) -> Violation:
        prop = self.model.violations(self.states[k], self.properties)[0]
        return Violation(prop, self._trace(k), self.states[k])

    def _report(
        self,
        *,
        violation: Violation | None = None,
        stuck: Violation | None = None,
        stuck_states: int = 0,
        terminal_states: int = 0,
    ) -> Report:
        return Report(
            states=len(self.states),
            transitions=self.transitions,
            violation=violation,
            stuck=stuck,
            stuck_states=stuck_states,
            terminal_states=terminal_states,
            steps=frozenset(self.steps),
            seconds=time.monotonic() - self.start,
            cpu_seconds=time.process_time() - self.cpu_start,
        )


def replay(model: Model, trace: Iterable[str]) -> State:
    """Follows `trace`, step name by step name, from the initial state.

    Args:
        model: the transition system the trace was found in.
        trace: step names, as in `Violation.trace`.

    Returns:
        The state the trace ends in.

    Raises:
        ValueError: a step that is not enabled where the trace takes it.
    """
    state = model.initial()
    for k, step in enumerate(trace, 1):
        nxt = next((t for name, t, _ in model.successors(state) if name == step), None)
        if nxt is None:
            raise ValueError(f"step {k} {step!r} is not enabled in {state.describe()}")
        state = nxt
    return state


# --- command line --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Checks the protocol, finds both broken variants' counterexamples, then shows
    what a cancelled `Coordinator.run` does (``cancel_run``).

    Args:
        argv: the command line arguments (``sys.argv[1:]`` by default).

    Returns:
        The exit status: 0 if the protocol holds and both bugs are found.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tests.model.twopc_model", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("-n", "--participants", type=int, nargs="+", default=[2, 3], help="default: 2 3")
    parser.add_argument("--read-only", type=int, default=0, help="read-only participants (default 0)")
    parser.add_argument("--coordinator-crashes", type=int, default=2, help="default 2")
    parser.add_argument("--participant-crashes", type=int, default=1, help="each (default 1)")
    parser.add_argument("--dups", type=int, default=None, help="default: 1 for 2 participants, 0 for more")
    args = parser.parse_args(argv)
    ok = True
    for n in args.participants:
        dups = args.dups if args.dups is not None else (1 if n <= 2 else 0)
        model = Model(
            n,
            read_only=args.read_only,
            max_coordinator_crashes=args.coordinator_crashes,
            max_participant_crashes=args.participant_crashes,
            max_dups=dups,
        )
        r = check(model)
        print(f"{model}\n  {r.summary()}", flush=True)
        for v in (r.violation, r.stuck):
            if v is not None:
                ok = False
                print(v.render())
    for bug in BUGS:
        for props in (PROPERTIES, ("atomicity",)):
            r = check(Model(2, bug=bug, cancel_run=bug == "orphan_on_cancel"), properties=props, liveness=False)
            print(f"\nbug={bug}, checking {', '.join(props)}: {r.summary()}")
            if r.violation is None:
                ok = False
                print("  no counterexample found")
            else:
                print(r.violation.render())
    r = check(Model(2, cancel_run=True))
    print(f"\nthe code with its caller cancelling run (cancel_run=True): {r.summary()}")
    for v in (r.violation, r.stuck):
        if v is not None:
            ok = False
            print(v.render())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
