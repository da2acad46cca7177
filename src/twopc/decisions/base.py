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
        """The log's id (set by `open`): stable for the life of the log."""
        ...

    async def log_commit(self, txn_id: str, targets: Sequence[str]) -> bool:
        """Durably records the COMMIT decision. Returns once it is on disk: True, or
        False if `txn_id` was logged already (nothing is written then)."""
        ...

    async def find(self, txn_id: str) -> CommitRecord | None:
        """The logged COMMIT of `txn_id`, ended or not, while it is retained."""
        ...

    async def log_end(self, txn_id: str) -> None:
        """Records that every participant acknowledged; the record may be forgotten."""
        ...

    async def outcome(self, txn_id: str) -> Outcome:
        """What the log says of `txn_id` (GetOutcome for a transaction the
        coordinator does not hold in memory): COMMITTED if a COMMIT is logged;
        PENDING while its owner may still log one (a shared log: the owner's lease
        is not taken over); ABORTED once nobody can.

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
