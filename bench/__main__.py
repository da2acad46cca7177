"""`python -m bench`: twopc against the floor of its own message pattern.

For each concurrency, and each number of branches N, the floor of N trivial servers
is measured first, then twopc over N participants right after it: the wallet and
order services (N = 2) and N durable participants. twopc runs twice per case: "ack"
(`phase2_wait_s` at its default: `run` returns once the Commits are acknowledged,
the same two round trips the floor waits for) and "commit-point" (`phase2_wait_s=0`:
`run` returns once the decision is durable; phase 2 goes on in the background, and
the time to drain it counts in the phase's elapsed time). Targets are judged on ack.
With N = 2, "durable+pglog" runs the same participants with the decision log in
PostgreSQL (`--pg-log`, the log several coordinator instances share) instead of
SQLite, and "pglog+sync-replica" with it on a replicated cluster's primary
(`bench/replica.py`).

Above 64 in flight only the two-branch cases run.

Before the one-in-flight cases, the disk's own rows: one durable SQLite commit back
to back (the unit of the one-in-flight limit: the floor's p50 plus three such
commits), and the same commit through `SqliteStore.write`, on its thread and on its
idle path. The table also goes to bench/results/latest.json, and a chart of
throughput and latency against concurrency to latest.png beside it (matplotlib).

`--memory` instead runs many transactions and compares resident memory after the
baseline count with the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import google.protobuf
import grpc

from bench import chart, durable, replica, shop
from bench.fleet import Fleet, Service, fixed_branches, progress, workdir
from bench.floor import FloorClient
from bench.load import Run, cpu_s, drained, drive, drive_count, rss_kb
from bench.plain import PlainShop
from twopc import Branch, Coordinator, CoordinatorConfig, Credentials, SqliteStore
from twopc.dev import pgserver
from twopc.observe import Event, EventKind, Observer, Observers, logconfig

INSECURE = Credentials.insecure()
PHASE2_WAIT_S = {"ack": CoordinatorConfig().phase2_wait_s, "commit-point": 0.0}
TEXTBOOK = {
    "coordinator_fsyncs_per_commit": 1,
    "coordinator_fsyncs_per_abort": 0,
    "coordinator_fsyncs_one_phase": 0,
    "participant_fsyncs_per_txn": 2,
    "participant_fsyncs_read_only": 0,
    "coordinator_messages_per_txn": "2N requests (4N counting replies)",
}
RESULTS = Path(__file__).parent / "results"
PLAIN = "pg-plain"  # the purchase without twopc on the same PostgreSQL server (bench.plain)
Db = Callable[[], tuple[int, float]]
"""The private PostgreSQL server's (statements run, CPU seconds) so far."""
DISK = "sqlite-commit"  # the disk row: one durable SQLite commit
STORE = "store-write"  # the same through SqliteStore: with the thread hand-off, and on the idle path
WIDE_MAX_CONCURRENCY = 64  # above it, only the two-branch cases run (the rest adds minutes, not insight)
# Textbook presumed-abort figures per transaction for the other paths: coordinator forced
# writes, forced writes per participant (mean), requests sent.
PATHS = {
    "one-phase": (0, 1, 1),  # one Prepare(one_phase) that commits: one participant write, no log
    "read-only": (1, 1, 3),  # the updater writes twice, the reader never; no Commit to the reader
    "abort": (0, 0.5, 4),  # the yes-voter forces its prepare only; aborts are not forced or logged
}


# --- phases ----------------------------------------------------------------------------


@dataclass
class Row:
    """One measured phase. Ratios compare with the floor of the same N and concurrency;
    per-transaction counts are per committed transaction."""

    concurrency: int
    system: str
    branches: int
    phase2: str
    committed: int
    aborted: int
    errors: int
    elapsed_s: float
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    tps_ratio: float | None = None
    p50_ratio: float | None = None
    p99_ratio: float | None = None
    limit_ratio: float | None = None  # p50 against the disk's limit (one in flight, 2 branches)
    coordinator_fsyncs_per_txn: float | None = None
    participant_fsyncs_per_txn: float | None = None  # mean over the participants
    messages_per_txn: float | None = None
    cpu_ms_per_txn: float | None = None  # user + system, this process and the servers together
    db_cpu_ms_per_txn: float | None = None  # the private PostgreSQL server's processes, beside cpu_ms
    statements_per_txn: float | None = None  # SQL statements the private PostgreSQL server ran
    first_error: str = ""

    @classmethod
    def of(cls, run: Run, *, concurrency: int, system: str, branches: int, phase2: str) -> Row:
        return cls(
            concurrency=concurrency,
            system=system,
            branches=branches,
            phase2=phase2,
            committed=run.committed,
            aborted=run.aborted,
            errors=run.errors,
            elapsed_s=round(run.elapsed_s, 3),
            tps=round(run.tps, 1),
            p50_ms=round(run.percentile_ms(0.50), 3),
            p99_ms=round(run.percentile_ms(0.99), 3),
            max_ms=round(run.percentile_ms(1.0), 3),
            first_error=run.first_error,
        )

    def cpu(self, before: list[float], after: list[float]) -> None:
        if self.committed:
            self.cpu_ms_per_txn = round(1000 * (sum(after) - sum(before)) / self.committed, 3)

    def database(self, before: tuple[int, float], after: tuple[int, float]) -> None:
        """The private PostgreSQL server's share: (statements, CPU s) before and after."""
        if self.committed:
            self.statements_per_txn = round((after[0] - before[0]) / self.committed, 2)
            self.db_cpu_ms_per_txn = round(1000 * (after[1] - before[1]) / self.committed, 3)

    def compare(self, floor: Row) -> None:
        self.tps_ratio = round(self.tps / floor.tps, 3) if floor.tps else None
        self.p50_ratio = round(self.p50_ms / floor.p50_ms, 3) if floor.p50_ms else None
        self.p99_ratio = round(self.p99_ms / floor.p99_ms, 3) if floor.p99_ms else None


