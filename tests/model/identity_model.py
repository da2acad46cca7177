"""Two coordinators that pick the same transaction id, at shared participants.

`Prepare.txn_id` was unique only per coordinator (the caller picks it, say
"order-42"), yet a participant keyed its transaction table by `txn_id` alone. This
model (issue 8, finding 2) runs two coordinators, A and B, each with one
transaction whose local id is the same, each with its own operation (A's debit is
not B's), over the same two participants p0 and p1. Each coordinator runs the
protocol of `twopc_model` (phase 1 with deadline, COMMIT logged before any Commit,
phase 2 retried until acknowledged, END, GetOutcome) and each participant the
participant's (durable row, repeated Prepare answered from the row, tombstones,
in-doubt query to the coordinator named in the Prepare). Messages may be lost or
reordered; crashes are left to `twopc_model`, which checks them for one
transaction: what this model adds is the key a row is found by, and that changes
nothing about a crash.

A row records which coordinator's operation it holds (its digest). Properties, in
every state:

* ``atomicity``: no coordinator's operation is COMMITTED at one participant and
  ABORTED at another;
* ``agreement``: a participant applies a coordinator's operation only if that
  coordinator logged COMMIT;
* ``applied``: a coordinator that logged END (every target acknowledged its Commit)
  has its own operation committed at every participant - not someone else's.

and liveness as in `twopc_model` (once faults stop, no row PREPARED and no COMMIT
without END stays reachable).

The fix (the default): the wire id is ``"<coordinator id>:<local id>"`` (every
decision log has a persistent random id), so A's and B's rows never meet; and a
participant stores a digest of the prepared operation and votes ABORT on a
repeated Prepare whose operation differs.

Broken variants (``bug=``):

* ``"local_ids"``: the code before the fix - rows keyed by the local id, a repeat
  answered from the row without comparing the operation. B's Prepare finds A's
  PREPARED row and votes COMMIT; B logs COMMIT and its Commit applies A's
  operation, which A then aborts elsewhere.
* ``"local_ids_digest"``: the digest alone, without the namespace. B's Prepare is
  refused, so B aborts - and its Abort, keyed "order-42", aborts A's row while A
  commits the other one. The digest guards a coordinator reusing its own id; only
  the namespace separates two coordinators.
"""

from __future__ import annotations

import dataclasses
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
    LOG_NONE,
    NONE,
    PENDING,
    PHASE1,
    PHASE2,
    PREPARED,
    CoordState,
    on_abort,
    on_commit,
    repeat_vote,
)

BUGS = ("local_ids", "local_ids_digest")
PROPERTIES = ("atomicity", "agreement", "applied")
NAMES = "AB"
NOBODY = -1
"""The operation of a tombstone: an Abort that came before any Prepare."""

Row = tuple[str, int]
"""A participant's row: (status, the coordinator whose operation it holds)."""

Msg = tuple[str, int, int, str]
"""(kind, participant, coordinator, value). To participant p from coordinator X:
Prepare (X's operation), Commit, Abort, Outcome (the answer to p's question). To X
from p: Vote, Ack ("Commit:ok", "Commit:refused"), GetOutcome."""

_TO_PARTICIPANT = frozenset({"Prepare", "Commit", "Abort", "Outcome"})


class State(NamedTuple):
    """Both coordinators, the participants' tables, the network.

    Attributes:
        coords: A then B (`twopc_model.CoordState`; crashes and closes unused).
        rows: per participant, its table: one row per key (A's and B's with the
            namespace; the first only, "order-42", without it).
        bag: the messages in flight.
        dups: duplications so far.
    """

    coords: tuple[CoordState, ...]
    rows: tuple[tuple[Row, ...], ...]
    bag: Bag[Msg] = frozenset()
    dups: int = 0

    def describe(self) -> str:
        """A one-line human reading of the state."""
        cs = " ".join(f"{NAMES[x]}={c.pc}/log={c.log}" for x, c in enumerate(self.coords))
        tables = " ".join(
            f"p{p}[" + ",".join(f"{st}({NAMES[op] if op != NOBODY else '-'})" for st, op in table) + "]"
            for p, table in enumerate(self.rows)
        )
        msgs = ", ".join(fmt_msg(m) + (f"x{n}" if n > 1 else "") for m, n in sorted(self.bag))
        return f"{cs} | {tables} | net=[{msgs}]"


