"""twopc: atomic actions across gRPC services, by two-phase commit with presumed abort.

The public names are here; everything else lives in modules named for their job,
each reachable from `import twopc` alone (`twopc.logs.configure`, `twopc.testing`...).
"""

from twopc import logs, rpc
from twopc.config import CoordinatorConfig, Credentials, ParticipantConfig
from twopc.coordinator import Coordinator
from twopc.decision_log import CommitRecord, DecisionLog, SqliteDecisionLog
from twopc.errors import (
    ClosedError,
    CoordinatorFailedError,
    DuplicateTransactionError,
    DurabilityError,
    FencedError,
    InvalidOperation,
    LogUnavailableError,
    NotFound,
    NotLoggedError,
    OutcomeUnknownError,
    StoreInUseError,
    TwoPCError,
    VoteAbort,
)
from twopc.participant import Participant, ParticipantHandler
from twopc.stores import SqliteStore
from twopc.types import Branch, BranchResult, Outcome, TransactionResult, Vote

logs.use_default()

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
    "InvalidOperation",
    "LogUnavailableError",
    "NotFound",
    "NotLoggedError",
    "Outcome",
    "OutcomeUnknownError",
    "Participant",
    "ParticipantConfig",
    "ParticipantHandler",
    "SqliteDecisionLog",
    "SqliteStore",
    "StoreInUseError",
    "TransactionResult",
    "TwoPCError",
    "Vote",
    "VoteAbort",
    "logs",
    "rpc",
]
