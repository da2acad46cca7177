"""What every decision log provides: the commit point of every transaction.

Presumed abort keeps the log small. Only COMMIT decisions are written, each with the
participants that must hear it, and the write is forced (fsync) before any Commit is
sent (rule 2 of docs/design.md). Once every participant has acknowledged, END marks the
record; END need not be forced, since losing it only means recovery re-sends Commits
that participants acknowledge again. A record without END after a restart is a
commit still to deliver (rule 4). No record means aborted.

Two implementations sit beside this protocol: `twopc.decisions.sqlite` (one file, one
coordinator) and `twopc.decisions.postgres` (one log shared by several instances).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twopc.types import Outcome


@dataclass(frozen=True)
class CommitRecord:
    """A logged COMMIT decision: the transaction and the participants to tell."""

    txn_id: str
    targets: tuple[str, ...]
    ended: bool = False


class DecisionLog(Protocol):
    """Where a coordinator makes its decisions durable. Implementations must force
    `log_commit` to stable storage before returning, and raise `DurabilityError`
    (and refuse all further writes) when that fails. A file log has one owner:
    opening it twice must fail. A shared log (`PostgresDecisionLog`) gives each
    coordinator instance an id and a lease of its own, and fences the COMMIT of an
    instance that was taken over (FencedError)."""

    async def open(self) -> list[CommitRecord]:
        """Opens the log and returns the commits that have no END yet."""
        ...

    @property
    def id(self) -> str:
        """The id of this coordinator on the log (set by `open`): the prefix of its
        transaction ids. A file log's is the log's own id, stable for the life of
        the log; a shared log's names one instance (one process)."""
        ...

    @property
    def log_id(self) -> str:
        """The log's identity (set by `open`), the same for every instance that
        shares it and stable for the life of the log: GetOutcome answers carry it,
        and participants believe a decided answer only from the owner's log."""
        ...

    @property
    def shared(self) -> bool:
        """Whether several coordinator instances may share this log (and so name
        each other as `peers`)."""
        ...

    @property
    def available(self) -> bool:
        """Whether the log can be written now: False while a shared log's database
        is out of reach (failing over, say) or once this instance is fenced. A
        coordinator's readiness (health) follows it."""
        ...

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> bool:
        """Durably records the COMMIT decision. Returns once it is on disk: True, or
        False if `txn_id` was logged already (nothing is written then)."""
        ...

    async def find(self, txn_id: str) -> CommitRecord | None:
        """The logged COMMIT of `txn_id`, ended or not, while it is retained."""
        ...

    async def decided(self, txn_id: str) -> Outcome | None:
        """The decision recorded under `txn_id` while it is retained: COMMITTED, ABORTED
        (a shared log's abort marker, rule 5 of `twopc.decisions.postgres`), or None
        if nothing is. `run` refuses a caller's id that has either."""
        ...

    async def log_end(self, txn_id: str) -> None:
        """Records that every participant acknowledged; the record may be forgotten."""
        ...

    async def outcome(self, txn_id: str) -> Outcome:
        """What the log says of `txn_id` (GetOutcome for a transaction the
        coordinator does not hold in memory; rules 11 and 12 of docs/design.md):
        COMMITTED if a COMMIT is logged; PENDING while its owner may still log one
        (a shared log: another instance's lease is not taken over), and for an id
        whose owner this log does not know (it cannot tell); ABORTED once nobody
        can log it. The caller's own ids (prefix `id`) that it does not hold in
        flight are ABORTED: it is their only writer.

        Raises:
            LogUnavailableError: the log cannot be read now; ask again.
        """
        ...

    def check_writable(self) -> None:
        """Raises LogUnavailableError (or FencedError) if a COMMIT cannot be logged
        now, so that `run` refuses a transaction before sending anything."""
        ...

    def watch(self, *, adopt: Callable[[Sequence[CommitRecord]], None], fail: Callable[[BaseException], None]) -> None:
        """Starts the log's background work (a shared log: lease renewal and
        takeover). `adopt` gets commits without END that this coordinator must now
        deliver (taken over from a dead instance); `fail` gets a fatal error (this
        instance was fenced). A log of one owner does nothing."""
        ...

    async def close(self) -> None: ...

    @property
    def syncs(self) -> int:
        """How many forced writes the log has made (for benchmarks)."""
        ...