@dataclass
class Settings:
    duration_s: float
    warmup_s: float
    concurrency: list[int]
    branches: list[int]
    phase2: list[str]
    log_level: str
    pg_log: str = ""  # a PostgreSQL server for the "durable+pglog" rows, or "" for none
    replica_log: str = ""  # a Patroni cluster's URL for the "pglog+sync-replica" rows, or ""
    why_no_replica: str = ""
    postgres: bool = True  # the wallet+order rows on a private PostgreSQL server
    postgres_only: bool = False  # only the floor and the two-branch PostgreSQL rows (and durable, their anchor)
    pg_batches_in_flight: int = 4  # CoordinatorConfig.batches_in_flight for participants on PostgreSQL
    coordinator_config: dict[str, Any] = field(default_factory=lambda: asdict(CoordinatorConfig()))


async def floor_phase(servers: Sequence[Service], concurrency: int, s: Settings) -> Row:
    client = FloorClient([x.address for x in servers], durable.operation())
    try:
        await drive(client.txn, concurrency=concurrency, duration_s=s.warmup_s)
        cpu = _cpu(servers)
        run = await drive(client.txn, concurrency=concurrency, duration_s=s.duration_s)
        row = Row.of(run, concurrency=concurrency, system="floor", branches=len(servers), phase2="-")
        row.cpu(cpu, _cpu(servers))
    finally:
        await client.close()
    return row


def disk_phase(workdir: Path, s: Settings) -> Row:
    """One durable SQLite commit on this disk, as the stores make it (WAL,
    synchronous=FULL, one small row per transaction), back to back on this thread:
    the unit of the one-in-flight limit."""
    db = sqlite3.connect(workdir / "disk-probe.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")

        def commit() -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 64,))
            db.execute("COMMIT")

        for duration_s in (s.warmup_s, s.duration_s):
            run = Run()
            started = stop_at = time.perf_counter()
            stop_at += duration_s
            while (now := time.perf_counter()) < stop_at:
                commit()
                run.record(now, True)
            run.elapsed_s = time.perf_counter() - started
    finally:
        db.close()
    return Row.of(run, concurrency=1, system=DISK, branches=0, phase2="-")


async def store_phases(workdir: Path, s: Settings) -> list[Row]:
    """The same commit through `SqliteStore.write`, one at a time: handed to the
    writer thread and back, and on the idle path (`inline_if_idle`, no hand-off),
    alternating in short rounds so both see the same disk and the same neighbours."""

    def insert(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 64,))

    runs = {False: Run(), True: Run()}
    async with SqliteStore(workdir / "store-probe.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)") as store:
        stop_at = time.perf_counter() + s.warmup_s
        while time.perf_counter() < stop_at:
            await store.write(insert, inline_if_idle=True)
            await store.write(insert)
        rounds = 20
        for _ in range(rounds):
            for inline, run in runs.items():
                started = stop_at = time.perf_counter()
                stop_at += s.duration_s / rounds / 2
                while (now := time.perf_counter()) < stop_at:
                    await store.write(insert, inline_if_idle=inline)
                    run.record(now, True)
                run.elapsed_s += time.perf_counter() - started
    return [
        Row.of(run, concurrency=1, system=STORE, branches=0, phase2="idle-path" if inline else "thread")
        for inline, run in runs.items()
    ]


async def plain_phase(
    plain: PlainShop, servers: Sequence[Service], concurrency: int, s: Settings, db: Db, wal_syncs: Callable[[], int]
) -> Row:
    """The purchase without twopc: two plain unary RPCs, one PostgreSQL transaction each."""
    await drive(plain.purchase, concurrency=concurrency, duration_s=s.warmup_s)
    cpu, counted, syncs = _cpu(servers), db(), wal_syncs()
    run = await drive(plain.purchase, concurrency=concurrency, duration_s=s.duration_s)
    row = Row.of(run, concurrency=concurrency, system=PLAIN, branches=2, phase2="-")
    row.cpu(cpu, _cpu(servers))
    row.database(counted, db())
    if run.committed:  # the server's WAL flushes, per service (as for the twopc rows on it)
        row.participant_fsyncs_per_txn = round((wal_syncs() - syncs) / run.committed / 2, 3)
    return row


