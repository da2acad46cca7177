"""The closed-loop load driver, its figures, and resident memory from /proc."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from twopc import Coordinator

Txn = Callable[[int], Awaitable[bool]]
"""One transaction for caller `i`; True if it committed, False if it aborted."""


@dataclass
class Run:
    """What one phase of load did. Latencies are of committed transactions only, and
    kept only when `keep_latencies` (a memory run must not grow by its own records)."""

    keep_latencies: bool = True
    elapsed_s: float = 0.0
    committed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    aborted: int = 0
    errors: int = 0
    first_error: str = ""

    @property
    def tps(self) -> float:
        return self.committed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0..1, nearest rank) of committed latencies, in ms."""
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def record(self, started: float, committed: bool) -> None:
        if not committed:
            self.aborted += 1
            return
        self.committed += 1
        if self.keep_latencies:
            self.latencies_s.append(time.perf_counter() - started)

    def error(self, e: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(e).__name__}: {e}"


async def drive(
    txn: Txn, *, concurrency: int, duration_s: float, drain: Callable[[], Awaitable[object]] | None = None
) -> Run:
    """Runs `concurrency` callers, each starting a new transaction as soon as its last
    one returns, until `duration_s` has passed; then awaits `drain` (background phase-2
    work), whose time counts, so that answering early borrows no throughput."""
    run = Run()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s

    async def caller(i: int) -> None:
        while loop.time() < stop_at:
            started = time.perf_counter()
            try:
                run.record(started, await txn(i))
            except Exception as e:  # noqa: BLE001 - counted and reported; the load goes on
                run.error(e)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    if drain is not None:
        await drain()
    run.elapsed_s = time.perf_counter() - started
    return run


async def drive_count(
    txn: Txn, *, concurrency: int, total: int, every: int, sample: Callable[[int], Awaitable[None]]
) -> Run:
    """Runs `total` transactions with `concurrency` callers and awaits `sample(done)`
    each time another `every` transactions have finished (the callers pause). Keeps
    counts, not latencies, so that this process's memory is twopc's."""
    run = Run(keep_latencies=False)
    started_txns = 0
    done = 0
    gate = asyncio.Event()
    gate.set()

    async def caller(i: int) -> None:
        nonlocal started_txns, done
        while started_txns < total:
            await gate.wait()
            started_txns += 1
            started = time.perf_counter()
            try:
                run.record(started, await txn(i))
            except Exception as e:  # noqa: BLE001 - counted and reported; the load goes on
                run.error(e)
            done += 1
            if done % every == 0:
                gate.clear()
                await sample(done)
                gate.set()

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    run.elapsed_s = time.perf_counter() - started
    return run


def drained(coordinator: Coordinator, timeout_s: float = 30.0) -> Callable[[], Awaitable[None]]:
    """A `drive` drain: waits for the coordinator's background phase 2, but not for
    ever (it retries without end when a participant is down)."""

    async def drain() -> None:
        if not await coordinator.wait_idle(timeout_s):
            raise RuntimeError(f"phase 2 still running after {timeout_s} s: is a participant down?")

    return drain


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size of a process, in KiB (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int | str = "self", *, children: bool = False) -> float:
    """CPU time (user + system, all threads) a process has used, in seconds; with
    `children`, also that of its children it has waited for (exited ones). A process
    gone meanwhile counts 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")
