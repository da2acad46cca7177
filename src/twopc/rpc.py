"""The gRPC boundary: channels, server ports and status translation, in one place.

Credentials arrive here and nowhere else, so switching on TLS or mutual TLS never
touches a call site. Raw `grpc.aio.AioRpcError` is turned into text here; it never
escapes the public API.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Any

import grpc

from twopc.config import Credentials

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


def add_port(server: grpc.aio.Server, address: str, credentials: Credentials) -> int:
    """Binds `address` ("host:port", port 0 for any free one); returns the port."""
    if credentials.server is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials.server)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def describe(error: grpc.aio.AioRpcError) -> str:
    """A one-line, human-readable form of an RPC failure."""
    return f"{error.code().name}: {error.details() or 'no details'}"


async def serve_until_signalled(
    server: grpc.aio.Server, address: str, credentials: Credentials, *, grace_s: float = 1.0
) -> None:
    """Binds, starts, announces and runs `server` until SIGTERM or SIGINT.

    Prints `READY host:port` on standard output once serving, which is how
    `twopc.testing.ServiceProcess` (tests, demo, benchmarks) learns the port.
    """
    port = add_port(server, address, credentials)
    await server.start()
    announce_ready(f"{address.rsplit(':', 1)[0]}:{port}")
    await until_signalled()
    await server.stop(grace=grace_s)


def announce_ready(address: str) -> None:
    """Tells a supervising `twopc.testing.ServiceProcess` where this process serves."""
    print(f"READY {address}", flush=True)


async def until_signalled() -> None:
    """Returns when the process gets SIGTERM or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
