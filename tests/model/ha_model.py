"""Two coordinator instances sharing one decision log in a database: leases,
takeover and fencing (issue 11; rules 9-12 of docs/design.md), checked before the code.

Instance I0 runs transaction T over participants p0 and p1; instance I1 shares the
decision log (a database, PostgreSQL in the code) and takes I0's work over when
I0's lease expires. Participants ask GetOutcome of either instance, and of F, an
instance on a log of its own that they were told to ask too (a mistyped schema, a
coordinator on a file listed as a peer). The checker,
properties and liveness goal are those of `twopc_model` (atomicity, agreement with
the log, validity; once faults stop, nobody stays PREPARED and no COMMIT stays
without END).

The rules the implementation must keep
--------------------------------------
1. Lease rows. Every instance has a row in the database: (instance id, epoch,
   expiry). An instance holds its row at the epoch it read when it took the row,
   and renews the expiry while it runs (a renewal checks the epoch too). A
   transaction belongs to the instance that began it, and its id names that
   instance ("<instance id>:<local id>"). A row's epoch moves only on takeover,
   and never back: an instance that finds its row taken over (a fenced write, a
   renewal that finds another epoch) stops deciding for good and exits; a
   restarted process is a new instance with a new row.
2. Fencing, by the database. The COMMIT record is written in one database
   transaction that also checks the writer's lease row still has the epoch the
   writer holds (``SELECT epoch ... FOR SHARE`` or an ``UPDATE ... WHERE epoch =
   held`` on the row, then the INSERT, one commit); if the epoch moved, nothing
   is written. The check must lock the row: a plain SELECT lets a takeover bump
   the epoch and read the records between the check and the INSERT's commit. No
   local clock, no earlier check: a pause or a partition can fall between any
   check and the write, and only the database sees the epoch at the commit. The
   model takes the check and the write as one atomic step, which the lock gives.
3. Takeover. An instance may take over a row whose expiry has passed (by the
   database's clock): it bumps the row's epoch first, then reads that instance's
   COMMIT records without END (in the same database transaction, or after it
   commits, never before the bump), and drives each to the end (Commit to every
   target, retried; END). Ownership changes are logged.
4. GetOutcome, by any instance, from the shared log: COMMITTED if T's record is
   COMMIT (with or without END); ABORTED if it is ABORT (rule 5). The owner
   answers PENDING while T is in flight there (phase 1, the write), else ABORTED:
   it is T's only writer, so an abort it never logged ends. Another instance
   answers PENDING while the owner's row has not been taken over (expired but not
   yet taken over counts as live: the owner may still write), and ABORTED once it
   has (the owner is fenced and can never write it). An instance that cannot
   reach the database answers nothing (UNAVAILABLE) and the participant asks
   another.
5. A COMMIT write whose result the writer did not see (a connection lost, a
   client timeout, a partition) may still be pending in the database, so "no
   record" when reading back does not mean "aborted". The writer settles it by
   inserting an ABORT record under the same key (T's id; ``INSERT ... ON
   CONFLICT DO NOTHING``, then reading the row): whichever commits first wins,
   and a late COMMIT fails on the key. It then follows the row (COMMIT: phase 2;
   ABORT: Abort to the branches), and sends nothing for T before that.
6. END needs no fencing: it is written only after every target acknowledged, and
   two instances driving the same COMMIT (the fenced owner and the taker) send
   idempotent Commits.
7. Whose answer counts. An instance answers ABORTED only for an owner its log
   knows: F's log never knew I0, so F answers PENDING. Every answer names its log,
   and a participant applies COMMITTED or ABORTED only from the owner's log: F's
   answers are refused. Either half alone is enough here; the code keeps both.

What is modelled
----------------
* Database: I0's lease row (epoch 0 as I0 holds it; 1 once taken over; the
  expiry a boolean "expired" that the environment may set at any time, since
  there are no clocks - once set it stays: a renewal in time is a lease that had
  not expired yet; it is a fault while I0 runs and reaches the database, since a
  live owner renews, and free once I0 is down or cut off), T's decision record (none, COMMIT, END, ABORT), and I0's
  COMMIT write: "db.commit_write" runs it with the fence and key checks ("...:
  fenced", "...:conflict" when they refuse it); "db.drop_write", while I0 is
  partitioned, loses it or its result.
* I0: phase 1 as in `twopc_model` (votes, ABORT vote or timeout aborts with Abort
  to both); "I0.log_submit" sends the write (I0 must reach the database);
  "I0.write_returns" follows the write's result once it ran; "I0.read_back"
  settles it without a result (rule 5), at any time while I0 reaches the
  database, even while the write is still pending; phase 2 retried; END.
  "I0.crash" (once): I0 is gone for good.
* I1: "I1.takeover(I0)" when I0's lease expired and I1 reaches the database
  (rule 3); then phase 2 for T if T's COMMIT was logged.
* F: answers GetOutcome from its own log (rule 7); never crashes or decides.
* Abort: retried by I0 for a while, then given up ("I0.abort_give_up", not a
  fault: the code stops after `abort_retry_s`); a lost Abort is a fault.
* Partitions: "Ij.cut" puts an instance out of reach of the database (once in a
  run, either instance); "Ij.heal" ends it. Participants stay reachable (a
  partition from the participants is message loss).
* Pauses: an instance that takes no step while the others take many is a pause;
  every interleaving is explored, so a pause of any length beyond the lease is
  there (between I0's last vote and its write, say). What a pause does to a local
  clock is what the broken variant ``no_fencing`` trusts.
* Participants as in `twopc_model` (durable rows, tombstones, repeated Prepare,
  in-doubt queries to either instance); no participant crashes (`twopc_model`
  checks those); messages may be lost and reordered.
* Not modelled: I1 crashing (it would need a third instance to take over from
  it: the same rules, one level up), transactions begun by I1, renewals.

Broken variants (``bug=``)
--------------------------
* ``"no_fencing"``: the write checks only the writer's local belief that its
  lease is live (a clock read before a pause): the database commits it whatever
  the epoch. I1 takes over, a participant learns ABORTED, then I0's COMMIT lands
  (atomicity, 14 steps).
* ``"aborted_on_expiry"``: GetOutcome answers ABORTED as soon as the owner's
  lease expired, before the epoch moved: the owner, slow but not fenced, still
  logs COMMIT (atomicity, 13 steps).
* ``"read_back_without_tombstone"``: the writer reads the record back without
  settling it, finds none while its write is still pending, and aborts; the write
  then lands (atomicity, 12 steps).
* ``"redrive_before_fence"``: the taker reads the records, then bumps the epoch.
  A COMMIT that lands in between is never re-driven: safe (GetOutcome says
  COMMITTED, so participants commit once they ask) but, with the owner gone, no
  instance drives it and it never gets its END: the liveness check finds it
  (10 steps).
* ``"aborted_for_unknown_owner"``, with ``check_log=False`` (the code before rule
  12 at both ends): F answers ABORTED for an owner its log never knew, and the
  participant believes it; I0 then commits (atomicity, 12 steps). With either
  defence left in place the model finds nothing.
* ``"owner_pending_for_its_aborts"``: the owner answers an abort it never logged
  from the lease (PENDING while it lives), as the PostgreSQL log did. An Abort lost
  past its retries leaves a participant PREPARED for as long as the owner lives:
  the liveness check finds it (5 steps).

Where the model and the code parted ways, and why it missed that last one: the
lease used to expire as an ordinary step at any time, so from the stuck state
above a takeover (epoch moved: ABORTED) was always one fault-free step away. In
the code a live owner renews for ever. Now expiry is a fault while the owner runs,
and the owner's answer for its own ids is modelled as the code gives it.

Measured (``python -m tests.model.ha_model``): the rules above, 114,972 states in
about 10 s of CPU, no violation, nothing stuck (before F and the rule 7 answers:
70,340 states).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
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
from tests.model.twopc_model import (
    ABORT,
    ABORTED,
    ABORTING,
    COMMIT,
    COMMITTED,
    DONE,
    INIT,
    LOG_COMMIT,
    LOG_END,
    NONE,
    PENDING,
    PHASE1,
    PHASE2,
    PREPARED,
    PROPERTIES,
    VOTED,
    WRITING,
    CoordState,
    on_abort,
    on_commit,
    repeat_vote,
)

BUGS = (
    "no_fencing",
    "aborted_on_expiry",
    "read_back_without_tombstone",
    "redrive_before_fence",
    "aborted_for_unknown_owner",
    "owner_pending_for_its_aborts",
)
LOG_ABORT = "ABORT"
"""The record rule 5 writes to settle a COMMIT write whose result was not seen."""
NO_WRITE, PENDING_WRITE, DONE_WRITE, LOST_WRITE = "", "pending", "done", "lost"
SCANNED = "scanned"
"""I1 with ``redrive_before_fence``: it read I0's records, and has not bumped the epoch."""
OWNER, TAKER, FOREIGN = 0, 1, 2
"""I0 and I1 share the log; F (index 2) is an instance on a log of its own."""
N_PARTICIPANTS = 2

