"""What every demo service shares: its command line, logging and serving loop."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor

from twopc import (
    Credentials,
    InvalidOperation,
    NotFound,
    Participant,
    ParticipantConfig,
    ParticipantHandler,
)
from twopc.errors import ClosedError
from twopc.observe import JsonLines, Observers
from twopc.observe.health import PARTICIPANT_SERVICE, Health
from twopc.observe.logconfig import configure as configure_logs
from twopc.observe.tracing import Tracing
from twopc.ops import metrics
from twopc.security import limits
from twopc.security.auth import ANYONE, Policy, operations_rules, participant_rules, peer_identities
from twopc.stores import ConflictError, StoreSetupError, StoreUnavailableError

_log = structlog.get_logger("services")

T = TypeVar("T")

MAX_AMOUNT = 10**12  # minor units in one operation: ten billion in a two-decimal currency
MAX_BALANCE = 2**62  # far below SQLite's int64 limit, so sums cannot overflow
MAX_QUANTITY = 10**9
DEFAULT_PAGE_SIZE = 100  # list RPCs: what page_size=0 means
MAX_PAGE_SIZE = 1000  # list RPCs: a larger page_size is lowered to this


def parser(
    prog: str,
    description: str,
    *,
    db_help: str = "SQLite file of this service (created if missing); the shop also takes a postgresql:// URL,"
    " a decision log shared by several shops (?schema=NAME&lease_s=S)",
) -> argparse.ArgumentParser:
    """The flags every service takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to listen on, 0 for any free one (default %(default)s); keep a stable one outside the ephemeral"
        " range (/proc/sys/net/ipv4/ip_local_port_range), where an outgoing connection may hold it at a restart",
    )
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
    tls = p.add_argument_group(
        "transport security", "mutual TLS (--tls-dir, or --tls-cert/--tls-key/--tls-ca), or an explicit --insecure"
    )
    tls.add_argument("--tls-dir", metavar="DIR", help="cert.pem, key.pem and ca.pem of this service")
    tls.add_argument("--tls-cert", metavar="PEM", help="this service's certificate chain")
    tls.add_argument("--tls-key", metavar="PEM", help="this service's private key")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA every peer's certificate must chain to")
    tls.add_argument(
        "--insecure", action="store_true", help="plaintext, no authentication: anyone who reaches the port may call"
    )
    tls.add_argument(
        "--insecure-beyond-loopback",
        action="store_true",
        help="with --insecure, allow listening on a non-loopback address (readable and forgeable on the network)",
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


def observe(observers: Observers, args: argparse.Namespace, *, health: Health | None = None) -> None:
    """Starts the /metrics endpoint (with /healthz, and /readyz from `health`) if
    `--metrics-port` was given, and the events file if `--events-file` was."""
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_host, health=health)
    if args.events_file:
        observers.add(JsonLines(args.events_file))