def _cpu(servers: Sequence[Service]) -> list[float]:
    return [cpu_s(), *(cpu_s(x.pid) for x in servers)]


async def twopc_phase(
    system: str,
    participants: Sequence[Service],
    branches: Callable[[int], list[Branch]],
    concurrency: int,
    phase2: str,
    s: Settings,
    log_path: Path | str,
    observers: Sequence[Observer] = (),
    server_syncs: Callable[[], int] | None = None,
    db: Db | None = None,
    batches_in_flight: int = 1,
) -> Row:
    """`server_syncs`: the participants' forced writes, counted at their shared
    database server (PostgreSQL) rather than in each process; `db`: that server's
    statements and CPU so far."""
    config = CoordinatorConfig(phase2_wait_s=PHASE2_WAIT_S[phase2], batches_in_flight=batches_in_flight)
    async with Coordinator(
        log_path, credentials=INSECURE, listen="127.0.0.1:0", config=config, observers=observers
    ) as coordinator:

        async def txn(i: int) -> bool:
            return (await coordinator.run(branches(i))).committed

        await drive(txn, concurrency=concurrency, duration_s=s.warmup_s, drain=drained(coordinator))
        syncs, messages = coordinator.log_syncs, coordinator.messages_sent
        before = [await p.syncs() for p in participants]
        server_before = server_syncs() if server_syncs else 0
        cpu = _cpu(participants)
        counted = db() if db else (0, 0.0)
        run = await drive(txn, concurrency=concurrency, duration_s=s.duration_s, drain=drained(coordinator))
        row = Row.of(run, concurrency=concurrency, system=system, branches=len(participants), phase2=phase2)
        row.cpu(cpu, _cpu(participants))
        if db:
            row.database(counted, db())
        after = [await p.syncs() for p in participants]
        if server_syncs:
            after, before = [server_syncs()], [server_before]
        txns = run.committed + run.aborted  # the abort path's rows count aborted transactions
        if txns:
            row.coordinator_fsyncs_per_txn = round((coordinator.log_syncs - syncs) / txns, 3)
            row.messages_per_txn = round((coordinator.messages_sent - messages) / txns, 3)
            if all(b is not None and a is not None for a, b in zip(after, before, strict=True)):
                total = sum(a - b for a, b in zip(after, before, strict=True) if a is not None and b is not None)
                row.participant_fsyncs_per_txn = round(total / txns / len(participants), 3)
    return row


class _Counter:
    """The cheapest listener: counts events."""

    def __init__(self) -> None:
        self.events = 0
        self.txns: set[str] = set()

    def on_event(self, event: Event) -> None:
        self.events += 1
        self.txns.add(event.txn_id)


def observer_cost(before: Row, observed: Row, after: Row, counter: _Counter) -> dict[str, Any]:
    """What observing costs: one unobserved report in ns (timed in a loop), the reports
    of a transaction as a share of its p50, and the observed run against the unobserved
    ones around it, whose own difference is the noise."""
    nobody = Observers()
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        nobody.emit(EventKind.VOTED, "txn", branch="b", target="t", vote=None, reason="")
    emit_ns = (time.perf_counter() - start) / n * 1e9
    per_txn = counter.events / len(counter.txns) if counter.txns else 0.0
    p50 = (before.p50_ms + after.p50_ms) / 2
    return {
        "unobserved_emit_ns": round(emit_ns, 1),
        "events_per_txn": round(per_txn, 2),
        "unobserved_share_of_p50": round(emit_ns * per_txn / 1e6 / p50, 6) if p50 else None,
        "observed_p50_ratio": round(observed.p50_ms / p50, 3) if p50 else None,
        "unobserved_p50_ratio": round(after.p50_ms / before.p50_ms, 3) if before.p50_ms else None,
    }


def _label(row: Row) -> str:
    return f"{row.system} x{row.branches}" + ("" if row.phase2 == "-" else f" ({row.phase2})")


