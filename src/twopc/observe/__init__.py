"""What watches the protocol: the observer interface the coordinator and participant
emit events to (`events`), and what is built on it or beside it without the protocol
knowing: OpenTelemetry spans (`tracing`), gRPC health (`health`), logging set-up
(`logconfig`). Consumers that sit above the protocol (metrics, the CLI) are in
`twopc.ops`.
"""

from twopc.observe.events import MAX_OPEN, Event, EventKind, JsonLines, Observer, Observers, Recorder, to_json

__all__ = ["MAX_OPEN", "Event", "EventKind", "JsonLines", "Observer", "Observers", "Recorder", "to_json"]
