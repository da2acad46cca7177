"""The explicit-state checker the protocol models share: BFS, safety, liveness, traces.

A model (`System`) gives its initial state, the transitions enabled in a state (each
named, and marked as a fault or not), the safety properties a state breaks, and
which states are terminal. `check` explores every reachable state by breadth-first
search (as TLC checks Lamport's TwoPhase spec) and checks the safety properties in
every state; a violation stops the search and its trace, rebuilt from BFS parent
pointers, is a shortest one.

Liveness: from every reachable state, once faults stop, a terminal state must stay
reachable. The fault-free edges met during the BFS are kept, and a reverse BFS from
the terminal states marks every state that can reach one; the rest are "stuck".

The module also holds the network helpers every model uses: the network is a bag
(multiset) of messages, any of which may be delivered next, lost or duplicated.
"""

from __future__ import annotations

import gc
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Described(Protocol):
    """A state: hashable, and readable in one line."""

    def describe(self) -> str:
        """A one-line human reading of the state."""
        ...


S = TypeVar("S", bound=Described)
M = TypeVar("M", bound=tuple[Any, ...])  # a message: a tuple of str and int
T = TypeVar("T")

Step = tuple[str, S, bool]
"""A transition: (step name, next state, whether it is a fault)."""


class System(Protocol[S]):
    """A transition system `check` can explore."""

    @property
    def known_properties(self) -> tuple[str, ...]:
        """Every safety property `violations` can report."""
        ...

    @property
    def default_properties(self) -> tuple[str, ...]:
        """The properties `check` checks unless told otherwise."""
        ...

    def initial(self) -> S:
        """The initial state."""
        ...

    def successors(self, s: S) -> list[tuple[str, S, bool]]:
        """Every transition enabled in `s`."""
        ...

    def violations(self, s: S, properties: Iterable[str]) -> list[str]:
        """The properties among `properties` that `s` breaks, in the order given."""
        ...

    def is_terminal(self, s: S) -> bool:
        """Whether `s` is a goal of the liveness check."""
        ...


