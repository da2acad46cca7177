"""The benchmark's processes: floors, durable participants, the wallet and order
services, each a real subprocess on 127.0.0.1 port 0, all stopped on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from google.protobuf.message import Message

from bench import shop
from bench.load import cpu_s
from bench.plain import PlainShop
from bench.probe import ENV as PROBE_ENV
from bench.probe import read_stats
from bench.shop import Shop
from twopc import Branch
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess

STATEMENTS = "pg_stat_statements"


def progress(message: str) -> None:
    """One line of progress on standard error."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Service:
    """A started process; `probe` is where it reports its store counters, if probed."""

    name: str
    proc: ServiceProcess
    probe: Path | None

    @property
    def address(self) -> str:
        return self.proc.address

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    async def syncs(self) -> int | None:
        """Forced writes by the process's twopc stores so far; None if not probed or
        if it has no twopc store."""
        if self.probe is None:
            return None
        stats = await read_stats(self.pid, self.probe)
        return stats["syncs"] if stats["jobs"] else None


class Fleet:
    """Every process the benchmark starts; `close` stops them all (also on Ctrl-C).

    Args:
        workdir: where databases, process logs and probe reports go.
        log_level: the twopc log level of every participant.
        probe: run participants under `bench.probe`, to read their fsync counters.
    """

    def __init__(self, workdir: Path, log_level: str, *, probe: bool = True) -> None:
        self.workdir = workdir
        self.log_level = log_level
        self.probe = probe
        self.services: list[Service] = []
        self.postgres: PostgresServer | None = None
        self.plain: list[Service] = []
        self._closing = contextlib.ExitStack()

    def start(self, specs: Sequence[tuple[str, str, list[str], bool]]) -> list[Service]:
        """Starts (name, module, args, probed) processes in parallel; waits until all serve."""
        started = []
        for name, module, args, probed in specs:
            probe = self.workdir / f"{name}.probe.json" if probed else None
            argv = ["bench.probe", module, *args] if probed else [module, *args]
            env = {PROBE_ENV: str(probe)} if probe else {}
            proc = ServiceProcess(argv[0], argv[1:], log_path=self.workdir / f"{name}.log", env=env)
            started.append(Service(name, proc, probe))
        self.services += started
        # Blocking on purpose: nothing else runs yet, and Ctrl-C then finds every
        # process spawned, so `close` stops them all.
        with ThreadPoolExecutor(max_workers=len(started) or 1) as pool:
            list(pool.map(lambda s: s.proc.start(timeout_s=60), started))
        return started

    def floors(self, n: int) -> list[Service]:
        return self.start([(f"floor-{k}", "bench.floor", [], False) for k in range(n)])

    def durables(self, n: int) -> list[Service]:
        return self.start(
            [
                (
                    f"durable-{k}",
                    "bench.durable",
                    [*self._db(f"durable-{k}"), "--log-level", self.log_level],
                    self.probe,
                )
                for k in range(n)
            ]
        )

    async def shop(self, customers: int) -> tuple[list[Service], shop.Shop]:
        """Starts the wallet and order services and seeds them for `customers` callers."""
        services = self.start(
            [
                (name, f"services.{name}", [*self._db(name), "--log-level", self.log_level, "--insecure"], self.probe)
                for name in ("wallet", "order")
            ]
        )
        the_shop = shop.Shop(services[0].address, services[1].address)
        await the_shop.seed(customers)
        return services, the_shop

    async def on_postgres(self, customers: int) -> tuple[dict[str, tuple[list[Service], Shop]], PlainShop]:
        """wallet and order on a private PostgreSQL server (a schema each), three times
        over the same tables: the services themselves (reservations, `--db
        postgresql://`), their business as prepared transactions (`bench.prepared`),
        and as plain unary RPCs with no atomicity (`bench.plain`, the anchor)."""
        self.postgres = self._closing.enter_context(
            # pg_stat_statements: the statements per purchase, counted by the server.
            PostgresServer(log_path=self.workdir / "postgres.log", settings={"shared_preload_libraries": STATEMENTS})
        )
        self.postgres.execute(f"CREATE EXTENSION {STATEMENTS}")
        schemas = (("wallet", "wallet"), ("order", "orders"))
        urls = {}
        for _, schema in schemas:
            self.postgres.execute(f'CREATE SCHEMA "{schema}"')
            urls[schema] = self.postgres.url_of("postgres", search_path=schema)
        level = ["--log-level", self.log_level, "--insecure"]
        reserve = self.start([(f"{n}-pg", f"services.{n}", ["--db", urls[d], *level], False) for n, d in schemas])
        reserve_shop = Shop(reserve[0].address, reserve[1].address)
        await reserve_shop.seed(customers)
        adapter = self.start(
            [(f"{n}-pg2pc", "bench.prepared", ["--service", n, "--db", urls[d], *level], False) for n, d in schemas]
        )
        adapter_shop = Shop(adapter[0].address, adapter[1].address)  # the same customers, already seeded
        plain = self.start(
            [(f"{n}-plain", "bench.plain", ["--service", n, "--db", urls[d]], False) for n, d in schemas]
        )
        self.plain = plain
        plain_shop = PlainShop(plain[0].address, plain[1].address, Shop(reserve[0].address, reserve[1].address))
        return {"wo-postgres": (reserve, reserve_shop), "wo-pg-adapter": (adapter, adapter_shop)}, plain_shop

    def statements(self) -> int:
        """Statements the private PostgreSQL server has run so far (pg_stat_statements,
        utility statements such as BEGIN, SAVEPOINT and COMMIT included)."""
        import psycopg

        assert self.postgres is not None
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            row = conn.execute(f"SELECT coalesce(sum(calls), 0) FROM {STATEMENTS}".encode()).fetchone()
        return int(row[0]) if row else 0

    def postgres_cpu_s(self) -> float:
        """CPU time the private PostgreSQL server has used: its processes alive now,
        and the backends that already exited (counted in the postmaster's children)."""
        if self.postgres is None:
            return 0.0
        pids = self.postgres.pids()
        if not pids:
            return 0.0
        return cpu_s(pids[0], children=True) + sum(cpu_s(pid) for pid in pids[1:] if _exists(pid))

    def wal_syncs(self) -> int:
        """The PostgreSQL server's WAL fsyncs so far (pg_stat_wal): its forced writes."""
        import psycopg

        assert self.postgres is not None
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            row = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
        return int(row[0]) if row else 0

    def _db(self, name: str) -> list[str]:
        return ["--db", str(self.workdir / f"{name}.db")]

    def stop_on_signals(self, *, remove_workdir: bool) -> None:
        """On Ctrl-C or SIGTERM: stop every process and exit at once.

        Not through asyncio cancellation: Ctrl-C also stops the participants, and a
        `Coordinator` retrying phase 2 against a dead participant can swallow
        `cancel()` (tenacity retries the CancelledError), so a graceful close may hang.
        """

        def stop(signum: int, frame: FrameType | None) -> None:
            self.close()
            if remove_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            progress("interrupted: every process stopped" + ("" if remove_workdir else f"; files in {self.workdir}"))
            os._exit(128 + signum)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def close(self) -> None:
        """Stops every process (SIGTERM, then SIGKILL for any that lingers)."""
        for s in self.services:
            s.proc.signal(signal.SIGTERM)
        for s in self.services:
            s.proc.stop()
        self._closing.close()


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def fixed_branches(participants: Sequence[Service], operation: Message) -> Callable[[int], list[Branch]]:
    """The same operation for every participant, whoever calls."""
    branches = [Branch(p.address, operation, name=p.name) for p in participants]
    return lambda i: branches


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """`path`, or a temporary directory removed at the end unless something failed."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="twopc-bench-"))
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            progress(f"process logs and databases kept in {tmp}")
