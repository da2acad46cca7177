"""What every demo service shares: its command line, logging and serving loop."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from twopc import Credentials, InvalidOperation, NotFound, Participant, ParticipantConfig, ParticipantHandler
from twopc.logs import configure as configure_logs

T = TypeVar("T")

MAX_AMOUNT = 10**12  # minor units in one operation: ten billion in a two-decimal currency
MAX_BALANCE = 2**62  # far below SQLite's int64 limit, so sums cannot overflow
MAX_QUANTITY = 10**9


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every service takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--db", required=True, help="SQLite file of this service (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port to listen on, 0 for any free one (default %(default)s)")
    p.add_argument(
        "--log-format", choices=["console", "json"], default="json", help="log rendering (default %(default)s)"
    )
    p.add_argument("--log-level", default="info", help="lowest level logged (default %(default)s)")
    return p


def participant_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags of a participant service: the common ones and in-doubt resolution."""
    p = parser(prog, description)
    d = ParticipantConfig()
    p.add_argument(
        "--in-doubt-after-s",
        type=float,
        default=d.in_doubt_after_s,
        help="ask the coordinator about a transaction prepared this long ago (default %(default)s)",
    )
    p.add_argument(
        "--resolve-interval-s",
        type=float,
        default=d.resolve_interval_s,
        help="how often to look for in-doubt transactions (default %(default)s)",
    )
    return p


def run_participant(
    handler: ParticipantHandler,
    add_api: Callable[[grpc.aio.Server, Participant], None],
    args: argparse.Namespace,
    participant: type[Participant] = Participant,
) -> None:
    """Serves the Participant contract and the service's own API until SIGTERM/SIGINT.
    `participant` lets a test run a deliberately broken helper."""
    configure_logs(args.log_format, level=args.log_level)
    config = ParticipantConfig(in_doubt_after_s=args.in_doubt_after_s, resolve_interval_s=args.resolve_interval_s)

    async def serve() -> None:
        credentials = Credentials.insecure()  # loopback demo; pass TLS credentials in production
        async with participant(handler, args.db, credentials=credentials, config=config) as p:
            await p.serve(f"{args.host}:{args.port}", services=[lambda server: add_api(server, p)])

    asyncio.run(serve())


class AlreadyExists(Exception):  # noqa: N818 - named for the gRPC status it maps to
    """The thing to create exists already (ALREADY_EXISTS)."""


_STATUS = {
    InvalidOperation: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}


async def api(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    """Awaits a business API job, turning business errors into gRPC statuses."""
    try:
        return await work
    except (InvalidOperation, NotFound, AlreadyExists) as e:
        await context.abort(_STATUS[type(e)], str(e))
        raise  # unreachable: abort raises


def check_amount(what: str, value: int, maximum: int) -> None:
    """Raises InvalidOperation unless 0 < value <= maximum."""
    if value <= 0:
        raise InvalidOperation(f"{what} must be > 0, got {value}")
    if value > maximum:
        raise InvalidOperation(f"{what} must be at most {maximum}, got {value}")
