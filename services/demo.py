"""`make demo`: a purchase across two services, with its failures, narrated.

Starts the wallet, order and shop services as separate processes, seeds them, runs
the seven scenarios of services/scenarios.py, and ends by checking the invariants
of docs/design.md over both services and the shop's log. Exits non-zero if any fails.
Every process it started is stopped when it exits, also on Ctrl-C.

    python -m services.demo [--workdir DIR] [--tls] [--db postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
from pathlib import Path

from services import scenarios
from services.cluster import Cluster, postgres_stores
from services.scenarios import Step, outcome

WIDTH = 78


def say(label: str, text: str) -> None:
    print(textwrap.fill(text, WIDTH, initial_indent=f"  {label:<8}", subsequent_indent=" " * 10))


def show(n: int, step: Step) -> None:
    print(f"\n{f'── {n}. {step.title} ':─<{WIDTH}}")
    say("", step.action)
    say("before:", step.before.describe())
    for event in step.events:
        say("…", event)
    for r in step.responses:
        votes = ", ".join(f"{b.name} {b.vote or 'no vote'}" for b in r.branches)
        say("shop:", f"{outcome(r)} ({votes}), txn {r.txn_id.rsplit(':', 1)[-1][:8]}")
    if step.after is not None:
        say("after:", step.after.describe())
    say("why:", step.why)


async def main(workdir: Path, *, tls: bool = False, db: str = "sqlite") -> int:
    if db == "postgres":
        with postgres_stores(workdir) as (server, stores):
            print(f"twopc demo on PostgreSQL: wallet and orders keep their data in {server.url} (a schema each)")
            return await _run(workdir, tls, stores)
    return await _run(workdir, tls, {})


async def _run(workdir: Path, tls: bool, stores: dict[str, str]) -> int:
    security = "mutual TLS (throwaway CA in pki/)" if tls else "plaintext on loopback"
    print(f"twopc demo: wallet, orders and shop as separate processes, {security}; data and logs in {workdir}/")
    async with Cluster(workdir, tls=tls, stores=stores) as c:
        print(f"  wallet {c.wallet.address}   orders {c.orders.address}   shop (coordinator) {c.shop.address}")
        await scenarios.seed(c)
        for n, scenario in enumerate(scenarios.SCENARIOS, 1):
            show(n, await scenario(c))
        report = await c.settled()
    heading = "── Invariants (docs/design.md), read from each service's own files "
    print(f"\n{heading:─<{WIDTH}}")
    print(f"  money: deposited {report.deposited} = balances {report.balances} + spent {report.spent} (cents)")
    print(f"  stock: received {report.received} = on hand {report.on_hand} + sold {report.sold}")
    print(f"  {report.committed} purchases committed at both services; {report.in_doubt} transactions in doubt")
    if report.ok:
        print("  OK: atomic, conserved, nothing negative, every commit logged, nothing left in doubt")
        return 0
    for v in report.violations:
        print(f"  VIOLATION: {v}")
    print(f"  logs: {workdir}/*.log")
    return 1


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m services.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("var") / time.strftime("demo-%Y%m%d-%H%M%S"))
    p.add_argument("--tls", action="store_true", help="mutual TLS between every process, with a throwaway CA")
    p.add_argument(
        "--db",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="where wallet and orders keep their data: SQLite files (default) or a private PostgreSQL server",
    )
    args = p.parse_args()
    try:
        sys.exit(asyncio.run(main(args.workdir, tls=args.tls, db=args.db)))
    except KeyboardInterrupt:  # the Cluster has stopped every process on the way out
        print("\ninterrupted; every process was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
