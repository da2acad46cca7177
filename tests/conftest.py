"""Fixtures: real participant processes on port 0, an in-process coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2

import twopc
from twopc import Branch, Coordinator, CoordinatorConfig, Credentials, rpc
from twopc.dev import pgserver
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess, query, wait_until
from twopc.participant import ParticipantBase
from twopc.v1 import participant_pb2, participant_pb2_grpc

# Every level, so that tests can capture the hot path's debug events (capture_logs).
twopc.configure_logging("console", level="debug")

INSECURE = Credentials.insecure()
FAST = CoordinatorConfig(prepare_timeout_s=3.0, rpc_timeout_s=1.0, retry_initial_s=0.05, retry_max_s=0.3)


def op(**fields: Any) -> struct_pb2.Struct:
    """A kv participant operation (see tests/apps/kv.py)."""
    s = struct_pb2.Struct()
    s.update(fields)
    return s


def prepare_request(txn_id: str, **fields: object) -> participant_pb2.PrepareRequest:
    """A Prepare of a kv operation (key "k", amount 1 unless `fields` say otherwise)."""
    operation = any_pb2.Any()
    operation.Pack(op(**({"key": "k", "amount": 1} | fields)))
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=operation)


def txn_state(db: Path | str, txn_id: str) -> str | None:
    found = query(db, "SELECT state FROM twopc_txn WHERE txn_id = :txn_id", txn_id=txn_id)
    return found[0][0] if found else None


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Polls `check` until it holds, failing after `timeout_s`."""
    if not await wait_until(check, timeout_s):
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Kv:
    """A kv participant process and its store (a SQLite file or a PostgreSQL URL)."""

    def __init__(self, proc: ServiceProcess, db: Path | str, name: str) -> None:
        self.proc, self.db, self.name = proc, db, name

    @property
    def target(self) -> str:
        return self.proc.address

    def branch(self, **fields: Any) -> Branch:
        return Branch(self.target, op(**({"key": "k", "amount": 1} | fields)), name=self.name)

    def reserved(self) -> list[tuple[Any, ...]]:
        return query(self.db, "SELECT txn_id, key, amount FROM reserved")

    def applied(self) -> list[tuple[Any, ...]]:
        return query(self.db, "SELECT txn_id, key, amount FROM applied")

    def state(self, txn_id: str) -> str | None:
        return txn_state(self.db, txn_id)


@pytest.fixture
def start_kv(tmp_path: Path) -> Iterator[Callable[..., Kv]]:
    """Starts kv participant processes; all are stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def start(
        name: str = "kv", env: dict[str, str] | None = None, args: Sequence[str] = (), db: str | None = None
    ) -> Kv:
        """`db`: a PostgreSQL URL to use instead of a fresh SQLite file."""
        unique = f"{name}-{len(started)}"
        store = db or tmp_path / f"{unique}.db"
        argv = ["--db", str(store), *args]
        proc = ServiceProcess("tests.apps.kv", argv, log_path=tmp_path / f"{unique}.log", env=env).start()
        started.append(proc)
        return Kv(proc, store, unique)

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def start_coordinator_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Starts `twopc coordinator` processes, each from a TOML file written from the
    participants (name -> address; the name is also its identity) and `settings`;
    all are stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def start(participants: Mapping[str, str], **settings: object) -> ServiceProcess:
        unique = f"coordinator-{len(started)}"
        values = {"listen": "127.0.0.1:0", "log": f"{unique}.db", **settings}
        lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON scalars are TOML
        for name, address in participants.items():
            lines += [f"[participants.{name}]", f"address = {json.dumps(address)}", f"identity = {json.dumps(name)}"]
        config = tmp_path / f"{unique}.toml"
        config.write_text("\n".join(lines) + "\n")
        proc = ServiceProcess(
            "twopc coordinator",
            ["--config", str(config)],
            log_path=tmp_path / f"{unique}.log",
            command=[sys.executable, "-m", "twopc.ops.cli", "coordinator"],
        )
        started.append(proc)
        return proc.start()

    yield start
    for p in started:
        p.stop()


@dataclass
class Served:
    """A participant served in this process on port 0, a stub to call it, and the URL
    (or path) of its store, to read it as an auditor would."""

    participant: ParticipantBase
    stub: participant_pb2_grpc.ParticipantAsyncStub
    url: str

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return query(self.url, sql, **params)


S = TypeVar("S", bound=Served)


@contextlib.asynccontextmanager
async def listening(add: Callable[[grpc.aio.Server], object], interceptors: Sequence[Any] = ()) -> AsyncIterator[str]:
    """A gRPC server in this process on a free loopback port, its services registered by
    `add` (a servicer's `add_to_server`, say); yields its address, stops it afterwards."""
    server = rpc.server(interceptors)
    add(server)
    port = rpc.add_port(server, "127.0.0.1:0", INSECURE)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def serve(participant: ParticipantBase, url: str, kind: type[S]) -> AsyncIterator[S]:
    """Opens `participant`, serves it on a gRPC server on port 0, and yields `kind`."""
    async with (
        participant,
        listening(participant.add_to_server) as address,
        grpc.aio.insecure_channel(address) as ch,
    ):
        yield kind(participant, participant_pb2_grpc.ParticipantStub(ch), url)


def _private_postgres() -> Iterator[PostgresServer]:
    reason = pgserver.missing()
    if reason:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole run (max_prepared_transactions set),
    for tests that do not kill it; they each get a schema of their own."""
    yield from _private_postgres()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A URL to a fresh schema on the shared private server, dropped afterwards."""
    with pgserver.schema(pg_server.url) as url:
        yield url


@pytest.fixture
def pg_killable() -> Iterator[PostgresServer]:
    """A private PostgreSQL server of this test's own, which it may SIGKILL."""
    yield from _private_postgres()


@pytest.fixture(params=["sqlite", "postgresql"])
def kv_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], str | None]]:
    """Where kv participants keep their data, as `start_kv(db=...)`: a fresh SQLite file
    (None), or a fresh schema on the private PostgreSQL server, one per call."""
    if request.param == "sqlite":
        yield lambda: None
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    with contextlib.ExitStack() as schemas:
        yield lambda: schemas.enter_context(pgserver.schema(server.url))


async def prepare_after_its_deadline(store: Any, stub: participant_pb2_grpc.ParticipantAsyncStub) -> None:
    """Holds a store with one worker busy while a Prepare with a 0.2 s deadline waits
    for it: the caller sees DEADLINE_EXCEEDED; returns once the store ran that Prepare."""
    release = threading.Event()
    # The service's own business API shares the store: one slow write holds its worker.
    slow = asyncio.create_task(store.write(lambda db: release.wait(10)))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(prepare_request("t-late"), timeout=0.2)
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
        await slow
    await store.read(lambda db: None)  # one worker, in order: the late Prepare has run


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with Coordinator(tmp_path / "decisions.db", credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
        yield c


# --- CI: a test that needs PostgreSQL, namespaces, node or a browser must not skip ---
# Such tests skip with a reason that starts with "needs " where the machine lacks the
# thing; CI sets TWOPC_REQUIRE_ALL=1 on a machine that has everything, and then any
# such skip fails the run.
_NEEDS_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if reason.startswith("needs "):
            _NEEDS_SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _NEEDS_SKIPPED and os.environ.get("TWOPC_REQUIRE_ALL") == "1":
        print("\nTWOPC_REQUIRE_ALL=1 and these tests skipped for want of something:", *_NEEDS_SKIPPED, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
