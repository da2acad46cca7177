"""`make chaos`: concurrent purchases under randomized faults, then the checker.

The run starts the wallet, order and shop services as separate processes (each in a
network namespace of its own when the machine allows it, so they are separate hosts),
drives concurrent purchases from random buyers, and meanwhile a nemesis injects faults
at random times:

* SIGKILL of the wallet, the order service or the shop (the coordinator), then a restart;
* SIGSTOP/SIGCONT pauses of a participant, longer than the prepare deadline;
* lost requests, lost replies, delayed and duplicated messages between the shop and
  the participants (a fault-injecting interceptor in the shop, `--net-faults`);
* a network partition: a participant's host is cut off from the network (its link is
  taken down), then reconnected. Needs root and `ip netns`; skipped with a message
  otherwise;
* with `--db postgres` (wallet and orders on a private PostgreSQL server, a schema
  each): SIGKILL of the PostgreSQL server, then a restart (crash recovery from WAL);
* with `--db cluster` (wallet, orders and the shop's log on a Patroni cluster, every
  service and node a host of the cluster's network): killing, pausing and
  partitioning PostgreSQL nodes (mostly the primary) and etcd members, with the
  failover times they cause (`services.pgfaults`).

With `--ha`, two shops (coordinator instances) share a PostgreSQL decision log
(a private server on a host of its own when namespaces are available, else the
server of `--pg-url`), and killing, pausing (past the lease) and partitioning
either shop are faults too; a shop that stopped (killed, or fenced after a pause
or partition) is restarted as a supervisor would, a new instance.

With `--away-past-abort` the shop decides on a PostgreSQL log (`--pg-url`) and
gives up an Abort after `--abort-retry-s` (1 s, each attempt 1 s); the shop
reaches the wallet and the order service through relays in this process, and the
only faults cut one of them off from the shop (its answers held first, so that
Prepares it receives are prepared but their votes never arrive; then every byte,
for longer than the Abort's retries; then the held bytes are dropped): such a
participant never hears the Abort of the transaction that timed out on its vote. It
still reaches the shop: it asks, and the shop, alive, that never logged the abort,
must answer ABORTED (rule 12 of docs/design.md), not PENDING for as long as it
lives. After heal nothing may be left held; the report counts the holds released
by asking.

At the end the nemesis stops, every process is brought back, the run waits (bounded)
for recovery and checks every invariant of docs/design.md from the services' own stores and
the shop's log, plus the client's view: a purchase the client saw committed is
committed at both services, one it saw aborted left no trace, one whose answer it
never saw is all there or not at all. The same seed gives the same schedule of faults
and operations (process timing still varies).

    python -m services.chaos --seed 7 --duration-s 60
    python -m services.chaos --ha --duration-s 300
    python -m services.chaos --away-past-abort --duration-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from services import pgfaults
from services.cluster import Cluster, Settings, postgres_stores
from services.scenarios import outcome
from twopc.dev.netns import Network
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess, query

if TYPE_CHECKING:
    from twopc.dev.pgcluster import PgCluster

KILLS = ("kill_wallet", "kill_orders", "kill_shop")
KILL_POSTGRES = "kill_postgres"  # with --db postgres: the server under wallet and orders
PAUSES = ("pause_wallet", "pause_orders")
PARTITIONS = ("partition_wallet", "partition_orders")
CUTS = ("cut_wallet", "cut_orders")  # --away-past-abort: parted from the shop only, by its relay
AWAY_RPC_TIMEOUT_S = 1.0  # the shop's per-attempt deadline in --away-past-abort
HA_KILLS = ("kill_shop1",)  # kill_shop is in KILLS
HA_PAUSES = ("pause_shop", "pause_shop1")
HA_PARTITIONS = ("partition_shop", "partition_shop1")
NET_KINDS = ("lose_request", "lose_reply", "delay", "duplicate")
SCARCE_SKU = "scarce"


@dataclass(frozen=True)
class Options:
    seed: int
    duration_s: float = 60.0
    concurrency: int = 8
    accounts: int = 8
    skus: int = 5
    prepare_timeout_s: float = 1.0
    recovery_timeout_s: float = 60.0
    partitions: bool = True
    net_faults: str = "lose_request=0.02,lose_reply=0.02,delay=0.05,duplicate=0.05,delay_max_s=0.3"
    wallet_module: str = "services.wallet"
    workdir: str = ""
    tls: bool = True
    ha: bool = False  # two shops on a PostgreSQL log
    lease_s: float = 1.0  # their lease, in --ha
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test"  # in --ha without namespaces
    db: str = "sqlite"
    away_past_abort: bool = False  # a PostgreSQL log, pauses past the Abort's retries
    abort_retry_s: float = 1.0  # the shop's, in --away-past-abort


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    length_s: float


@dataclass
class Purchase:
    order_id: str
    account: str
    items: dict[str, int]
    seen: str = ""  # committed / aborted / unknown, as the client saw it
    txn_id: str = ""
    reason: str = ""
    started: float = 0.0  # monotonic, when sent
    answered: float = 0.0  # monotonic, when answered


@dataclass
class Result:
    options: dict[str, Any]
    purchases: dict[str, int] = field(default_factory=dict)
    unknown_resolved: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    batched_faults: dict[str, int] = field(default_factory=dict)  # net faults on PrepareMany, CommitMany
    skipped: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    totals: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    released_by_asking: int = 0  # holds a participant released on GetOutcome ABORTED
    failover: dict[str, Any] = field(default_factory=dict)  # --db cluster: pgfaults.ClusterFaults.summary


def schedule(rng: random.Random, opts: Options, kinds: list[str]) -> list[Fault]:
    """The nemesis' plan: every kind at least once (in random order), then random
    kinds, one fault at a time with gaps between them."""
    first = list(kinds)
    rng.shuffle(first)
    faults: list[Fault] = []
    t = 1.0
    while t < opts.duration_s - 2.0:
        kind = first.pop() if first else rng.choice(kinds)
        if kind in pgfaults.KINDS:  # long enough for a failover (Patroni's ttl is 5 s), or not
            length = rng.uniform(2.0, 12.0)
        elif kind in HA_PAUSES:
            length = opts.lease_s * rng.uniform(1.5, 3.0)  # past the lease: the other takes over
        elif kind in CUTS:  # past the Abort's retries: its first attempt and the next ones
            length = opts.abort_retry_s + 2 * AWAY_RPC_TIMEOUT_S + rng.uniform(1.0, 2.0)
        elif kind.startswith("pause"):
            length = opts.prepare_timeout_s + rng.uniform(0.5, 2.0)
        elif kind.startswith("partition"):
            length = rng.uniform(1.0, 4.0)
        else:
            length = rng.uniform(0.2, 2.0)  # downtime before the restart
        faults.append(Fault(round(t, 2), kind, round(length, 2)))
        t += length + rng.uniform(0.5, 2.5)
    return faults


class Nemesis:
    """Runs the fault schedule against the cluster, one fault at a time."""

    def __init__(
        self,
        c: Cluster,
        network: Network | None,
        postgres: PostgresServer | None = None,
        cluster: pgfaults.ClusterFaults | None = None,
    ) -> None:
        self.c, self.network, self.postgres, self.cluster = c, network, postgres, cluster
        self.counts: Counter[str] = Counter()
        self.active: tuple[str, ServiceProcess | None] | None = None
        self.node = ""  # the cluster's node or member hit by the active fault

    def _proc(self, kind: str) -> ServiceProcess:
        procs = {"wallet": self.c.wallet, "orders": self.c.orders, "shop": self.c.shop}
        procs.update({f"shop{i}": shop for i, shop in enumerate(self.c.shops) if i})
        return procs[kind.split("_", 1)[1]]

    async def supervise(self) -> None:
        """Restarts a shop that stopped by itself (fenced after a pause or a
        partition, it exits), as a supervisor (systemd, Kubernetes) would."""
        while True:
            await asyncio.sleep(0.5)
            busy = self.active[1] if self.active else None
            for shop in self.c.shops:
                if shop is not busy and shop.proc is not None and not shop.running:
                    self.counts["restart_stopped_shop"] += 1
                    await asyncio.to_thread(shop.restart)

    async def run(self, faults: list[Fault], started: float) -> None:
        for fault in faults:
            await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
            await self.inject(fault.kind)
            await asyncio.sleep(fault.length_s)
            try:
                await self.heal()
            except (RuntimeError, TimeoutError) as e:  # a restart that failed: the end brings it back
                progress(f"chaos: healing {fault.kind} failed ({e}); going on")
                self.counts["heal_failed"] += 1

    async def inject(self, kind: str) -> None:
        if kind in pgfaults.KINDS:
            assert self.cluster is not None
            self.node = await self.cluster.inject(kind)
            self.active = (kind, None)
            self.counts[kind] += 1
            return
        if kind == KILL_POSTGRES:  # the database under both participants crashes
            assert self.postgres is not None
            await asyncio.to_thread(self.postgres.kill)
            self.active = (kind, None)
            self.counts[kind] += 1
            return
        if kind in CUTS:
            # First only its answers are held: the Prepares that reach it meanwhile
            # are prepared (held), their votes never come back, and the shop aborts
            # them at their deadline. By then everything is held: those Aborts too.
            proxy = self.c.proxies[kind.split("_", 1)[1]]
            proxy.cut_replies()
            await asyncio.sleep(0.5 * self.c.settings.prepare_timeout_s)
            proxy.cut()
            self.active = (kind, None)
            self.counts[kind] += 1
            return
        proc = self._proc(kind)
        if kind in KILLS or kind in HA_KILLS:
            proc.kill()
        elif kind in PAUSES or kind in HA_PAUSES:
            proc.pause()
        else:
            assert self.network is not None
            self.network.cut(kind.split("_", 1)[1])
        self.active = (kind, proc)
        self.counts[kind] += 1

    async def heal(self) -> None:
        if self.active is None:
            return
        kind, proc = self.active
        self.active = None
        if kind in pgfaults.KINDS:
            assert self.cluster is not None
            await self.cluster.heal(kind, self.node)
        elif kind == KILL_POSTGRES:
            assert self.postgres is not None
            await asyncio.to_thread(self.postgres.restart)  # crash recovery from its WAL
        elif kind in CUTS:  # what it held is lost, as a partition loses it
            proxy = self.c.proxies[kind.split("_", 1)[1]]
            proxy.reset()
            proxy.heal()
        elif kind in KILLS or kind in HA_KILLS:
            assert proc is not None
            await asyncio.to_thread(proc.restart)
        elif kind in PAUSES or kind in HA_PAUSES:
            assert proc is not None
            proc.resume()
        elif self.network is not None:
            self.network.heal(kind.split("_", 1)[1])


async def workload(c: Cluster, opts: Options, accounts: list[str], skus: list[str], until: float) -> list[Purchase]:
    """`concurrency` buyers, each with its own seeded stream of purchases and deposits."""
    history: list[Purchase] = []
    plenty = [s for s in skus if s != SCARCE_SKU]

    async def buyer(worker: int) -> None:
        rng = random.Random(f"{opts.seed}-buyer-{worker}")
        n = 0
        while time.monotonic() < until:
            n += 1
            if rng.random() < 0.1:  # money keeps coming in, beside the holds
                with contextlib.suppress(grpc.aio.AioRpcError):  # the wallet may be down: skip it
                    await c.deposit(rng.choice(accounts), rng.randint(5_000, 50_000))
                continue
            picked = rng.sample(plenty, rng.randint(1, min(3, len(plenty))))
            if rng.random() < 0.05:  # now and then the scarce product, bound to run out
                picked.append(SCARCE_SKU)
            p = Purchase(f"w{worker}-{n}", rng.choice(accounts), {s: rng.randint(1, 3) for s in picked})
            history.append(p)
            p.started = time.monotonic()
            try:
                r = await c.purchase(p.order_id, p.account, p.items, timeout_s=opts.prepare_timeout_s, shop=worker)
                p.seen, p.txn_id, p.reason = outcome(r).lower(), r.txn_id, r.reason
                p.answered = time.monotonic()
            except grpc.aio.AioRpcError as e:
                p.seen, p.reason = "unknown", e.code().name
                await asyncio.sleep(0.2)  # the shop may be down: do not spin
            await asyncio.sleep(rng.uniform(0, 0.02))

    await asyncio.gather(*(buyer(w) for w in range(opts.concurrency)))
    return history


def check_client_view(c: Cluster, history: list[Purchase], result: Result) -> None:
    """What the client saw against what the services hold."""
    debited = {t for (t,) in query(c.wallet_db, "SELECT txn_id FROM ledger WHERE kind = 'debit'")}
    placed = {o: (s, t) for o, s, t in query(c.orders_db, "SELECT order_id, state, txn_id FROM orders")}
    resolved: Counter[str] = Counter()
    for p in history:
        state, txn = placed.get(p.order_id, ("ABSENT", ""))
        if p.seen == "committed" and not (state == "CONFIRMED" and txn == p.txn_id and p.txn_id in debited):
            result.violations.append(f"{p.order_id} (txn {p.txn_id}): client saw COMMITTED, order is {state}")
        elif p.seen == "aborted" and (state == "CONFIRMED" or p.txn_id in debited):
            result.violations.append(f"{p.order_id} (txn {p.txn_id}): client saw ABORTED, but it left a trace")
        elif p.seen == "unknown":
            resolved["committed" if state == "CONFIRMED" else "aborted"] += 1
    result.unknown_resolved = dict(resolved)


def released_by_asking(workdir: Path) -> int:
    """How many times a participant heard ABORTED when it asked about a hold: the
    Aborts lost past their retries, settled by asking the shop."""
    released = 0
    for name in ("wallet", "orders"):
        path = workdir / f"{name}.log"
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            released += sum(1 for line in lines if '"in_doubt_asked"' in line and '"OUTCOME_ABORTED"' in line)
    return released


def count_net_faults(shop_log: Path) -> tuple[Counter[str], Counter[str]]:
    """The network faults the shop's interceptor injected: by kind, and by batched
    method (PrepareMany, CommitMany), which shows the batched paths were hit."""
    kinds: Counter[str] = Counter()
    batched: Counter[str] = Counter()
    for line in shop_log.read_text(errors="replace").splitlines():
        if '"net_fault"' in line:
            try:
                event = json.loads(line)
                kinds[event["kind"]] += 1
            except (ValueError, KeyError):
                continue
            method = str(event.get("method", "")).rsplit("/", 1)[-1]
            if method.endswith("Many"):
                batched[method] += 1
    return kinds, batched


async def run(opts: Options) -> Result:
    rng = random.Random(opts.seed)
    workdir = Path(opts.workdir or f"var/chaos-{opts.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = Result(options=asdict(opts) | {"workdir": str(workdir)})
    kinds = [*KILLS, *PAUSES, *(HA_KILLS + HA_PAUSES if opts.ha else ())]
    shared_log = opts.ha or opts.away_past_abort
    names = ["wallet", "orders", "shop", *(["shop1"] if opts.ha else []), *(["pg"] if shared_log else [])]
    network = None
    pgc: PgCluster | None = None
    if opts.away_past_abort:
        kinds = list(CUTS)  # only what loses an Abort past its retries
    elif opts.db == "cluster":  # the services join the cluster's network
        from twopc.dev import pgcluster  # the postgres extra

        reason = pgcluster.missing()
        if reason:
            raise SystemExit(f"--db cluster {reason}")
        pgc = pgcluster.PgCluster(prefix="cha", net=237, hosts=names, workdir=workdir / "pgcluster")
        network = pgc.network
        kinds += [*PARTITIONS, *(HA_PARTITIONS if opts.ha else ()), *pgfaults.KINDS]
    elif opts.partitions:
        ok, why = Network.available()
        if ok:
            network = Network(names, prefix="haq" if opts.ha else "tpc", net=233 if opts.ha else 231)
            kinds += [*PARTITIONS, *(HA_PARTITIONS if opts.ha else ())]
        else:
            result.skipped.append(f"partition: {why}")
    else:
        result.skipped.append("partition: disabled by --no-partitions")
    net_faults = f"{opts.net_faults},seed={opts.seed}"
    shop_args = ["--net-faults", net_faults]
    if opts.away_past_abort:
        shop_args += ["--abort-retry-s", str(opts.abort_retry_s), "--rpc-timeout-s", str(AWAY_RPC_TIMEOUT_S)]
    settings = Settings(prepare_timeout_s=opts.prepare_timeout_s, log_level="info")
    hosts = {n: network.host(n) for n in names if n != "pg"} if network else None
    accounts = [f"buyer{i}" for i in range(opts.accounts)]
    skus = [*(f"sku{i}" for i in range(opts.skus - 1)), SCARCE_SKU]
    if opts.db == "postgres":
        kinds.append(KILL_POSTGRES)
    faults = schedule(rng, opts, kinds)
    pg: Any = None
    cluster_faults: pgfaults.ClusterFaults | None = None
    try:
        stores: dict[str, str] = {}
        log_url = ""
        if pgc is not None:
            progress("chaos: starting the PostgreSQL cluster (etcd, Patroni)")
            await asyncio.to_thread(pgc.start)
            for name in ("wallet", "orders"):
                stores[name] = pgc.url(schema=name)  # the store creates its schema
            log_url = pgc.url(schema="chaos_log", lease_s=str(pgfaults.LOG_LEASE_S))
            cluster_faults = pgfaults.ClusterFaults(pgc, list(stores.values()), log_url, rng)
        elif network:
            network.up()
        if shared_log and pgc is None:
            from services.failover import PrivatePostgres  # the postgres extra

            schema = f"chaos_{opts.seed}_{int(time.time())}"
            if network:
                pg = PrivatePostgres(network.host("pg").address, network.host("pg").wrapper).start()
                log_url = pg.url(schema, lease_s=str(opts.lease_s))
            else:
                log_url = f"{opts.pg_url}?schema={schema}&lease_s={opts.lease_s}"
        async with contextlib.AsyncExitStack() as stack:
            postgres: PostgresServer | None = None
            if opts.db == "postgres":  # reached at the bridge's address from the namespaces
                address = network.gateway if network else "127.0.0.1"
                postgres, stores = stack.enter_context(postgres_stores(workdir, address=address))
            cluster = Cluster(
                workdir,
                settings,
                hosts=hosts,
                # On PostgreSQL the participants' pools take several batches at once.
                shop_args=[*shop_args, *(["--batches-in-flight", "4"] if stores else [])],
                wallet_module=opts.wallet_module,
                tls=opts.tls,
                log_url=log_url,
                shops=2 if opts.ha else 1,
                stores=stores,
                proxied=("wallet", "orders") if opts.away_past_abort else (),
            )
            c = await stack.enter_async_context(cluster)
            for i, account in enumerate(accounts):  # some buyers are poor: purchases fail for funds
                await c.open_account(account, 1_000 if i % 4 == 0 else rng.randint(200_000, 2_000_000))
            for sku in skus:  # one scarce product: purchases fail for stock
                await c.add_stock(sku, 5 if sku == SCARCE_SKU else 100_000, rng.randint(100, 2_000))
            progress(f"chaos: seed {opts.seed}, {opts.duration_s:.0f} s, {len(faults)} faults planned, in {workdir}")
            started = time.monotonic()
            nemesis = Nemesis(c, network, postgres, cluster_faults)
            nemesis_task = asyncio.create_task(nemesis.run(faults, started))
            supervisor = asyncio.create_task(nemesis.supervise())
            history = await workload(c, opts, accounts, skus, started + opts.duration_s)
            nemesis_task.cancel()
            await asyncio.gather(nemesis_task, return_exceptions=True)
            await nemesis.heal()  # bring back whatever was down at the end
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            if postgres is not None and not postgres.running:
                await asyncio.to_thread(postgres.restart)
            if cluster_faults is not None:
                await cluster_faults.heal_all(opts.recovery_timeout_s)
            for proc in (c.wallet, c.orders, *c.shops):
                if not proc.running:
                    await asyncio.to_thread(proc.restart)
            progress("chaos: nemesis stopped, every process back; waiting for recovery")
            healed = time.monotonic()
            report = await c.settled(opts.recovery_timeout_s)
            result.recovery_s = round(time.monotonic() - healed, 2) if report.ok else None
            result.violations += report.violations
            result.totals = {
                k: getattr(report, k) for k in ("deposited", "balances", "spent", "received", "on_hand", "sold")
            } | {"in_doubt": report.in_doubt, "committed_at_both": report.committed}
            check_client_view(c, history, result)
            result.released_by_asking = released_by_asking(workdir)
            result.purchases = dict(Counter(p.seen for p in history))
            net, batched = count_net_faults(workdir / "shop.log")
            result.faults = dict(nemesis.counts) | dict(net)
            result.batched_faults = dict(batched)
            if cluster_faults is not None:
                await cluster_faults.close(opts.recovery_timeout_s)
                cluster_faults.record_commits([(p.started, p.answered) for p in history if p.seen == "committed"])
                result.failover = cluster_faults.summary()
    finally:
        if pg is not None:
            pg.close()
        if pgc is not None:
            pgc.close()
        elif network:
            network.down()
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def render(result: Result) -> str:
    lines = ["", "chaos report", "------------"]
    p = result.purchases
    lines.append(
        f"purchases: {p.get('committed', 0)} committed, {p.get('aborted', 0)} aborted, "
        f"{p.get('unknown', 0)} unknown to the client"
        + (f" (afterwards {result.unknown_resolved})" if result.unknown_resolved else "")
    )
    lines.append("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items())))
    batched = ", ".join(f"{k} {v}" for k, v in sorted(result.batched_faults.items())) or "none"
    lines.append(f"of them on batched messages: {batched}")
    for skipped in result.skipped:
        lines.append(f"skipped: {skipped}")
    if result.failover:
        f = result.failover
        lines.append(
            f"faults of the primary: {f['primary_faults']}; to the first new commit {f['primary_first_commit_s']},"
            f" to nothing in doubt {f['primary_settled_s']} (seconds)"
        )
        if f["unsettled"]:
            lines.append(f"not settled within 120 s of the fault: {', '.join(f['unsettled'])}")
    recovery = f"{result.recovery_s} s" if result.recovery_s is not None else "NOT reached"
    lines.append(f"recovery after healing: {recovery}")
    if result.options.get("away_past_abort"):
        lines.append(f"holds released by asking the shop (ABORTED past the Abort retries): {result.released_by_asking}")
    t = result.totals
    if t:
        lines.append(
            f"money: deposited {t['deposited']} = balances {t['balances']} + spent {t['spent']}; "
            f"stock: received {t['received']} = on hand {t['on_hand']} + sold {t['sold']}; in doubt {t['in_doubt']}"
        )
    if result.violations:
        lines.append(f"VIOLATIONS ({len(result.violations)}):")
        lines += [f"  {v}" for v in result.violations[:50]]
    else:
        lines.append("no violations: atomic, conserved, nothing negative, agrees with the log, nothing in doubt")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m services.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="random by default; printed for reproduction")
    p.add_argument("--duration-s", type=float, default=Options.duration_s)
    p.add_argument("--concurrency", type=int, default=Options.concurrency)
    p.add_argument("--accounts", type=int, default=Options.accounts)
    p.add_argument("--skus", type=int, default=Options.skus)
    p.add_argument("--no-partitions", action="store_true", help="skip network partitions")
    p.add_argument("--ha", action="store_true", help="two shops on a PostgreSQL decision log; faults to either")
    p.add_argument("--lease-s", type=float, default=Options.lease_s, help="the shops' lease in --ha")
    p.add_argument("--pg-url", default=Options.pg_url, help="PostgreSQL for --ha when namespaces are not available")
    p.add_argument("--net-faults", default=Options.net_faults, help="probabilities for the shop's interceptor")
    p.add_argument(
        "--away-past-abort",
        action="store_true",
        help="the shop on a PostgreSQL log; participants paused past the Abort's retries; nothing may stay held",
    )
    p.add_argument("--abort-retry-s", type=float, default=Options.abort_retry_s, help="the shop's Abort retry")
    p.add_argument("--wallet-module", default=Options.wallet_module, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="")
    p.add_argument("--insecure", action="store_true", help="plaintext instead of mutual TLS between the services")
    p.add_argument(
        "--db",
        choices=["sqlite", "postgres", "cluster"],
        default=Options.db,
        help="wallet and orders on SQLite files, on a private PostgreSQL server (adds the kill_postgres fault),"
        " or with the shop's log on a Patroni cluster (adds killing, pausing, partitioning its nodes and etcd)",
    )
    p.add_argument("--json", type=Path, default=None, help="where to write the report as JSON")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1_000_000)
    opts = Options(
        seed=seed,
        duration_s=a.duration_s,
        concurrency=a.concurrency,
        accounts=a.accounts,
        skus=max(2, a.skus),
        partitions=not a.no_partitions,
        net_faults=a.net_faults,
        wallet_module=a.wallet_module,
        workdir=a.workdir,
        tls=not a.insecure,
        ha=a.ha,
        lease_s=a.lease_s,
        pg_url=a.pg_url,
        db=a.db,
        away_past_abort=a.away_past_abort,
        abort_retry_s=a.abort_retry_s,
    )
    result = asyncio.run(run(opts))
    print(render(result))
    json_path = a.json or Path(result.options["workdir"]) / "report.json"
    json_path.write_text(json.dumps(asdict(result), indent=2))
    db = f" DB={a.db}" if a.db != "sqlite" else ""
    print(f"report: {json_path}   reproduce: make chaos SEED={seed} DURATION={a.duration_s:g}{db}")
    sys.exit(1 if result.violations or result.recovery_s is None else 0)


if __name__ == "__main__":
    main()
