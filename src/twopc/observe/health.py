"""The standard gRPC services every server is expected to have: health and reflection.

`Health(services)` is the gRPC health checking service (`grpc.health.v1.Health`)
and server reflection (`grpc.reflection.v1alpha`) in one object; give it to
`Participant.serve` or `Coordinator.serve` (`health=`), or add it to a server of
your own with `add_to_server`. Then `grpc_health_probe`, `grpcurl` and load
balancers work against any twopc process, yours included. Needs the `ops` extra
(`pip install twopc[ops]`).

`Participant.serve` and `Coordinator.serve` make one by default when none is given
(and the extra is installed), and check their store or decision log with it.

Status follows what the process can promise: NOT_SERVING until `serving()` is called
(`serve` does once the store or log is open and recovery has started), NOT_SERVING
for good once `shutdown()` starts a graceful stop (`serve` does on SIGTERM),
NOT_SERVING as soon as a watched store reports a failed fsync (`watch`), since such
a process must be restarted, and NOT_SERVING while a `check` fails (a PostgreSQL
store or log out of reach), SERVING again once it passes. `status` is what
`twopc.ops.metrics.serve` answers on `/readyz`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

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
        self._watchers: set[asyncio.Task[None]] = set()
        self._final = False
        self._ready = False  # serving() was called
        self._failed = False  # a watched failure: for good
        self._failing: set[str] = set()  # the checks failing now
        self._checks: list[Callable[[], Coroutine[Any, Any, None]]] = []  # started by serving()
        self.status = "NOT_SERVING"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Adds health checking (and reflection) to `server`, before it starts."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        if self.reflection_on:
            names = (*self.services[1:], HEALTH_SERVICE, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)

    async def serving(self) -> None:
        """SERVING for every service: the process can take work (unless a watched
        failure happened, or a check is failing)."""
        self._ready = True
        while self._checks:
            self._start(self._checks.pop()())
        await self._update()

    async def starting(self) -> None:
        """NOT_SERVING until `serving()`, said outright (gRPC's health servicer answers
        SERVING overall until told otherwise): `serve` says it while a participant
        waits for its database."""
        await self._update()

    async def not_serving(self) -> None:
        """NOT_SERVING for every service, for good (e.g. its store failed)."""
        self._failed = True
        await self._update()

    async def shutdown(self) -> None:
        """NOT_SERVING for good: the process is draining before it stops."""
        await self._stop_watching()
        await self._servicer.enter_graceful_shutdown()
        self.status = "NOT_SERVING"
        self._final = True

    def watch(self, failed: Callable[[], Awaitable[object]]) -> None:
        """Turns NOT_SERVING for good once `failed()` returns (e.g.
        `store.wait_failed`, `coordinator.wait_failed`)."""

        async def wait() -> None:
            error = await failed()
            _log.critical("health_not_serving", error=str(error))
            await self.not_serving()

        self._start(wait())

    def check(
        self, name: str, probe: Callable[[], Awaitable[object]], *, every_s: float = 1.0, timeout_s: float = 2.0
    ) -> None:
        """Runs `probe()` every `every_s` once `serving()` is called: NOT_SERVING while
        it raises or takes longer than `timeout_s` (a PostgreSQL store down),
        SERVING again once it passes."""

        async def loop() -> None:
            while True:
                try:
                    await asyncio.wait_for(probe(), timeout_s)
                except Exception as e:  # noqa: BLE001 - any failure of the probe means not ready
                    if name not in self._failing:
                        _log.warning("health_check_failing", check=name, error=str(e) or type(e).__name__)
                        self._failing.add(name)
                        await self._update()
                else:
                    if name in self._failing:
                        _log.info("health_check_passing", check=name)
                        self._failing.discard(name)
                        await self._update()
                await asyncio.sleep(every_s)

        if self._ready:
            self._start(loop())
        else:
            self._checks.append(loop)

    async def close(self) -> None:
        """Stops watching and checking."""
        await self._stop_watching()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _update(self) -> None:
        if self._final:
            return
        status = _SERVING if self._ready and not self._failed and not self._failing else _NOT_SERVING
        for service in self.services:
            await self._servicer.set(service, status)
        self.status = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    async def _stop_watching(self) -> None:
        self._checks.clear()
        watchers = set(self._watchers)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