async def benchmark(fleet: Fleet, s: Settings) -> dict[str, Any]:
    """Starts the processes, runs every phase in order, and returns the results."""
    n_max = max(s.branches)
    why_no_shop = shop.missing()
    floors = fleet.floors(max(n_max, 2))
    durables = fleet.durables(2 if s.postgres_only else n_max)
    the_shop: shop.Shop | None = None
    shop_services: list[Service] = []
    if why_no_shop or s.postgres_only:
        progress(f"wallet+order: skipped ({why_no_shop or '--postgres-only'})")
    else:
        shop_services, the_shop = await fleet.shop(max(s.concurrency))
    on_postgres: dict[str, tuple[list[Service], shop.Shop]] = {}
    plain: PlainShop | None = None
    why_no_postgres = why_no_shop or pgserver.missing() or ("" if s.postgres else "--no-postgres")
    if why_no_postgres:
        progress(f"wallet+order on PostgreSQL: skipped ({why_no_postgres})")
    else:
        on_postgres, plain = await fleet.on_postgres(max(s.concurrency))

    def db() -> tuple[int, float]:
        return fleet.statements(), fleet.postgres_cpu_s()

    progress(f"started {len(fleet.services)} processes in {fleet.workdir}")

    why_no_pg = _pg_missing(s.pg_log)
    if why_no_pg:
        progress(f"durable, pg log: skipped ({why_no_pg})")
    pg_schemas: list[str] = []
    sizes = [2] if s.postgres_only else sorted(set(s.branches) | ({2} if the_shop else set()))
    per_size = {
        n: len(s.phase2)
        * (
            (n in s.branches)
            + (n == 2) * ((the_shop is not None) + (not why_no_pg) + (not s.why_no_replica) + len(on_postgres))
        )
        + 1
        + (n == 2 and plain is not None)
        for n in sizes
    }
    total = sum(sum(per_size.values()) if c <= WIDE_MAX_CONCURRENCY else per_size[2] for c in s.concurrency)
    if not s.postgres_only:
        total += len(PATHS) + 3 + 3 * (1 in s.concurrency)
    rows: list[Row] = []
    op, ro, no = durable.operation(), durable.operation(vote="read_only"), durable.operation(vote="abort")

    def done(row: Row) -> None:
        rows.append(row)
        ratio = "" if row.tps_ratio is None else f"  x{row.tps_ratio:.2f} floor txn/s, x{row.p50_ratio:.2f} floor p50"
        ratio += "" if row.limit_ratio is None else f", x{row.limit_ratio:.2f} the disk's limit"
        bad = f"  ({row.aborted} aborted, {row.errors} errors: {row.first_error})" if row.aborted or row.errors else ""
        progress(
            f"[{len(rows)}/{total}] c={row.concurrency:<3} {_label(row):<36} {row.tps:8.1f} txn/s  "
            f"p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms{ratio}{bad}"
        )

    disk: Row | None = None
    for c in s.concurrency:
        if c == 1 and not s.postgres_only:
            disk = disk_phase(fleet.workdir, s)
            done(disk)
            for row in await store_phases(fleet.workdir, s):
                row.p50_ratio = round(row.p50_ms / disk.p50_ms, 3) if disk.p50_ms else None
                done(row)
        for n in sizes if c <= WIDE_MAX_CONCURRENCY else [2]:
            floor = await floor_phase(floors[:n], c, s)
            done(floor)
            if n == 2 and plain is not None:
                row = await plain_phase(plain, fleet.plain, c, s, db, fleet.wal_syncs)
                row.compare(floor)
                done(row)
            cases: list[tuple[str, Sequence[Service], Callable[[int], list[Branch]]]] = []
            if n == 2 and the_shop is not None:
                cases.append(("wallet+order", shop_services, the_shop.purchase))
            if n == 2:
                cases += [(name, svcs, sh.purchase) for name, (svcs, sh) in on_postgres.items()]
            if n in s.branches:
                cases.append(("durable", durables[:n], fixed_branches(durables[:n], op)))
            if n == 2 and not why_no_pg:
                cases.append(("durable+pglog", durables[:n], fixed_branches(durables[:n], op)))
            if n == 2 and not s.why_no_replica:
                cases.append((replica.SYSTEM, durables[:n], fixed_branches(durables[:n], op)))
            for system, participants, branches in cases:
                for phase2 in s.phase2:
                    log: Path | str = fleet.workdir / f"decisions-{len(rows)}.db"
                    if system == "durable+pglog":
                        pg_schemas.append(f"bench_{os.getpid()}_{len(rows)}")
                        log = f"{s.pg_log}?schema={pg_schemas[-1]}"
                    elif system == replica.SYSTEM:  # a cluster of the run's own: dropped with it
                        log = replica.log_url(s.replica_log, f"bench_{len(rows)}")
                    on_pg = system in on_postgres
                    row = await twopc_phase(
                        system,
                        participants,
                        branches,
                        c,
                        phase2,
                        s,
                        log,
                        server_syncs=fleet.wal_syncs if on_pg else None,
                        db=db if on_pg else None,
                        batches_in_flight=s.pg_batches_in_flight if on_pg else 1,
                    )
                    row.compare(floor)
                    if c == 1 and n == 2 and disk is not None:
                        row.limit_ratio = round(row.p50_ms / limit_ms(floor, disk), 3)
                    done(row)
    if plain is not None:
        await plain.close()
    skipped = {
        "wallet+order": why_no_shop,
        "durable+pglog": why_no_pg,
        replica.SYSTEM: s.why_no_replica,
        "wallet+order on PostgreSQL": why_no_postgres,
    }
    if s.postgres_only:
        _drop_schemas(s.pg_log, pg_schemas)
        return {"rows": [asdict(r) for r in rows], "targets": targets_met(rows), "skipped": _skipped(skipped)}
    # The other paths of the protocol, one at a time, for their forced writes and messages.
    for system, participants, branches in (
        ("one-phase", durables[:1], fixed_branches(durables[:1], op)),
        ("read-only", durables[:2], lambda i: [Branch(durables[0].address, op), Branch(durables[1].address, ro)]),
        ("abort", durables[:2], lambda i: [Branch(durables[0].address, op), Branch(durables[1].address, no)]),
    ):
        quick = Settings(**(asdict(s) | {"duration_s": max(1.0, s.duration_s / 2)}))
        done(await twopc_phase(system, participants, branches, 1, "ack", quick, fleet.workdir / f"{system}.db"))
    # The observer interface: the same transactions without a listener, with one, and
    # without again (the two unobserved runs show the noise), and what a report costs
    # when nobody listens.
    counter = _Counter()
    for i, (system, observers) in enumerate((("unobserved", ()), ("observed", (counter,)), ("unobserved", ()))):
        log = fleet.workdir / f"{system}-{i}.db"
        done(await twopc_phase(system, durables[:2], fixed_branches(durables[:2], op), 1, "ack", s, log, observers))
    _drop_schemas(s.pg_log, pg_schemas)
    return {
        "rows": [asdict(r) for r in rows],
        "observer": observer_cost(rows[-3], rows[-2], rows[-1], counter),
        "targets": targets_met(rows),
        "skipped": _skipped(skipped),
    }


