"""Where the time goes: one benchmark case under py-spy, coordinator and participants.

    python -m bench.profile --system wallet+order --concurrency 64 --duration-s 10

Runs the case's load (after a warm-up) while `py-spy record --gil` samples the
coordinator (this process) and every participant process, then prints, per process,
its CPU time per transaction, the share of GIL-holding samples by area (twopc, grpc,
structlog, tenacity, asyncio, sqlite...) and the top functions by own and inclusive
time. grpc's Cython core is invisible to py-spy: its work shows as the Python frame
that called it (`UnaryUnaryCall._invoke` in a client, `Handle._run` in a server). Raw collapsed stacks are kept in
`--out` for flame graphs. Needs py-spy (`.venv/bin/pip install py-spy`) and the right
to ptrace the processes (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import durable
from bench.fleet import Fleet, Service, fixed_branches, progress, workdir
from bench.floor import FloorClient
from bench.load import Txn, cpu_s, drained, drive
from twopc import Branch, Coordinator, CoordinatorConfig, Credentials
from twopc.observe import logconfig

AREAS = (  # first match wins: the path fragment py-spy shows, and the area it belongs to
    ("twopc/store", "twopc store"),
    ("sqlalchemy/", "sqlalchemy"),
    ("psycopg", "psycopg"),
    ("twopc/", "twopc"),
    ("services/", "services"),
    ("bench/", "bench"),
    ("structlog/", "structlog"),
    ("tenacity/", "tenacity"),
    ("grpc/", "grpc"),
    ("google/protobuf", "protobuf"),
    ("asyncio/", "asyncio"),
    ("sqlite3", "sqlite"),
    ("threading.py", "threads"),
    ("queue.py", "threads"),
    ("uuid.py", "uuid"),
    ("json/", "json"),
)
_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def _key(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame "fn (file:line)"."""
    m = _FRAME.match(frame)
    return (m["fn"], m["file"]) if m else (frame, "")


def _area(file: str) -> str:
    return next((area for fragment, area in AREAS if fragment in file), "other")


def summarize(raw: Path, *, top: int, rate: int, duration_s: float) -> str:
    """Areas and hot functions of one process, from py-spy's raw (collapsed) output."""
    own: Counter[tuple[str, str]] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_key(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        areas[_area(frames[-1][1])] += n
        for k in set(frames):
            inclusive[k] += n
    if not total:
        return "  no samples"
    busy = total / (rate * duration_s)
    lines = [f"  {total} samples holding the GIL = {busy:.0%} of the time"]
    lines.append("  own time by area: " + ", ".join(f"{a} {n / total:.0%}" for a, n in areas.most_common()))
    lines.append("  top functions, own time:")
    lines += [f"    {n / total:6.1%}  {fn} ({file})" for (fn, file), n in own.most_common(top)]
    lines.append("  top functions, inclusive (excluding the event loop and runpy frames):")
    skip = {"asyncio", "threads"}
    shown = [(k, n) for k, n in inclusive.most_common() if _area(k[1]) not in skip and not k[1].startswith("<frozen")]
    shown = [(k, n) for k, n in shown if k[0] not in ("<module>", "main", "run", "serve", "run_participant")]
    lines += [f"    {n / total:6.1%}  {fn} ({file})" for (fn, file), n in shown[:top]]
    return "\n".join(lines)


async def profile(args: argparse.Namespace, fleet: Fleet, out: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    c = args.concurrency
    participants: list[Service]
    branches: Callable[[int], list[Branch]]
    if args.system == "wallet+order":
        participants, the_shop = await fleet.shop(c)
        branches = the_shop.purchase
    elif args.system in ("wo-postgres", "wo-pg-adapter"):
        participants, the_shop = (await fleet.on_postgres(c))[0][args.system]
        branches = the_shop.purchase
    elif args.system == "floor":
        participants = fleet.floors(args.branches)
        branches = fixed_branches(participants, durable.operation())
    else:
        participants = fleet.durables(args.branches)
        branches = fixed_branches(participants, durable.operation())
    config = CoordinatorConfig(
        phase2_wait_s=0.0 if args.phase2 == "commit-point" else CoordinatorConfig().phase2_wait_s,
        batches_in_flight=args.batches_in_flight,
    )
    async with Coordinator(
        fleet.workdir / "decisions.db", credentials=Credentials.insecure(), listen="127.0.0.1:0", config=config
    ) as coordinator:
        client = FloorClient([p.address for p in participants], durable.operation())

        async def twopc_txn(i: int) -> bool:
            return (await coordinator.run(branches(i))).committed

        txn: Txn = client.txn if args.system == "floor" else twopc_txn
        await drive(txn, concurrency=c, duration_s=1.0, drain=drained(coordinator))
        targets = [("coordinator", os.getpid()), *((p.name, p.pid) for p in participants)]
        spies = [await _spy(py_spy, pid, out / f"{name}.txt", args) for name, pid in targets]
        await asyncio.sleep(0.5)  # let py-spy attach
        cpu = {name: cpu_s(pid) for name, pid in targets}
        run = await drive(txn, concurrency=c, duration_s=args.duration_s, drain=drained(coordinator))
        cpu = {name: cpu_s(pid) - cpu[name] for name, pid in targets}
        await asyncio.gather(*(s.wait() for s in spies))
        await client.close()
    print(
        f"{args.system} x{len(participants)} c={c} ({args.phase2}): {run.tps:.1f} txn/s, "
        f"p50 {run.percentile_ms(0.5):.2f} ms, p99 {run.percentile_ms(0.99):.2f} ms"
    )
    for name, _ in targets:
        raw = out / f"{name}.txt"
        print(f"\n{name}: {1e3 * cpu[name] / max(1, run.committed):.2f} ms CPU per committed txn")
        print(summarize(raw, top=args.top, rate=args.rate, duration_s=args.duration_s) if raw.exists() else "  no data")
    progress(f"raw py-spy stacks in {out}")


async def _spy(py_spy: str, pid: int, output: Path, args: argparse.Namespace) -> asyncio.subprocess.Process:
    argv = ["record", "--pid", str(pid), "--duration", str(args.duration_s), "--rate", str(args.rate)]
    argv += ["--format", "raw", "--gil", "--nonblocking", "--output", str(output)]
    quiet = asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(py_spy, *argv, stdout=quiet, stderr=quiet)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    systems = ["wallet+order", "wo-postgres", "wo-pg-adapter", "durable", "floor"]
    p.add_argument("--system", choices=systems, default="wallet+order")
    p.add_argument("--batches-in-flight", type=int, default=1, help="CoordinatorConfig.batches_in_flight")
    p.add_argument("--branches", type=int, default=2, help="participants for durable and floor (default 2)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--phase2", choices=["ack", "commit-point"], default="ack")
    p.add_argument("--duration-s", type=int, default=10, help="seconds sampled (py-spy takes whole seconds)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--log-level", default="info")
    p.add_argument("--out", type=Path, default=Path("bench/results/profile"), help="raw stacks (default %(default)s)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with workdir(None) as wd, open(wd / "coordinator.log", "w") as log:
        logconfig.configure("json", level=args.log_level, stream=log)
        fleet = Fleet(wd, args.log_level, probe=False)
        fleet.stop_on_signals(remove_workdir=True)
        try:
            asyncio.run(profile(args, fleet, args.out))
        finally:
            fleet.close()


if __name__ == "__main__":
    main()