Msg = tuple[str, int, int, str]
"""(kind, participant, instance, value). To participant p from instance j: Prepare,
Commit, Abort, Outcome. To j from p: Vote, Ack ("Commit:ok"/"Commit:refused"),
GetOutcome."""

_TO_PARTICIPANT = frozenset({"Prepare", "Commit", "Abort", "Outcome"})


class Db(NamedTuple):
    """The shared database.

    Attributes:
        epoch: the epoch of I0's lease row (I0 holds 0; a takeover makes it 1).
        expired: I0's lease expiry has passed.
        log: T's decision record: none, COMMIT, END, or ABORT (rule 5).
        write: I0's COMMIT write: none, pending in the database, done (its result
            on its way to I0), or lost (the connection dropped before it ran or
            before its result reached I0).
    """

    epoch: int = 0
    expired: bool = False
    log: str = NONE
    write: str = NO_WRITE


class State(NamedTuple):
    """Instances, database, participants, network, and the ghosts of the properties.

    Attributes:
        insts: I0 then I1: their work on T (`twopc_model.CoordState`: pc, votes,
            acks, refused, targets; its log and counters unused).
        up: per instance, running (False after a crash, for good).
        cut: per instance, partitioned from the database.
        db: the database.
        rows: the participants' rows for T.
        bag: the messages in flight.
        crashes: instance crashes so far.
        partitions: partitions so far.
        yes_voters: ghost: participants that ever voted COMMIT.
        ever_logged_commit: ghost: the database held T's COMMIT at some point.
    """

    insts: tuple[CoordState, ...]
    up: tuple[bool, ...]
    cut: tuple[bool, ...]
    db: Db
    rows: tuple[str, ...]
    bag: Bag[Msg] = frozenset()
    crashes: int = 0
    partitions: int = 0
    yes_voters: frozenset[int] = frozenset()
    ever_logged_commit: bool = False

    def describe(self) -> str:
        """A one-line human reading of the state."""
        insts = " ".join(
            f"I{j}={c.pc}{'' if self.up[j] else '(down)'}{'(cut)' if self.cut[j] else ''}"
            for j, c in enumerate(self.insts)
        )
        db = self.db
        lease = f"lease(I0)=epoch {db.epoch}{' expired' if db.expired else ''}"
        rows = " ".join(f"p{p}={r}" for p, r in enumerate(self.rows))
        msgs = ", ".join(fmt_msg(m) + (f"x{n}" if n > 1 else "") for m, n in sorted(self.bag))
        write = f" write {db.write}" if db.write else ""
        return f"{insts} | db: {lease} log={db.log}{write} | {rows} | net=[{msgs}]"


