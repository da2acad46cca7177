"""The participant role: the durable transaction table, idempotent Prepare/Commit/Abort,
whom to believe (`trust`), and in-doubt resolution (rules 1, 6 and 7 of docs/design.md).

Every kind of participant is a `ParticipantBase` (`base`): admission (`admission`),
the per-item batching, decisions and the resolver (`resolver`) are done there once,
and a kind overrides its documented hooks. Two kinds: `helper.Participant`
(reservations in the participant's own store, SQLite or PostgreSQL) and
`prepared.PreparedParticipant` (PostgreSQL's own PREPARE TRANSACTION, the `postgres`
extra, imported only when used). `table` holds the transaction table and the one
in-doubt query both kinds, and the operator's CLI, use.
"""

from twopc.participant.admission import DecisionRefused, Item
from twopc.participant.base import ParticipantBase
from twopc.participant.helper import Participant, ParticipantHandler
from twopc.participant.table import ABORTED, COMMITTED, PREPARED

__all__ = [
    "ABORTED",
    "COMMITTED",
    "PREPARED",
    "DecisionRefused",
    "Item",
    "Participant",
    "ParticipantBase",
    "ParticipantHandler",
]
