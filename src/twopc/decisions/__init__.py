"""Decision logs: where a coordinator makes its COMMIT decisions durable.

`base` is the protocol every log provides; `sqlite` is the embedded log (one file, one
coordinator); `postgres` is the log several coordinator instances share (the
`postgres` extra, imported only when used).
"""

from twopc.decisions.base import CommitRecord, DecisionLog
from twopc.decisions.sqlite import SqliteDecisionLog

__all__ = ["CommitRecord", "DecisionLog", "SqliteDecisionLog"]
