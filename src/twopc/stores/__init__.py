"""Where participants and coordinators keep durable state: one room per database.

`sqlite` is the embedded default (one file, one writer thread, group commit).
"""

from twopc.stores.sqlite import SqliteStore, StoreStats

__all__ = ["SqliteStore", "StoreStats"]