def _skipped(reasons: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in reasons.items() if v}


def _pg_missing(url: str) -> str | None:
    """Why the PostgreSQL log rows cannot run, or None."""
    if not url:
        return "no --pg-log"
    try:
        import psycopg
    except ImportError:
        return "needs psycopg (pip install 'twopc[postgres]')"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        return f"needs PostgreSQL at {url}: {e}"
    return None


def _drop_schemas(url: str, schemas: list[str]) -> None:
    """Removes the benchmark's decision logs from the server."""
    if not schemas:
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


def limit_ms(floor: Row, disk: Row) -> float:
    """The one-in-flight limit of a two-branch commit: the floor's two rounds plus the
    three forced writes that cannot overlap (the prepare inside round one, the
    decision between the rounds, the commit inside round two)."""
    return floor.p50_ms + 3 * disk.p50_ms


def targets_met(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the ack rows (same round trips as the floor)."""

    def find(system: str, c: int, n: int, phase2: str = "ack") -> Row | None:
        return next(
            (r for r in rows if (r.system, r.concurrency, r.branches, r.phase2) == (system, c, n, phase2)), None
        )

    out: list[dict[str, Any]] = []
    cs = sorted({r.concurrency for r in rows})
    if not cs:
        return out
    hi, lo = (64 if 64 in cs else cs[-1]), (1 if 1 in cs else cs[0])
    row = find("wallet+order", hi, 2)
    value = row.tps_ratio if row else None
    out.append({"target": f"c={hi} wallet+order txn/s >= 1.5x floor", "value": value, "met": _ok(value, 1.5, None)})
    value = row.p99_ratio if row else None
    out.append({"target": f"c={hi} wallet+order p99 <= floor p99", "value": value, "met": _ok(value, None, 1.0)})
    row = find("wallet+order", lo, 2)
    value = row.limit_ratio if row else None
    out.append(
        {
            "target": f"c={lo} wallet+order p50 <= 1.3x the disk's limit (floor p50 + 3 x sqlite commit p50)",
            "value": value,
            "met": _ok(value, None, 1.3),
        }
    )
    out += _postgres_targets(find, hi, lo)
    for c in cs:
        two, eight = find("durable", c, 2), find("durable", c, 8)
        if two and eight and two.tps_ratio is not None and eight.tps_ratio is not None:
            out.append(
                {
                    "target": f"c={c} durable x8 txn/s ratio >= x2 ratio - 0.2 ({two.tps_ratio:.2f} - 0.2)",
                    "value": eight.tps_ratio,
                    "met": eight.tps_ratio >= two.tps_ratio - 0.2,
                }
            )
    return out


def _postgres_targets(find: Callable[..., Row | None], hi: int, lo: int) -> list[dict[str, Any]]:
    """The PostgreSQL targets: twopc against the same purchase without it (pg-plain)
    and the floor, and the PostgreSQL decision log against SQLite's."""

    def ratio(a: Row | None, b: Row | None, field: str) -> float | None:
        x, y = (getattr(r, field) if r else None for r in (a, b))
        return round(x / y, 3) if x is not None and y and not math.isnan(x) and not math.isnan(y) else None

    plain, plain_lo = find(PLAIN, hi, 2, "-"), find(PLAIN, lo, 2, "-")
    reserve, adapter, reserve_lo = find("wo-postgres", hi, 2), find("wo-pg-adapter", hi, 2), find("wo-postgres", lo, 2)
    pglog, durable = find("durable+pglog", hi, 2), find("durable", hi, 2)
    return [
        {
            "target": f"c={hi} wo-postgres txn/s >= 0.8x {PLAIN}",
            "value": (v := ratio(reserve, plain, "tps")),
            "met": _ok(v, 0.8, None),
        },
        {
            "target": f"c={hi} wo-postgres txn/s >= 0.6x floor",
            "value": (v := reserve.tps_ratio if reserve else None),
            "met": _ok(v, 0.6, None),
        },
        {
            "target": f"c={hi} wo-pg-adapter txn/s >= 0.6x {PLAIN}",
            "value": (v := ratio(adapter, plain, "tps")),
            "met": _ok(v, 0.6, None),
        },
        {
            "target": f"c={lo} wo-postgres p50 <= 2.0x {PLAIN} p50",
            "value": (v := ratio(reserve_lo, plain_lo, "p50_ms")),
            "met": _ok(v, None, 2.0),
        },
        {
            "target": f"c={hi} durable+pglog txn/s >= 0.9x durable (the SQLite log)",
            "value": (v := ratio(pglog, durable, "tps")),
            "met": _ok(v, 0.9, None),
        },
    ]


def _ok(value: float | None, at_least: float | None, at_most: float | None) -> bool | None:
    if value is None:
        return None
    return (at_least is None or value >= at_least) and (at_most is None or value <= at_most)


def table(result: dict[str, Any]) -> str:
    """The results as a fixed-width table, with the textbook figures beside them."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None or math.isnan(v) else format(v, fmt)

    head = (
        f"{'conc':>4}  {'system':<13}{'N':>2}  {'phase2':<12}{'txn/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'x txn/s':>9}{'x p50':>7}{'x p99':>7}{'x limit':>8}"
        f"{'coord fsync':>13}{'part fsync':>12}{'msgs':>11}{'cpu ms':>8}{'db cpu':>8}{'stmts':>7}{'abort/err':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in (Row(**x) for x in result["rows"]):
        coord, part, msgs = (f" ({b})" for b in PATHS.get(r.system, (1, 2, 2 * r.branches)))
        if r.system in ("floor", DISK, STORE, PLAIN):
            coord = part = msgs = ""
        lines.append(
            f"{r.concurrency:>4}  {r.system:<13}{r.branches:>2}  {r.phase2:<12}{r.tps:>9.1f}{num(r.p50_ms, '.2f'):>9}"
            f"{num(r.p99_ms, '.2f'):>9}{num(r.max_ms, '.2f'):>9}"
            f"{num(r.tps_ratio, '.2f'):>9}{num(r.p50_ratio, '.2f'):>7}{num(r.p99_ratio, '.2f'):>7}"
            f"{num(r.limit_ratio, '.2f'):>8}"
            f"{num(r.coordinator_fsyncs_per_txn, '.2f') + coord:>13}"
            f"{num(r.participant_fsyncs_per_txn, '.2f') + part:>12}"
            f"{num(r.messages_per_txn, '.1f') + msgs:>11}"
            f"{num(r.cpu_ms_per_txn, '.2f'):>8}"
            f"{num(r.db_cpu_ms_per_txn, '.2f'):>8}"
            f"{num(r.statements_per_txn, '.1f'):>7}"
            f"{f'{r.aborted}/{r.errors}':>11}"
        )
    lines += [
        "",
        "x txn/s, x p50, x p99: against the floor row just above (same N, same concurrency).",
        f"{DISK}: one durable SQLite commit on this disk (WAL, synchronous=FULL), back to back. x limit: p50",
        f"against the one-in-flight limit = floor p50 + 3 x {DISK} p50 (prepare, decision, commit in series).",
        f"{STORE}: that commit through SqliteStore.write, handed to its thread or on the idle path (run on the",
        f"caller's thread when the store is idle); x p50 against {DISK}.",
        "fsync and message counts are per transaction: coordinator = forced decision-log writes;",
        "part = forced writes per participant (mean); msgs = requests the coordinator sent. In brackets, the",
        "textbook presumed-abort figures: coordinator 1 per commit (0 per abort, 0 one-phase), participant 2",
        "(0 read-only), 2N requests (4N messages with replies). Group commit shows as fewer than the book.",
        "one-phase, read-only (one of two branches votes READ_ONLY) and abort (one of two votes ABORT): the",
        "protocol's other paths at one in flight, with their own textbook figures (participant: the mean of two).",
        "cpu ms: CPU time (user + system) per committed transaction, client or coordinator and servers together;",
        "on a machine short of cores, txn/s ratios follow the inverse ratio of this figure.",
        "db cpu: CPU ms per committed transaction of the private PostgreSQL server's processes (backends, WAL",
        "writer...), beside cpu ms; stmts: SQL statements per committed transaction that server ran",
        "(pg_stat_statements, BEGIN/SAVEPOINT/COMMIT included). Both for the rows on that server.",
        f"{PLAIN}: the same purchase with no atomicity, two plain unary RPCs of one PostgreSQL transaction each",
        "(bench.plain), on the same server and tables as wo-postgres and wo-pg-adapter: the price of atomicity.",
        "phase2: ack = run() returns after the Commit acks (default phase2_wait_s, the floor's pattern);",
        "commit-point = phase2_wait_s=0, phase 2 in the background, its drain counted in the elapsed time.",
        "unobserved, observed, unobserved: two durable branches at one in flight, without, with a counting observer,",
        "and without again; the two unobserved rows show the noise.",
    ]
    if obs := result.get("observer"):
        lines.append(
            f"observer: an unobserved report costs {obs['unobserved_emit_ns']} ns; {obs['events_per_txn']} per txn"
            f" = {obs['unobserved_share_of_p50']:.4%} of p50; observed p50 x{obs['observed_p50_ratio']} the"
            f" unobserved runs' mean, which differ from each other by x{obs['unobserved_p50_ratio']} (noise)"
        )
    for what, why in result.get("skipped", {}).items():
        lines.append(f"SKIPPED {what}: {why}")
    for t in result.get("targets", []):
        met = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"target {t['target']}: {value} {met}")
    return "\n".join(lines)


# --- memory ----------------------------------------------------------------------------


async def memory(
    fleet: Fleet,
    *,
    txns: int,
    baseline: int,
    concurrency: int,
    system: str = "wallet+order",
    batches_in_flight: int = 1,
) -> dict[str, Any]:
    """Runs `txns` transactions; RSS of the coordinator (this process) and of each
    participant after `baseline` transactions and after all, sampled every `baseline`.
    `system` "wo-postgres" runs the wallet and order services on a private PostgreSQL
    server (its processes' RSS is reported, not judged: shared buffers fill as they
    are touched)."""
    why_no_shop = shop.missing()
    branches: Callable[[int], list[Branch]]
    if system == "wo-postgres":
        participants, the_shop = (await fleet.on_postgres(concurrency))[0][system]
        branches = the_shop.purchase
    elif why_no_shop:
        progress(f"memory: wallet+order {why_no_shop}; using 2 durable participants")
        participants = fleet.durables(2)
        branches = fixed_branches(participants, durable.operation())
        system = "durable x2"
    else:
        participants, the_shop = await fleet.shop(concurrency)
        branches = the_shop.purchase
        system = "wallet+order"
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()

    async def sample(done: int) -> None:
        rss = {"coordinator": rss_kb()} | {p.name: rss_kb(p.pid) for p in participants}
        samples.append({"txns": done, "elapsed_s": round(time.perf_counter() - started, 1), "rss_kb": rss})
        if fleet.postgres is not None:
            samples[-1]["postgres_rss_kb"] = sum(rss_kb(pid) for pid in fleet.postgres.pids())
        progress(f"memory: {done} txns, {samples[-1]['elapsed_s']} s, RSS KiB {rss}")

    config = CoordinatorConfig(batches_in_flight=batches_in_flight)
    async with Coordinator(
        fleet.workdir / "decisions-memory.db", credentials=INSECURE, listen="127.0.0.1:0", config=config
    ) as coord:

        async def txn(i: int) -> bool:
            return (await coord.run(branches(i))).committed

        run = await drive_count(txn, concurrency=concurrency, total=txns, every=baseline, sample=sample)
    first = next(x for x in samples if x["txns"] == baseline)
    last = samples[-1]
    growth = {k: round(last["rss_kb"][k] / v - 1, 4) for k, v in first["rss_kb"].items()}
    return {
        "system": system,
        "concurrency": concurrency,
        "txns": txns,
        "baseline_txns": baseline,
        "committed": run.committed,
        "aborted": run.aborted,
        "errors": run.errors,
        "tps": round(run.tps, 1),
        "samples": samples,
        "growth": growth,
        "within_10_percent": all(g <= 0.10 for g in growth.values()),
    }


# --- the run ---------------------------------------------------------------------------


def machine(workdir: Path) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "sqlite": sqlite3.sqlite_version,
        "git": _git("describe", "--always", "--dirty"),
        "fsync_us": round(_fsync_us(workdir), 1),
        "loadavg_at_start": os.getloadavg(),  # other work on the machine skews every figure
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _fsync_us(workdir: Path, n: int = 100) -> float:
    """What one 4 KiB write + fsync costs on the disk under `workdir` (context for the
    durable figures)."""
    path = workdir / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        started = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        os.close(fd)
        path.unlink()


def _ints(text: str) -> list[int]:
    values = sorted({int(x) for x in text.split(",") if x.strip()})
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration-s", type=float, default=5.0, help="measured time per phase (default 5)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured load before each phase (default 1)")
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 64, 256],
        help=f"callers in flight (default 1,64,256; above {WIDE_MAX_CONCURRENCY} only the two-branch cases)",
    )
    p.add_argument("--branches", type=_ints, default=[2, 4, 8], help="durable participants, e.g. 2,4,8 (default)")
    p.add_argument(
        "--no-postgres", action="store_true", help="skip wallet+order on PostgreSQL (reservations and the adapter)"
    )
    p.add_argument(
        "--postgres-only",
        action="store_true",
        help=f"only two branches: the floor, {PLAIN}, wo-postgres, wo-pg-adapter, durable and durable+pglog",
    )
    p.add_argument(
        "--pg-batches-in-flight",
        type=int,
        default=Settings.pg_batches_in_flight,
        help="batches in flight to each participant on PostgreSQL (CoordinatorConfig.batches_in_flight;"
        " default %(default)s)",
    )
    p.add_argument(
        "--phase2",
        default="ack,commit-point",
        help="twopc modes: ack (default phase2_wait_s) and/or commit-point (phase2_wait_s=0); default both",
    )
    p.add_argument("--quick", action="store_true", help="1 s phases, 0.25 s warm-up (memory: 10k/1k txns)")
    p.add_argument("--json", type=Path, help="results file (default bench/results/latest.json, or memory.json)")
    p.add_argument(
        "--pg-log",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for the durable+pglog rows ('' for none; default %(default)s)",
    )
    p.add_argument("--no-replica", action="store_true", help="skip the pglog+sync-replica rows (a Patroni cluster)")
    p.add_argument("--chart", type=Path, help="the chart (default: the results file with .png; needs matplotlib)")
    p.add_argument("--log-level", default="info", help="twopc log level in every process (logs go to the workdir)")
    p.add_argument("--workdir", type=Path, help="keep databases and process logs here (default: a temp dir, removed)")
    m = p.add_argument_group("memory mode")
    m.add_argument("--memory", action="store_true", help="measure RSS growth instead of throughput")
    m.add_argument("--memory-txns", type=int, default=100_000, help="transactions in all (default 100000)")
    m.add_argument("--memory-baseline", type=int, default=10_000, help="RSS baseline after this many (default 10000)")
    m.add_argument("--memory-concurrency", type=int, default=64, help="callers in flight (default 64)")
    m.add_argument(
        "--memory-system",
        choices=["wallet+order", "wo-postgres"],
        default="wallet+order",
        help="the services on SQLite (default) or on a private PostgreSQL server",
    )
    args = p.parse_args(argv)
    args.phase2 = [x.strip() for x in args.phase2.split(",") if x.strip()]
    if not args.phase2 or set(args.phase2) - set(PHASE2_WAIT_S):
        p.error(f"--phase2 takes {' and/or '.join(PHASE2_WAIT_S)}")
    if args.quick:
        args.duration_s, args.warmup_s = 1.0, 0.25
        args.memory_txns, args.memory_baseline = 10_000, 1_000
    if args.memory_txns % args.memory_baseline:
        p.error("--memory-txns must be a multiple of --memory-baseline (RSS is sampled every baseline)")
    return args


async def main(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(fleet.workdir), "textbook": TEXTBOOK}
    if (load := result["machine"]["loadavg_at_start"][0]) > 1.0:
        progress(f"note: load average {load:.1f} before starting: other work on this machine will skew the figures")
    if args.memory:
        keys = ("memory_txns", "memory_baseline", "memory_concurrency", "memory_system")
        result["settings"] = {k: getattr(args, k) for k in keys}
        result["memory"] = await memory(
            fleet,
            txns=args.memory_txns,
            baseline=args.memory_baseline,
            concurrency=args.memory_concurrency,
            system=args.memory_system,
            batches_in_flight=args.pg_batches_in_flight if args.memory_system == "wo-postgres" else 1,
        )
    else:
        with replica.cluster_log(not args.no_replica) as (replica_log, why_no_replica):
            if why_no_replica:
                progress(f"{replica.SYSTEM}: skipped ({why_no_replica})")
            settings = Settings(
                args.duration_s,
                args.warmup_s,
                args.concurrency,
                args.branches,
                args.phase2,
                args.log_level,
                args.pg_log,
                replica_log=replica_log,
                why_no_replica=why_no_replica,
                postgres=not args.no_postgres,
                postgres_only=args.postgres_only,
                pg_batches_in_flight=args.pg_batches_in_flight,
            )
            result["settings"] = asdict(settings)
            result |= await benchmark(fleet, settings)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    return result


def memory_report(m: dict[str, Any]) -> str:
    first = next(x for x in m["samples"] if x["txns"] == m["baseline_txns"])
    last = m["samples"][-1]
    lines = [
        f"memory: {m['system']}, {m['txns']} txns at concurrency {m['concurrency']} "
        f"({m['committed']} committed, {m['aborted']} aborted, {m['errors']} errors, {m['tps']} txn/s)",
        f"{'process':<14}{'RSS KiB @' + str(first['txns']):>18}{'RSS KiB @' + str(last['txns']):>18}{'growth':>9}",
    ]
    for name, growth in m["growth"].items():
        lines.append(f"{name:<14}{first['rss_kb'][name]:>18}{last['rss_kb'][name]:>18}{growth:>9.1%}")
    if "postgres_rss_kb" in last:
        lines.append(f"{'postgres':<14}{first['postgres_rss_kb']:>18}{last['postgres_rss_kb']:>18}  (not judged)")
    lines.append(f"within 10%: {'yes' if m['within_10_percent'] else 'NO'}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with workdir(args.workdir) as wd, open(wd / "coordinator.log", "w") as coordinator_log:
        logconfig.configure("json", level=args.log_level, stream=coordinator_log)
        fleet = Fleet(wd, args.log_level, probe=not args.memory)
        fleet.stop_on_signals(remove_workdir=args.workdir is None)
        try:
            result = asyncio.run(main(args, fleet))
        finally:
            fleet.close()
    out = args.json or RESULTS / ("memory.json" if args.memory else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(memory_report(result["memory"]) if args.memory else table(result))
    if not args.memory:
        picture = args.chart or out.with_suffix(".png")
        why_not = chart.draw(result, picture)
        progress(f"chart: {why_not}" if why_not else f"chart written to {picture}")
    progress(f"results written to {out}")


if __name__ == "__main__":
    run()