def fmt_msg(m: Msg) -> str:
    """``Kind(pN,Ij)`` or ``Kind(pN,Ij,value)`` (``F`` for the foreign instance)."""
    kind, p, j, value = m
    return f"{kind}(p{p},{_name(j)}{',' + value if value else ''})"


@dataclass(frozen=True)
class Model:
    """Two instances, one shared log, one transaction, two participants.

    Attributes:
        bug: None for the rules above, or one of `BUGS`.
        check_log: participants take a decided answer only from the owner's log
            (rule 7); False believes any instance asked, as before rule 12.
        foreign: F, an instance on another log, is among the addresses asked.
        max_crashes: crashes of I0 (the owner) over a run.
        max_partitions: partitions from the database over a run (either instance).
        bag_cap: copies of one message the network holds at most (messages are
            lost and reordered, not duplicated: `twopc_model` checks duplicates).
    """

    bug: str | None = None
    check_log: bool = True
    foreign: bool = True
    max_crashes: int = 1
    max_partitions: int = 1
    bag_cap: int = 2
    max_dups = 0  # not a field: duplication is `twopc_model`'s to check

    def __post_init__(self) -> None:
        if self.bug is not None and self.bug not in BUGS:
            raise ValueError(f"unknown bug {self.bug!r}; known: {', '.join(BUGS)}")

    known_properties = default_properties = PROPERTIES

    def initial(self) -> State:
        """I0 about to begin T; I1 standing by; every lease live."""
        n = N_PARTICIPANTS
        return State((CoordState(), CoordState()), (True, True), (False, False), Db(), (NONE,) * n)

    def violations(self, s: State, properties: Iterable[str] = PROPERTIES) -> list[str]:
        """The properties that `s` violates, in the order given."""
        rows = set(s.rows)
        broken = {
            "atomicity": lambda: COMMITTED in rows and ABORTED in rows,
            "agreement": lambda: COMMITTED in rows and not s.ever_logged_commit,
            "validity": lambda: s.ever_logged_commit and len(s.yes_voters) < N_PARTICIPANTS,
        }
        return [name for name in properties if broken[name]()]

    def is_terminal(self, s: State) -> bool:
        """Nobody in doubt, and no COMMIT left without END."""
        return s.db.log != LOG_COMMIT and PREPARED not in s.rows

    def _freeze(self, s: State, **changes: object) -> State:
        """The next state, dropping the messages that can no longer matter."""
        t = s._replace(**changes)  # type: ignore[arg-type]  # field names and types as in `State`
        kept = frozenset((m, n) for m, n in t.bag if n > 0 and _useful(m, t))
        return t._replace(bag=kept)

    def _bag(self, s: State, *msgs: Msg, bag: dict[Msg, int] | None = None) -> frozenset[tuple[Msg, int]]:
        b = dict(s.bag) if bag is None else bag
        put(b, self.bag_cap, *msgs)
        return frozenset(b.items())

    def _inst(self, s: State, j: int, c: CoordState, **changes: object) -> State:
        return self._freeze(s, insts=replace(s.insts, j, c), **changes)

    # --- transitions ---------------------------------------------------------------

    def successors(self, s: State) -> list[Step[State]]:
        """Every transition enabled in `s`."""
        out: list[Step[State]] = []
        if s.up[OWNER]:
            self._owner_steps(s, out)
        if s.up[TAKER]:
            self._taker_steps(s, out)
        for j in (OWNER, TAKER):
            if s.up[j]:
                self._partition_steps(s, j, out)
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[0] not in _TO_PARTICIPANT:
                out.append(self._instance_receives(s, m))
        for p in range(N_PARTICIPANTS):
            self._participant_steps(s, p, out)
        self._database_steps(s, out)
        out += network_faults(self, s.bag, 0, fmt_msg, lambda bag, _: self._freeze(s, bag=frozenset(bag.items())))
        return out

    def _owner_steps(self, s: State, out: list[Step[State]]) -> None:
        c, db, cut = s.insts[OWNER], s.db, s.cut[OWNER]
        if c.pc == INIT:
            bag = self._bag(s, *(("Prepare", p, OWNER, "") for p in range(N_PARTICIPANTS)))
            out.append(
                (
                    "I0.begin",
                    self._inst(s, OWNER, c._replace(pc=PHASE1, votes=(None,) * N_PARTICIPANTS), bag=bag),
                    False,
                )
            )
        elif c.pc == PHASE1:
            out.append(("I0.timeout", self._abort(s), False))
        elif c.pc == VOTED and not cut:
            nc = c._replace(pc=WRITING, votes=(), targets=frozenset(range(N_PARTICIPANTS)))
            out.append(("I0.log_submit", self._inst(s, OWNER, nc, db=db._replace(write=PENDING_WRITE)), False))
        elif c.pc == WRITING and not cut:
            self._settle_write(s, out)
        elif c.pc in (PHASE2, ABORTING):
            self._phase2_steps(s, OWNER, out)
        if s.crashes < self.max_crashes:
            up = replace(s.up, OWNER, False)
            out.append(("I0.crash", self._freeze(s, up=up, crashes=s.crashes + 1), True))

    def _settle_write(self, s: State, out: list[Step[State]]) -> None:
        """I0 learns what became of its COMMIT write: from its result, or (rule 5)
        by settling it with an ABORT record under the same key."""
        db = s.db
        if db.write == DONE_WRITE:  # the result came back: committed, or fenced
            settled = s._replace(db=db._replace(write=NO_WRITE))
            if db.log == LOG_COMMIT:
                out.append(("I0.write_returns:COMMIT", self._start_phase2(settled, OWNER), False))
            else:
                out.append(("I0.write_returns:fenced", self._abort(settled), False))
            return
        # No result (the connection was lost, or the client gave up waiting): the
        # write may still be pending in the database.
        if self.bug != "read_back_without_tombstone" and db.log == NONE:
            db = db._replace(log=LOG_ABORT)  # INSERT ... ON CONFLICT DO NOTHING: first commit wins
        settled = s._replace(db=db._replace(write=NO_WRITE if db.write == LOST_WRITE else db.write))
        if db.log == LOG_COMMIT:
            out.append(("I0.read_back:COMMIT", self._start_phase2(settled, OWNER), False))
        else:
            out.append((f"I0.read_back:{'ABORT' if db.log == LOG_ABORT else 'none'}", self._abort(settled), False))

    def _taker_steps(self, s: State, out: list[Step[State]]) -> None:
        c, db = s.insts[TAKER], s.db
        if s.cut[TAKER] or not db.expired or db.epoch != 0:
            pass
        elif c.pc == INIT and self.bug == "redrive_before_fence":
            scanned = c._replace(
                pc=SCANNED, targets=frozenset(range(N_PARTICIPANTS)) if db.log == LOG_COMMIT else frozenset()
            )
            out.append(("I1.read_records(I0)", self._inst(s, TAKER, scanned), False))
        elif c.pc in (INIT, SCANNED):
            # Rule 3: bump the epoch first, then read I0's COMMIT records without END.
            taken = s._replace(db=db._replace(epoch=1))
            found = bool(c.targets) if c.pc == SCANNED else db.log == LOG_COMMIT
            if found:
                out.append(("I1.takeover(I0):redrive", self._start_phase2(taken, TAKER), False))
            else:
                out.append(
                    ("I1.takeover(I0)", self._inst(taken, TAKER, c._replace(pc=DONE, targets=frozenset())), False)
                )
        if c.pc == PHASE2:
            self._phase2_steps(s, TAKER, out)

    def _start_phase2(self, s: State, j: int) -> State:
        targets = frozenset(range(N_PARTICIPANTS))
        bag = self._bag(s, *(("Commit", p, j, "") for p in sorted(targets)))
        return self._inst(s, j, CoordState(PHASE2, targets=targets), bag=bag)

    def _abort(self, s: State, bag: dict[Msg, int] | None = None) -> State:
        targets = frozenset(range(N_PARTICIPANTS))
        bag2 = self._bag(s, *(("Abort", p, OWNER, "") for p in sorted(targets)), bag=bag)
        return self._inst(s, OWNER, CoordState(ABORTING, targets=targets), bag=bag2)

    def _phase2_steps(self, s: State, j: int, out: list[Step[State]]) -> None:
        """Commit (or Abort) retried to each target; END once every Commit is acknowledged."""
        c, name = s.insts[j], f"I{j}"
        kind = "Commit" if c.pc == PHASE2 else "Abort"
        if c.pc == PHASE2 and c.acks == c.targets and not s.cut[j]:
            log = LOG_END if s.db.log == LOG_COMMIT else s.db.log
            out.append((f"{name}.log_end", self._inst(s, j, c._replace(pc=DONE), db=s.db._replace(log=log)), False))
        if c.pc == ABORTING:
            out.append((f"{name}.abort_give_up", self._inst(s, j, c._replace(pc=DONE)), False))
        for p in sorted(c.targets - c.acks - c.refused):
            if not in_flight(s.bag, (kind, p, j), ("Ack", p, j)):
                bag = self._bag(s, (kind, p, j, ""))
                out.append((f"{name}.retry_{kind.lower()}(p{p})", self._freeze(s, bag=bag), False))

    def _partition_steps(self, s: State, j: int, out: list[Step[State]]) -> None:
        if s.cut[j]:
            out.append((f"I{j}.heal", self._freeze(s, cut=replace(s.cut, j, False)), False))
        elif s.partitions < self.max_partitions:
            cut = replace(s.cut, j, True)
            out.append((f"I{j}.cut", self._freeze(s, cut=cut, partitions=s.partitions + 1), True))

    def _database_steps(self, s: State, out: list[Step[State]]) -> None:
        db = s.db
        if not db.expired:
            # No clocks: I0's lease may expire at any time. Its expiry is no fault once
            # I0 stopped renewing it (down, or cut off from the database); while I0
            # runs and reaches the database it renews, and only a pause or a renewal
            # slower than the lease (a fault) lets it expire. Taking every expiry as
            # free let the liveness check escape through a takeover that a live owner
            # never suffers: it missed an abort held PENDING for the owner's life.
            renewing = s.up[OWNER] and not s.cut[OWNER]
            out.append(("lease(I0).expires", self._freeze(s, db=db._replace(expired=True)), renewing))
        if db.write == PENDING_WRITE:
            # Rule 2: the write and the fence check commit together, or nothing does;
            # the record's key is T's id, so a settled T (rule 5) refuses it too.
            waiting = s.up[OWNER] and s.insts[OWNER].pc == WRITING
            result = DONE_WRITE if waiting else NO_WRITE
            if db.log != NONE:
                out.append(("db.commit_write:conflict", self._freeze(s, db=db._replace(write=result)), False))
            elif db.epoch != 0 and self.bug != "no_fencing":
                out.append(("db.commit_write:fenced", self._freeze(s, db=db._replace(write=result)), False))
            else:
                nd = db._replace(write=result, log=LOG_COMMIT)
                out.append(("db.commit_write", self._freeze(s, db=nd, ever_logged_commit=True), False))
        if db.write in (PENDING_WRITE, DONE_WRITE) and s.cut[OWNER]:
            # The partition breaks the connection: the write never runs, or its
            # result never reaches I0.
            out.append(("db.drop_write", self._freeze(s, db=db._replace(write=LOST_WRITE)), True))

    def _instance_receives(self, s: State, m: Msg) -> Step[State]:
        kind, p, j, value = m
        if j == FOREIGN:
            return self._foreign_answers(s, m)
        c, bag = s.insts[j], take(s.bag, m)
        name = f"I{j}.recv {fmt_msg(m)}"
        if kind == "Vote":  # I0 in phase 1, first vote of p (see `_useful`)
            if value == ABORT:
                return name, self._abort(s, bag), False
            votes = replace(c.votes, p, value)
            pc = VOTED if all(v is not None for v in votes) else PHASE1
            return name, self._inst(s, j, c._replace(pc=pc, votes=votes), bag=frozenset(bag.items())), False
        if kind == "Ack":
            nc = c._replace(acks=c.acks | {p}) if value == "Commit:ok" else c._replace(refused=c.refused | {p})
            return name, self._inst(s, j, nc, bag=frozenset(bag.items())), False
        # GetOutcome, from the shared log (rule 4).
        if s.cut[j]:
            return f"I{j}.outcome(p{p}):UNAVAILABLE", self._freeze(s, bag=frozenset(bag.items())), False
        db = s.db
        if j == OWNER and c.pc in (PHASE1, VOTED, WRITING):
            answer = PENDING  # in flight: memory first
        elif db.log in (LOG_COMMIT, LOG_END):
            answer = COMMITTED
        elif db.log == LOG_ABORT:
            answer = ABORTED
        elif j == OWNER and self.bug != "owner_pending_for_its_aborts":
            answer = ABORTED  # rule 4: its own id, not in flight: it will never log it
        elif db.epoch == 0 and not (db.expired and self.bug == "aborted_on_expiry"):
            answer = PENDING
        else:
            answer = ABORTED
        new_bag = self._bag(s, *([("Outcome", p, j, answer)] if answer != PENDING else []), bag=bag)
        return f"I{j}.outcome(p{p}):{answer}", self._freeze(s, bag=new_bag), False

    def _foreign_answers(self, s: State, m: Msg) -> Step[State]:
        """F reads its own log, which never knew I0 (rule 7): PENDING, it cannot
        tell; or, with ``aborted_for_unknown_owner``, ABORTED (presumed abort)."""
        _, p, _, _ = m
        bag = take(s.bag, m)
        answer = ABORTED if self.bug == "aborted_for_unknown_owner" else PENDING
        new_bag = self._bag(s, *([("Outcome", p, FOREIGN, answer)] if answer != PENDING else []), bag=bag)
        return f"F.outcome(p{p}):{answer}", self._freeze(s, bag=new_bag), False

    def _participant_steps(self, s: State, p: int, out: list[Step[State]]) -> None:
        row = s.rows[p]
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[1] == p and m[0] in _TO_PARTICIPANT:
                self._participant_receives(s, p, m, out)
        if row == PREPARED and not in_flight(s.bag, ("GetOutcome", p), ("Outcome", p)):
            for j in (OWNER, TAKER):
                if s.up[j]:
                    bag = self._bag(s, ("GetOutcome", p, j, ""))
                    out.append((f"p{p}.ask_outcome(I{j})", self._freeze(s, bag=bag), False))
            if self.foreign:
                bag = self._bag(s, ("GetOutcome", p, FOREIGN, ""))
                out.append((f"p{p}.ask_outcome(F)", self._freeze(s, bag=bag), False))

    def _participant_receives(self, s: State, p: int, m: Msg, out: list[Step[State]]) -> None:
        kind, _, j, value = m
        row, bag = s.rows[p], take(s.bag, m)

        def step(name: str, new: str, *reply: Msg, yes: bool = False) -> None:
            voters = s.yes_voters | {p} if yes else s.yes_voters
            nxt = self._freeze(
                s, rows=replace(s.rows, p, new), bag=self._bag(s, *reply, bag=dict(bag)), yes_voters=voters
            )
            out.append((f"p{p}.{name}", nxt, False))

        if kind == "Prepare":
            if row == NONE:
                step(f"prepare:{COMMIT}", PREPARED, ("Vote", p, j, COMMIT), yes=True)
                step(f"prepare:{ABORT}", NONE, ("Vote", p, j, ABORT))
            else:
                vote = repeat_vote(row)
                step(f"prepare(repeat):{vote}", row, ("Vote", p, j, vote), yes=vote == COMMIT)
        elif kind == "Outcome" and j == FOREIGN and self.check_log:
            step(f"refuse_outcome(F):{value}", row)  # rule 7: not the owner's log
        elif kind == "Outcome":  # the row is PREPARED (see `_useful`)
            step(f"apply_outcome({_name(j)}):{value}", value)
        elif kind == "Commit":
            new, ok = on_commit(row)
            result = "ok" if ok else "refused"
            step(f"commit(I{j}):{result}", new, ("Ack", p, j, f"Commit:{result}"))
        else:
            new, ok = on_abort(row)
            step(f"abort(I{j}):{'ok' if ok else 'refused'}", new)


