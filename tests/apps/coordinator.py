"""A coordinator process for the core's crash tests: serves GetOutcome and, with
--run, runs one transaction of kv branches, printing the result as JSON.

    python -m tests.apps.coordinator --db c.db --port 0 --run k1=127.0.0.1:5001 k2=...

Without --run it only recovers (re-drives logged commits) and serves GetOutcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from google.protobuf import struct_pb2

from twopc import Branch, Coordinator, CoordinatorConfig, Credentials, rpc
from twopc.observe.logconfig import configure as configure_logs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--run", nargs="*", default=[], metavar="KEY=TARGET")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--slow-s", type=float, default=0.0, help="the last branch takes this long to vote")
    parser.add_argument("--peers", nargs="*", default=[], help="other instances sharing a PostgreSQL --db")
    parser.add_argument("--tls-dir", help="mutual TLS with cert.pem, key.pem, ca.pem here (default: plaintext)")
    args = parser.parse_args()
    configure_logs("json", level="debug")
    config = CoordinatorConfig(retry_initial_s=0.05, retry_max_s=0.5)
    async with Coordinator(
        args.db,
        credentials=Credentials.from_dir(args.tls_dir) if args.tls_dir else Credentials.insecure(),
        listen=f"{args.host}:{args.port}",
        config=config,
        peers=args.peers,
    ) as coordinator:
        rpc.announce_ready(coordinator.address)
        if args.run:
            branches = []
            for spec in args.run:
                key, target = spec.split("=", 1)
                fields = {"key": struct_pb2.Value(string_value=key)}
                if args.slow_s and spec == args.run[-1]:
                    fields["delay_s"] = struct_pb2.Value(number_value=args.slow_s)
                branches.append(Branch(target, struct_pb2.Struct(fields=fields)))
            result = await coordinator.run(branches, timeout_s=args.timeout_s)
            print(
                json.dumps({"txn_id": result.txn_id, "outcome": result.outcome.value, "reason": result.reason}),
                flush=True,
            )
        await rpc.until_signalled()


if __name__ == "__main__":
    asyncio.run(main())
