"""What watches the protocol: the observer interface the coordinator and participant
emit events to (`events`), and what is built on it or beside it without the protocol
knowing: OpenTelemetry spans (`tracing`), gRPC health (`health`), logging set-up
(`logconfig`). Consumers that sit above the protocol (metrics, the CLI) are in
`twopc.ops`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from twopc.observe.events import MAX_OPEN, Event, EventKind, JsonLines, Observer, Observers, Recorder, to_json

if TYPE_CHECKING:
    from twopc.observe.health import Health

__all__ = [
    "MAX_OPEN",
    "Event",
    "EventKind",
    "JsonLines",
    "Observer",
    "Observers",
    "Recorder",
    "default_health",
    "health_for_serve",
    "to_json",
]


def default_health(services: Iterable[str]) -> Health | None:
    """The health service `serve` gives a process that was given none: `Health(services)`,
    or None where the `ops` extra (grpcio-health-checking) is not installed."""
    try:
        from twopc.observe.health import Health  # the ops extra
    except ImportError:
        return None
    return Health(services)


def health_for_serve(
    given: Any,
    services: Iterable[str],
    *,
    failed: Callable[[], Awaitable[object]],
    probe: Callable[[], Awaitable[object]],
) -> Any:
    """The health service `Participant.serve` and `Coordinator.serve` run.

    `given` (the caller's), or a default `Health(services)` that turns NOT_SERVING
    for good once `failed()` returns. A `twopc.observe.health.Health` also runs
    `probe` (a store or log that must be reachable) as a readiness check.
    """
    health = given if given is not None else default_health(services)
    if given is None and health is not None:
        health.watch(failed)
    if health is not None and callable(getattr(health, "check", None)):
        health.check("store", probe)
    return health
