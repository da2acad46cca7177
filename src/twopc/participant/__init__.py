"""The participant role: the durable transaction table, idempotent Prepare/Commit/Abort,
whom to believe (`trust`), and in-doubt resolution (rules 1, 6 and 7 of docs/design.md).

Two kinds of participant: `helper.Participant` (reservations in the participant's own
store, SQLite or PostgreSQL) and `prepared.PreparedParticipant` (PostgreSQL's own
PREPARE TRANSACTION, the `postgres` extra, imported only when used).
"""

from twopc.participant.helper import ABORTED, COMMITTED, PREPARED, Participant, ParticipantHandler

__all__ = ["ABORTED", "COMMITTED", "PREPARED", "Participant", "ParticipantHandler"]
