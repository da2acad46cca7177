"""Every kind of participant through the one base: the same admission, the same
per-item batching, the same cap, the same in-doubt query, on each store.

The kinds run in this process (the reservation helper on SQLite and PostgreSQL, the
PREPARE TRANSACTION adapter on PostgreSQL), served by a real gRPC server on port 0;
a private PostgreSQL server holds their data, and tests hold its rows from another
connection as a concurrent transaction would. Issues 18, 19 (findings 4, 6, 7, 8, 9)
and 20 (finding 5).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cluster import Cluster, Settings
from services.shop.v1 import shop_pb2
from tests.apps.kv import KV
from tests.conftest import INSECURE, Served, prepare_request, serve
from tests.test_cli import twopc
from twopc import Credentials, Participant, ParticipantConfig, Vote, VoteAbort, rpc
from twopc.dev.pgserver import PostgresServer, schema
from twopc.dev.testing import ServiceProcess
from twopc.participant import ParticipantBase
from twopc.participant.prepared import PreparedParticipant
from twopc.security import pki
from twopc.stores import Connection, SqliteStore, execute
from twopc.stores.postgres import PostgresStore
from twopc.v1 import participant_pb2, participant_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BY_HAND = ParticipantConfig(allow_no_coordinator=True)  # tests drive Prepare by hand
NOBODY = "127.0.0.1:1"  # a coordinator address nobody listens on: unreachable at once
LOCK_TIMEOUT_S = 0.3
KINDS = ["helper-sqlite", "helper-postgresql", "adapter"]


class Accounts:
    """Debits one account per operation ({"account": "a0", "amount": 1}), with the same
    SQL for both kinds: the helper keeps the debit as a reservation (commit forgets
    it, abort gives it back); the adapter's prepared transaction is the debit.

    {"account": "deadlock"} fails as a deadlock does, every time; {"account": "gate"}
    waits in `prepare` until the test opens `gate` (and says it is there)."""

    operations = (struct_pb2.Struct,)
    schema = """
    CREATE TABLE IF NOT EXISTS accounts (account TEXT PRIMARY KEY, balance BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS debits (
        txn_id TEXT PRIMARY KEY, account TEXT NOT NULL, amount BIGINT NOT NULL CHECK (amount > 0)
    );
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def prepare(self, db: Connection, txn_id: str, operation: Any) -> Vote:
        account, amount = operation["account"], int(operation["amount"])
        if account == "deadlock":
            execute(db, "DO $$ BEGIN RAISE EXCEPTION 'planted' USING ERRCODE = '40P01'; END $$")
        if account == "gate":
            self.entered.set()
            self.gate.wait(10)
        done = execute(
            db,
            "UPDATE accounts SET balance = balance - :amount WHERE account = :account AND balance >= :amount",
            {"account": account, "amount": amount},
        )
        if done.rowcount != 1:
            raise VoteAbort(f"insufficient funds in {account}")
        execute(
            db,
            "INSERT INTO debits VALUES (:txn_id, :account, :amount)",
            {"txn_id": txn_id, "account": account, "amount": amount},
        )
        return Vote.COMMIT

    def commit(self, db: Connection, txn_id: str) -> None:
        execute(db, "DELETE FROM debits WHERE txn_id = :txn_id", {"txn_id": txn_id})

    def abort(self, db: Connection, txn_id: str) -> None:
        execute(
            db,
            "UPDATE accounts SET balance = balance + (SELECT amount FROM debits WHERE txn_id = :txn_id)"
            " WHERE account = (SELECT account FROM debits WHERE txn_id = :txn_id)",
            {"txn_id": txn_id},
        )
        execute(db, "DELETE FROM debits WHERE txn_id = :txn_id", {"txn_id": txn_id})


ACCOUNTS = ["held", "gate", "deadlock", *(f"a{i}" for i in range(8))]


def kind_of(kind: str, where: str, handler: Accounts, **options: Any) -> ParticipantBase:
    """A participant of `kind` over `where` (a SQLite path or a PostgreSQL URL)."""
    options.setdefault("config", BY_HAND)
    options.setdefault("credentials", INSECURE)
    if kind == "adapter":
        return PreparedParticipant(handler, where, lock_timeout_s=LOCK_TIMEOUT_S, **options)
    if kind == "helper-postgresql":
        return Participant(handler, PostgresStore(where, lock_timeout_s=LOCK_TIMEOUT_S), **options)
    return Participant(handler, where, **options)


def seed(where: str) -> None:
    """The accounts, 100 each, and a debit row already there (for a unique violation)."""
    rows = [("INSERT INTO accounts VALUES (:account, 100)", {"account": a}) for a in ACCOUNTS]
    rows.append(("INSERT INTO debits VALUES ('t-used', 'a0', 1)", {}))
    if where.startswith("postgresql://"):
        with psycopg.connect(where, autocommit=True) as conn:
            conn.execute(Accounts.schema.encode())
            for sql, params in rows:
                conn.execute(sql.replace(":account", "%(account)s").encode(), params)
        return
    with contextlib.closing(sqlite3.connect(where)) as lite, lite:
        lite.executescript(Accounts.schema)
        for sql, params in rows:
            lite.execute(sql, params)


@contextlib.contextmanager
def where_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if kind == "helper-sqlite":
        yield str(tmp_path / "accounts.db")
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    with schema(server.url) as url:
        yield url


class Local(Served):
    def balances(self) -> dict[str, int]:
        return {a: int(b) for a, b in self.rows("SELECT account, balance FROM accounts")}


@contextlib.asynccontextmanager
async def running(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, handler: Accounts | None = None, **options: Any
) -> AsyncIterator[Local]:
    """A participant of `kind` over a fresh seeded store, served in this process."""
    with where_for(kind, tmp_path, request) as where:
        seed(where)
        async with serve(kind_of(kind, where, handler or Accounts(), **options), where, Local) as served:
            yield served


def debit(txn_id: str, account: str, amount: int = 1, coordinator: str = "") -> participant_pb2.PrepareRequest:
    fields = struct_pb2.Struct()
    fields.update({"account": account, "amount": amount})
    operation = any_pb2.Any()
    operation.Pack(fields)
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=operation, coordinator=coordinator)


