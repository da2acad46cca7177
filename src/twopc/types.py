"""The values a transaction is made of and returns: branches, votes, outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from google.protobuf.message import Message


class Vote(enum.Enum):
    """A participant's answer to Prepare."""

    COMMIT = "commit"
    ABORT = "abort"
    READ_ONLY = "read_only"


class Outcome(enum.Enum):
    """How a transaction ended, or that it has not yet.

    `Coordinator.run` returns only COMMITTED or ABORTED; `Coordinator.outcome` may
    also answer PENDING (still in phase 1, or only the disk knows until a restart).
    """

    COMMITTED = "committed"
    ABORTED = "aborted"
    PENDING = "pending"


@dataclass(frozen=True)
class Branch:
    """One participant's part of a transaction.

    Attributes:
        target: the participant's gRPC address, "host:port". One branch per target
            in a transaction: put everything one participant does in one operation.
        operation: the business message (e.g. `wallet.v1.Debit`), packed into the
            Prepare's `google.protobuf.Any`.
        name: a label for logs and results; the target when empty.
    """

    target: str
    operation: Message = field(repr=False)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.target


@dataclass(frozen=True)
class BranchResult:
    """What one branch did.

    Attributes:
        name: the branch's label.
        target: the participant's address.
        vote: its vote, or None when it never voted (error, timeout, cancelled).
        reason: why it voted ABORT or did not vote; empty otherwise.
        acknowledged: whether it acknowledged phase 2 before `run` returned (a
            READ_ONLY branch has no phase 2 and counts as acknowledged). For a
            commit `run` waits up to `phase2_wait_s` for acknowledgements; an abort
            returns at once, so its branches usually show False.
    """

    name: str
    target: str
    vote: Vote | None
    reason: str = ""
    acknowledged: bool = False


@dataclass(frozen=True)
class TransactionResult:
    """The result of `Coordinator.run`.

    Attributes:
        txn_id: the transaction's global id, `"<coordinator id>:<local id>"`: what
            participants store and log, and what `Coordinator.outcome` takes.
        outcome: COMMITTED or ABORTED. COMMITTED is only ever returned once the
            decision is durable (or, with one branch, once that participant committed).
        branches: each branch's vote, reason and phase-2 acknowledgement, in the
            order the branches were given.
        completed: every branch acknowledged phase 2 before `run` returned. When
            False, the coordinator keeps delivering the decision in the background
            (and after a restart, for commits).
        reason: for an abort, the deciding branch and why ("wallet: insufficient
            funds: available 300, needed 1200"); empty for a commit.
    """

    txn_id: str
    outcome: Outcome
    branches: tuple[BranchResult, ...]
    completed: bool
    reason: str = ""

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED
