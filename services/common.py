"""What every demo service shares: its command line, logging and serving loop."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from twopc import (
    Credentials,
    InvalidOperation,
    NotFound,
    Participant,
    ParticipantConfig,
    ParticipantHandler,
    metrics,
)
from twopc.health import PARTICIPANT_SERVICE, Health
from twopc.logs import configure as configure_logs
from twopc.observe import JsonLines, Observers
from twopc.tracing import Tracing

T = TypeVar("T")

MAX_AMOUNT = 10**12  # minor units in one operation: ten billion in a two-decimal currency
MAX_BALANCE = 2**62  # far below SQLite's int64 limit, so sums cannot overflow
MAX_QUANTITY = 10**9
DEFAULT_PAGE_SIZE = 100  # list RPCs: what page_size=0 means
MAX_PAGE_SIZE = 1000  # list RPCs: a larger page_size is lowered to this


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
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (default: off)"
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default %(default)s)")
    p.add_argument("--events-file", help="append every transaction event as a JSON line here (the web console)")
    p.add_argument("--trace-file", help="write OpenTelemetry spans as JSON lines here (default: no tracing)")
    p.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="on SIGTERM, time to drain work in progress and finish RPCs in flight (default %(default)s)",
    )
    return p


def tracing(args: argparse.Namespace) -> Tracing | None:
    """Tracing to `--trace-file` (one JSON span per line), or None when not asked for.
    A deployment would configure its own exporter instead (OTLP to a collector)."""
    if not args.trace_file:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider()
    out = open(args.trace_file, "a", encoding="utf-8")  # noqa: SIM115 - held for the process's life
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n"))
    )
    return Tracing(provider)


def observe(observers: Observers, args: argparse.Namespace) -> None:
    """Starts the /metrics endpoint if `--metrics-port` was given, and the events
    file if `--events-file` was."""
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_host)
    if args.events_file:
        observers.add(JsonLines(args.events_file))


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
    *,
    services: Sequence[str] = (),
) -> None:
    """Serves the Participant contract and the service's own API (`services`, by full
    name, for health and reflection) until SIGTERM/SIGINT, then stops gracefully.
    `participant` lets a test run a deliberately broken helper."""
    configure_logs(args.log_format, level=args.log_level)
    config = ParticipantConfig(in_doubt_after_s=args.in_doubt_after_s, resolve_interval_s=args.resolve_interval_s)

    async def serve() -> None:
        credentials = Credentials.insecure()  # loopback demo; pass TLS credentials in production
        async with participant(handler, args.db, credentials=credentials, config=config) as p:
            health = Health([PARTICIPANT_SERVICE, *services])
            health.watch(p.store.wait_failed)
            metrics.ParticipantMetrics(p)
            observe(p.observers, args)
            traced = tracing(args)
            await p.serve(
                f"{args.host}:{args.port}",
                services=[lambda server: add_api(server, p)],
                grace_s=args.grace_s,
                health=health,
                interceptors=[traced.server_interceptor()] if traced else [],
            )

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


def page_size(requested: int) -> int:
    """The page size a list RPC serves for `requested` (0: the default; above the
    maximum: the maximum, as gRPC APIs do). InvalidOperation if negative."""
    if requested < 0:
        raise InvalidOperation(f"page_size must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(kind: str, *after: Any) -> str:
    """An opaque token for the page that follows the item keyed `after`."""
    return base64.urlsafe_b64encode(json.dumps([kind, *after]).encode()).decode()


def page_after(kind: str, token: str) -> list[Any] | None:
    """The key a `page_token(kind, ...)` carries; None for the first page (empty
    token). InvalidOperation for a token this list did not hand out."""
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error) as e:
        raise InvalidOperation("page_token is not one this list handed out") from e
    if not isinstance(decoded, list) or not decoded or decoded[0] != kind:
        raise InvalidOperation("page_token is not one this list handed out")
    return decoded[1:]
