"""Whose GetOutcome answer counts (rule 12 of docs/design.md), at the participant and
at a coordinator on a file log.

A participant keeps the owner's log identity (`PrepareRequest.coordinator_log`) with
its prepared row and takes COMMITTED or ABORTED only from an answer read from that
log, on each kind of participant: the reservation helper (SQLite) and the PREPARE
TRANSACTION adapter (PostgreSQL). The coordinators asked are GetOutcome servers in
this process that answer what the test tells them, from the log it names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from structlog.testing import capture_logs

from tests.apps.debits import Debits, seed
from tests.apps.kv import KV
from tests.conftest import INSECURE, Served, eventually, listening, prepare_request, serve
from twopc import Coordinator, Participant, ParticipantConfig
from twopc.participant.prepared import PreparedParticipant
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2

QUICK = ParticipantConfig(in_doubt_after_s=0.1, resolve_interval_s=0.1)


class Answering(coordinator_pb2_grpc.CoordinatorServicer):
    """A GetOutcome that gives one answer, read from the log it names, and counts asks."""

    def __init__(self, outcome: coordinator_pb2.Outcome.ValueType, log_id: str) -> None:
        self.outcome, self.log_id, self.asked = outcome, log_id, 0

    async def GetOutcome(  # noqa: N802 - the RPC's name
        self, request: coordinator_pb2.GetOutcomeRequest, context: Any
    ) -> coordinator_pb2.GetOutcomeResponse:
        self.asked += 1
        return coordinator_pb2.GetOutcomeResponse(outcome=self.outcome, log_id=self.log_id)


@pytest.fixture
async def two_logs() -> AsyncIterator[tuple[tuple[str, Answering], tuple[str, Answering]]]:
    """A foreign instance that answers ABORTED from log "other", and the owner's
    instance that answers COMMITTED from log "owner"."""
    foreign, owner = (
        Answering(coordinator_pb2.OUTCOME_ABORTED, "other"),
        Answering(coordinator_pb2.OUTCOME_COMMITTED, "owner"),
    )

    def adder(servicer: Answering) -> Callable[[Any], None]:
        return lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)

    async with listening(adder(foreign)) as at_foreign, listening(adder(owner)) as at_owner:
        yield (at_foreign, foreign), (at_owner, owner)


async def ask_full(address: str, txn_id: str) -> coordinator_pb2.GetOutcomeResponse:
    """GetOutcome as a participant asks it, the whole answer."""
    async with grpc.aio.insecure_channel(address) as ch:
        return await coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(
            coordinator_pb2.GetOutcomeRequest(txn_id=txn_id), timeout=5
        )


class Kind(Served):
    """Either kind, read alike: the state of a txn id in `twopc_txn`."""

    def state(self, txn_id: str) -> str | None:
        rows = self.rows("SELECT state FROM twopc_txn WHERE txn_id = :t", t=txn_id)
        return str(rows[0][0]) if rows else None


def _helper_prepare(txn_id: str) -> participant_pb2.PrepareRequest:
    return prepare_request(txn_id)


def _adapter_prepare(txn_id: str) -> participant_pb2.PrepareRequest:
    operation = any_pb2.Any()
    operation.Pack(wrappers_pb2.Int64Value(value=10))
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=operation)


@pytest.fixture(params=["helper", "adapter"])
async def kind(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Kind, Callable[[str], participant_pb2.PrepareRequest]]]:
    """A participant of each kind, served in this process, resolving quickly."""
    if request.param == "helper":
        path = str(tmp_path / "kv.db")
        async with serve(Participant(KV(), path, credentials=INSECURE, config=QUICK), path, Kind) as served:
            yield served, _helper_prepare
        return
    url: str = request.getfixturevalue("pg_url")
    seed(url)
    adapter = PreparedParticipant(Debits(), url, credentials=INSECURE, config=QUICK)
    async with serve(adapter, url, Kind) as served:
        yield served, _adapter_prepare


async def test_a_decided_answer_counts_only_from_the_owners_log(
    kind: tuple[Kind, Callable[[str], participant_pb2.PrepareRequest]],
    two_logs: tuple[tuple[str, Answering], tuple[str, Answering]],
) -> None:
    """A participant in doubt asks an instance on another log first: its ABORTED is
    not believed (logged as in_doubt_foreign_log); the owner's log's COMMITTED is,
    and the transaction commits."""
    participant, prepare = kind
    (at_foreign, foreign), (at_owner, owner) = two_logs
    request = prepare("0123456789abcdef:t1")
    request.coordinator, request.coordinator_log = at_foreign, "owner"
    request.coordinators.append(at_owner)
    with capture_logs() as events:
        assert (await participant.stub.Prepare(request, timeout=5)).vote == participant_pb2.VOTE_COMMIT
        await eventually(lambda: participant.state(request.txn_id) == "COMMITTED", what="the owner's answer")
    assert foreign.asked >= 1 and owner.asked >= 1
    assert any(e["event"] == "in_doubt_foreign_log" for e in events)


async def test_without_the_owners_log_every_named_instance_is_believed(
    kind: tuple[Kind, Callable[[str], participant_pb2.PrepareRequest]],
    two_logs: tuple[tuple[str, Answering], tuple[str, Answering]],
) -> None:
    """A Prepare from a coordinator that predates `coordinator_log` keeps today's
    behaviour: the first decided answer is applied, whichever log it names."""
    participant, prepare = kind
    (at_foreign, _), _ = two_logs
    request = prepare("0123456789abcdef:t2")
    request.coordinator = at_foreign
    assert (await participant.stub.Prepare(request, timeout=5)).vote == participant_pb2.VOTE_COMMIT
    await eventually(lambda: participant.state(request.txn_id) == "ABORTED", what="the only answer")


async def test_a_file_log_answers_only_for_its_own_ids(tmp_path: Path) -> None:
    """A coordinator on a SQLite log answers ABORTED for its own unlogged ids, but
    PENDING for another coordinator's id (it cannot know it), and names its log in
    every answer."""
    async with Coordinator(tmp_path / "d.db", credentials=INSECURE, listen="127.0.0.1:0") as c:
        own = await ask_full(c.address, c.global_id("never-run"))
        other = await ask_full(c.address, "0123456789abcdef:someone-elses")
    assert (own.outcome, own.log_id) == (coordinator_pb2.OUTCOME_ABORTED, c.id)
    assert (other.outcome, other.log_id) == (coordinator_pb2.OUTCOME_PENDING, c.id)


async def test_a_malformed_owner_log_is_refused_and_changes_nothing(
    kind: tuple[Kind, Callable[[str], participant_pb2.PrepareRequest]],
) -> None:
    """A Prepare whose coordinator_log is too long or has characters outside an id's
    is INVALID_ARGUMENT, and nothing is prepared."""
    participant, prepare = kind
    for bad in ("x" * 129, "log with spaces"):
        request = prepare("0123456789abcdef:bad")
        request.coordinator_log = bad
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await participant.stub.Prepare(request, timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "coordinator_log" in (err.value.details() or "")
    assert participant.state("0123456789abcdef:bad") is None