def many(*requests: participant_pb2.PrepareRequest) -> participant_pb2.PrepareManyRequest:
    ten = duration_pb2.Duration(seconds=10)
    return participant_pb2.PrepareManyRequest(
        items=[participant_pb2.PrepareManyRequest.Item(prepare=r, timeout=ten) for r in requests]
    )


def votes(reply: participant_pb2.PrepareManyResponse) -> list[tuple[str, str]]:
    """Each item's (vote, reason), or (status code name, message)."""
    out = []
    for r in reply.results:
        if r.code:
            out.append((grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code)).name, r.message))
        else:
            out.append((participant_pb2.Vote.Name(r.response.vote).removeprefix("VOTE_"), r.response.reason))
    return out


@contextlib.contextmanager
def row_held(url: str, account: str) -> Iterator[None]:
    """Another transaction holds `account`'s row (SELECT ... FOR UPDATE) until the block ends."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM accounts WHERE account = %s FOR UPDATE", (account,))
        try:
            yield
        finally:
            conn.rollback()


# --- the extension point --------------------------------------------------------------


def test_the_adapter_uses_only_public_names_and_hooks() -> None:
    """prepared.py imports no private name of another module and overrides no private
    method of the base (issue 18): a kind is built from the documented hooks alone."""
    tree = ast.parse((ROOT / "src/twopc/participant/prepared.py").read_text())
    private_imports = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private_imports == []
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PreparedParticipant"]
    overridden = {f.name for f in cls.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
    inherited_private = {name for name in dir(ParticipantBase) if name.startswith("_") and not name.startswith("__")}
    assert overridden & inherited_private == set()
    assert {"recorded", "prepare_item", "commit_txn", "abort_txn"} <= overridden


# --- per-item failures (issue 19, finding 4) -------------------------------------------


@pytest.mark.parametrize("kind", ["helper-postgresql", "adapter"])
async def test_one_item_s_database_error_votes_abort_for_that_item_alone(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """In one PrepareMany, an item waiting on a row another transaction holds votes
    ABORT "conflict: lock wait timed out", items breaking a CHECK or a unique
    constraint of the business tables vote ABORT with theirs, and the 8 items behind
    them on rows nobody holds all vote COMMIT and stay prepared."""
    async with running(kind, tmp_path, request) as local:
        with row_held(local.url, "held"):
            reply = await local.stub.PrepareMany(
                many(
                    debit("t-held", "held"),
                    debit("t-check", "a0", amount=-5),
                    debit("t-used", "a1"),
                    *(debit(f"t{i}", f"a{i}") for i in range(8)),
                ),
                timeout=30,
            )
        got = votes(reply)
        assert got[0] == ("ABORT", "conflict: lock wait timed out")
        assert got[1][0] == "ABORT" and got[1][1].startswith("conflict: check violation"), got[1]
        assert got[2][0] == "ABORT" and got[2][1].startswith("conflict: unique violation"), got[2]
        assert got[3:] == [("COMMIT", "")] * 8
        assert sorted(t for t, _ in await local.participant.in_doubt()) == [f"t{i}" for i in range(8)]
        await local.stub.CommitMany(participant_pb2.CommitManyRequest(txn_ids=[f"t{i}" for i in range(8)]), timeout=10)
        assert local.balances() == {a: (99 if a.startswith("a") else 100) for a in ACCOUNTS}
        assert await local.participant.in_doubt() == []


@pytest.mark.parametrize("kind", ["helper-postgresql", "adapter"])
async def test_a_batch_given_up_leaves_nothing_prepared(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A batch the store keeps running again (a deadlock every time) is given up: every
    item votes ABORT with the conflict, and what it had prepared before the deadlock
    (the adapter's PREPARE TRANSACTIONs) is rolled back, not left holding locks."""
    async with running(kind, tmp_path, request) as local:
        reply = await local.stub.PrepareMany(
            many(debit("t0", "a0"), debit("t1", "a1"), debit("t-dead", "deadlock")), timeout=60
        )
        got = votes(reply)
        assert [v for v, _ in got] == ["ABORT"] * 3 and all("deadlock" in r for _, r in got), got
        assert await local.participant.in_doubt() == []
        assert local.rows("SELECT count(*) FROM pg_prepared_xacts") == [(0,)]
        assert local.balances() == dict.fromkeys(ACCOUNTS, 100)