@dataclass(frozen=True)
class Violation(Generic[S]):
    """A counterexample: a shortest trace from the initial state to a bad state.

    Attributes:
        prop: the violated property, or "liveness" for a state from which no
            fault-free path terminates.
        trace: the step names, first step first.
        state: the state the trace ends in.
    """

    prop: str
    trace: tuple[str, ...]
    state: S

    def render(self) -> str:
        """The trace, one numbered step per line, then the final state."""
        lines = [f"violated: {self.prop} ({len(self.trace)} steps)"]
        lines += [f"  {k:2d}. {step}" for k, step in enumerate(self.trace, 1)]
        lines.append(f"  => {self.state.describe()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Report(Generic[S]):
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
    violation: Violation[S] | None
    stuck: Violation[S] | None
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

    def problems(self) -> list[Violation[S]]:
        """The safety violation and the stuck state, those that were found."""
        return [v for v in (self.violation, self.stuck) if v is not None]


def check(model: System[S], *, properties: Sequence[str] | None = None, liveness: bool = True) -> Report[S]:
    """Explores every reachable state of `model` by BFS and checks it.

    Args:
        model: the transition system.
        properties: the safety properties to check in every state (a subset of
            `model.known_properties`); `model.default_properties` if None.
        liveness: also check that every reachable state can terminate once faults
            stop (not done when a safety property fails).

    Returns:
        The number of states explored, the first violation if any, and the result
        of the liveness check.

    Raises:
        ValueError: an unknown property name.
    """
    props = model.default_properties if properties is None else tuple(properties)
    unknown = set(props) - set(model.known_properties)
    if unknown:
        raise ValueError(f"unknown properties {sorted(unknown)}; known: {', '.join(model.known_properties)}")
    enabled = gc.isenabled()
    gc.disable()  # millions of tuples and no cycles: the collector would only rescan them
    try:
        return _Search(model, props, liveness).run()
    finally:
        if enabled:
            gc.enable()


class _Search(Generic[S]):
    """One BFS over a model's states, then the backward liveness pass."""

    def __init__(self, model: System[S], properties: tuple[str, ...], liveness: bool) -> None:
        self.model = model
        self.properties = properties
        self.liveness = liveness
        self.states: list[S] = []
        self.parent = array("q")  # BFS tree: the index of the state each was found from
        self.via: list[str] = []  # ... and the step that found it
        self.src = array("q")  # fault-free edges, for the liveness pass
        self.dst = array("q")
        self.steps: set[str] = set()
        self.transitions = 0
        self.start = time.monotonic()
        self.cpu_start = time.process_time()

    def run(self) -> Report[S]:
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
                n = len(states)
                j = index.setdefault(t, n)  # one hash of `t`, not two
                if j == n:
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

    def _liveness(self) -> Report[S]:
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

    def _violation(self, k: int) -> Violation[S]:
        prop = self.model.violations(self.states[k], self.properties)[0]
        return Violation(prop, self._trace(k), self.states[k])

    def _report(
        self,
        *,
        violation: Violation[S] | None = None,
        stuck: Violation[S] | None = None,
        stuck_states: int = 0,
        terminal_states: int = 0,
    ) -> Report[S]:
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


def replay(model: System[S], trace: Iterable[str]) -> S:
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


def print_report(title: str, report: Report[S]) -> bool:
    """Prints `report` under `title`, with any counterexample; True if it found none."""
    print(f"{title}\n  {report.summary()}", flush=True)
    for v in report.problems():
        print(v.render())
    return not report.problems()


def print_counterexample(title: str, report: Report[S]) -> bool:
    """Prints the counterexample a broken variant must yield; True if there is one."""
    print(f"\n{title}: {report.summary()}", flush=True)
    if report.violation is None:
        print("  no counterexample found")
        return False
    print(report.violation.render())
    return True


# --- the network: a bag of messages --------------------------------------------------

Bag = frozenset[tuple[M, int]]
"""The network: each distinct message in flight with its number of copies."""


def take(bag: Bag[M], m: M) -> dict[M, int]:
    """The bag, as a dict, with one copy of `m` delivered (or lost)."""
    d = dict(bag)
    d[m] -= 1
    return d


def put(bag: dict[M, int], cap: int, *msgs: M) -> None:
    """Sends `msgs`; a copy beyond `cap` of one message is as if lost."""
    for m in msgs:
        bag[m] = min(bag.get(m, 0) + 1, cap)


def in_flight(bag: Bag[M], *prefixes: tuple[object, ...]) -> bool:
    """Whether a message starting with one of `prefixes` is in the bag."""
    return any(m[: len(pre)] == pre for m, _ in bag for pre in prefixes)


class Network(Protocol):
    """The bounds of a model's network."""

    @property
    def max_dups(self) -> int:
        """Duplications allowed over a run."""
        ...

    @property
    def bag_cap(self) -> int:
        """Copies of one message the network holds at most."""
        ...


def network_faults(
    net: Network, bag: Bag[M], dups: int, fmt: Callable[[M], str], rebuild: Callable[[dict[M, int], int], S]
) -> list[Step[S]]:
    """Loss of any message in flight, and duplication while `dups < net.max_dups`.

    Args:
        net: the model's bounds.
        bag: the messages in flight.
        dups: duplications so far.
        fmt: how a message prints in a step name.
        rebuild: the next state from the new bag and the new duplication count.
    """
    out: list[Step[S]] = []
    for m, n in sorted(bag):
        out.append((f"net.lose {fmt(m)}", rebuild(take(bag, m), dups), True))
        if dups < net.max_dups and n < net.bag_cap:
            more = dict(bag)
            more[m] = n + 1
            out.append((f"net.dup {fmt(m)}", rebuild(more, dups + 1), True))
    return out


def replace(items: tuple[T, ...], i: int, item: T) -> tuple[T, ...]:
    """`items` with position `i` replaced by `item`."""
    return (*items[:i], item, *items[i + 1 :])
