"""OpenTelemetry tracing: one trace per transaction, a span per phase and branch.

    from twopc.observe.tracing import Tracing
    tracing = Tracing()                       # the global tracer provider, or pass one
    coordinator = Coordinator(..., observers=[tracing], interceptors=[tracing.client_interceptor()])
    server = rpc.server(interceptors=[tracing.server_interceptor()])   # at each participant

On the coordinator, `Tracing` is an observer: each transaction gets a root span
`twopc.transaction` with children `twopc.phase1` (a `twopc.prepare` span per branch,
ended by its vote), `twopc.decision_write` (the forced write of a commit) and
`twopc.phase2` (a `twopc.commit` or `twopc.abort` span per branch, ended by its
acknowledgement, retries as span events). Spans are timed from the observer events.
The client interceptor puts the transaction's phase span into the gRPC metadata of
each Prepare, Commit and Abort (W3C trace context), and the server interceptor at a
participant continues the trace with a server span per RPC, so a tracing backend
shows a purchase across every service. Nothing is exported unless the application
configures a tracer provider with an exporter; needs the `tracing` extra.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from twopc.observe import MAX_OPEN, Event, EventKind
from twopc.types import Outcome

if TYPE_CHECKING:
    _ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # not subscriptable at run time
    _ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

_TRACER = "twopc"


def _ns(at: float) -> int:
    return int(at * 1e9)


@dataclass
class _Txn:
    root: Span
    phase: Span  # the phase in progress: its context travels with the RPCs
    phase_at: int  # when it started (ns)
    prepares: dict[str, Span] = field(default_factory=dict)  # by branch label, until its vote
    outcome: Outcome | None = None


class Tracing:
    """Spans from a coordinator's observer events, and the interceptors that carry
    the trace to participants.

    Args:
        tracer_provider: where spans go; the global provider by default.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(_TRACER, tracer_provider=tracer_provider)
        self._txns: dict[str, _Txn] = {}

    # --- the observer ------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        kind, at = event.kind, _ns(event.at)
        if kind in (EventKind.PHASE1_STARTED, EventKind.RECOVERING):
            self._start(event, at)
            return
        txn = self._txns.get(event.txn_id)
        if txn is None:
            return
        if kind is EventKind.VOTED:
            span = txn.prepares.pop(event.branch, None)
            if span is not None:
                span.set_attribute("twopc.vote", event.vote.value if event.vote else "none")
                if event.reason:
                    span.set_attribute("twopc.reason", event.reason)
                if event.vote is None:
                    span.set_status(Status(StatusCode.ERROR, event.reason))
                span.end(end_time=at)
        elif kind is EventKind.DECIDED:
            self._decided(txn, event, at)
        elif kind is EventKind.DECISION_LOGGED:
            txn.phase.end(end_time=at)  # the write
            self._phase2(txn, at)
        elif kind is EventKind.PHASE2_RETRY:
            txn.phase.add_event(
                "retry", {"twopc.target": event.target, "attempt": event.attempt, "error": event.reason}, timestamp=at
            )
        elif kind is EventKind.ACKNOWLEDGED:
            # One span per branch, from the start of phase 2 to its acknowledgement.
            name = "twopc.commit" if event.outcome is Outcome.COMMITTED else "twopc.abort"
            attributes = {"twopc.branch": event.branch or event.target, "twopc.target": event.target}
            span = self._tracer.start_span(
                name, context=trace.set_span_in_context(txn.phase), start_time=txn.phase_at, attributes=attributes
            )
            span.end(end_time=at)
        elif kind is EventKind.ENDED:
            self._end(event.txn_id, txn, at)

    def _start(self, event: Event, at: int) -> None:
        name = "twopc.transaction" if event.kind is EventKind.PHASE1_STARTED else "twopc.recovery"
        root = self._tracer.start_span(
            name, kind=SpanKind.INTERNAL, start_time=at, attributes={"twopc.txn_id": event.txn_id}
        )
        root.set_attribute("twopc.branches", list(event.branches))
        if len(self._txns) >= MAX_OPEN:  # one that never reported END: end its spans now
            oldest = next(iter(self._txns))
            self._end(oldest, self._txns[oldest], at)
        parent = trace.set_span_in_context(root)
        first = "twopc.phase1" if event.kind is EventKind.PHASE1_STARTED else "twopc.phase2"  # recovery: decided
        txn = self._txns[event.txn_id] = _Txn(root, self._tracer.start_span(first, context=parent, start_time=at), at)
        if event.kind is EventKind.PHASE1_STARTED:
            for label in event.branches:
                txn.prepares[label] = self._tracer.start_span(
                    "twopc.prepare",
                    context=trace.set_span_in_context(txn.phase),
                    start_time=at,
                    attributes={"twopc.branch": label},
                )

    def _decided(self, txn: _Txn, event: Event, at: int) -> None:
        for span in txn.prepares.values():  # cancelled: another branch decided first
            span.set_attribute("twopc.vote", "none")
            span.end(end_time=at)
        txn.prepares.clear()
        txn.phase.end(end_time=at)
        assert event.outcome is not None
        txn.outcome = event.outcome
        txn.root.set_attribute("twopc.outcome", event.outcome.value)
        if event.reason:
            txn.root.set_attribute("twopc.reason", event.reason)
        if event.outcome is Outcome.COMMITTED and not event.one_phase:
            # Until the forced write returns nothing is sent; DECISION_LOGGED ends it.
            parent = trace.set_span_in_context(txn.root)
            txn.phase = self._tracer.start_span("twopc.decision_write", context=parent, start_time=at)
            txn.phase_at = at
        else:
            self._phase2(txn, at)

    def _phase2(self, txn: _Txn, at: int) -> None:
        txn.phase = self._tracer.start_span("twopc.phase2", context=trace.set_span_in_context(txn.root), start_time=at)
        txn.phase_at = at

    def _end(self, txn_id: str, txn: _Txn, at: int) -> None:
        txn.phase.end(end_time=at)
        txn.root.end(end_time=at)
        del self._txns[txn_id]

    # --- context propagation -------------------------------------------------------

    def context_of(self, txn_id: str) -> otel_context.Context | None:
        """The context to send with an RPC of `txn_id`: its current phase's span."""
        txn = self._txns.get(txn_id)
        return None if txn is None else trace.set_span_in_context(txn.phase)

    def client_interceptor(self) -> _ClientInterceptor:
        """Give to `Coordinator(interceptors=...)`: adds the trace context to the
        metadata of every Prepare, Commit and Abort."""
        return _Inject(self)

    def server_interceptor(self) -> _ServerInterceptor:
        """Give to a participant's server: continues the coordinator's trace with a
        server span around each Participant RPC."""
        return _Extract(self._tracer)


class _Inject(_ClientInterceptor):
    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        # A batch (CommitMany, PrepareMany) travels in its first transaction's trace.
        txn_id = (
            getattr(request, "txn_id", "")
            or next(iter(getattr(request, "txn_ids", ())), "")
            or next((item.prepare.txn_id for item in getattr(request, "items", ())), "")
        )
        ctx = self._tracing.context_of(txn_id) if txn_id else None
        if ctx is not None:
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=ctx)
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carrier.items())
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class _Extract(_ServerInterceptor):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith("/twopc.v1."):
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        parent = propagate.extract(carrier)
        inner: Any = handler.unary_unary  # a coroutine function on an aio server
        tracer = self._tracer

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            attributes = {"rpc.system": "grpc", "rpc.method": method, "twopc.txn_id": getattr(request, "txn_id", "")}
            with tracer.start_as_current_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