async def test_a_prepare_that_meets_an_abort_s_tombstone_votes_abort(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The adapter: an Abort that arrives while the Prepare's business SQL runs leaves
    its tombstone; the Prepare then meets it on twopc_txn's key and votes ABORT
    "transaction already aborted", alone in its batch, with nothing left prepared."""
    handler = Accounts()
    async with running("adapter", tmp_path, request, handler) as local:

        async def prepare() -> participant_pb2.PrepareManyResponse:
            return await local.stub.PrepareMany(
                many(debit("t0", "a0"), debit("t-late", "gate"), debit("t1", "a1")), timeout=30
            )

        batch = asyncio.create_task(prepare())
        assert await asyncio.to_thread(handler.entered.wait, 10)
        await local.stub.Abort(participant_pb2.AbortRequest(txn_id="t-late"), timeout=10)
        handler.gate.set()
        got = votes(await batch)
        assert got == [("COMMIT", ""), ("ABORT", "transaction already aborted"), ("COMMIT", "")]
        assert sorted(t for t, _ in await local.participant.in_doubt()) == ["t0", "t1"]
        assert local.rows("SELECT count(*) FROM twopc_prepared WHERE txn_id = 't-late'") == [(0,)]
        assert local.balances()["gate"] == 100


# --- the cap (issue 19 finding 6; issue 20 finding 5) ----------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_caps_undecided_prepares_per_coordinator(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With cap 2, the third undecided Prepare from one coordinator is RESOURCE_EXHAUSTED
    and holds nothing, on each kind; a repeat is still answered; a decision frees a place."""
    async with running(kind, tmp_path, request, config=ParticipantConfig(max_undecided_per_coordinator=2)) as served:
        stub = served.stub
        for i in range(2):
            assert (await stub.Prepare(debit(f"t{i}", f"a{i}", coordinator=NOBODY), timeout=10)).vote == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(debit("t2", "a2", coordinator=NOBODY), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, kind
        assert (await stub.Prepare(debit("t0", "a0", coordinator=NOBODY), timeout=10)).vote == 1  # a repeat
        assert sorted(t for t, _ in await served.participant.in_doubt()) == ["t0", "t1"]
        assert served.balances()["a2"] == 100
        await stub.Abort(participant_pb2.AbortRequest(txn_id="t0"), timeout=10)
        assert (await stub.Prepare(debit("t2", "a2", coordinator=NOBODY), timeout=10)).vote == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_the_cap_counts_per_caller_identity_not_per_named_address(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Under mutual TLS with cap 5, the identity `shop` naming `shop:2` ... `shop:19` as
    its coordinator holds at most 5 undecided transactions here (issue 20, finding 5)."""
    root = pki.issue(tmp_path / "pki", ["shop", "wallet"])
    config = ParticipantConfig(max_undecided_per_coordinator=5, trusted_coordinators=frozenset())
    with where_for(kind, tmp_path, request) as where:
        seed(where)
        participant = kind_of(kind, where, Accounts(), credentials=Credentials.from_dir(root / "wallet"), config=config)
        async with participant:
            server = rpc.server()
            participant.add_to_server(server)
            port = rpc.add_port(server, "127.0.0.1:0", Credentials.from_dir(root / "wallet"))
            await server.start()
            try:
                async with rpc.channel(f"127.0.0.1:{port}", Credentials.from_dir(root / "shop")) as ch:
                    stub = participant_pb2_grpc.ParticipantStub(ch)
                    codes = []
                    for n in range(2, 20):
                        try:
                            await stub.Prepare(debit(f"t{n}", f"a{n % 8}", coordinator=f"shop:{n}"), timeout=10)
                            codes.append("OK")
                        except grpc.aio.AioRpcError as e:
                            codes.append(e.code().name)
            finally:
                await server.stop(None)
            assert codes == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 13
            assert len(await participant.in_doubt()) == 5


# --- the SQLite idle path (issue 19, finding 7) -----------------------------------------


async def test_a_slow_business_prepare_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """A handler whose prepare takes 2 s, on a SQLite store whose idle path is open to
    it, delays no other coroutine of the process by more than half of that (a bound
    loose enough for a loaded machine): the business step runs on the store's thread,
    not on the event loop."""
    db = tmp_path / "kv.db"
    store = SqliteStore(db, idle_path_max_s=10.0)  # the idle path is always on offer
    async with serve(Participant(KV(), store, credentials=INSECURE, config=BY_HAND), str(db), Served) as local:
        await local.stub.Prepare(_kv("warm-up"), timeout=10)
        lag = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal lag
            while not stop.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - before - 0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert (await local.stub.Prepare(_kv("slow", delay_s=2.0), timeout=10)).vote == participant_pb2.VOTE_COMMIT
        assert time.monotonic() - started >= 2.0
        stop.set()
        await ticking
    assert lag < 1.0, f"the event loop stalled for {lag:.2f} s"


def _kv(txn_id: str, **fields: Any) -> participant_pb2.PrepareRequest:
    return prepare_request(txn_id, **fields)


# --- one in-doubt query for the operator (issue 19, finding 8) ---------------------------


@pytest.mark.parametrize("decision", ["--commit", "--abort"])
@pytest.mark.parametrize("kind", KINDS)
async def test_the_cli_sees_and_settles_every_kind(
    kind: str, decision: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`twopc participant in-doubt` lists what each kind holds prepared (the adapter's
    PostgreSQL prepared transactions too) and `twopc resolve` settles it as that kind
    does: the helper's handler, or COMMIT/ROLLBACK PREPARED with its outcome row."""
    async with running(kind, tmp_path, request) as served:
        await settle_by_hand(kind, served, decision)


async def settle_by_hand(kind: str, served: Local, decision: str) -> None:
    await served.stub.Prepare(debit("t-stuck", "a3", amount=7, coordinator=NOBODY), timeout=10)
    listed = await asyncio.to_thread(twopc, "participant", "in-doubt", served.url, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["txn_id"], row["coordinator"]) == ("t-stuck", NOBODY)
    handler = [] if kind == "adapter" else ["--handler", "tests.test_kinds:Accounts"]
    done = await asyncio.to_thread(twopc, "resolve", "t-stuck", "--db", served.url, decision, "--yes", *handler)
    assert done.returncode == 0, done.stderr
    assert await served.participant.in_doubt() == []
    state = "COMMITTED" if decision == "--commit" else "ABORTED"
    assert served.rows("SELECT state FROM twopc_txn WHERE txn_id = 't-stuck'") == [(state,)]
    assert served.rows("SELECT decision FROM twopc_heuristic WHERE txn_id = 't-stuck'") == [(state,)]
    assert served.balances()["a3"] == (93 if decision == "--commit" else 100)
    if kind != "helper-sqlite":
        assert served.rows("SELECT count(*) FROM pg_prepared_xacts") == [(0,)]
    again = await asyncio.to_thread(twopc, "participant", "in-doubt", served.url)
    assert again.stdout.strip() == "nothing in doubt"


# --- a database down at start (issue 19, finding 9) --------------------------------------


async def test_a_wallet_started_before_its_postgres_waits_not_serving_then_serves(
    tmp_path: Path, pg_killable: PostgresServer
) -> None:
    """The wallet service started while its PostgreSQL is stopped does not exit: it
    serves health NOT_SERVING (and refuses Prepares with UNAVAILABLE) while it tries
    again; once PostgreSQL is up it turns SERVING and a purchase commits."""
    pg_killable.execute('CREATE SCHEMA "wallet"')
    url = pg_killable.url_of("postgres", search_path="wallet")
    pg_killable.stop()
    async with Cluster(tmp_path, Settings(prepare_timeout_s=3.0), stores={"wallet": url}) as cluster:
        assert await health(cluster.wallet.address) == "NOT_SERVING"
        async with rpc.channel(cluster.wallet.address, INSECURE) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await participant_pb2_grpc.ParticipantStub(ch).Prepare(debit("t", "a0"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert cluster.wallet.running
        await asyncio.to_thread(pg_killable.start)
        deadline = time.monotonic() + 30
        while await health(cluster.wallet.address) != "SERVING":
            assert time.monotonic() < deadline, "the wallet never turned SERVING"
            await asyncio.sleep(0.1)
        await cluster.open_account("alice", 1_000)
        await cluster.add_stock("widget", 10, 100)
        reply = await cluster.purchase("o1", "alice", {"widget": 2})
        assert reply.outcome == shop_pb2.OUTCOME_COMMITTED
        assert (await cluster.balance("alice")).balance == 800
    assert "store_unavailable" in (tmp_path / "wallet.log").read_text()


async def health(address: str) -> str:
    async with rpc.channel(address, INSECURE) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_a_wallet_refused_by_its_postgres_for_good_exits(tmp_path: Path, pg_server: PostgresServer) -> None:
    """What a restart does not fix (an unknown role) is not waited for: the service
    exits non-zero at start, saying why."""
    url = f"postgresql://nobody@{pg_server.host}:{pg_server.port}/postgres"
    wallet = ServiceProcess("services.wallet", ["--db", url, "--insecure"], log_path=tmp_path / "w.log")
    with pytest.raises(RuntimeError, match="exited with 1"):
        wallet.start()
    assert "refused the connection" in (tmp_path / "w.log").read_text()
