"""Prometheus metrics for coordinators and participants, fed by the observer events.

    from twopc.ops import metrics
    metrics.CoordinatorMetrics(coordinator)    # or ParticipantMetrics(participant)
    metrics.serve(9464, health=health)          # GET http://127.0.0.1:9464/metrics

The same port answers probes that cannot present a client certificate (a
Kubernetes kubelet under mutual TLS): `/healthz` is 200 while the process is alive,
`/readyz` is 200 exactly while the gRPC health service says SERVING (503 otherwise),
and every other path is 404.

Each class is an `Observer` that attaches itself to the coordinator or participant
given; the protocol code does not know it is there. Names follow Prometheus
conventions (units in the name, `_total` for counters) and every label has a small,
fixed set of values: a transaction id is never a label. The README lists them with
what to alert on. Needs the `ops` extra (`pip install twopc[ops]`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import prometheus_client
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from twopc.coordinator.core import Coordinator
from twopc.observe import Event, EventKind
from twopc.participant.base import ParticipantBase
from twopc.types import Outcome, Vote

# Latency buckets from a fsync on a fast disk to a phase-1 deadline of several seconds.
_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REASON_CLASSES = ("none", "business", "deadline", "unavailable", "cancelled", "refused", "error")


def reason_class(vote: Vote | None, reason: str) -> str:
    """A vote's reason reduced to one of `REASON_CLASSES` (a bounded label value).

    none: a yes vote. business: the participant said no with its own reason
    (insufficient funds...). deadline: the phase-1 deadline passed. unavailable: the
    participant could not be reached. cancelled: another branch decided first.
    refused: a repeated or late Prepare for a transaction already aborted. error:
    any other failure (a bug, a bad request).
    """
    if vote in (Vote.COMMIT, Vote.READ_ONLY):
        return "none"
    lowered = reason.lower()
    if lowered.startswith("cancelled"):
        return "cancelled"
    if "deadline" in lowered:
        return "deadline"
    if lowered.startswith("unavailable"):
        return "unavailable"
    if "already aborted" in lowered:
        return "refused"
    if vote is Vote.ABORT:
        return "business"
    return "error"


class Readiness(Protocol):
    """What `/readyz` reads: `twopc.observe.health.Health` (its gRPC status)."""

    @property
    def status(self) -> str: ...


def serve(
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    health: Readiness | None = None,
) -> int:
    """Serves `/metrics`, `/healthz` and `/readyz` over HTTP on a background thread;
    returns the bound port (pass 0 for any free one). Loopback by default: expose
    it deliberately (`host="0.0.0.0"`).

    Args:
        port: the port; keep a stable one outside the ephemeral range
            (/proc/sys/net/ipv4/ip_local_port_range).
        host: the address to bind.
        registry: the Prometheus registry; the default one if None.
        health: the process's health service: `/readyz` answers 200 while it says
            SERVING and 503 otherwise. Without it, `/readyz` is 404.
    """
    handler = _handler(registry or prometheus_client.REGISTRY, health)
    server_class = _V6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), handler)
    threading.Thread(target=server.serve_forever, name="twopc-metrics", daemon=True).start()
    return int(server.server_port)


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(registry: CollectorRegistry, health: Readiness | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path == "/healthz":
                self._send(200, b"alive\n")
            elif path == "/readyz" and health is not None:
                status = health.status
                self._send(200 if status == "SERVING" else 503, f"{status}\n".encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: a scrape every few seconds is not news."""

    return Handler


