"""Runs a service module and reports its stores' counters on SIGUSR1, without
touching its code: `python -m bench.probe MODULE ARGS...` runs `python -m MODULE ARGS...`
in this process; on SIGUSR1 it finds every `twopc.stores.SqliteStore` alive (through
the garbage collector, so the service needs no hook) and writes their `StoreStats`
as JSON to the file named by $BENCH_PROBE_FILE. `read_stats` asks and waits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from twopc.stores import SqliteStore

ENV = "BENCH_PROBE_FILE"


def _write(path: Path) -> None:
    seq = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal seq
        seq += 1
        stores = [o for o in gc.get_objects() if isinstance(o, SqliteStore)]
        report = {
            "seq": seq,
            "stores": [
                {"path": os.fspath(s.path), "syncs": s.stats.syncs, "jobs": s.stats.jobs, "batches": s.stats.batches}
                for s in stores
            ],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(path)

    signal.signal(signal.SIGUSR1, handler)


async def read_stats(pid: int, path: Path, *, timeout_s: float = 5.0) -> dict[str, int]:
    """Asks the probed process `pid` for its counters; returns them summed over its
    stores ({"syncs", "jobs", "batches"})."""
    before = _load(path)["seq"]
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while (report := _load(path))["seq"] <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not report its counters to {path}")
        await asyncio.sleep(0.005)
    stores: list[dict[str, Any]] = report["stores"]
    return {k: sum(int(s[k]) for s in stores) for k in ("syncs", "jobs", "batches")}


def _load(path: Path) -> dict[str, Any]:
    """The last report (a few hundred bytes, replaced atomically); seq 0 if none yet."""
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"seq": 0, "stores": []}
    return report


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.probe MODULE [ARGS...]")
    _write(Path(os.environ[ENV]))
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
