"""The shop: the demo's coordinator, written the way a user's own service would be.

It imports `twopc.Coordinator`, serves `GetOutcome` beside its own `Purchase` RPC on
one port (so participants in doubt find it again after a restart), and logs its
decisions to its own SQLite file.
"""
