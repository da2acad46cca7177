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

The BFS, the liveness pass and the traces are `tests.model.checker`'s, shared with
`identity_model` (two coordinators, one local id) and `ha_model` (two coordinator
instances sharing a decision log).

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
* GetOutcome, answered from memory: COMMITTED if the coordinator knows its COMMIT
  is logged (``logged``, ``phase2``); PENDING while the transaction is in phase 1
  or its decision write in this incarnation (``phase1``, ``voted``, ``writing``)
  or the write's end was not seen (``uncertain``); ABORTED otherwise. After END
  it still says COMMITTED (the record is kept for `retention_s`; the model never
  purges it), though no participant is left in doubt to ask by then.

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
defaults, 33,627 states in about 1 s; 3 participants need ``max_dups=0`` (the
bound the tests and the command line use for 3): 220,372 states in about 10 s.
3 participants with ``max_dups=1`` and ``max_coordinator_crashes=1`` is about 1.2
million states and over a minute, too slow for the test suite. With ``shutdown``
(2 participants), 112,219 states in about 4 s.

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
Besides those of the next sections:

* ``"commit_before_log"``: in ``voted`` the coordinator sends Commit
  ("coordinator.send_commits") before "coordinator.log_commit"; a crash in between
  loses the decision while a participant may already be COMMITTED.
* ``"outcome_aborted_in_flight"``: GetOutcome answers ABORTED, not PENDING, for a
  transaction still in phase 1.
* ``"outcome_before_load"``: the code before issue 8 (finding 3): a restarted
  coordinator serves GetOutcome before it has read its log ("coordinator.restart"
  to ``loading``, then "coordinator.log_loaded"), and answers ABORTED for a
  logged COMMIT it has not loaded yet. In the fixed code the question gets
  UNAVAILABLE until the log is read, which the model has as the question lost.