def _name(j: int) -> str:
    return "F" if j == FOREIGN else f"I{j}"


def _useful(m: Msg, s: State) -> bool:
    """Whether message `m` can still have an effect (else the network drops it)."""
    kind, p, j, _ = m
    if kind in _TO_PARTICIPANT:
        row = s.rows[p]
        if kind == "Abort":
            return row != ABORTED
        return kind != "Outcome" or row == PREPARED
    if j == FOREIGN:
        return True
    c = s.insts[j]
    if not s.up[j]:
        return False
    if kind == "Vote":
        return c.pc == PHASE1 and c.votes[p] is None
    if kind == "Ack":
        return c.pc == PHASE2 and p not in (c.acks | c.refused)
    return True


def main() -> int:
    """Checks the rules, then finds every broken variant's counterexample."""
    ok = print_report(f"two instances, one shared log, a foreign one: {Model()}", check(Model()))
    for bug in BUGS[:3]:
        ok &= print_counterexample(f"bug={bug}", check(Model(bug=bug), liveness=False))
    unchecked = Model(bug="aborted_for_unknown_owner", check_log=False)
    ok &= print_counterexample(f"bug=aborted_for_unknown_owner, {unchecked}", check(unchecked, liveness=False))
    for name, model in (
        ("bug=redrive_before_fence", Model(bug="redrive_before_fence")),
        ("bug=owner_pending_for_its_aborts", Model(bug="owner_pending_for_its_aborts")),
    ):
        r = check(model)
        print(f"\n{name}: {r.summary()}")
        ok &= r.violation is None and r.stuck is not None
        for v in r.problems():
            print(v.render())
    for name, model in (
        ("one defence: the participant checks the log", Model(bug="aborted_for_unknown_owner")),
        ("one defence: F answers PENDING", Model(check_log=False)),
    ):
        r = check(model)
        print(f"\n{name}: {r.summary()}")
        ok &= r.violation is None and r.stuck is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
