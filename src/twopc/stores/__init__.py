"""Where participants and coordinators keep durable state: one room per database.

`sqlite` is the embedded default (one file, one writer thread, group commit);
`postgres` keeps a participant's data in PostgreSQL (extra `[postgres]`, imported only
when used). `open_store` picks one from a path or a URL, and `execute` runs one
statement on either's connection, so business SQL is written once (see `base`);
`lock_rows` locks the rows a job's rule reads on PostgreSQL (SQLite's one writer
needs none), and `for_update` reads and locks them in one statement; `snapshot`
and `query` read a store from outside, as an auditor or operator would.
"""

from twopc.stores.base import (
    ConflictError,
    Connection,
    Store,
    StoreSetupError,
    StoreUnavailableError,
    execute,
    for_update,
    lock_rows,
    open_store,
    query,
    snapshot,
)
from twopc.stores.sqlite import SqliteStore, StoreStats

__all__ = [
    "ConflictError",
    "Connection",
    "SqliteStore",
    "Store",
    "StoreSetupError",
    "StoreStats",
    "StoreUnavailableError",
    "execute",
    "for_update",
    "lock_rows",
    "open_store",
    "query",
    "snapshot",
]
