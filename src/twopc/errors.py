"""The exceptions twopc raises.

An aborted transaction is a result (`TransactionResult.outcome`), never an exception.
Exceptions are for what a caller cannot treat as an ordinary outcome: a durable write
that failed, an outcome nobody can know yet, or misuse. (A participant that breaks the
protocol, e.g. refuses a Commit it prepared, is logged as an error: there is no caller
to raise it to, since phase 2 runs in the background.)
"""

from __future__ import annotations


class TwoPCError(Exception):
    """The root of every twopc exception."""


class DurabilityError(TwoPCError):
    """A durable write (fsync) failed. Fatal: the store stops, nothing is retried.

    The page cache may have dropped the data, so the process must stop and let
    recovery decide from what is on disk (DESIGN.md rule 8).
    """


class CoordinatorFailedError(TwoPCError):
    """The coordinator stopped after a failed decision write; restart it to recover."""


class OutcomeUnknownError(TwoPCError):
    """A one-phase transaction's only participant did not answer, and could not be
    reached to settle it. The participant decides; ask again later."""

    def __init__(self, txn_id: str, reason: str) -> None:
        super().__init__(f"outcome of {txn_id} unknown: {reason}")
        self.txn_id = txn_id
        self.reason = reason


class VoteAbort(TwoPCError):  # noqa: N818 - it is a vote, not an error condition
    """Raised by a participant's business `prepare` to vote ABORT with a reason.

    The reason is shown to people: say what failed and by how much
    ("insufficient funds: available 300, needed 1200").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidOperation(TwoPCError):  # noqa: N818 - named for the gRPC status it maps to
    """The operation is malformed (a negative amount, a missing field).

    The participant answers INVALID_ARGUMENT and changes nothing.
    """


class NotFound(TwoPCError):  # noqa: N818 - named for the gRPC status it maps to
    """The operation names something that does not exist (an unknown account).

    The participant answers NOT_FOUND and changes nothing.
    """
