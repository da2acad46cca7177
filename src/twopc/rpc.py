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


def channel(target: str, credentials: Credentials, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """A channel to `target` with the given transport security and interceptors."""
    if credentials.channel is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials.channel, options=_CHANNEL_OPTIONS, interceptors=interceptors)


# One server per address: gRPC sets SO_REUSEPORT by default, which lets a second
# process bind a port that is in use, and two coordinators answer for one address.
_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


def server(interceptors: Sequence[Any] = ()) -> grpc.aio.Server:
    """A grpc.aio server that binds its ports exclusively; every twopc server is one."""
    return grpc.aio.server(interceptors=interceptors, options=_SERVER_OPTIONS)


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
    """A one-line, human-readable form of an RPC failure."""
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
    if health is not None:
        await health.serving()
    announce_ready(where)
    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(until_signalled())}
    failure: asyncio.Future[BaseException] | None = None
    if failed is not None:
        failure = asyncio.ensure_future(failed())
        waits.add(failure)
    stopping = time.monotonic()
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stopping = time.monotonic()
        if failure is None or not failure.done():
            await _drain(health, drain, grace_s)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await srv.stop(grace=max(0.0, grace_s - (time.monotonic() - stopping)))
    if failure is not None and failure.done() and not failure.cancelled():
        raise failure.result()


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
