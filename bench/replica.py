"""The `pglog+sync-replica` rows: the decision log on the primary of a Patroni
cluster (`twopc.dev.pgcluster`: three nodes, synchronous and strict, so every COMMIT
record is on a standby before the primary answers), beside `durable+pglog` (one
server) in the same run, over the same two durable participants.

The difference between the two rows is the price of a decision log that survives
its primary: one more network round trip (primary to synchronous standby, and the
standby's WAL flush) per forced write. The cluster is this module's own, started
for the run and removed after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SYSTEM = "pglog+sync-replica"


@contextlib.contextmanager
def cluster_log(enabled: bool) -> Iterator[tuple[str, str]]:
    """Yields (the cluster's multi-host URL, "") while a cluster runs, or ("", why
    not) when it cannot run here."""
    if not enabled:
        yield "", "--no-replica"
        return
    from twopc.dev import pgcluster

    why = pgcluster.missing()
    if why:
        yield "", why
        return
    with pgcluster.PgCluster(prefix="bnc", net=239) as c:
        yield c.url(), ""


def log_url(cluster_url: str, schema: str) -> str:
    """The decision log's URL on the cluster, in a schema of its own."""
    return f"{cluster_url}&schema={schema}"
