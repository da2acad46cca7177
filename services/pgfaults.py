"""`make chaos DB=cluster`: faults of the PostgreSQL cluster under the services, and
the failover times they cause.

The wallet's and the order service's data and the shop's decision log live in a
Patroni cluster (`twopc.dev.pgcluster`: three etcd members, three PostgreSQL nodes,
synchronous and strict); the services run on hosts of the cluster's network. Besides
the usual faults the nemesis kills (SIGKILL of Patroni and the postmaster), pauses
(SIGSTOP) and partitions a PostgreSQL node, mostly the primary, or an etcd member,
then restarts, resumes or reconnects it.

For each fault it measures, from the moment of the fault:

* to the first new commit: the first purchase started after the fault that the
  client saw committed (through the new primary, if the fault made one);
* to nothing in doubt: no transaction prepared at a participant before the fault
  is still PREPARED, and no COMMIT logged before it lacks its END, as the surviving
  primary says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twopc.dev.pgcluster import PgCluster
from twopc.dev.testing import query, wait_until

KINDS = ("kill_pg", "pause_pg", "partition_pg", "kill_etcd", "pause_etcd", "partition_etcd")
LOG_LEASE_S = 30.0
"""The shops' lease on a cluster: longer than a failover (about 10 s), so that the
first shop back does not take the others over (the leases expire by the database's
clock, which a failover does not stop)."""


@dataclass
class Failover:
    """One fault of the cluster and what it cost."""

    kind: str
    node: str
    primary: bool  # the node was the primary when hit
    at: float  # monotonic
    at_wall: float  # time.time(), as the stores' prepared_at
    first_commit_s: float | None = None
    settled_s: float | None = None


class ClusterFaults:
    """Injects and heals the cluster's faults; keeps each one's `Failover`.

    Args:
        pgc: the cluster.
        stores: the participants' URLs (their `twopc_txn`).
        log_url: the shops' decision log.
        rng: the run's random source (which node).
    """

    def __init__(self, pgc: PgCluster, stores: Sequence[str], log_url: str, rng: random.Random) -> None:
        self.pgc, self.stores, self.log_url, self.rng = pgc, list(stores), log_url, rng
        self.failovers: list[Failover] = []
        self._watchers: set[asyncio.Task[None]] = set()

    async def inject(self, kind: str) -> str:
        """Hits a node (the primary three times in four for PostgreSQL faults)."""
        primary = await asyncio.to_thread(self.pgc.primary)
        if kind.endswith("_etcd"):
            node = self.rng.choice(self.pgc.members)
        elif primary is not None and self.rng.random() < 0.75:
            node = primary
        else:
            node = self.rng.choice(self.pgc.nodes)
        f = Failover(kind, node, node == primary, time.monotonic(), time.time())
        if kind.startswith("kill"):
            await asyncio.to_thread(self.pgc.kill, node)
        elif kind.startswith("pause"):
            self.pgc.pause(node)
        else:
            self.pgc.cut(node)
        self.failovers.append(f)
        task = asyncio.create_task(self._watch_settled(f))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return node

    async def heal(self, kind: str, node: str) -> None:
        if kind.startswith("kill"):
            await asyncio.to_thread(self.pgc.start_node, node)
        elif kind.startswith("pause"):
            self.pgc.resume(node)
        else:
            self.pgc.heal(node)

    async def heal_all(self, timeout_s: float) -> None:
        """Every node and member back, and the cluster healthy again."""
        for host in (*self.pgc.members, *self.pgc.nodes):
            self.pgc.heal(host)
            self.pgc.resume(host)
            if not self.pgc.network.pids(host):
                await asyncio.to_thread(self.pgc.start_node, host)
        await asyncio.to_thread(self.pgc.wait_healthy, timeout_s)

    async def close(self, timeout_s: float) -> None:
        """Lets the watchers finish (bounded), then stops them."""
        if self._watchers:
            await asyncio.wait(set(self._watchers), timeout=timeout_s)
        for task in list(self._watchers):
            task.cancel()

    async def _watch_settled(self, f: Failover, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._settled_since, f.at_wall):
                f.settled_s = round(time.monotonic() - f.at, 2)
                return
            await asyncio.sleep(0.2)

    def _settled_since(self, wall: float) -> bool:
        """Nothing from before `wall` in doubt, on the primary (False while there is none)."""
        from twopc.decisions.postgres import connection_info  # the postgres extra

        try:
            for url in self.stores:
                sql = "SELECT count(*) FROM twopc_txn WHERE state = 'PREPARED' AND prepared_at <= :t"
                if int(query(url, sql, t=wall)[0][0]):
                    return False
            conninfo, schema = connection_info(self.log_url)
            sql = (
                f"SELECT count(*) FROM {schema}.decisions WHERE decision = 'commit' AND ended_at IS NULL"
                " AND logged_at <= to_timestamp(:t)"
            )
            return int(query(conninfo, sql, t=wall)[0][0]) == 0
        except Exception:  # noqa: BLE001 - no primary yet, or a lost connection: not settled
            return False

    def record_commits(self, started_committed: Sequence[tuple[float, float]]) -> None:
        """Fills each fault's time to the first new commit from the purchases'
        (start, answer) monotonic times of those the client saw committed."""
        for f in self.failovers:
            after = [answered for started, answered in started_committed if started >= f.at]
            if after:
                f.first_commit_s = round(min(after) - f.at, 2)

    def summary(self) -> dict[str, Any]:
        """Median and max of both times, over faults of the primary and over all."""

        def stats(values: list[float]) -> dict[str, float]:
            return (
                {"n": len(values), "median": round(statistics.median(values), 2), "max": max(values)} if values else {}
            )

        hit = [f for f in self.failovers if f.primary]
        return {
            "primary_faults": len(hit),
            "primary_first_commit_s": stats([f.first_commit_s for f in hit if f.first_commit_s is not None]),
            "primary_settled_s": stats([f.settled_s for f in hit if f.settled_s is not None]),
            "all_first_commit_s": stats([f.first_commit_s for f in self.failovers if f.first_commit_s is not None]),
            "unsettled": [f"{f.kind} {f.node}" for f in self.failovers if f.settled_s is None],
        }


async def measure_kills(kills: int, *, workdir: Path, concurrency: int = 8, settle_s: float = 10.0) -> dict[str, Any]:
    """The failover figures: one shop, wallet and orders with their data and the
    shop's log in a cluster, purchases at `concurrency`, and `kills` SIGKILLs of the
    primary, each once the cluster is healthy again. Per kill: the time to the first
    purchase (started after the kill) committed, and throughput (commits/s) in the
    `settle_s` before the kill, from the kill to that first commit, and in the
    `settle_s` after it."""
    from services.chaos import Purchase
    from services.cluster import Cluster, Settings
    from services.shop.v1 import shop_pb2

    names = ["wallet", "orders", "shop"]
    with PgCluster(prefix="pgk", net=238, hosts=names, workdir=workdir / "pgcluster") as pgc:
        stores = {}
        for name in ("wallet", "orders"):
            stores[name] = pgc.url(schema=name)  # the store creates its schema
        log_url = pgc.url(schema="kills_log", lease_s=str(LOG_LEASE_S))
        hosts = {n: pgc.network.host(n) for n in names}
        cluster = Cluster(workdir, Settings(prepare_timeout_s=2.0), hosts=hosts, log_url=log_url, stores=stores)
        async with cluster as c:
            accounts, skus = [f"buyer{i}" for i in range(8)], [f"sku{i}" for i in range(4)]
            for account in accounts:
                await c.open_account(account, 1_000_000_000)
            for sku in skus:
                await c.add_stock(sku, 10_000_000, 1)
            done: list[tuple[float, float]] = []  # (started, answered) of committed purchases
            stop = asyncio.Event()

            async def buyer(worker: int) -> None:
                rng = random.Random(worker)
                n = 0
                while not stop.is_set():
                    n += 1
                    p = Purchase(f"k{worker}-{n}", rng.choice(accounts), {rng.choice(skus): 1})
                    started = time.monotonic()
                    with contextlib.suppress(Exception):
                        r = await c.purchase(p.order_id, p.account, p.items, timeout_s=2.0, shop=0)
                        if r.outcome == shop_pb2.OUTCOME_COMMITTED:
                            done.append((started, time.monotonic()))
                            continue
                    await asyncio.sleep(0.05)

            load = [asyncio.create_task(buyer(w)) for w in range(concurrency)]
            rows = []
            for _ in range(kills):
                await asyncio.sleep(settle_s)
                primary = await asyncio.to_thread(pgc.primary)
                at = time.monotonic()
                await asyncio.to_thread(pgc.kill, str(primary))
                if not await wait_until(lambda: any(s >= at for s, _ in done), 120.0):  # noqa: B023 - now
                    raise TimeoutError("no purchase committed within 120 s of the kill")
                first = min(a for s, a in done if s >= at)
                await asyncio.sleep(settle_s)
                rows.append(
                    {
                        "first_commit_s": round(first - at, 2),
                        "before_tps": round(sum(at - settle_s <= a < at for _, a in done) / settle_s, 1),
                        "during_tps": round(sum(at <= a < first for _, a in done) / max(first - at, 1e-9), 1),
                        "after_tps": round(sum(first <= a < first + settle_s for _, a in done) / settle_s, 1),
                    }
                )
                print(f"kill {len(rows)}: {rows[-1]}", flush=True)
                await asyncio.to_thread(pgc.start_node, str(primary))
                await asyncio.to_thread(pgc.wait_healthy, 120)
            stop.set()
            await asyncio.gather(*load)
            final = await c.settled(60)
    times = [r["first_commit_s"] for r in rows]
    return {
        "kills": rows,
        "first_commit_s": {"median": round(statistics.median(times), 2), "max": max(times)},
        "violations": final.violations,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m services.pgfaults", description=measure_kills.__doc__)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path(f"var/pgkills-{time.strftime('%Y%m%d-%H%M%S')}"))
    a = p.parse_args()
    result = asyncio.run(measure_kills(a.kills, workdir=a.workdir, concurrency=a.concurrency))
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))


if __name__ == "__main__":
    main()
