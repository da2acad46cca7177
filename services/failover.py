"""Coordinator failover under load: several shops on one PostgreSQL decision log,
concurrent purchases, and one fault to the first shop (the instance that owns
in-flight transactions):

* "kill": SIGKILL in phase 2 (the shop dies at its first delivered Commit, a
  crash point, while other purchases of it are in phase 1);
* "pause": SIGSTOP for three leases, then SIGCONT: it must find itself fenced;
* "partition": its host cut off from the network (PostgreSQL and participants)
  for three leases, then reconnected: the same (needs `Network`).

The buyers fail over as a client of several shops does: an attempt that gets no
answer (or UNAVAILABLE) is retried with the same order id at the next shop, which
answers from what became of the earlier attempt. The report gives the time from
the fault until none of the failed instance's transactions is in doubt, whether
the failed instance logged anything after it was taken over, and the invariants
and client-view violations once everything settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import psycopg

from services.chaos import Purchase, Result, check_client_view
from services.cluster import Cluster
from services.scenarios import outcome
from twopc.decisions.postgres import connection_info, read_commits
from twopc.dev import pgserver
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import query, wait_until

FAULTS = ("kill", "pause", "partition")


@dataclass
class FailoverReport:
    fault: str
    instance: str = ""  # the failed shop's instance id
    fault_to_settled_s: float | None = None  # fault until none of its txns is in doubt
    taken_over_commits: int = 0  # its COMMITs without END that another shop adopted
    logged_after_takeover: list[str] = field(default_factory=list)
    fenced: bool = False  # its log says so (pause, partition)
    purchases: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def instance_of(c: Cluster, shop: int) -> str:
    """The instance id a shop registered with (from its log's JSON events)."""
    for line in reversed(c.shops[shop].log_path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "instance_registered":
                return str(event["instance"])
    return ""


def in_doubt(c: Cluster, instance: str) -> int:
    """The instance's transactions still PREPARED at a participant, or logged
    without END."""
    prefix = f"{instance}:%"
    sql = "SELECT count(*) FROM twopc_txn WHERE state = 'PREPARED' AND txn_id LIKE ?"
    prepared = sum(int(query(db, sql, prefix)[0][0]) for db in (c.wallet_db, c.orders_db))
    open_commits = sum(1 for t, ended in read_commits(str(c.log)).items() if t.startswith(instance) and not ended)
    return prepared + open_commits


async def buyers(
    c: Cluster,
    accounts: list[str],
    skus: list[str],
    stop: asyncio.Event,
    history: list[Purchase],
    *,
    concurrency: int,
    seed: int,
) -> None:
    """Purchases spread over the shops until `stop`, appended to `history`; each
    one retried at the next shop with its order id until some shop answers
    (bounded)."""

    async def buyer(worker: int) -> None:
        rng = random.Random(f"{seed}-{worker}")
        n = 0
        while not stop.is_set():
            n += 1
            items = {s: rng.randint(1, 2) for s in rng.sample(skus, rng.randint(1, min(2, len(skus))))}
            p = Purchase(f"f{worker}-{n}", rng.choice(accounts), items)
            history.append(p)
            shop = worker
            for _ in range(40):
                try:
                    r = await c.purchase(p.order_id, p.account, p.items, timeout_s=1.0, shop=shop)
                    p.seen, p.txn_id, p.reason = outcome(r).lower(), r.txn_id, r.reason
                    if p.seen != "pending":
                        break
                except grpc.aio.AioRpcError as e:
                    p.seen, p.reason = "unknown", e.code().name
                shop += 1  # the next shop, as a client of several does
                await asyncio.sleep(0.1)

    await asyncio.gather(*(buyer(w) for w in range(concurrency)))


async def run(
    c: Cluster,
    fault: str,
    *,
    lease_s: float,
    cut: Callable[[], None] | None = None,
    heal: Callable[[], None] | None = None,
    concurrency: int = 6,
    seed: int = 1,
    settle_timeout_s: float = 60.0,
) -> FailoverReport:
    """Runs purchases, injects `fault` into the first shop, and reports.

    For "kill", the first shop must have been started with the crash point
    `coordinator.after_first_commit` armed; for "partition", `cut`/`heal` isolate
    its host.
    """
    report = FailoverReport(fault)
    accounts = [f"buyer{i}" for i in range(4)]
    skus = [f"sku{i}" for i in range(4)]
    for account in accounts:
        await c.open_account(account, 10_000_000)
    for sku in skus:
        await c.add_stock(sku, 1_000_000, 100)
    report.instance = instance_of(c, 0)
    stop = asyncio.Event()
    history: list[Purchase] = []
    died = asyncio.create_task(asyncio.to_thread(c.shop.wait, 60)) if fault == "kill" else None
    load = asyncio.create_task(buyers(c, accounts, skus, stop, history, concurrency=concurrency, seed=seed))
    if died is not None:
        await died  # at its first delivered Commit, with other purchases in phase 1
    else:
        await wait_until(lambda: sum(p.seen == "committed" for p in history) >= 10, 30.0)
    faulted = time.monotonic()
    settle = asyncio.create_task(_settled(c, report.instance, settle_timeout_s))
    if died is None:
        if fault == "pause":
            c.shop.pause()
        else:
            assert cut is not None
            cut()
        await asyncio.sleep(lease_s * 3)  # a fault longer than the lease is the point,
        # and held until the other instance has taken over: healed before that (a slow
        # machine), the instance renews its lease, unfenced, and rightly so.
        await wait_until(lambda: asyncio.to_thread(_taken_over, c, report.instance), settle_timeout_s, interval_s=0.1)
        if fault == "pause":
            c.shop.resume()
        else:
            assert heal is not None
            heal()
    settled_at = await settle
    report.fault_to_settled_s = round(settled_at - faulted, 2) if settled_at is not None else None
    stop.set()
    await load
    final = await c.settled(settle_timeout_s)
    report.violations += final.violations
    result = Result(options={})
    check_client_view(c, history, result)
    report.violations += result.violations
    report.purchases = dict(Counter(p.seen for p in history))
    report.taken_over_commits, report.logged_after_takeover = _takeover_facts(c, report.instance)
    if fault != "kill":  # healed, it learns of the takeover at its next renewal, which may
        # first have to time out on a connection the partition broke
        log = c.shop.log_path
        report.fenced = await wait_until(lambda: "instance_fenced" in log.read_text(errors="replace"), settle_timeout_s)
    return report


async def _settled(c: Cluster, instance: str, timeout_s: float) -> float | None:
    """When `instance` had been taken over and none of its transactions was in
    doubt any more (monotonic time), or None if not within `timeout_s`."""

    def done() -> bool:
        return _taken_over(c, instance) and in_doubt(c, instance) == 0

    ok = await wait_until(lambda: asyncio.to_thread(done), timeout_s, interval_s=0.1)
    return time.monotonic() if ok else None


def _taken_over(c: Cluster, instance: str) -> bool:
    """Whether another instance has taken `instance` over (its epoch bumped)."""
    conninfo, schema = connection_info(str(c.log))
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        row = conn.execute(f"SELECT taken_at FROM {schema}.instances WHERE id = %s", (instance,)).fetchone()
    return row is not None and row[0] is not None


def _takeover_facts(c: Cluster, instance: str) -> tuple[int, list[str]]:
    """How many COMMITs of `instance` were adopted, and which of its COMMITs were
    logged after it was taken over (there must be none)."""
    conninfo, schema = connection_info(str(c.log))
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        adopted = conn.execute(
            f"SELECT coalesce(sum(commits), 0) FROM {schema}.ownership WHERE instance = %s", (instance,)
        ).fetchone()
        late = conn.execute(
            f"SELECT d.txn_id FROM {schema}.decisions d JOIN {schema}.instances i ON i.id = d.owner"
            " WHERE d.owner = %s AND d.decision = 'commit' AND i.taken_at IS NOT NULL AND d.logged_at > i.taken_at",
            (instance,),
        ).fetchall()
    return int(adopted[0] if adopted else 0), [str(t) for (t,) in late]


class PrivatePostgres(PostgresServer):
    """A PostgreSQL server of the run's own, on a host of its own (a network
    namespace) so coordinators on other hosts reach it over the network and a
    partition can cut them off: `PostgresServer` on port 5432 of `address`, with
    trust for the run's private network (10.0.0.0/8) and PostgreSQL's own defaults
    otherwise.

    Args:
        address: the host address to listen on.
        wrapper: the command prefix that puts it on that host (`ip netns exec NS`).
    """

    PORT = 5432

    def __init__(self, address: str, wrapper: Sequence[str] = ()) -> None:
        # PostgreSQL's defaults, where PostgresServer's own differ.
        defaults = {"shared_buffers": "128MB"}
        super().__init__(
            max_prepared_transactions=0,
            settings=defaults,
            port=self.PORT,
            listen=(address,),
            trust=("10.0.0.0/8",),
            wrapper=wrapper,
        )
        self.address = address

    @staticmethod
    def missing() -> str | None:
        """Why a private server cannot run here (a reason starting "needs "), or None."""
        return pgserver.missing()

    def url(self, schema: str, **options: str) -> str:  # type: ignore[override]
        """The URL of a decision log in `schema` of its `postgres` database, with
        the log's options (e.g. lease_s)."""
        query = "&".join(f"{k}={v}" for k, v in {"schema": schema, **options}.items())
        return f"{self.url_of('postgres')}?{query}"

    def start(self, timeout_s: float = 60.0) -> PrivatePostgres:
        try:
            super().start(timeout_s)
        except BaseException:
            self.close()
            raise
        return self
