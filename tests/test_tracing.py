"""OpenTelemetry tracing: one trace per transaction across the coordinator and its
participants, over real gRPC, collected with the SDK's in-memory exporter."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.cluster import Cluster
from services.shop.v1 import shop_pb2
from tests.apps.kv import KV
from tests.conftest import FAST, INSECURE, eventually, listening, op
from twopc import Branch, Coordinator, Participant
from twopc.observe.tracing import Tracing


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, list[str], InMemorySpanExporter]]:
    """A traced coordinator and two kv participants served in this process, each on
    its own gRPC server with the tracing server interceptor."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    async with AsyncExitStack() as stack:
        targets = []
        for name in ("a", "b"):
            p = await stack.enter_async_context(Participant(KV(), tmp_path / f"{name}.db", credentials=INSECURE))
            targets.append(await stack.enter_async_context(listening(p.add_to_server, [tracing.server_interceptor()])))
        coordinator = await stack.enter_async_context(
            Coordinator(
                tmp_path / "decisions.db",
                credentials=INSECURE,
                listen="127.0.0.1:0",
                config=FAST,
                observers=[tracing],
                interceptors=[tracing.client_interceptor()],
            )
        )
        yield coordinator, targets, exporter


def spans_of(exporter: InMemorySpanExporter, txn_id: str) -> list[ReadableSpan]:
    """The spans of the trace whose root is `txn_id`'s transaction span."""
    spans = list(exporter.get_finished_spans())
    roots = [s for s in spans if s.name == "twopc.transaction" and (s.attributes or {}).get("twopc.txn_id") == txn_id]
    assert len(roots) == 1
    assert roots[0].context is not None
    trace_id = roots[0].context.trace_id
    return [s for s in spans if s.context is not None and s.context.trace_id == trace_id]


async def test_a_commit_is_one_trace_across_coordinator_and_participants(
    traced: tuple[Coordinator, list[str], InMemorySpanExporter],
) -> None:
    """Root, phase 1 with a prepare span per branch, the decision write, phase 2 with a
    commit span per branch, and each participant's server spans, all in one trace and
    parented where they happened."""
    coordinator, (a, b), exporter = traced
    result = await coordinator.run([Branch(a, op(key="k", amount=1), name="a"), Branch(b, op(key="k"), name="b")])
    assert result.committed

    def done() -> bool:
        return any(s.name == "twopc.transaction" for s in exporter.get_finished_spans())

    await eventually(done, what="the transaction span ended (END)")
    spans = spans_of(exporter, result.txn_id)
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert {(s.attributes or {}).get("twopc.branch") for s in by_name["twopc.prepare"]} == {"a", "b"}
    assert {(s.attributes or {}).get("twopc.vote") for s in by_name["twopc.prepare"]} == {"commit"}
    assert {(s.attributes or {}).get("twopc.target") for s in by_name["twopc.commit"]} == {a, b}
    assert len(by_name["twopc.decision_write"]) == 1 and len(by_name["twopc.phase2"]) == 1
    root = by_name["twopc.transaction"][0]
    assert (root.attributes or {}).get("twopc.outcome") == "committed"
    phase1, phase2 = by_name["twopc.phase1"][0], by_name["twopc.phase2"][0]
    assert phase1.parent is not None and root.context is not None and phase1.parent.span_id == root.context.span_id
    # The participants' server spans continue the trace under the phase that sent them.
    prepares = by_name["/twopc.v1.Participant/Prepare"]
    assert len(prepares) == 2 and all(s.parent and s.parent.span_id == phase1.context.span_id for s in prepares)
    commits = [s for s in spans if s.name.startswith("/twopc.v1.Participant/Commit")]
    assert len(commits) == 2 and all(s.parent and s.parent.span_id == phase2.context.span_id for s in commits)
    assert all((s.attributes or {}).get("twopc.txn_id") in (result.txn_id, "") for s in prepares + commits)


async def test_an_abort_trace_carries_the_reason(traced: tuple[Coordinator, list[str], InMemorySpanExporter]) -> None:
    """A NO vote: the root says aborted with the reason, the branch span says why."""
    coordinator, (a, b), exporter = traced
    result = await coordinator.run([Branch(a, op(key="k"), name="a"), Branch(b, op(behave="abort"), name="b")])
    assert not result.committed
    await eventually(
        lambda: any(s.name == "twopc.transaction" for s in exporter.get_finished_spans()), what="the root span"
    )
    spans = spans_of(exporter, result.txn_id)
    root = next(s for s in spans if s.name == "twopc.transaction")
    assert (root.attributes or {}).get("twopc.outcome") == "aborted"
    assert "told to abort" in str((root.attributes or {}).get("twopc.reason"))
    no = next(s for s in spans if s.name == "twopc.prepare" and (s.attributes or {}).get("twopc.branch") == "b")
    assert (no.attributes or {}).get("twopc.reason") == "told to abort"
    assert not [s for s in spans if s.name == "twopc.decision_write"]


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def test_a_purchase_is_one_trace_across_the_three_service_processes(tmp_path: Path) -> None:
    """With --trace-file, the shop's transaction span and the wallet's and the order
    service's server spans for Prepare and Commit share one trace id: the context
    crossed real process boundaries in gRPC metadata."""
    async with Cluster(tmp_path, traces=True) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 10, 1_500)
        result = await c.purchase("o1", "alice", {"widget": 1})
        assert result.outcome == shop_pb2.OUTCOME_COMMITTED

        def root() -> dict[str, Any] | None:
            return next(
                (
                    s
                    for s in read_spans(c.trace_path["shop"])
                    if s["name"] == "twopc.transaction" and s["attributes"].get("twopc.txn_id") == result.txn_id
                ),
                None,
            )

        def server_spans(name: str) -> set[str]:
            return {s["name"] for s in read_spans(c.trace_path[name]) if s["context"]["trace_id"] == trace_id}

        await eventually(lambda: root() is not None, what="the shop's transaction span")
        found = root()
        assert found is not None
        trace_id = found["context"]["trace_id"]
        commits = {"/twopc.v1.Participant/Commit", "/twopc.v1.Participant/CommitMany"}

        def prepared_and_committed(name: str) -> bool:
            spans = server_spans(name)
            return "/twopc.v1.Participant/Prepare" in spans and bool(spans & commits)

        for name in ("wallet", "orders"):
            await eventually(
                functools.partial(prepared_and_committed, name), what=f"{name}'s Prepare and Commit spans in the trace"
            )