class _Syncs(Collector):
    """A counter read at scrape time from a store's own count of forced writes."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class CoordinatorMetrics:
    """A coordinator's metrics. Attaches itself to `coordinator` as an observer.

    Args:
        coordinator: the coordinator to watch.
        registry: where the metrics live; the default registry unless given.
    """

    def __init__(self, coordinator: Coordinator, *, registry: CollectorRegistry | None = None) -> None:
        r = registry or prometheus_client.REGISTRY
        c = prometheus_client
        self.transactions = c.Counter(
            "twopc_transactions_total", "Transactions decided, by outcome.", ["outcome"], registry=r
        )
        self.phase1 = c.Histogram(
            "twopc_phase1_duration_seconds",
            "From the first Prepare sent to the decision (all votes in, or the first no).",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.decision_write = c.Histogram(
            "twopc_decision_write_duration_seconds",
            "The forced write of a COMMIT decision to the decision log (the commit point).",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.phase2 = c.Histogram(
            "twopc_phase2_duration_seconds",
            "From the durable decision to the last acknowledgement (END), by outcome.",
            ["outcome"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.votes = c.Counter(
            "twopc_votes_total", "Phase-1 votes received, by vote and reason class.", ["vote", "reason"], registry=r
        )
        self.retries = c.Counter(
            "twopc_phase2_retries_total", "Phase-2 Commit/Abort attempts that failed and were retried.", registry=r
        )
        self.pending = c.Gauge(
            "twopc_pending_commits", "Logged COMMIT decisions not yet acknowledged by every participant.", registry=r
        )
        self.questions = c.Counter(
            "twopc_outcome_questions_total", "GetOutcome questions answered, by answer.", ["answer"], registry=r
        )
        r.register(
            _Syncs(
                "twopc_decision_log_forced_writes",
                "Forced (fsynced) writes of the decision log; concurrent decisions share one.",
                lambda: coordinator.log_syncs,
            )
        )
        self._logged: set[str] = set()
        for outcome in (Outcome.COMMITTED, Outcome.ABORTED):  # both series exist from the start
            self.transactions.labels(outcome.value)
        coordinator.observers.add(self)

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.VOTED:
            self.votes.labels(*_vote_labels(event)).inc()
        elif kind is EventKind.DECIDED:
            assert event.outcome is not None
            self.transactions.labels(event.outcome.value).inc()
            self.phase1.observe(event.duration_s)
        elif kind is EventKind.DECISION_LOGGED:
            self.decision_write.observe(event.duration_s)
            self._track(event.txn_id, True)
        elif kind is EventKind.RECOVERING:
            self._track(event.txn_id, True)
        elif kind is EventKind.PHASE2_RETRY:
            self.retries.inc()
        elif kind is EventKind.ENDED:
            self._track(event.txn_id, False)
            if not event.one_phase and event.outcome is not None:
                self.phase2.labels(event.outcome.value).observe(event.duration_s)
        elif kind is EventKind.OUTCOME_ANSWERED:
            self.questions.labels(event.outcome.value if event.outcome else "pending").inc()

    def _track(self, txn_id: str, logged: bool) -> None:
        if logged:
            self._logged.add(txn_id)
        else:
            self._logged.discard(txn_id)
        self.pending.set(len(self._logged))


class ParticipantMetrics:
    """A participant's metrics. Attaches itself to `participant` as an observer; the
    in-doubt gauges are refreshed each resolver round.

    Args:
        participant: the participant helper to watch.
        registry: where the metrics live; the default registry unless given.
    """

    def __init__(self, participant: ParticipantBase, *, registry: CollectorRegistry | None = None) -> None:
        r = registry or prometheus_client.REGISTRY
        c = prometheus_client
        self.prepares = c.Counter(
            "twopc_participant_votes_total",
            "Votes this participant gave, by vote and reason class.",
            ["vote", "reason"],
            registry=r,
        )
        self.decisions = c.Counter(
            "twopc_participant_decisions_total", "Decisions applied here, by outcome.", ["outcome"], registry=r
        )
        self.in_doubt = c.Gauge(
            "twopc_participant_in_doubt_transactions", "Transactions prepared here and not yet decided.", registry=r
        )
        self.oldest = c.Gauge(
            "twopc_participant_in_doubt_oldest_age_seconds",
            "Age of the oldest transaction prepared here and not yet decided (0 if none).",
            registry=r,
        )
        self.questions = c.Counter(
            "twopc_participant_in_doubt_questions_total",
            "GetOutcome questions asked about in-doubt transactions, by answer.",
            ["answer"],
            registry=r,
        )
        r.register(
            _Syncs(
                "twopc_participant_forced_writes",
                "Forced (fsynced) writes of the participant's store; concurrent prepares share one.",
                lambda: participant.store.stats.syncs,
            )
        )
        participant.observers.add(self)

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.PREPARED:
            self.prepares.labels(*_vote_labels(event)).inc()
        elif kind is EventKind.APPLIED:
            assert event.outcome is not None
            self.decisions.labels(event.outcome.value).inc()
        elif kind is EventKind.IN_DOUBT_SCANNED:
            self.in_doubt.set(event.count)
            self.oldest.set(event.duration_s)
        elif kind is EventKind.IN_DOUBT_ASKED:
            answer = event.outcome.value if event.outcome else "unreachable"
            self.questions.labels(answer).inc()


def _vote_labels(event: Event) -> tuple[str, str]:
    """The (vote, reason class) labels of a VOTED or PREPARED event."""
    return (event.vote.value if event.vote is not None else "none"), reason_class(event.vote, event.reason)
