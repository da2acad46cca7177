"""The standard gRPC services every server is expected to have: health and reflection.

`Health(services)` is the gRPC health checking service (`grpc.health.v1.Health`)
and server reflection (`grpc.reflection.v1alpha`) in one object; give it to
`Participant.serve` or `Coordinator.serve` (`health=`), or add it to a server of
your own with `add_to_server`. Then `grpc_health_probe`, `grpcurl` and load
balancers work against any twopc process, yours included. Needs the `ops` extra
(`pip install twopc[ops]`).

Status follows what the process can promise: NOT_SERVING until `serving()` is called
(`serve` does once the store or log is open and recovery has started), NOT_SERVING
for good once `shutdown()` starts a graceful stop (`serve` does on SIGTERM), and
NOT_SERVING as soon as a watched store reports a failed fsync (`watch`), since such
a process must be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # the stubs predate aio
from grpc_reflection.v1alpha import reflection

# Re-exported: the names a service gives `Health`, one definition with the policy's.
from twopc.security.auth import COORDINATOR_SERVICE as COORDINATOR_SERVICE
from twopc.security.auth import PARTICIPANT_SERVICE as PARTICIPANT_SERVICE

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_log = structlog.get_logger("twopc.observe.health")


class Health:
    """Health checking and reflection, with the status under our control.

    Args:
        services: full names of the services it serves (e.g. `PARTICIPANT_SERVICE`,
            "wallet.v1.Wallet"); each gets a health status, and reflection lists them.
            The overall status ("") is always there.
        reflection_on: also add server reflection.
    """

    def __init__(self, services: Iterable[str], *, reflection_on: bool = True) -> None:
        self.services = ("", *services)
        self.reflection_on = reflection_on
        self._servicer = health_aio.HealthServicer()
        self._watcher: asyncio.Task[None] | None = None
        self._final = False
        self.status = "NOT_SERVING"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Adds health checking (and reflection) to `server`, before it starts."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        if self.reflection_on:
            names = (*self.services[1:], HEALTH_SERVICE, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)

    async def serving(self) -> None:
        """SERVING for every service: the process can take work."""
        await self._set(_SERVING)

    async def not_serving(self) -> None:
        """NOT_SERVING for every service (e.g. its store failed)."""
        await self._set(_NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for good: the process is draining before it stops."""
        await self._stop_watching()
        await self._servicer.enter_graceful_shutdown()
        self.status = "NOT_SERVING"
        self._final = True

    def watch(self, failed: Callable[[], Awaitable[object]]) -> None:
        """Turns NOT_SERVING once `failed()` returns (e.g. `store.wait_failed`,
        `coordinator.wait_failed`)."""

        async def wait() -> None:
            error = await failed()
            _log.critical("health_not_serving", error=str(error))
            await self.not_serving()

        self._watcher = asyncio.create_task(wait())

    async def close(self) -> None:
        """Stops watching."""
        await self._stop_watching()

    async def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        if self._final:
            return
        for service in self.services:
            await self._servicer.set(service, status)
        self.status = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    async def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