def fmt_msg(m: Msg) -> str:
    """``Kind(pN,X)`` or ``Kind(pN,X,value)``."""
    kind, p, x, value = m
    return f"{kind}(p{p},{NAMES[x]}{',' + value if value else ''})"


@dataclass(frozen=True)
class Model:
    """Two coordinators, one local id, two participants.

    Attributes:
        bug: None for the fixed protocol, or one of `BUGS`.
        max_dups: message duplications over a run.
        bag_cap: copies of one message the network holds at most.
        lossy: messages may be lost (then retries and in-doubt queries matter).
        refusals: a participant may refuse a first Prepare (vote ABORT).
        queries: a PREPARED participant may ask GetOutcome at any time.

    The two transactions multiply: with loss and queries the fixed protocol has
    857,476 states (about a minute, `main`); the test suite checks it without them
    (35,344 states, under 2 s), where the broken variants fail just the same.
    """

    bug: str | None = None
    max_dups: int = 0
    bag_cap: int = 2
    lossy: bool = True
    refusals: bool = True
    queries: bool = True

    def __post_init__(self) -> None:
        if self.bug is not None and self.bug not in BUGS:
            raise ValueError(f"unknown bug {self.bug!r}; known: {', '.join(BUGS)}")

    known_properties = default_properties = PROPERTIES

    def key(self, x: int) -> int:
        """The row coordinator `x`'s transaction is found by at a participant."""
        return 0 if self.bug is not None else x

    def initial(self) -> State:
        """Neither transaction begun."""
        keys = 1 if self.bug is not None else len(NAMES)
        return State((CoordState(),) * len(NAMES), (((NONE, NOBODY),) * keys,) * 2)

    def violations(self, s: State, properties: Iterable[str] = PROPERTIES) -> list[str]:
        """The properties that `s` violates, in the order given."""

        def statuses(x: int) -> set[str]:
            return {st for table in s.rows for st, op in table if op == x}

        broken = {
            "atomicity": lambda: any({COMMITTED, ABORTED} <= statuses(x) for x in range(len(NAMES))),
            "agreement": lambda: any(
                COMMITTED in statuses(x) and s.coords[x].log == LOG_NONE for x in range(len(NAMES))
            ),
            "applied": lambda: any(
                c.log == LOG_END and any((COMMITTED, x) not in table for table in s.rows)
                for x, c in enumerate(s.coords)
            ),
        }
        return [name for name in properties if broken[name]()]

    def is_terminal(self, s: State) -> bool:
        """Nobody in doubt, no COMMIT left without END."""
        prepared = any(st == PREPARED for table in s.rows for st, _ in table)
        return not prepared and all(c.log != LOG_COMMIT for c in s.coords)

    def _freeze(
        self,
        s: State,
        coords: tuple[CoordState, ...] | None = None,
        rows: tuple[tuple[Row, ...], ...] | None = None,
        bag: dict[Msg, int] | None = None,
        dups: int | None = None,
    ) -> State:
        cs = s.coords if coords is None else coords
        rs = s.rows if rows is None else rows
        items = s.bag if bag is None else bag.items()
        kept = frozenset((m, n) for m, n in items if n > 0 and self._useful(m, cs, rs))
        return State(cs, rs, kept, s.dups if dups is None else dups)

    def _useful(self, m: Msg, coords: tuple[CoordState, ...], rows: tuple[tuple[Row, ...], ...]) -> bool:
        kind, p, x, value = m
        c = coords[x]
        if kind == "Vote":
            return c.pc == PHASE1 and c.votes[p] is None
        if kind == "Ack":
            return value == "Commit:ok" and c.pc == PHASE2 and p not in c.acks
        if kind == "Outcome":
            return rows[p][self.key(x)][0] == PREPARED
        return True

    # --- transitions ---------------------------------------------------------------

    def successors(self, s: State) -> list[Step[State]]:
        """Every transition enabled in `s`."""
        out: list[Step[State]] = []
        for x in range(len(NAMES)):
            self._coordinator_steps(s, x, out)
        for p in range(len(s.rows)):
            self._participant_steps(s, p, out)
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[0] not in _TO_PARTICIPANT:
                out.append(self._coordinator_receives(s, m))
        if self.lossy:
            out += network_faults(self, s.bag, s.dups, fmt_msg, lambda bag, dups: self._freeze(s, bag=bag, dups=dups))
        return out

    def _with(self, s: State, x: int, c: CoordState, bag: dict[Msg, int] | None = None) -> State:
        return self._freeze(s, coords=replace(s.coords, x, c), bag=bag)

    def _send(self, s: State, *msgs: Msg, bag: dict[Msg, int] | None = None) -> dict[Msg, int]:
        bag = dict(s.bag) if bag is None else bag
        put(bag, self.bag_cap, *msgs)
        return bag

    def _coordinator_steps(self, s: State, x: int, out: list[Step[State]]) -> None:
        c, name, everyone = s.coords[x], NAMES[x], range(len(s.rows))
        if c.pc == INIT:
            bag = self._send(s, *(("Prepare", p, x, "") for p in everyone))
            out.append(
                (f"{name}.begin", self._with(s, x, c._replace(pc=PHASE1, votes=(None,) * len(s.rows)), bag), False)
            )
        elif c.pc == PHASE1:
            out.append((f"{name}.timeout", self._decide_abort(s, x), False))
        elif c.pc == PHASE2:
            if c.acks == c.targets:
                out.append((f"{name}.log_end", self._with(s, x, c.fresh(DONE)._replace(log=LOG_END)), False))
            for p in sorted(c.targets - c.acks - c.refused):
                if not in_flight(s.bag, ("Commit", p, x), ("Ack", p, x)):
                    bag = self._send(s, ("Commit", p, x, ""))
                    out.append((f"{name}.retry_commit(p{p})", self._with(s, x, c, bag), False))
        elif c.pc == ABORTING:
            out.append((f"{name}.abort_give_up", self._with(s, x, c.fresh(DONE)), False))
            for p in sorted(c.targets):
                if not in_flight(s.bag, ("Abort", p, x)):
                    out.append(
                        (f"{name}.retry_abort(p{p})", self._with(s, x, c, self._send(s, ("Abort", p, x, ""))), False)
                    )

    def _decide_abort(self, s: State, x: int, bag: dict[Msg, int] | None = None) -> State:
        c = s.coords[x]
        targets = frozenset(range(len(s.rows)))
        bag = self._send(s, *(("Abort", p, x, "") for p in sorted(targets)), bag=bag)
        return self._with(s, x, c.fresh(ABORTING, targets), bag)

    def _coordinator_receives(self, s: State, m: Msg) -> Step[State]:
        kind, p, x, value = m
        c, bag, name = s.coords[x], take(s.bag, m), f"{NAMES[x]}.recv {fmt_msg(m)}"
        if kind == "Vote":
            if value == ABORT:
                return name, self._decide_abort(s, x, bag), False
            votes = replace(c.votes, p, value)
            if any(v is None for v in votes):
                return name, self._with(s, x, c._replace(votes=votes), bag), False
            # Every vote is COMMIT: COMMIT is forced to the log, then Commit goes out.
            targets = frozenset(range(len(votes)))
            self._send(s, *(("Commit", q, x, "") for q in sorted(targets)), bag=bag)
            nc = c._replace(pc=PHASE2, votes=(), targets=targets, log=LOG_COMMIT)
            return f"{name} -> log_commit, send_commits", self._with(s, x, nc, bag), False
        if kind == "Ack":  # only first "Commit:ok" answers are in the bag
            return name, self._with(s, x, c._replace(acks=c.acks | {p}), bag), False
        if c.log in (LOG_COMMIT, LOG_END):  # GetOutcome, rule 5 of docs/design.md
            answer = COMMITTED
        elif c.pc == PHASE1:
            answer = PENDING
        else:
            answer = ABORTED
        if answer != PENDING:
            self._send(s, ("Outcome", p, x, answer), bag=bag)
        return f"{NAMES[x]}.outcome(p{p}):{answer}", self._freeze(s, bag=bag), False

    def _participant_steps(self, s: State, p: int, out: list[Step[State]]) -> None:
        table = s.rows[p]
        for m, _ in sorted(s.bag):  # sorted: the same traces whatever the hash seed
            if m[1] == p and m[0] in _TO_PARTICIPANT:
                self._participant_receives(s, p, m, out)
        for status, op in table:  # in doubt: ask the coordinator the Prepare named
            if self.queries and status == PREPARED and not in_flight(s.bag, ("GetOutcome", p, op), ("Outcome", p, op)):
                bag = self._send(s, ("GetOutcome", p, op, ""))
                out.append((f"p{p}.ask_outcome({NAMES[op]})", self._freeze(s, bag=bag), False))

    def _participant_receives(self, s: State, p: int, m: Msg, out: list[Step[State]]) -> None:
        kind, _, x, value = m
        k, bag = self.key(x), take(s.bag, m)
        status, op = s.rows[p][k]

        def step(name: str, row: Row, *reply: Msg) -> None:
            rows = replace(s.rows, p, replace(s.rows[p], k, row))
            out.append((f"p{p}.{name}", self._freeze(s, rows=rows, bag=self._send(s, *reply, bag=dict(bag))), False))

        if kind == "Prepare":
            if status == NONE:
                step(f"prepare({NAMES[x]}):{COMMIT}", (PREPARED, x), ("Vote", p, x, COMMIT))
                if self.refusals:
                    step(f"prepare({NAMES[x]}):{ABORT}", (NONE, NOBODY), ("Vote", p, x, ABORT))
            elif op != x and self.bug != "local_ids":  # the digest differs: refused, row unchanged
                step(f"prepare({NAMES[x]},other operation):{ABORT}", (status, op), ("Vote", p, x, ABORT))
            else:
                vote = repeat_vote(status)
                step(f"prepare({NAMES[x]},repeat):{vote}", (status, op), ("Vote", p, x, vote))
        elif kind == "Outcome":  # the row is PREPARED (see `_useful`)
            step(f"apply_outcome({NAMES[x]}):{value}", (value, op))
        elif kind == "Commit":
            new, ok = on_commit(status)
            step(
                f"commit({NAMES[x]}):{'ok' if ok else 'refused'}",
                (new, op),
                ("Ack", p, x, f"Commit:{'ok' if ok else 'refused'}"),
            )
        else:
            new, ok = on_abort(status)
            step(f"abort({NAMES[x]}):{'ok' if ok else 'refused'}", (new, op))


SMALL = Model(lossy=False, queries=False)
"""The configuration the test suite checks: every interleaving, no loss."""


def main() -> int:
    """Checks the fixed protocol (small, then with loss and in-doubt queries), then
    finds both broken variants' counterexamples."""
    ok = True
    for title, model in (("no loss", SMALL), ("loss and in-doubt queries", Model())):
        ok &= print_report(f"two coordinators, one local id, {title}: {model}", check(model))
    for bug in BUGS:
        ok &= print_counterexample(f"bug={bug}", check(dataclasses.replace(SMALL, bug=bug), liveness=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