The decision write in three steps
---------------------------------
With ``cancel_run`` or ``shutdown`` the COMMIT write is not one step but three, as
in the code, so that a cancellation or a close can fall between them:
"coordinator.log_submit" (the job is on the store's queue: ``writing``),
"coordinator.record_lands" (the store's thread commits it: the log holds COMMIT,
whatever became of the task awaiting it), "coordinator.log_commit" (the write
returns: ``logged``). A crash in ``writing`` keeps the record only if it landed.

Cancelling `Coordinator.run` (``cancel_run=True``)
---------------------------------------------------
The caller may cancel `Coordinator.run` (a task cancelled, a timeout around it, the
RPC that called it cancelled). "coordinator.run_cancelled" may come in ``phase1``:
`_phase1` cancels its Prepares and Abort goes to every branch (issue 8, finding 9),
as on a timeout. Once the votes are in, the code runs the decision in a task the
caller only awaits through `asyncio.shield`, so a cancellation then changes nothing
and is not modelled.

* ``bug="silent_cancel"`` is the code before issue 8: a cancelled phase 1 sends
  nothing. It is safe and live (the participants' in-doubt queries end it), and
  its reachable states are the same as the fix's, because a timeout followed by
  the loss of every Abort reaches them too. What differs is how long a
  reservation is held, which the property ``prompt`` states on fault-free runs
  (``faults=False``): no participant is PREPARED with no Commit or Abort on its
  way and a coordinator that will send it none (`Model.left_for_query`). The fix
  keeps it; ``silent_cancel`` breaks it in 3 steps.
* ``bug="orphan_on_cancel"`` (with ``cancel_run``) is the code before the shield:
  a cancellation in ``writing`` forgets the decision (``orphaned``) while the
  store's thread still commits the record, and no phase 2 starts, so GetOutcome
  answers ABORTED for a logged COMMIT, which the next restart re-drives: an
  atomicity violation (14 steps).

Closing the coordinator (``shutdown=True``)
-------------------------------------------
`Coordinator.close` may be called at any time (``max_closes`` times, 1 by
default), as issue 8 (finding 1) fixes it:

* "coordinator.close" (``closing``): no new run (a close before "coordinator.begin"
  means the transaction never begins); work under way goes on: phase 1, the
  decision, phase 2.
* "coordinator.grace_over" (``stopping``): the background work is cancelled. A run
  still in phase 1 is abandoned as a cancelled run is (Abort to every branch);
  phase 2 and Abort retries stop (the log keeps the COMMIT, recovery resumes it);
  a started decision write is waited for, so the grace is never over in ``voted``
  or ``writing`` - unless the write outlasts any grace
  ("coordinator.write_outlasts_close", a fault): then the coordinator cannot know
  and says PENDING (``uncertain``) until a restart reads the disk, and the record
  may still land.
* "coordinator.stop": the server stops, GetOutcome last; the process is gone
  (``down``) and "coordinator.restart" recovers as after a crash.

The code (`Coordinator.close`) takes the narrowest of these paths: it lets phase 1
end by itself (the deadline bounds it) and waits for every started decision, so it
never abandons phase 1 or gives up on a write; the model also allows both, and
shows they would be safe too.

* ``bug="close_cancels_write"`` is the code before issue 8: the grace ends in
  ``writing`` too, the decision task is cancelled (``orphaned``: `_in_flight`
  cleared, `_committed` never set), the record lands, GetOutcome answers ABORTED
  until the server stops, a participant aborts, and the restart re-drives the
  COMMIT: an atomicity violation (15 steps).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tests.model.checker import (
    Bag,
    Step,
    check,
    in_flight,
    network_faults,
    print_counterexample,
    print_report,
    put,
    replace,
    take,
)

# Participant rows.
NONE, PREPARED, COMMITTED, ABORTED = "none", "PREPARED", "COMMITTED", "ABORTED"
# Votes.
COMMIT, ABORT, READ_ONLY = "COMMIT", "ABORT", "READ_ONLY"
YES = (COMMIT, READ_ONLY)
# GetOutcome answers (COMMITTED and ABORTED are spelt as the rows).
PENDING = "PENDING"
# Coordinator program counter.
INIT, PHASE1, VOTED, SENT_UNLOGGED, WRITING, UNCERTAIN, ORPHANED, LOGGED, PHASE2, ABORTING, DONE, DOWN, LOADING = (
    "init",
    "phase1",
    "voted",
    "sent_unlogged",
    "writing",
    "uncertain",
    "orphaned",
    "logged",
    "phase2",
    "aborting",
    "done",
    "down",
    "loading",
)
# GetOutcome says PENDING: `Coordinator._in_flight` (phase 1 and the decision write)
# and `_uncertain` (a decision write whose end the coordinator could not see).
_PENDING_PCS = (PHASE1, VOTED, SENT_UNLOGGED, WRITING, UNCERTAIN)
# Where the coordinator knows a COMMIT is in its log (`_committed`).
_KNOWS_COMMIT = (LOGGED, PHASE2, SENT_UNLOGGED)
# `Coordinator.close`: open, closing (no new run; work goes on), stopping (the grace
# is over: background work cancelled, GetOutcome still served).
OPEN, CLOSING, STOPPING = 0, 1, 2
# Decision log.
LOG_NONE, LOG_COMMIT, LOG_END = "none", "COMMIT", "END"

BUGS = (
    "commit_before_log",
    "outcome_aborted_in_flight",
    "outcome_before_load",
    "orphan_on_cancel",
    "close_cancels_write",
    "silent_cancel",
)
PROPERTIES = ("atomicity", "agreement", "validity")
PROMPT = "prompt"
"""Not a safety property of 2PC, checked on fault-free runs only: no participant
keeps a reservation that only its in-doubt query can release (`Model.left_for_query`)."""

Msg = tuple[str, int, str]
"""A message: (kind, participant index, value). Kinds to a participant: Prepare,
Commit, Abort, Outcome (value: the answer); to the coordinator: Vote (value: the
vote), Ack (value: "Commit:ok", "Commit:refused", "Abort:ok", "Abort:refused"),
GetOutcome."""

_TO_PARTICIPANT = frozenset({"Prepare", "Commit", "Abort", "Outcome"})


# --- a participant's row: the rules every model shares --------------------------------


def on_commit(row: str) -> tuple[str, bool]:
    """Commit: the row after it, and whether it is acknowledged (else refused)."""
    ok = row in (PREPARED, COMMITTED)
    return (COMMITTED if ok else row), ok


def on_abort(row: str) -> tuple[str, bool]:
    """Abort: the row after it (a tombstone for none), and whether it is acknowledged."""
    ok = row != COMMITTED
    return (ABORTED if ok else row), ok


def repeat_vote(row: str) -> str:
    """A repeated Prepare answers from the row, with no work: ABORT for a tombstone."""
    return ABORT if row == ABORTED else COMMIT


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
        closing: OPEN, CLOSING or STOPPING (`Coordinator.close`).
        closes: closes so far (bounded).
    """

    pc: str = INIT
    votes: tuple[str | None, ...] = ()
    acks: frozenset[int] = frozenset()
    refused: frozenset[int] = frozenset()
    targets: frozenset[int] = frozenset()
    log: str = LOG_NONE
    crashes: int = 0
    closing: int = OPEN
    closes: int = 0

    def fresh(self, pc: str, targets: frozenset[int] | None = None) -> CoordState:
        """At `pc` with nothing volatile but `targets` (by default those the log
        holds, durable with its COMMIT record); the log and the counters kept."""
        if targets is None:
            targets = self.targets if self.log != LOG_NONE else frozenset()
        return CoordState(pc, targets=targets, log=self.log, crashes=self.crashes, closes=self.closes)


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
    bag: Bag[Msg] = frozenset()
    dups: int = 0
    yes_voters: frozenset[int] = frozenset()
    ever_decided_commit: bool = False
    ever_logged_commit: bool = False

    def describe(self) -> str:
        """A one-line human reading of the state."""
        c = self.coord
        rows = " ".join(f"p{i}={p.row}{'' if p.up else '(down)'}" for i, p in enumerate(self.parts))
        msgs = ", ".join(f"{fmt_msg(m)}x{n}" if n > 1 else fmt_msg(m) for m, n in sorted(self.bag))
        closing = ("", " closing", " stopping")[c.closing]
        return f"coordinator={c.pc}{closing} log={c.log} | {rows} | net=[{msgs}]"


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
            docstring).
        shutdown: `Coordinator.close` may be called at any time (see the module
            docstring).
        max_closes: closes over a run, with ``shutdown``.
        faults: False takes away every fault (loss, duplication, crashes, power
            loss, a decision write outlasting `close`), whatever the bounds say;
            cancellations and closes remain. `PROMPT` is checked that way.
    """

    n_participants: int = 2
    read_only: int = 0
    bug: str | None = None
    max_coordinator_crashes: int = 2
    max_participant_crashes: int = 1
    max_dups: int = 1
    bag_cap: int = 2
    cancel_run: bool = False
    shutdown: bool = False
    max_closes: int = 1
    faults: bool = True

    def __post_init__(self) -> None:
        if self.n_participants < 2:
            raise ValueError("n_participants must be >= 2 (one branch is one-phase commit, not modelled)")
        if not 0 <= self.read_only <= self.n_participants:
            raise ValueError("read_only must be between 0 and n_participants")
        if self.bug is not None and self.bug not in BUGS:
            raise ValueError(f"unknown bug {self.bug!r}; known: {', '.join(BUGS)}")

    @property
    def known_properties(self) -> tuple[str, ...]:
        """The safety properties, and `PROMPT`."""
        return (*PROPERTIES, PROMPT)

    @property
    def default_properties(self) -> tuple[str, ...]:
        """The safety properties of 2PC."""
        return PROPERTIES

    @property
    def split_write(self) -> bool:
        """Whether the COMMIT write takes three steps (submitted, on disk, returned):
        only what may happen in between (a cancellation, a close) needs them."""
        return self.cancel_run or self.shutdown

    def coordinator_crashes(self) -> int:
        """Crashes the coordinator may have over a run."""
        return self.max_coordinator_crashes if self.faults else 0

    def participant_crashes(self) -> int:
        """Crashes each participant may have over a run."""
        return self.max_participant_crashes if self.faults else 0

    # --- states ------------------------------------------------------------------

    def initial(self) -> State:
        """The state before `Coordinator.run`: nothing sent, nothing written."""
        return State(CoordState(), tuple(PartState() for _ in range(self.n_participants)))

    def is_read_only(self, p: int) -> bool:
        """Whether participant `p` is a read-only voter."""
        return p >= self.n_participants - self.read_only

    def violations(self, s: State, properties: Iterable[str] = PROPERTIES) -> list[str]:
        """The properties that `s` violates, in the order given."""
        rows = {p.row for p in s.parts}
        broken = {
            "atomicity": lambda: COMMITTED in rows and ABORTED in rows,
            "agreement": lambda: COMMITTED in rows and not s.ever_logged_commit,
            "validity": lambda: s.ever_decided_commit and len(s.yes_voters) < self.n_participants,
            PROMPT: lambda: any(self.left_for_query(s, i) for i in range(self.n_participants)),
        }
        return [name for name in properties if broken[name]()]

    def left_for_query(self, s: State, i: int) -> bool:
        """Whether participant `i` holds a reservation that only its in-doubt query
        can release: PREPARED, no Commit or Abort on its way to it, and a
        coordinator that will send it none (recovery re-drives only a COMMIT)."""
        if s.parts[i].row != PREPARED or in_flight(s.bag, ("Commit", i), ("Abort", i)):
            return False
        c = s.coord
        if c.log == LOG_COMMIT:
            return False
        if c.pc == DOWN or c.closing == STOPPING:
            return True
        if c.pc == ABORTING:
            return i not in c.targets
        return c.pc in (DONE, ORPHANED, UNCERTAIN)

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
        put(bag, self.bag_cap, *msgs)

    # --- transitions ---------------------------------------------------------------

    def successors(self, s: State) -> list[Step[State]]:
        """Every transition enabled in `s`."""
        out: list[Step[State]] = []
        self._coordinator_steps(s, out)
        for i in range(self.n_participants):
            self._participant_steps(s, i, out)
        if self.faults:
            out += network_faults(self, s.bag, s.dups, fmt_msg, lambda bag, dups: self._freeze(s, bag=bag, dups=dups))
        return out

    def _coordinator_steps(self, s: State, out: list[Step[State]]) -> None:
        c = s.coord
        if c.pc == DOWN:
            # The log is read before GetOutcome is served (UNAVAILABLE until then: a
            # question sent meanwhile is lost), except with ``outcome_before_load``.
            loading = self.bug == "outcome_before_load"
            out.append(
                ("coordinator.restart", self._freeze(s, c.fresh(LOADING)) if loading else self._recover(s), False)
            )
            return
        if c.pc == LOADING:
            out.append(("coordinator.log_loaded", self._recover(s), False))
        if c.closing == STOPPING:
            self._stopping_steps(s, out)
        else:
            self._working_steps(s, out)
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[0] not in _TO_PARTICIPANT:
                out.append(self._coordinator_receives(s, m))
        if self.shutdown:
            self._close_steps(s, out)
        if c.crashes < self.coordinator_crashes():
            if c.pc not in (INIT, DONE):
                out.append((_crash_name(c), self._freeze(s, c.fresh(DOWN)._replace(crashes=c.crashes + 1)), True))
            elif c.log == LOG_END:  # END is not forced: a power loss may take it back
                nc = c.fresh(DOWN)._replace(log=LOG_COMMIT, crashes=c.crashes + 1)
                out.append(("coordinator.power_loss", self._freeze(s, nc), True))

    def _recover(self, s: State) -> State:
        """Recovery (`__aenter__`): re-drive the COMMIT without END, if any."""
        c = s.coord
        if c.log != LOG_COMMIT:
            return self._freeze(s, c.fresh(DONE))
        bag = dict(s.bag)
        self._send(bag, *(("Commit", p, "") for p in sorted(c.targets)))
        return self._freeze(s, c.fresh(PHASE2), bag=bag)

    def _working_steps(self, s: State, out: list[Step[State]]) -> None:
        """What the coordinator does while open or closing (its work goes on)."""
        c = s.coord
        n = self.n_participants
        if c.pc == INIT:
            bag = dict(s.bag)
            self._send(bag, *(("Prepare", p, "") for p in range(n)))
            out.append(("coordinator.begin", self._freeze(s, c._replace(pc=PHASE1, votes=(None,) * n), bag=bag), False))
        elif c.pc == PHASE1:
            out.append(("coordinator.timeout", self._decide_abort(s), False))
            # `run` can be cancelled at its awaits: in phase 1, and (before the shield)
            # while the COMMIT write is queued.
            if self.cancel_run:
                out.append(("coordinator.run_cancelled", self._abandon_phase1(s), True))
        elif c.pc == VOTED:
            targets = frozenset(p for p, v in enumerate(c.votes) if v == COMMIT)
            if not targets:  # every branch read-only: nothing to log, nothing to send
                out.append(
                    ("coordinator.decide_commit(read_only)", self._freeze(s, c.fresh(DONE), decided=True), False)
                )
            elif self.bug == "commit_before_log":
                bag = dict(s.bag)
                self._send(bag, *(("Commit", p, "") for p in sorted(targets)))
                nc = c._replace(pc=SENT_UNLOGGED, votes=(), targets=targets)
                out.append(("coordinator.send_commits", self._freeze(s, nc, bag=bag, decided=True), False))
            elif self.split_write:  # the job is on the store's queue; the decision awaits it
                out.append(
                    (
                        "coordinator.log_submit",
                        self._freeze(s, c._replace(pc=WRITING, votes=(), targets=targets)),
                        False,
                    )
                )
            else:
                nc = c._replace(pc=LOGGED, votes=(), targets=targets, log=LOG_COMMIT)
                out.append(("coordinator.log_commit", self._freeze(s, nc, decided=True, logged=True), False))
        elif c.pc == WRITING:
            if c.log == LOG_COMMIT:  # the write returns: `_committed` knows it
                out.append(("coordinator.log_commit", self._freeze(s, c._replace(pc=LOGGED)), False))
            if self.cancel_run and self.bug == "orphan_on_cancel":
                out.append(("coordinator.run_cancelled", self._freeze(s, c._replace(pc=ORPHANED)), True))
        elif c.pc == SENT_UNLOGGED:
            nc = c._replace(pc=PHASE2, log=LOG_COMMIT)
            out.append(("coordinator.log_commit", self._freeze(s, nc, logged=True), False))
        elif c.pc == LOGGED:
            bag = dict(s.bag)
            self._send(bag, *(("Commit", p, "") for p in sorted(c.targets)))
            out.append(("coordinator.send_commits", self._freeze(s, c._replace(pc=PHASE2), bag=bag), False))
        elif c.pc == PHASE2:
            self._phase2_steps(s, out)
        elif c.pc == ABORTING:
            out.append(("coordinator.abort_give_up", self._freeze(s, c.fresh(DONE)), False))
            for p in sorted(c.targets):
                if not in_flight(s.bag, ("Abort", p), ("Ack", p, "Abort")):
                    bag = dict(s.bag)
                    self._send(bag, ("Abort", p, ""))
                    out.append((f"coordinator.retry_abort(p{p})", self._freeze(s, bag=bag), False))
        self._record_lands(s, out)

    def _phase2_steps(self, s: State, out: list[Step[State]]) -> None:
        c = s.coord
        if c.acks == c.targets:
            out.append(("coordinator.log_end", self._freeze(s, c.fresh(DONE)._replace(log=LOG_END)), False))
        for p in sorted(c.targets - c.acks - c.refused):
            if not in_flight(s.bag, ("Commit", p), ("Ack", p, "Commit")):
                bag = dict(s.bag)
                self._send(bag, ("Commit", p, ""))
                out.append((f"coordinator.retry_commit(p{p})", self._freeze(s, bag=bag), False))

    def _record_lands(self, s: State, out: list[Step[State]]) -> None:
        """The store's thread commits a submitted COMMIT record, whatever became of
        the task that awaits it."""
        c = s.coord
        if c.pc in (WRITING, UNCERTAIN, ORPHANED) and c.log == LOG_NONE:
            landed = self._freeze(s, c._replace(log=LOG_COMMIT), decided=True, logged=True)
            out.append(("coordinator.record_lands", landed, False))

    def _stopping_steps(self, s: State, out: list[Step[State]]) -> None:
        """The grace is over: only a submitted record may still land, then the
        server stops (GetOutcome is answered until then)."""
        self._record_lands(s, out)
        c = s.coord
        out.append(("coordinator.stop", self._freeze(s, c.fresh(DOWN)), False))

    def _close_steps(self, s: State, out: list[Step[State]]) -> None:
        """`Coordinator.close`: refuses new runs at once; after the grace period the
        background work is cancelled; a started decision write is waited for."""
        c = s.coord
        if c.closing == OPEN and c.closes < self.max_closes:
            nc = c._replace(closing=CLOSING, closes=c.closes + 1)
            if c.pc == INIT:  # `run` refused: the transaction never begins
                nc = nc.fresh(DONE)._replace(closing=CLOSING)
            out.append(("coordinator.close", self._freeze(s, nc), True))
            return
        if c.closing != CLOSING:
            return
        if c.pc == WRITING:
            if self.bug == "close_cancels_write":  # the task is cancelled; the record still lands
                out.append(
                    ("coordinator.grace_over", self._freeze(s, c._replace(pc=ORPHANED, closing=STOPPING)), False)
                )
            elif self.faults:  # the write outlasts any grace: only a restart can tell
                nc = c._replace(pc=UNCERTAIN, closing=STOPPING)
                out.append(("coordinator.write_outlasts_close", self._freeze(s, nc), True))
            return
        if c.pc == VOTED:  # no await between the last vote and the write: it has started
            return
        if c.pc == PHASE1:  # the run is cancelled
            stopped = self._abandon_phase1(s)
            nc = stopped.coord.fresh(DONE)._replace(closing=STOPPING)
        elif c.pc in (LOGGED, PHASE2, SENT_UNLOGGED):  # phase 2 cancelled; recovery resumes it
            stopped, nc = s, c._replace(pc=PHASE2, closing=STOPPING)
        else:  # INIT never (refused), ABORTING (retries cancelled), DONE, UNCERTAIN, ORPHANED
            nc = c.fresh(DONE) if c.pc == ABORTING else c.fresh(c.pc, c.targets)
            stopped, nc = s, nc._replace(closing=STOPPING)
        out.append(("coordinator.grace_over", self._freeze(stopped, nc, bag=dict(stopped.bag)), False))

    def _abandon_phase1(self, s: State) -> State:
        """A run cancelled in phase 1: Abort to every branch (issue 8), or, with
        ``silent_cancel``, nothing (the branches wait for their in-doubt query)."""
        if self.bug == "silent_cancel":
            return self._freeze(s, s.coord.fresh(DONE))
        return self._decide_abort(s)

    def _decide_abort(self, s: State, bag: dict[Msg, int] | None = None) -> State:
        """ABORT: Abort to every branch that did not vote READ_ONLY, nothing logged."""
        c = s.coord
        bag = dict(s.bag) if bag is None else bag
        targets = frozenset(p for p, v in enumerate(c.votes) if v != READ_ONLY)
        self._send(bag, *(("Abort", p, "") for p in sorted(targets)))
        return self._freeze(s, c.fresh(ABORTING, targets)._replace(closing=c.closing), bag=bag)

    def _coordinator_receives(self, s: State, m: Msg) -> Step[State]:
        c = s.coord
        kind, p, value = m
        bag = take(s.bag, m)
        name = f"coordinator.recv {fmt_msg(m)}"
        if kind == "Vote":  # only useful ones are in the bag: phase 1, first vote of p
            if value == ABORT:
                return name, self._decide_abort(s, bag), False
            votes = replace(c.votes, p, value)
            pc = VOTED if all(v is not None for v in votes) else PHASE1
            return name, self._freeze(s, c._replace(pc=pc, votes=votes), bag=bag), False
        if kind == "Ack":
            result = value.split(":")[1]
            # Only Commit answers are in the bag (see `_useful`).
            nc = c._replace(acks=c.acks | {p}) if result == "ok" else c._replace(refused=c.refused | {p})
            return name, self._freeze(s, nc, bag=bag), False
        # GetOutcome, answered from memory (`_committed`, `_in_flight`, `_uncertain`).
        if (c.log == LOG_COMMIT and c.pc in _KNOWS_COMMIT) or c.log == LOG_END:
            answer = COMMITTED
        elif c.pc in _PENDING_PCS and self.bug != "outcome_aborted_in_flight":
            answer = PENDING
        else:
            answer = ABORTED
        if answer != PENDING:
            self._send(bag, ("Outcome", p, answer))
        return f"coordinator.outcome(p{p}):{answer}", self._freeze(s, bag=bag), False

    def _participant_steps(self, s: State, i: int, out: list[Step[State]]) -> None:
        part = s.parts[i]
        if not part.up:
            out.append((f"p{i}.restart", self._freeze(s, parts=replace(s.parts, i, part._replace(up=True))), False))
            return
        if part.unsynced and part.crashes < self.participant_crashes():
            lost = PartState(part.unsynced, up=False, crashes=part.crashes + 1)
            out.append((f"p{i}.power_loss", self._freeze(s, parts=replace(s.parts, i, lost)), True))
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[1] == i and m[0] in _TO_PARTICIPANT:
                self._participant_receives(s, i, m, out)
        if part.row == PREPARED and s.coord.pc != DOWN and not in_flight(s.bag, ("GetOutcome", i), ("Outcome", i)):
            bag = dict(s.bag)
            self._send(bag, ("GetOutcome", i, ""))
            out.append((f"p{i}.ask_outcome", self._freeze(s, bag=bag), False))

    def _participant_receives(self, s: State, i: int, m: Msg, out: list[Step[State]]) -> None:
        part = s.parts[i]
        kind, _, value = m
        bag = take(s.bag, m)
        if kind == "Prepare":
            if part.row != NONE:  # a repeated Prepare: the same answer from the row, no work
                vote = repeat_vote(part.row)
                self._reply_vote(s, i, bag, vote, f"p{i}.prepare(repeat):{vote}", out)
                return
            if self.is_read_only(i):
                self._reply_vote(s, i, bag, READ_ONLY, f"p{i}.prepare:{READ_ONLY}", out)
            else:
                parts = replace(s.parts, i, part._replace(row=PREPARED))
                self._reply_vote(s, i, bag, COMMIT, f"p{i}.prepare:{COMMIT}", out, parts)
                if part.crashes < self.participant_crashes():
                    dead = replace(s.parts, i, PartState(PREPARED, up=False, crashes=part.crashes + 1))
                    out.append((f"participant.after_prepare_durable@p{i}", self._freeze(s, parts=dead, bag=bag), True))
            self._reply_vote(s, i, bag, ABORT, f"p{i}.prepare:{ABORT}", out)
            return
        if kind == "Outcome":  # only useful ones are in the bag: the participant is PREPARED
            if value == COMMITTED:
                parts = replace(s.parts, i, part._replace(row=COMMITTED, unsynced=""))
            else:
                parts = replace(s.parts, i, part._replace(row=ABORTED, unsynced=PREPARED))
            out.append((f"p{i}.apply_outcome:{value}", self._freeze(s, parts=parts, bag=bag), False))
            return
        # Commit or Abort: idempotent, refused (unchanged) when the row forbids it.
        # A commit is forced to disk (and with it any earlier write); an abort is not.
        if kind == "Commit":
            row, ok = on_commit(part.row)
            new = part._replace(row=row, unsynced="") if ok else part
        else:
            row, ok = on_abort(part.row)
            new = part if not ok or part.row == ABORTED else part._replace(row=row, unsynced=part.row)
        result = "ok" if ok else "refused"
        self._send(bag, ("Ack", i, f"{kind}:{result}"))
        parts = replace(s.parts, i, new)
        out.append((f"p{i}.{kind.lower()}:{result}", self._freeze(s, parts=parts, bag=bag), False))

    def _reply_vote(
        self,
        s: State,
        i: int,
        bag: dict[Msg, int],
        vote: str,
        name: str,
        out: list[Step[State]],
        parts: tuple[PartState, ...] | None = None,
    ) -> None:
        bag = dict(bag)
        self._send(bag, ("Vote", i, vote))
        yes = s.yes_voters | {i} if vote in YES else s.yes_voters
        out.append((name, self._freeze(s, parts=parts, bag=bag, yes_voters=yes), False))


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
        # after it succeeded (harmless: Abort is idempotent). Once stopping, phase 2
        # is cancelled and no answer counts.
        live = c.pc in (PHASE2, SENT_UNLOGGED) and c.closing != STOPPING
        return value.startswith("Commit") and live and p not in (c.acks | c.refused)
    return True  # GetOutcome to a running coordinator


# --- command line --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Checks the protocol, finds every broken variant's counterexample, then checks
    what a cancelled `Coordinator.run` and `Coordinator.close` do.

    Args:
        argv: the command line arguments (``sys.argv[1:]`` by default).

    Returns:
        The exit status: 0 if the protocol holds and every bug is found.
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
        ok &= print_report(str(model), check(model))
    for title, model in VARIANTS.items():
        ok &= print_report(f"\n{title}: {model}", check(model))
    for bug, model in BROKEN.items():
        for props in (PROPERTIES, ("atomicity",)):
            r = check(model, properties=props, liveness=False)
            ok &= print_counterexample(f"bug={bug}, checking {', '.join(props)}", r)
    for title, model in PROMPTNESS.items():
        r = check(model, properties=(PROMPT,), liveness=False)
        if model.bug is None:
            ok &= print_report(f"\n{title}, checking {PROMPT}: {model}", r)
        else:
            ok &= print_counterexample(f"{title}, checking {PROMPT}", r)
    return 0 if ok else 1


VARIANTS = {
    "callers cancelling run": Model(2, cancel_run=True),
    "close at any time": Model(2, shutdown=True),
}
"""The protocol with what may befall it besides faults: each must be safe and live."""

BROKEN = {
    "commit_before_log": Model(2, bug="commit_before_log"),
    "outcome_aborted_in_flight": Model(2, bug="outcome_aborted_in_flight"),
    "outcome_before_load": Model(2, bug="outcome_before_load"),
    "orphan_on_cancel": Model(2, cancel_run=True, bug="orphan_on_cancel"),
    "close_cancels_write": Model(2, shutdown=True, bug="close_cancels_write"),
}
"""Each broken variant, set up so that it can show its bug."""

PROMPTNESS = {
    "a cancelled run or a close, no faults": Model(2, cancel_run=True, shutdown=True, faults=False),
    "bug=silent_cancel, no faults": Model(2, cancel_run=True, faults=False, bug="silent_cancel"),
}
"""`PROMPT`, on fault-free runs: the fix of issue 8 keeps it, the old code does not."""


if __name__ == "__main__":
    sys.exit(main())
