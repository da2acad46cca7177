"""twopc: atomic actions across gRPC services, by two-phase commit with presumed abort.

The public names are here; everything else lives in packages named for their role:
`twopc.coordinator`, `twopc.participant`, `twopc.decisions` (decision logs),
`twopc.stores` (participant stores), `twopc.observe`, `twopc.ops`, `twopc.security`,
and `twopc.dev` (tooling for tests, never imported by the protocol).
"""

from twopc import rpc
from twopc.config import CoordinatorConfig, Credentials, ParticipantConfig
from twopc.coordinator import Coordinator
from twopc.coordinator.client import TransactionsClient
from twopc.decisions import CommitRecord, DecisionLog, SqliteDecisionLog
from twopc.errors import (
    ClosedError,
    CoordinatorFailedError,
    DuplicateTransactionError,
    DurabilityError,
    FencedError,
    ForeignPeerError,
    InvalidOperation,
    LogUnavailableError,
    NotFound,
    NotLoggedError,
    OutcomeUnknownError,
    ServiceError,
    StoreInUseError,
    TwoPCError,
    VoteAbort,
)
from twopc.observe import logconfig
from twopc.observe.logconfig import configure as configure_logging
from twopc.participant import Participant, ParticipantHandler
from twopc.stores import SqliteStore
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote

logconfig.use_default()

__all__ = [
    "Branch",
    "BranchResult",
    "ClosedError",
    "CommitRecord",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorFailedError",
    "Credentials",
    "DecisionLog",
    "DuplicateTransactionError",
    "DurabilityError",
    "FencedError",
    "ForeignPeerError",
    "InvalidOperation",
    "LogUnavailableError",
    "NotFound",
    "NotLoggedError",
    "Outcome",
    "OutcomeUnknownError",
    "Participant",
    "ParticipantConfig",
    "ParticipantHandler",
    "ServiceError",
    "SqliteDecisionLog",
    "SqliteStore",
    "StoreInUseError",
    "TransactionResult",
    "TransactionsClient",
    "TwoPCError",
    "Vote",
    "VoteAbort",
    "configure_logging",
    "rpc",
]
