"""`make console`: the services as processes plus the web console on loopback.

    python -m services.console [--demo] [--host 127.0.0.1] [--port 8080] [--workdir DIR]

Starts wallet, orders and shop (each its own process, with its events file and
/metrics), seeds buyers and products, serves the page, prints its URL, and stops
everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from aiohttp import web

from services import scenarios
from services.cluster import Cluster, Settings
from services.console.app import Catalogue, Console, Guard, make_app
from twopc import rpc


async def main(args: argparse.Namespace) -> None:
    workdir = args.workdir or Path("var") / f"console-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = Settings(prepare_timeout_s=args.prepare_timeout_s, in_doubt_after_s=1.0, resolve_interval_s=0.3)
    shop_args = ["--net-faults", "seed=0"] if args.demo else []  # no random faults: only those asked for
    async with Cluster(workdir, settings, shop_args=shop_args, metrics=True, events=True) as cluster:
        await scenarios.seed(cluster)
        console = Console(cluster, Catalogue(tuple(scenarios.ACCOUNTS), tuple(scenarios.PRODUCTS)), demo=args.demo)
        console.start()
        guard = Guard()
        runner = web.AppRunner(make_app(console, guard), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # the bound port, for --port 0
        guard.serve_at(args.host, port)
        rpc.announce_ready(f"{args.host}:{port}")
        mode = "demo mode: fault controls on" if args.demo else "fault controls off (--demo turns them on)"
        print(f"twopc console: http://{args.host}:{port}/  ({mode}; data and logs in {workdir}/; Ctrl-C stops)")
        try:
            await rpc.until_signalled()
        finally:
            await console.stop()
            await runner.cleanup()


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m services.console", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address of the web server (default %(default)s: loopback)")
    p.add_argument("--port", type=int, default=8080, help="its port, 0 for any free one (default %(default)s)")
    p.add_argument("--demo", action="store_true", help="offer fault controls (pause, kill, crash) on the page")
    p.add_argument("--workdir", type=Path, help="where the services' files go (default var/console-<time>/)")
    p.add_argument("--prepare-timeout-s", type=float, default=2.0, help="the shop's phase-1 deadline (default 2)")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