def identities(text: str) -> frozenset[str]:
    """A comma-separated allowlist ("shop,backup-shop"; "*" = any authenticated)."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def add_api_access_args(p: argparse.ArgumentParser, *, writers: str, writers_default: str) -> None:
    """--operators (who may call the service's own write RPCs) and --readers."""
    g = p.add_argument_group("authorization (client certificate names; comma-separated; '*' = any)")
    g.add_argument(f"--{writers}", type=identities, default=writers_default, help=f"default {writers_default}")
    g.add_argument(
        "--readers",
        type=identities,
        default="",
        help="who may read everything (health, stock, every account and order); an owner reads only its own"
        " accounts and orders (default: nobody)",
    )


MAX_OWNERS = 16
"""Identities one account may belong to."""


@dataclass(frozen=True)
class Readers:
    """Who may read what a read RPC returns: `everything` reads all; an owner
    reads its own. Under plaintext (`secure` False) no caller has a name and
    everyone reads everything (tests and loopback demos only).

    Attributes:
        everything: identities that read every account and order (--readers).
        secure: mutual TLS: callers have names to check.
    """

    everything: frozenset[str]
    secure: bool

    def may_read(self, context: grpc.aio.ServicerContext[Any, Any], owners: Sequence[str]) -> bool:
        """True if the caller reads everything or is one of `owners`."""
        if not self.secure:
            return True
        caller = peer_identities(context)
        return ANYONE in self.everything or not self.everything.isdisjoint(caller) or not set(owners).isdisjoint(caller)

    def reads_everything(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """True if the caller may read every account and order."""
        return self.may_read(context, ())


def buyer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's identity ("" under plaintext): the first name in its certificate."""
    names = peer_identities(context)
    return names[0] if names else ""


def credentials(args: argparse.Namespace) -> Credentials:
    """The transport security the flags chose; exits with a usage error otherwise."""
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if args.insecure:
        if args.tls_dir or any(files):
            raise SystemExit("error: --insecure and --tls-* exclude each other")
        return Credentials.insecure(beyond_loopback=args.insecure_beyond_loopback)
    if args.insecure_beyond_loopback:
        raise SystemExit("error: --insecure-beyond-loopback needs --insecure")
    try:
        if args.tls_dir and not any(files):
            return Credentials.from_dir(args.tls_dir)
        if all(files) and not args.tls_dir:
            return Credentials.mutual_tls(*files)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    raise SystemExit("error: give --tls-dir, or all of --tls-cert, --tls-key and --tls-ca, or say --insecure")


@dataclass(frozen=True)
class ApiAccess:
    """Which of a service's own RPCs are reads; every other one is a write.

    Attributes:
        service: the service's descriptor (e.g. `wallet_pb2.DESCRIPTOR.services_by_name["Wallet"]`).
        reads: names of its read RPCs (any `--readers` identity); the rest need `--operators`.
        owned: the reads an owner may make of its own things (any authenticated
            caller gets past the Authorizer; the servicer checks ownership).
    """

    service: ServiceDescriptor
    reads: frozenset[str]

    owned: frozenset[str] = frozenset()

    def rules(self, writers: frozenset[str], readers: frozenset[str]) -> dict[str, frozenset[str]]:
        """Writes to `writers`, reads to `readers`, and owned reads to any
        authenticated caller: the servicer then lets an owner see only its own."""
        return {
            f"/{self.service.full_name}/{m.name}": (
                frozenset({ANYONE}) if m.name in self.owned else readers if m.name in self.reads else writers
            )
            for m in self.service.methods
        }


def policy(credentials: Credentials, rules: dict[str, frozenset[str]]) -> Policy | None:
    """Who may call what, under TLS; None for plaintext, where no caller has a name."""
    if not credentials.secure:
        _log.warning("plaintext", note="no transport security and no authorization: anyone may call anything")
        return None
    return Policy(rules)


def participant_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags of a participant service: the common ones and in-doubt resolution."""
    p = parser(
        prog,
        description,
        db_help="where this service keeps its data: a SQLite file (created if missing) or a PostgreSQL URL,"
        " postgresql://user@host:port/database (needs the postgres extra)",
    )
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
    p.add_argument(
        "--resolve-backoff-max-s",
        type=float,
        default=d.resolve_backoff_max_s,
        help="longest wait before asking again a coordinator that did not answer (default %(default)s)",
    )
    g = p.add_argument_group("trust (who drives this participant, and whom it asks for outcomes)")
    g.add_argument(
        "--coordinators",
        type=identities,
        default="shop",
        help="identities that may call Prepare, PrepareMany, Commit, CommitMany and Abort (default %(default)s)",
    )
    g.add_argument(
        "--trust-coordinator",
        action="append",
        default=[],
        metavar="NAME@HOST:PORT",
        help="a coordinator a Prepare may name (repeatable): its identity and address; the in-doubt resolver"
        " believes only a server holding NAME's certificate there (a bare HOST:PORT takes the caller's name)."
        " Without it, under TLS: any address, bound to the calling coordinator's name; with --insecure: any",
    )
    g.add_argument(
        "--allow-no-coordinator",
        action="store_true",
        help="accept a two-phase Prepare that names no coordinator (nobody to ask if in doubt)",
    )
    g.add_argument(
        "--max-undecided-per-coordinator",
        type=int,
        default=d.max_undecided_per_coordinator,
        help="prepared, undecided transactions one coordinator may hold here (default %(default)s)",
    )
    add_api_access_args(p, writers="operators", writers_default="operator")
    return p


def run_participant(
    handler: ParticipantHandler,
    add_api: Callable[[grpc.aio.Server, Participant, Readers], None],
    args: argparse.Namespace,
    participant: type[Participant] = Participant,
    *,
    services: Sequence[str] = (),
    access: ApiAccess,
) -> None:
    """Serves the Participant contract and the service's own API (`services`, by full
    name, for health and reflection) until SIGTERM/SIGINT, then stops gracefully.
    `participant` lets a test run a deliberately broken helper; `access` says which
    of the service's own RPCs are reads."""
    configure_logs(args.log_format, level=args.log_level)
    creds = credentials(args)
    trusted = frozenset(args.trust_coordinator) if args.trust_coordinator or creds.secure else None
    try:
        config = ParticipantConfig(
            in_doubt_after_s=args.in_doubt_after_s,
            resolve_interval_s=args.resolve_interval_s,
            resolve_backoff_max_s=args.resolve_backoff_max_s,
            trusted_coordinators=trusted,
            allow_no_coordinator=args.allow_no_coordinator,
            max_undecided_per_coordinator=args.max_undecided_per_coordinator,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    rules = (
        participant_rules(args.coordinators)
        | access.rules(args.operators, args.readers)
        | operations_rules(args.readers)  # health and reflection: whoever may read
    )

    async def serve() -> None:
        # Not entered: `serve` opens the store itself, and waits (NOT_SERVING) for a
        # PostgreSQL that is down or still starting.
        p = participant(handler, args.db, credentials=creds, config=config)
        health = Health([PARTICIPANT_SERVICE, *services])
        health.watch(p.wait_failed)
        metrics.ParticipantMetrics(p)
        observe(p.observers, args, health=health)
        traced = tracing(args)
        await p.serve(
            f"{args.host}:{args.port}",
            services=[lambda server: add_api(server, p, Readers(args.readers, creds.secure))],
            grace_s=args.grace_s,
            health=health,
            interceptors=[traced.server_interceptor()] if traced else [],
            policy=policy(creds, rules),
        )

    try:
        asyncio.run(serve())
    except (ValueError, StoreSetupError, StoreUnavailableError) as e:  # a bad --db URL, refused for good: one line
        raise SystemExit(f"error: {e}") from None


class AlreadyExists(Exception):  # noqa: N818 - named for the gRPC status it maps to
    """The thing to create exists already (ALREADY_EXISTS)."""


_STATUS = {
    InvalidOperation: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ConflictError: grpc.StatusCode.ABORTED,  # PostgreSQL: kept losing to concurrent calls; retry
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,  # PostgreSQL: unreachable, or the outcome unknown
    ClosedError: grpc.StatusCode.UNAVAILABLE,  # the store is not open yet (its database is starting)
}


async def api(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    """Awaits a business API job, turning business errors into gRPC statuses."""
    try:
        return await work
    except tuple(_STATUS) as e:  # the first match: ConflictError before StoreUnavailableError, its base
        await context.abort(next(code for kind, code in _STATUS.items() if isinstance(e, kind)), str(e))
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
    if len(token) > limits.MAX_PAGE_TOKEN_LEN:
        raise InvalidOperation("page_token is not one this list handed out")
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error) as e:
        raise InvalidOperation("page_token is not one this list handed out") from e
    if not isinstance(decoded, list) or not decoded or decoded[0] != kind:
        raise InvalidOperation("page_token is not one this list handed out")
    return decoded[1:]
