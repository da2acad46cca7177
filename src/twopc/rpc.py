"""The gRPC boundary: channels, server ports and status translation, in one place.

Credentials arrive here and nowhere else, so switching on TLS or mutual TLS never
touches a call site. Raw `grpc.aio.AioRpcError` is turned into text here; it never
escapes the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import structlog

from twopc.config import Credentials
from twopc.security import limits
from twopc.security.auth import Authorizer, Policy

_log = structlog.get_logger("twopc.rpc")
T = TypeVar("T")

# Keepalives find a dead peer on an idle channel; reconnect backoff is kept short
# so that a restarted participant is reached again within the retry schedule.
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def split_target(target: str) -> tuple[str, str]:
    """("name", "host:port") from "name@host:port"; ("", target) when no name is given.

    A name binds the target to an identity: under TLS the peer must hold a
    certificate for that name, not merely one valid for the address.
    """
    name, at, address = target.partition("@")
    return (name, address) if at else ("", target)


def channel(target: str, credentials: Credentials, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """A channel to `target` ("host:port", or "name@host:port" bound to an identity)
    with the given transport security and interceptors.

    Under TLS, "name@host:port" makes the handshake verify the server's certificate
    against `name` instead of the host (gRPC's `grpc.ssl_target_name_override`), so
    any other holder of a certificate from the same CA listening on that address
    fails the handshake: every call rides on a connection whose server proved that
    name, and a reconnect proves it again. Plaintext has no names to check.
    """
    name, address = split_target(target)
    namer = _NameTlsFailures(target, credentials.secure)
    chain = [namer, *interceptors]
    if credentials.channel is None:
        made = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS, interceptors=chain)
    else:
        options = (*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)) if name else _CHANNEL_OPTIONS
        made = grpc.aio.secure_channel(address, credentials.channel, options=options, interceptors=chain)
    namer.channel = made
    return made


# What grpc-core says when a connection fails in its TLS handshake (the peer's
# certificate, its CA, its name, or TLS against plaintext), and what that means.
_TLS_SIGNS = (
    ("Hostname Verification Check failed", "the server's certificate is not for the name expected there"),
    ("unsupported certificate purpose", "the server's certificate is not for server use (a client's?)"),
    ("unable to get local issuer certificate", "the server's certificate is not signed by a trusted CA"),
    ("certificate has expired", "the server's certificate has expired"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate failed verification"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (plaintext?)"),
    ("andshake failed", "the TLS handshake failed"),
)
_CLOSED = "Socket closed"
_NOT_CONNECTED = "failed to connect to all addresses"
_REFUSED_CONNECTION = (
    "Connection refused",
    "No route to host",
    "Network is unreachable",
    "DNS resolution failed",
    "Connection timed out",
)


def tls_failure(error: grpc.aio.AioRpcError, *, secure: bool = True) -> str | None:
    """What went wrong in the TLS handshake behind `error`, in words; None when the
    error is not a failed handshake. `secure`: whether the channel used TLS (a
    connection closed at once then means the server refused our certificate,
    and under plaintext that the server expects TLS)."""
    details = error.details() or ""
    if error.code() is not grpc.StatusCode.UNAVAILABLE or _NOT_CONNECTED not in details:
        return None
    for sign, meaning in _TLS_SIGNS:
        if sign in details:
            return meaning
    if _CLOSED in details:
        if secure:
            return "the server closed the connection in the handshake: it refused this client's certificate (or none)"
        return "the server closed the connection at once: it expects TLS (plaintext was used)"
    return None


def unreachable(error: grpc.aio.AioRpcError) -> bool:
    """True only if no connection could be made at all (refused, no route, no such
    host): the peer may be down. Any answer, refusal, TLS failure or timeout is
    something else, and a caller deciding on "unreachable" must not guess."""
    details = error.details() or ""
    return (
        error.code() is grpc.StatusCode.UNAVAILABLE
        and _NOT_CONNECTED in details
        and any(sign in details for sign in _REFUSED_CONNECTION)
    )


_PROBE = "/twopc.v1.Probe/Handshake"


def _cause(details: str) -> str:
    """The TLS library's own words at the end of grpc-core's connection error, short."""
    for mark in ("OPENSSL_internal:", "last error: "):
        if mark in details:
            return limits.clip(details.rsplit(mark, 1)[1], 160)
    return limits.clip(details, 160)


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _NameTlsFailures(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]  # grpc-stubs: generic for no reason here
    """Turns a call that failed on a broken TLS handshake into an error that says so.

    A call made with `wait_for_ready` (the coordinator's) waits out its deadline
    while the channel retries a handshake that keeps failing, and ends as
    DEADLINE_EXCEEDED with nothing about TLS. On such a failure this asks the
    channel once more without waiting (it fails at once with the last connection
    error) and, if that names a TLS failure, raises UNAVAILABLE saying so, and logs
    `tls_failed` with the target.
    """

    def __init__(self, target: str, secure: bool) -> None:
        self.target, self.secure = target, secure
        self.channel: grpc.aio.Channel | None = None

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if _method(details) == _PROBE:
                raise  # the probe itself: its caller reads it
            named: grpc.aio.AioRpcError | None = e if tls_failure(e, secure=self.secure) else None
            # Only a channel whose connecting failed can name why; one still connecting
            # (a paused peer) would only make the probe wait.
            failing = self.channel is not None and (
                self.channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE
            )
            if named is None and failing:
                named = await self._probe()
            if named is None:
                raise
            meaning = tls_failure(named, secure=self.secure)
            _log.error("tls_failed", target=self.target, meaning=meaning, error=limits.clip(named.details() or "", 500))
            said = f"TLS with {self.target} failed: {meaning} ({_cause(named.details() or '')})"
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), said, said
            ) from e
        return call

    async def _probe(self) -> grpc.aio.AioRpcError | None:
        assert self.channel is not None
        probe = self.channel.unary_unary(_PROBE, request_serializer=None, response_deserializer=None)
        try:
            await probe(b"", timeout=1.0, wait_for_ready=False)
        except grpc.aio.AioRpcError as e:
            return e if tls_failure(e, secure=self.secure) else None
        return None


MAX_STREAMS_PER_CONNECTION = 1000
"""Concurrent calls one connection may carry (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS),
as many as a server runs at all: bounds what one connection can make a server hold.
Lower would hurt honest callers: grpc-core refuses (REFUSED_STREAM, seen as
UNAVAILABLE) the streams a client opens past it before the limit reaches it, and 300
concurrent calls on a fresh channel lost a third of them at 100."""

MAX_CONCURRENT_RPCS = 1000
"""Calls a server runs at once, all connections together; past it RESOURCE_EXHAUSTED."""

MAX_CONNECTION_IDLE_S = 300
"""A connection without calls for this long is closed (GOAWAY); clients reconnect."""

# One server per address: gRPC sets SO_REUSEPORT by default, which lets a second
# process bind a port that is in use, and two coordinators answer for one address.
# The rest bounds what a caller can make a server hold (docs/security.md, "Limits"):
# streams per connection, idle connections, and keepalive pings (a client pinging
# more often than every 5 s without calls is sent GOAWAY after two strikes; twopc's
# channels ping every 10 s, and only with calls in flight).
_SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_S * 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.http2.bdp_probe", 0),
)


def server(interceptors: Sequence[Any] = ()) -> grpc.aio.Server:
    """A grpc.aio server that binds its ports exclusively; every twopc server is one.

    Its first interceptor is always an `Authorizer` (the one in `interceptors`, or
    one with no policy under plaintext), so every request is authorized before it
    is parsed, and bytes that do not parse get INVALID_ARGUMENT, never UNKNOWN.
    """
    guards = [i for i in interceptors if isinstance(i, Authorizer)] or [Authorizer(None)]
    others = [i for i in interceptors if not isinstance(i, Authorizer)]
    return grpc.aio.server(
        interceptors=[guards[0], *others], options=_SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
    )


def add_port(server: grpc.aio.Server, address: str, credentials: Credentials) -> int:
    """Binds `address` ("host:port", port 0 for any free one); returns the port.

    Raises:
        ValueError: plaintext on a non-loopback address, unless the credentials
            allow it in so many words (`Credentials.insecure(beyond_loopback=True)`).
        OSError: the address is in use or not one of this host's.
    """
    if credentials.server is None and not (credentials.plaintext_beyond_loopback or is_loopback(address)):
        raise ValueError(
            f"refusing plaintext on {address}: a non-loopback port needs TLS, or say"
            " Credentials.insecure(beyond_loopback=True) (--insecure-beyond-loopback)"
        )
    try:
        if credentials.server is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials.server)
    except RuntimeError as e:  # what grpcio raises when the bind fails
        raise OSError(f"cannot bind {address}: in use, or not an address of this host") from e
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def is_loopback(address: str) -> bool:
    """True if "host:port" names a loopback interface (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def validate(context: grpc.aio.ServicerContext[Any, Any], check: Callable[[], T]) -> T:
    """Runs `check` (the `twopc.security.limits` checks of a request); a `LimitError` aborts
    the call with INVALID_ARGUMENT and its message, which never echoes the input."""
    try:
        return check()
    except limits.LimitError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise  # unreachable: abort raises


def describe(error: grpc.aio.AioRpcError) -> str:
    """A one-line, human-readable form of an RPC failure (a failed TLS handshake is
    named as such by the channel, `channel`)."""
    return f"{error.code().name}: {error.details() or 'no details'}"


async def serve_until_signalled(
    server: grpc.aio.Server, address: str, credentials: Credentials, *, grace_s: float = 1.0
) -> None:
    """Binds, starts, announces and runs `server` until SIGTERM or SIGINT.

    Prints `READY host:port` on standard output once serving, which is how
    `twopc.dev.testing.ServiceProcess` (tests, demo, benchmarks) learns the port.
    """
    port = add_port(server, address, credentials)
    await server.start()
    announce_ready(f"{address.rsplit(':', 1)[0]}:{port}")
    await until_signalled()
    await server.stop(grace=grace_s)


class Health(Protocol):
    """What `serve` tells the standard health service (`twopc.observe.health.Health`)."""

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def serving(self) -> None: ...

    async def starting(self) -> None: ...

    async def shutdown(self) -> None: ...


Drain = Callable[[float], Awaitable[bool]]
"""Refuses new work and waits up to its argument (seconds) for work in progress;
True if all of it finished (`Participant.drain`)."""


async def serve(
    address: str,
    credentials: Credentials,
    services: Sequence[Callable[[grpc.aio.Server], None]],
    *,
    failed: Callable[[], Awaitable[BaseException]] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    on_bound: Callable[[str], None] | None = None,
    grace_s: float = 1.0,
    health: Health | None = None,
    drain: Drain | None = None,
    interceptors: Sequence[Any] = (),
    policy: Policy | None = None,
) -> None:
    """Runs a server with `services` on `address` until SIGTERM/SIGINT or failure.

    What `Participant.serve` and `Coordinator.serve` share: an exclusive bind,
    `on_bound(host:port)` before the first request can arrive, `READY host:port`
    on standard output once serving, and a graceful stop. If `failed` returns first
    (a store or decision log failed), the server stops and its error is raised, so
    the process exits non-zero and is restarted.

    The graceful stop, on a signal: `health` turns NOT_SERVING for good, `drain`
    refuses new work while work in progress finishes, then the server stops; all
    within `grace_s`, after which RPCs still in flight are cancelled.

    With `ready` (a participant whose database is not up yet), the server answers
    at once, `health` says NOT_SERVING until `ready()` returns, then SERVING; if
    `ready()` raises, the server stops and its error is raised.

    `interceptors` are server interceptors (tracing...). With a `policy`, every call
    passes `twopc.security.auth.Authorizer` first (mutual TLS), before any other interceptor.
    """
    srv = server([*([Authorizer(policy)] if policy is not None else []), *interceptors])
    for add in services:
        add(srv)
    if health is not None:
        health.add_to_server(srv)
    port = add_port(srv, address, credentials)
    where = f"{address.rsplit(':', 1)[0]}:{port}"
    if on_bound is not None:
        on_bound(where)
    await srv.start()
    signalled = asyncio.ensure_future(until_signalled())
    waits: set[asyncio.Future[Any]] = {signalled}
    opening: asyncio.Future[None] | None = None
    if ready is None:
        if health is not None:
            await health.serving()
    else:
        if health is not None:  # said outright: gRPC's health service starts SERVING overall
            await health.starting()
        opening = asyncio.ensure_future(_serving_once(ready, health))
        waits.add(opening)
    announce_ready(where)
    failure: asyncio.Future[BaseException] | None = None
    if failed is not None:
        failure = asyncio.ensure_future(failed())
        waits.add(failure)
    stopping = time.monotonic()
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stopping = time.monotonic()
        if signalled.done():
            await _drain(health, drain, grace_s)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await srv.stop(grace=max(0.0, grace_s - (time.monotonic() - stopping)))
    if failure is not None and failure.done() and not failure.cancelled():
        raise failure.result()
    if opening is not None and opening.done() and not opening.cancelled():
        opening.result()  # `ready` raised (what a restart does not fix): raised here


async def _serving_once(ready: Callable[[], Awaitable[None]], health: Health | None) -> None:
    """Awaits `ready`, turns `health` SERVING, then waits for the end of serving."""
    await ready()
    if health is not None:
        await health.serving()
    await asyncio.Event().wait()


async def _drain(health: Health | None, drain: Drain | None, grace_s: float) -> None:
    if health is not None:
        await health.shutdown()
    if drain is not None:
        finished = await drain(grace_s)
        _log.info("drained", finished=finished, grace_s=grace_s)


def announce_ready(address: str) -> None:
    """Tells a supervising `twopc.dev.testing.ServiceProcess` where this process serves."""
    print(f"READY {address}", flush=True)


async def until_signalled() -> None:
    """Returns when the process gets SIGTERM or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            with contextlib.suppress(Exception):  # the loop may be closing
                loop.remove_signal_handler(sig)
