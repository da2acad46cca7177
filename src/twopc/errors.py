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
    recovery decide from what is on disk (rule 8 of docs/design.md).
    """


class ClosedError(TwoPCError):
    """The store or coordinator is closed (or closing): the work was not done."""


class StoreInUseError(TwoPCError):
    """The store's file is open in another store, in this process or another one.

    A file has one owner: two coordinators deciding from one decision log, or two
    participants on one transaction table, would break the protocol.
    """


class CoordinatorFailedError(TwoPCError):
    """The coordinator stopped after a failed decision write; restart it to recover.

    The embedding process learns of it from `Coordinator.wait_failed()` (or the
    `failure` property) as well as from the next `run`: it must restart, so that
    recovery decides from what is on disk.
    """


class LogUnavailableError(TwoPCError):
    """The decision log cannot be reached now (a shared log's database is down or
    out of reach, or this instance's lease is not renewed): `run` refuses new
    transactions before sending anything, and GetOutcome answers UNAVAILABLE so a
    participant asks another instance. Retry later; nothing was started."""


class ServiceError(TwoPCError):
    """The coordinator service (`twopc coordinator`) refused a request or could not
    be reached in time: `status` names the gRPC status ("INVALID_ARGUMENT",
    "UNAVAILABLE"...) as transactions.proto documents it. `TransactionsClient`
    already retried what is safe to retry (by the same txn_id)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class ForeignPeerError(TwoPCError):
    """A coordinator's `peers` do not share its decision log: a peer answered with
    another log's identity (a mistyped `?schema=`, another database), or the log
    is a file of one owner. Such a peer cannot know this coordinator's outcomes,
    so the coordinator refuses to start rather than name it in its Prepares."""


class NotLoggedError(TwoPCError):
    """The COMMIT decision was certainly not logged and never can be: the
    transaction aborts (its result says why). Not raised to `run`'s caller."""


class FencedError(NotLoggedError):
    """Another coordinator instance took this one's lease over (it was paused, cut
    off from the database, or too slow to renew): the database refused its COMMIT.
    The instance decides nothing more; restart the process (a new instance).
    """


class DuplicateTransactionError(TwoPCError):
    """`run` was given a transaction id this coordinator is running or has committed.

    A transaction id names one transaction for ever. Nothing was sent.
    """

    def __init__(self, txn_id: str, state: str) -> None:
        super().__init__(f"transaction {txn_id} is {state} already; give each transaction a new id")
        self.txn_id = txn_id
        self.state = state


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
