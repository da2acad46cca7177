"""Where a transaction's time goes, stage by stage: phase 1 (the Prepares and their
votes), the decision write, phase 2 (the Commits until acknowledged) and the rest
(the coordinator's own hand-offs between them), against the real wallet and order
services.

    python -m bench.stages --concurrency 1,64

A subclass of `Coordinator` times its own private stages; nothing else changes. The
figures are per committed transaction (p50 and mean), in the same run for every
concurrency, so they show which stage grows with load and which one bounds it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from bench.fleet import Fleet, progress, workdir
from bench.load import drained, drive
from twopc import Coordinator, Credentials, TransactionResult
from twopc.observe import logconfig

T = TypeVar("T")
STAGES = ("phase 1", "decision", "phase 2", "run")


class TimedCoordinator(Coordinator):
    """A coordinator that records how long each stage of every transaction took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages: dict[str, list[float]] = {name: [] for name in STAGES}
        # Phase 1 and phase 2 run in the coordinator's parts: time them there.
        self._time(self._phase1, "votes", "phase 1")
        self._time(self._delivery, "finish_commit", "phase 2")

    def _time(self, part: object, method: str, stage: str) -> None:
        untimed = getattr(part, method)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            return await self._timed(stage, untimed(*args, **kwargs))

        setattr(part, method, timed)

    async def _timed(self, stage: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await work
        finally:
            self.stages[stage].append(time.perf_counter() - started)

    async def _log_commit(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("decision", super()._log_commit(*args, **kwargs))

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("run", super().run(*args, **kwargs))


async def measure(fleet: Fleet, concurrency: list[int], duration_s: float) -> list[str]:
    _, shop = await fleet.shop(max(concurrency))
    lines = [f"{'conc':>4}  {'txn/s':>7}  " + "  ".join(f"{s + ' p50/mean ms':>22}" for s in [*STAGES[:3], "rest"])]
    for c in concurrency:
        path = fleet.workdir / f"stages-{c}.db"
        coordinator = TimedCoordinator(path, credentials=Credentials.insecure(), listen="127.0.0.1:0")
        async with coordinator:

            async def txn(i: int, coordinator: TimedCoordinator = coordinator) -> bool:
                result: TransactionResult = await coordinator.run(shop.purchase(i))
                return result.committed

            await drive(txn, concurrency=c, duration_s=1.0, drain=drained(coordinator))
            for samples in coordinator.stages.values():
                samples.clear()
            run = await drive(txn, concurrency=c, duration_s=duration_s, drain=drained(coordinator))
        s = coordinator.stages
        rest = [r - a - b - d for r, a, b, d in zip(s["run"], s["phase 1"], s["decision"], s["phase 2"], strict=False)]
        cells = [*(s[name] for name in STAGES[:3]), rest]
        lines.append(
            f"{c:>4}  {run.tps:>7.0f}  "
            + "  ".join(f"{1e3 * statistics.median(x):>10.2f} /{1e3 * statistics.mean(x):>9.2f}" for x in cells)
        )
        progress(lines[-1])
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,64", help="callers in flight (default 1,64)")
    p.add_argument("--duration-s", type=float, default=4.0)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    concurrency = sorted({int(x) for x in args.concurrency.split(",")})
    with workdir(args.workdir) as wd, open(wd / "coordinator.log", "w") as log:
        logconfig.configure("json", level="info", stream=log)
        fleet = Fleet(wd, "info", probe=False)
        fleet.stop_on_signals(remove_workdir=args.workdir is None)
        try:
            lines = asyncio.run(measure(fleet, concurrency, args.duration_s))
        finally:
            fleet.close()
    print("\n".join(lines))
    print("the decision is only written for commits; 'rest' is run() minus the three stages")


if __name__ == "__main__":
    main()
