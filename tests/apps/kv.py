"""A minimal participant for the core's tests: reserves an amount under a key.

The operation is a `google.protobuf.Struct` so the core needs no proto of its own:
    {"key": "k", "amount": 5}            reserve 5 under k, vote COMMIT
    {"behave": "abort"}                  vote ABORT with a reason
    {"behave": "read_only"}              vote READ_ONLY, reserve nothing
    {"behave": "raise"}                  raise inside prepare (a bug in the service)
    {"behave": "invalid"}                InvalidOperation -> INVALID_ARGUMENT
    {"key": "raise_on_commit"}           reserve, then raise inside commit (a bug)
    {"key": "k", "delay_s": 2}           take 2 s to prepare (a slow voter)
Reservations live in `reserved`, committed ones move to `applied`; tests read the
store directly to see what the participant really holds. The same code runs on
SQLite and on PostgreSQL (`--db postgresql://...`).

Run: python -m tests.apps.kv --db kv.db --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from google.protobuf import struct_pb2

from twopc import Credentials, InvalidOperation, Participant, ParticipantConfig, Vote, VoteAbort
from twopc.observe.health import PARTICIPANT_SERVICE, Health
from twopc.observe.logconfig import configure as configure_logs
from twopc.ops import metrics
from twopc.participant import ParticipantBase
from twopc.stores import Connection, execute


class KV:
    operations = (struct_pb2.Struct,)
    schema = """
    CREATE TABLE IF NOT EXISTS reserved (txn_id TEXT PRIMARY KEY, key TEXT NOT NULL, amount INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS applied (txn_id TEXT PRIMARY KEY, key TEXT NOT NULL, amount INTEGER NOT NULL);
    """

    def prepare(self, db: Connection, txn_id: str, operation: Any) -> Vote:
        op = dict(operation.items())
        behave = op.get("behave", "")
        if behave == "abort":
            raise VoteAbort("told to abort")
        if behave == "read_only":
            return Vote.READ_ONLY
        if behave == "raise":
            raise RuntimeError("bug in prepare")
        if behave == "invalid" or "key" not in op:
            raise InvalidOperation("key is required")
        execute(
            db,
            "INSERT INTO reserved VALUES (:txn_id, :key, :amount)",
            {"txn_id": txn_id, "key": op["key"], "amount": int(op.get("amount", 1))},
        )
        time.sleep(float(op.get("delay_s", 0)))  # on the store's thread: a slow vote, nothing else waits
        return Vote.COMMIT

    def commit(self, db: Connection, txn_id: str) -> None:
        (key,) = execute(db, "SELECT key FROM reserved WHERE txn_id = :txn_id", {"txn_id": txn_id}).fetchone()
        if key == "raise_on_commit":
            raise RuntimeError("bug in commit")
        execute(db, "INSERT INTO applied SELECT * FROM reserved WHERE txn_id = :txn_id", {"txn_id": txn_id})
        execute(db, "DELETE FROM reserved WHERE txn_id = :txn_id", {"txn_id": txn_id})

    def abort(self, db: Connection, txn_id: str) -> None:
        execute(db, "DELETE FROM reserved WHERE txn_id = :txn_id", {"txn_id": txn_id})


def arguments(doc: str) -> tuple[argparse.Namespace, ParticipantConfig]:
    """The command line of a test participant process (logs configured), and its
    in-doubt timing: short, so tests see resolution quickly."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--in-doubt-after-s", type=float, default=1.0)
    parser.add_argument("--resolve-interval-s", type=float, default=0.3)
    parser.add_argument("--log-format", choices=["console", "json"], default="json")
    parser.add_argument("--metrics-port", type=int, default=None, help="/metrics, /healthz and /readyz")
    args = parser.parse_args()
    configure_logs(args.log_format, level="debug")
    return args, ParticipantConfig(
        in_doubt_after_s=args.in_doubt_after_s,
        resolve_interval_s=args.resolve_interval_s,
        allow_no_coordinator=True,  # tests drive Prepare by hand, with no coordinator to ask
    )


async def main() -> None:
    args, config = arguments(__doc__)
    credentials = Credentials.insecure()
    async with Participant(KV(), args.db, credentials=credentials, config=config) as participant:
        await serve(participant, args)


async def serve(participant: ParticipantBase, args: argparse.Namespace) -> None:
    """Serves `participant` as the command line says; with `--metrics-port`, the HTTP
    probes read the same health service as gRPC."""
    health = None
    if args.metrics_port is not None:
        health = Health([PARTICIPANT_SERVICE])
        metrics.serve(args.metrics_port, health=health)
    await participant.serve(f"{args.host}:{args.port}", health=health)


if __name__ == "__main__":
    asyncio.run(main())
