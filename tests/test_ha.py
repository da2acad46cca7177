"""Several coordinator instances on one PostgreSQL decision log: leases, fencing,
takeover, outcomes (rules 1-6 of tests/model/ha_model.py), on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from services.cluster import Cluster, Settings
from tests.conftest import FAST, INSECURE, Kv, eventually, op, txn_state
from tests.test_crash import txn_of
from tests.test_trust import FakeCoordinator, debit, seeded, status
from twopc import Branch, ClosedError, Coordinator, DuplicateTransactionError, ForeignPeerError, Outcome, rpc
from twopc.dev.netns import Network
from twopc.dev.testing import ServiceProcess, TcpProxy, free_port
from twopc.errors import FencedError, LogUnavailableError, NotLoggedError
from twopc.observe import EventKind, Recorder
from twopc.v1 import coordinator_pb2_grpc, participant_pb2

psycopg = pytest.importorskip("psycopg", reason="needs psycopg (pip install 'twopc[postgres]')")

from services import failover  # noqa: E402 - after the skip
from twopc.decisions.postgres import PostgresDecisionLog  # noqa: E402

SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable() -> bool:
    try:
        psycopg.connect(SERVER, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _reachable(), reason="needs PostgreSQL on 127.0.0.1:5432 (database test)")


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped at the end."""
    name = f"ha_{secrets.token_hex(6)}"
    yield name
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def sql(statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Runs one statement on the test server in its own transaction; its rows."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def expire(schema: str, instance: str) -> None:
    """Ages an instance's lease past its expiry, as if it stopped renewing long ago."""
    sql(f"UPDATE {schema}.instances SET expires_at = now() - interval '1 hour' WHERE id = %s", instance)


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[PostgresDecisionLog]:
    """A log opened without its background work: the test drives leases itself."""
    log = PostgresDecisionLog(url, **options)
    await log.open()
    try:
        yield log
    finally:
        await log.close()


async def test_fenced_instance_cannot_log_commit(schema: str) -> None:
    """Once another instance bumped an instance's epoch, the database refuses its
    COMMIT: FencedError, and no record is written."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        assert await a.log_commit(f"{a.id}:before", ["t1"])
        expire(schema, a.id)
        assert await b.take_over() == [a.id]
        with pytest.raises(FencedError):
            await a.log_commit(f"{a.id}:after", ["t1"])
        with pytest.raises(FencedError):
            a.check_writable()
        assert sql(f"SELECT txn_id FROM {schema}.decisions") == [(f"{a.id}:before",)]
        assert sql(f"SELECT instance, taken_by, commits FROM {schema}.ownership") == [(a.id, b.id, 1)]


async def test_concurrent_commits_are_written_as_one_batch_under_one_fence_check(schema: str) -> None:
    """COMMIT records written at once share one database transaction (one INSERT: one
    logged_at, one sync), and so do their ENDs; each lands once and a repeat answers
    False; a batch of an instance fenced meanwhile writes none of its records."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        ids = [f"{a.id}:t{i}" for i in range(20)]
        assert await asyncio.gather(*(a.log_commit(t, ["t1"]) for t in ids)) == [True] * 20
        assert a.syncs == 1
        assert sql(f"SELECT count(*), count(DISTINCT logged_at) FROM {schema}.decisions") == [(20, 1)]
        await asyncio.gather(*(a.log_end(t) for t in ids))  # ENDs too: one UPDATE
        assert sql(f"SELECT count(*), count(DISTINCT ended_at) FROM {schema}.decisions") == [(20, 1)]
        again = await asyncio.gather(a.log_commit(ids[0], ["t1"]), a.log_commit(f"{a.id}:new", ["t1"]))
        assert list(again) == [False, True]
        expire(schema, a.id)
        await b.take_over()
        late = await asyncio.gather(
            *(a.log_commit(f"{a.id}:late{i}", ["t1"]) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(e, FencedError) for e in late), late
        assert sql(f"SELECT count(*) FROM {schema}.decisions WHERE txn_id LIKE %s", f"{a.id}:late%") == [(0,)]


async def test_outcome_is_pending_until_the_owner_is_taken_over(schema: str) -> None:
    """GetOutcome's rule 4: COMMITTED if logged; from another instance PENDING while
    the owner's row is not taken over, even past its expiry, and ABORTED once taken
    over; from the owner, ABORTED for its own unlogged ids; PENDING for an owner the
    log never knew (another log's id: rule 12)."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        await a.log_commit(f"{a.id}:logged", ["t1"])
        assert await b.outcome(f"{a.id}:logged") is Outcome.COMMITTED
        assert await b.outcome(f"{a.id}:running") is Outcome.PENDING
        assert await a.outcome(f"{a.id}:running") is Outcome.ABORTED  # the owner: its only writer
        expire(schema, a.id)
        assert await b.outcome(f"{a.id}:running") is Outcome.PENDING  # expired, not fenced: it may still write
        await b.take_over()
        assert await b.outcome(f"{a.id}:running") is Outcome.ABORTED
        assert await b.outcome(f"{a.id}:logged") is Outcome.COMMITTED
        assert await b.outcome("0123456789abcdef:never") is Outcome.PENDING


async def test_purge_keeps_what_an_answer_needs(schema: str) -> None:
    """Purging drops ended records past retention, keeps open records and every
    instance row (a taken-over one is the tombstone that keeps its ids ABORTED)."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60, retention_s=0.0) as a, opened(url, lease_s=60, retention_s=0.0) as b:
        await a.log_commit(f"{a.id}:ended", ["t1"])
        await a.log_end(f"{a.id}:ended")
        await a.log_commit(f"{a.id}:open", ["t1"])
        expire(schema, a.id)
        await b.take_over()
        await b.purge()
        assert decisions(schema) == {f"{a.id}:open": ("commit", False)}  # b delivers it now
        assert sorted(i for (i,) in sql(f"SELECT id FROM {schema}.instances")) == sorted([a.id, b.id])
        assert await b.outcome(f"{a.id}:open") is Outcome.COMMITTED
        assert await b.outcome(f"{a.id}:other") is Outcome.ABORTED
        assert await b.outcome("0123456789abcdef:other") is Outcome.PENDING  # never known: not purged


async def test_takeover_waits_for_a_commit_being_written(schema: str) -> None:
    """A takeover that meets a COMMIT write in progress (the writer's lease row held
    FOR SHARE) waits for it, then adopts the record: no COMMIT lands unseen."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=60) as a, opened(url, lease_s=60) as b:
        expire(schema, a.id)
        adopted: list[str] = []
        b.watch(adopt=lambda records: adopted.extend(r.txn_id for r in records), fail=lambda e: None)
        # a's own COMMIT transaction, held open between its fence check and its commit.
        async with await psycopg.AsyncConnection.connect(SERVER) as writer:
            await writer.execute(f"SELECT epoch FROM {schema}.instances WHERE id = %s FOR SHARE", (a.id,))
            await writer.execute(
                f"INSERT INTO {schema}.decisions (txn_id, owner, driver, decision, targets)"
                " VALUES (%s, %s, %s, 'commit', '[\"t1\"]')",
                (f"{a.id}:racing", a.id, a.id),
            )
            takeover = asyncio.create_task(b.take_over())
            done, _ = await asyncio.wait({takeover}, timeout=0.5)
            assert not done, "the epoch bump must wait for the COMMIT's transaction"
            await writer.commit()
        assert await takeover == [a.id]
        assert adopted == [f"{a.id}:racing"]


async def test_commit_write_lost_in_a_partition_is_read_back(schema: str) -> None:
    """A COMMIT write whose answer is cut off (rule 5) is read back once the database
    is reachable, and the log and the answer agree: logged and True, or an abort
    marker and NotLoggedError (the late write can no longer land)."""
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
    try:
        async with opened(url, lease_s=60, op_timeout_s=0.5, decision_wait_s=30) as a:
            proxy.cut()
            write = asyncio.create_task(a.log_commit(f"{a.id}:cut", ["t1"]))
            with capture_logs() as logs:
                await eventually(
                    lambda: any(e["event"] == "decision_write_unseen" for e in logs), what="the write times out"
                )
            assert not write.done(), "nothing is decided while the database cannot be read"
            proxy.heal()
            try:
                logged = await write
            except NotLoggedError:
                logged = False
            proxy.reset()  # every connection of the cut is gone: nothing more can land
            rows = sql(f"SELECT decision FROM {schema}.decisions WHERE txn_id = %s", f"{a.id}:cut")
            assert rows == [("commit",)] if logged else rows == [("abort",)]
    finally:
        await proxy.close()


async def test_end_waits_for_the_database_then_lands(schema: str) -> None:
    """A COMMIT logged before the database was cut off: its END (phase 2 done) waits
    while the database is out of reach and is written once it is back."""
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
    try:
        async with opened(url, lease_s=60, op_timeout_s=0.5) as a:
            assert await a.log_commit(f"{a.id}:t", ["t1"])
            proxy.cut()
            end = asyncio.create_task(a.log_end(f"{a.id}:t"))
            done, _ = await asyncio.wait({end}, timeout=1.5)
            assert not done, "END cannot be written while the database is cut off"
            assert sql(f"SELECT ended_at IS NULL FROM {schema}.decisions") == [(True,)]
            proxy.heal()
            await asyncio.wait_for(end, timeout=20)
            assert sql(f"SELECT ended_at IS NULL FROM {schema}.decisions") == [(False,)]
    finally:
        await proxy.close()


async def test_unreachable_log_refuses_new_transactions_then_recovers(schema: str, start_kv: Callable[..., Kv]) -> None:
    """With the database cut off past the lease, run() refuses before sending
    anything (LogUnavailableError); once it is back, transactions commit again."""
    kv1, kv2 = start_kv("a"), start_kv("b")
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    log = PostgresDecisionLog(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}", lease_s=1)

    def writable() -> bool:
        try:
            log.check_writable()
        except LogUnavailableError:
            return False
        return True

    try:
        async with Coordinator(log, credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as c:
            assert (await c.run([kv1.branch(), kv2.branch()])).outcome is Outcome.COMMITTED
            proxy.cut()
            await eventually(lambda: not writable(), what="the lease lapses unrenewed")
            sent = c.messages_sent
            with pytest.raises(LogUnavailableError, match="lease"):
                await c.run([kv1.branch(), kv2.branch()])
            assert c.messages_sent == sent, "a refused run sends nothing"
            proxy.heal()
            await eventually(writable, what="the lease is renewed")
            assert (await c.run([kv1.branch(), kv2.branch()])).outcome is Outcome.COMMITTED
    finally:
        await proxy.close()


@pytest.fixture
def instance_proc(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Coordinator instances in processes of their own (tests/apps/coordinator.py)."""
    procs: list[ServiceProcess] = []

    def start(url: str, *run: str, args: Sequence[str] = (), crash_at: str = "") -> ServiceProcess:
        proc = ServiceProcess(
            "tests.apps.coordinator",
            ["--db", url, *args, *(["--run", *run] if run else [])],
            log_path=tmp_path / f"instance-{len(procs)}.log",
        )
        procs.append(proc)
        return proc.start(env={"TWOPC_CRASH_AT": crash_at} if crash_at else None)

    yield start
    for p in procs:
        p.stop()


def decisions(schema: str) -> dict[str, tuple[str, bool]]:
    """Every record of the shared log: txn id -> (decision, ended)."""
    rows = sql(f"SELECT txn_id, decision, ended_at IS NOT NULL FROM {schema}.decisions")
    return {t: (d, e) for t, d, e in rows}


async def test_takeover_completes_a_killed_instances_commits(
    schema: str, start_kv: Callable[..., Kv], instance_proc: Callable[..., ServiceProcess]
) -> None:
    """An instance SIGKILLed right after logging a COMMIT: once its lease expires,
    another instance takes it over, commits both participants and writes END; the
    ownership change is recorded."""
    patient = ["--in-doubt-after-s", "600"]  # only the takeover can commit them
    a, b = start_kv("a", args=patient), start_kv("b", args=patient)
    url = f"{SERVER}?schema={schema}&lease_s=1"
    dead = instance_proc(url, f"k0={a.target}", f"k1={b.target}", crash_at="coordinator.after_commit_logged")
    assert dead.wait(20) == -9
    txn = txn_of(a)
    assert a.state(txn) == b.state(txn) == "PREPARED"
    assert decisions(schema) == {txn: ("commit", False)}
    async with Coordinator(url, credentials=INSECURE, config=FAST) as survivor:
        await eventually(lambda: a.state(txn) == b.state(txn) == "COMMITTED", what="the takeover commits both")
        await eventually(lambda: decisions(schema) == {txn: ("commit", True)}, what="END by the taker")
        owner = txn.split(":")[0]
        assert sql(f"SELECT instance, taken_by, commits FROM {schema}.ownership") == [(owner, survivor.id, 1)]


async def test_paused_instance_resumes_fenced_and_commits_nothing(
    schema: str, start_kv: Callable[..., Kv], instance_proc: Callable[..., ServiceProcess]
) -> None:
    """An instance SIGSTOPped between Prepare and its decision for longer than its
    lease is taken over; its participants learn ABORTED from the other instance;
    resumed, it finds itself fenced and logs no COMMIT."""
    a, b = start_kv("a"), start_kv("b")
    url = f"{SERVER}?schema={schema}&lease_s=1"
    async with Coordinator(url, credentials=INSECURE, listen="127.0.0.1:0", config=FAST) as other:
        # Started off the event loop: `other` must renew its lease and answer the
        # new instance's peer check meanwhile.
        paused = await asyncio.to_thread(
            instance_proc,
            url,
            f"k0={a.target}",
            f"k1={b.target}",
            args=["--slow-s", "3", "--timeout-s", "60", "--peers", other.address],
        )
        await eventually(lambda: len(a.reserved()) == 1, what="a prepared")
        paused.pause()
        txn = txn_of(a)
        owner = txn.split(":")[0]
        await eventually(
            lambda: sql(f"SELECT taken_by FROM {schema}.instances WHERE id = %s", owner) == [(other.id,)],
            what="the other instance takes the paused one over",
        )
        await eventually(lambda: a.state(txn) == "ABORTED", what="a learns ABORTED from the other instance")
        await eventually(lambda: b.state(txn) == "PREPARED", what="b voted while the owner was paused")
        paused.resume()
        await eventually(lambda: b.state(txn) == "ABORTED", timeout_s=20, what="b aborted")
        await eventually(lambda: "instance_fenced" in paused.log_path.read_text(), what="the resumed one is fenced")
        assert decisions(schema) == {}
        assert a.applied() == b.applied() == []


async def test_instances_join_and_leave_while_transactions_run(schema: str, start_kv: Callable[..., Kv]) -> None:
    """Instances start and stop (gracefully) under concurrent transactions: every
    transaction ends, each participant applied exactly the committed ones, and
    no COMMIT is left without END."""
    a, b = start_kv("a"), start_kv("b")
    url = f"{SERVER}?schema={schema}&lease_s=1"
    committed: set[str] = set()
    stop = asyncio.Event()

    async def traffic(c: Coordinator) -> None:
        while not stop.is_set():
            try:
                result = await c.run([a.branch(), b.branch()])
            except ClosedError:
                return
            if result.outcome is Outcome.COMMITTED:
                committed.add(result.txn_id)

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Coordinator(url, credentials=INSECURE, config=FAST))
        workers = [asyncio.create_task(traffic(first)) for _ in range(4)]
        await eventually(lambda: len(committed) >= 10, what="traffic on the first instance")
        second = await stack.enter_async_context(Coordinator(url, credentials=INSECURE, config=FAST))
        workers += [asyncio.create_task(traffic(second)) for _ in range(4)]
        await eventually(lambda: len(committed) >= 30, what="traffic on both")
        await first.close()  # leaves while its workers are mid-transaction
        third = await stack.enter_async_context(Coordinator(url, credentials=INSECURE, config=FAST))
        workers += [asyncio.create_task(traffic(third)) for _ in range(4)]
        await eventually(lambda: len(committed) >= 60, what="traffic after the first left")
        stop.set()
        await asyncio.gather(*workers)
        await eventually(lambda: all(ended for _, ended in decisions(schema).values()), what="every COMMIT ended")
    logged = {t for t, (d, _) in decisions(schema).items() if d == "commit"}
    assert committed <= logged
    await eventually(lambda: a.reserved() == b.reserved() == [], what="nothing left reserved")
    for kv in (a, b):
        assert {str(t) for t, *_ in kv.applied()} == logged


def assert_failed_over(report: failover.FailoverReport) -> None:
    """Every purchase ended and checks out, and the failed shop was replaced cleanly."""
    assert report.violations == []
    assert report.fault_to_settled_s is not None, "the failed shop's transactions were all resolved"
    assert report.logged_after_takeover == []
    if report.fault == "kill":
        assert report.taken_over_commits >= 1, "the killed shop's COMMIT was adopted"
    else:
        assert report.fenced


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_two_shops_on_postgres_fail_over(schema: str, tmp_path: Path, fault: str) -> None:
    """Two shops on one PostgreSQL log under concurrent purchases; the first is
    SIGKILLed in phase 2, or SIGSTOPped past its lease: the other takes over,
    every purchase ends, the invariants and the client's view hold, and the
    failed shop logs no COMMIT once taken over."""
    url = f"{SERVER}?schema={schema}&lease_s=1"
    cluster = Cluster(tmp_path / "cluster", Settings(prepare_timeout_s=1.0), log_url=url, shops=2)
    if fault == "kill":
        cluster.shop.env["TWOPC_CRASH_AT"] = "coordinator.after_first_commit"
    async with cluster as c:
        report = await failover.run(c, fault, lease_s=1.0)
    print(f"failover ({fault}): {report}")
    assert_failed_over(report)


HOSTS = ["pg", "wallet", "orders", "shop", "shop1"]


@pytest.fixture
def hosts() -> Iterator[tuple[Network, failover.PrivatePostgres]]:
    """Every service a host of its own (network namespaces named ha*), and a
    PostgreSQL server of the test's own on the "pg" host."""
    ok, why = Network.available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    missing = failover.PrivatePostgres.missing()
    if missing:
        pytest.skip(missing)
    network = Network(HOSTS, prefix="ha", net=232)
    network.up()
    pg = None
    try:
        where = network.host("pg")
        pg = failover.PrivatePostgres(where.address, where.wrapper).start()
        yield network, pg
    finally:
        if pg is not None:
            pg.close()
        network.down()


@pytest.mark.parametrize("fault", ["kill", "partition", "pause"])
async def test_failover_between_hosts(
    hosts: tuple[Network, failover.PrivatePostgres], tmp_path: Path, fault: str
) -> None:
    """Two shops, the wallet, the order service and PostgreSQL each on a host of
    its own; under concurrent purchases the first shop is SIGKILLed in phase 2,
    partitioned away, or SIGSTOPped past its lease: the other takes over, every
    purchase ends, the invariants and the client's view hold, and the failed
    shop logs no COMMIT after the takeover (partitioned or paused, it is fenced)."""
    network, pg = hosts
    lease_s = 1.0
    cluster = Cluster(
        tmp_path / "cluster",
        Settings(prepare_timeout_s=1.0),
        hosts={n: network.host(n) for n in HOSTS if n != "pg"},
        log_url=pg.url("shop_log", lease_s=str(lease_s)),
        shops=2,
    )
    if fault == "kill":
        cluster.shop.env["TWOPC_CRASH_AT"] = "coordinator.after_first_commit"
    async with cluster as c:
        report = await failover.run(
            c, fault, lease_s=lease_s, cut=lambda: network.cut("shop"), heal=lambda: network.heal("shop")
        )
    print(f"failover between hosts ({fault}): {report}")
    assert_failed_over(report)


async def test_participant_asks_the_next_instance_and_trusts_only_trusted_ones(tmp_path: Path) -> None:
    """A Prepare naming an untrusted instance in `coordinators` is refused and holds
    nothing; with every instance trusted, a participant whose first instance is dead
    learns the outcome from the next one."""
    servicer = FakeCoordinator()  # an instance that answers COMMITTED
    server = grpc.aio.server()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    other = f"127.0.0.1:{rpc.add_port(server, '127.0.0.1:0', INSECURE)}"
    await server.start()
    dead = "127.0.0.1:1"  # nobody listens there
    common = ["--insecure", "--trust-coordinator", dead, "--in-doubt-after-s", "0.1", "--resolve-interval-s", "0.1"]
    strict = ServiceProcess(
        "services.wallet", ["--db", str(tmp_path / "s.db"), *common], log_path=tmp_path / "s.log"
    ).start()
    both = ServiceProcess(
        "services.wallet",
        ["--db", str(tmp_path / "b.db"), *common, "--trust-coordinator", other],
        log_path=tmp_path / "b.log",
    ).start()
    try:
        ch, stub = await seeded(strict)
        async with ch:
            request = debit("t-untrusted", dead)
            request.coordinators.append(other)
            assert await status(stub.Prepare(request, timeout=5)) is grpc.StatusCode.PERMISSION_DENIED
        assert txn_state(tmp_path / "s.db", "t-untrusted") is None
        ch, stub = await seeded(both)
        async with ch:
            request = debit("t-doubt", dead)
            request.coordinators.append(other)
            assert (await stub.Prepare(request, timeout=5)).vote == participant_pb2.VOTE_COMMIT
            await eventually(lambda: txn_state(tmp_path / "b.db", "t-doubt") == "COMMITTED", what="resolved")
        assert servicer.asked[:1] == ["t-doubt"]
    finally:
        strict.stop()
        both.stop()
        await server.stop(None)


# --- rule 12: whose ABORTED counts, and an abort that ends ---------------------------


def foreign_log(kind: str, schema: str, tmp_path: Path) -> str:
    """A decision log that is not the test's own: a mistyped schema, or a file."""
    return f"{SERVER}?schema={schema}_typo" if kind == "schema" else str(tmp_path / "foreign.db")


@pytest.fixture
def typo_schema(schema: str) -> Iterator[None]:
    """Drops the mistyped schema a test's foreign instance creates."""
    yield
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema}_typo CASCADE")


@pytest.mark.usefixtures("typo_schema")
@pytest.mark.parametrize("kind", ["schema", "sqlite"])
async def test_an_alternate_on_another_log_never_aborts_what_the_owner_commits(
    schema: str, tmp_path: Path, start_kv: Callable[..., Kv], kind: str
) -> None:
    """The issue's setup: B, listed in A's peers, runs on its own log (a mistyped
    ?schema=, or a SQLite file) and starts after A, so A cannot refuse it. A's phase
    1 outlasts a participant's in_doubt_after_s; the participant asks A, then B: B
    answers PENDING (an owner its log never knew), and both participants commit."""
    quick = start_kv("a", args=["--in-doubt-after-s", "0.2", "--resolve-interval-s", "0.1"])
    slow = start_kv("b")
    b_address = f"127.0.0.1:{free_port()}"
    url = f"{SERVER}?schema={schema}"
    seen = Recorder()
    foreign = Coordinator(foreign_log(kind, schema, tmp_path), credentials=INSECURE, listen=b_address, observers=[seen])
    owner = Coordinator(url, credentials=INSECURE, listen="127.0.0.1:0", config=FAST, peers=[b_address])
    # A first, while nothing listens at B's address: A cannot check B, and names it.
    async with owner as a, foreign:
        result = await a.run([quick.branch(), slow.branch(delay_s=2.5)], timeout_s=10)
        asked = [e.outcome for e in seen.of(result.txn_id) if e.kind is EventKind.OUTCOME_ANSWERED]
    assert result.outcome is Outcome.COMMITTED
    assert asked and set(asked) == {Outcome.PENDING}, "the participant asked B, which could not tell"
    await eventually(lambda: quick.state(result.txn_id) == slow.state(result.txn_id) == "COMMITTED", what="both")


@pytest.mark.usefixtures("typo_schema")
@pytest.mark.parametrize("kind", ["schema", "sqlite"])
async def test_peers_on_another_log_are_refused_at_start(schema: str, tmp_path: Path, kind: str) -> None:
    """An instance whose peer answers from another log (a mistyped schema, a SQLite
    file) refuses to start (ForeignPeerError); a peer on the same log is accepted;
    a file log refuses peers outright."""
    url = f"{SERVER}?schema={schema}"
    async with Coordinator(foreign_log(kind, schema, tmp_path), credentials=INSECURE, listen="127.0.0.1:0") as b:
        with pytest.raises(ForeignPeerError, match="answers from decision log"):
            async with Coordinator(url, credentials=INSECURE, listen="127.0.0.1:0", peers=[b.address]):
                pass
    async with Coordinator(url, credentials=INSECURE, listen="127.0.0.1:0") as a:
        with capture_logs() as events:
            async with Coordinator(url, credentials=INSECURE, listen="127.0.0.1:0", peers=[a.address]) as a2:
                assert a2.id != a.id
        assert any(e["event"] == "peer_verified" for e in events)
    with pytest.raises(ValueError, match="shared decision log"):
        Coordinator(tmp_path / "alone.db", credentials=INSECURE, peers=["127.0.0.1:1"])


async def test_a_live_owner_answers_aborted_for_an_abort_it_never_logged(
    schema: str, start_kv: Callable[..., Kv]
) -> None:
    """Rule 12 on PostgreSQL: a participant cut off until the Abort's retries are
    over asks the owner, which is alive and never logged the abort: ABORTED (not
    PENDING for as long as the owner lives), and the participant releases its hold."""
    fast, cut_off = start_kv("a"), start_kv("b")
    proxy = await TcpProxy("127.0.0.1", int(cut_off.target.rsplit(":", 1)[1])).start()
    seen = Recorder()
    config = replace(FAST, abort_retry_s=0.5)
    try:
        async with Coordinator(
            f"{SERVER}?schema={schema}", credentials=INSECURE, listen="127.0.0.1:0", config=config, observers=[seen]
        ) as owner:
            via_proxy = Branch(f"127.0.0.1:{proxy.port}", op(key="k", amount=1), name="b")
            run = asyncio.create_task(owner.run([via_proxy, fast.branch(delay_s=4)], timeout_s=2))
            await eventually(lambda: len(cut_off.reserved()) == 1, what="b prepared")
            proxy.cut()  # the Abort never reaches b
            result = await run
            assert result.outcome is Outcome.ABORTED
            await eventually(lambda: cut_off.state(result.txn_id) == "ABORTED", what="b asks and aborts")
            answers = [e.outcome for e in seen.of(result.txn_id) if e.kind is EventKind.OUTCOME_ANSWERED]
            acked = [e.target for e in seen.of(result.txn_id) if e.kind is EventKind.ACKNOWLEDGED]
        assert answers[-1] is Outcome.ABORTED and via_proxy.target not in acked
        assert cut_off.reserved() == []
    finally:
        await proxy.close()


async def test_an_id_settled_by_an_abort_marker_is_not_run_again(schema: str, start_kv: Callable[..., Kv]) -> None:
    """An id whose COMMIT write was settled by an abort marker is refused before any
    message (DuplicateTransactionError "aborted"); a COMMIT write that meets such a
    marker aborts the transaction (NotLoggedError), never "committed"."""
    kv1, kv2 = start_kv("a"), start_kv("b")
    url = f"{SERVER}?schema={schema}"
    async with Coordinator(url, credentials=INSECURE, config=FAST) as c:
        gid = c.global_id("reused")
        sql(
            f"INSERT INTO {schema}.decisions (txn_id, owner, driver, decision, targets, ended_at)"
            " VALUES (%s, %s, %s, 'abort', '[]', now())",
            gid,
            c.id,
            c.id,
        )
        sent = c.messages_sent
        with pytest.raises(DuplicateTransactionError, match="aborted"):
            await c.run([kv1.branch(), kv2.branch()], txn_id="reused")
        assert c.messages_sent == sent
    async with opened(url, lease_s=60) as log:
        marked = f"{log.id}:marked"
        sql(
            f"INSERT INTO {schema}.decisions (txn_id, owner, driver, decision, targets, ended_at)"
            " VALUES (%s, %s, %s, 'abort', '[]', now())",
            marked,
            log.id,
            log.id,
        )
        with pytest.raises(NotLoggedError, match="abort marker"):
            await log.log_commit(marked, ["t1"])


def test_a_lease_that_one_slow_renewal_would_lose_is_refused() -> None:
    """A renewal as slow as op_timeout_s must land inside the lease: lease_s=2 with
    op_timeout_s=2 is refused; without op_timeout_s, a short lease gets a shorter
    bound on a database round."""
    with pytest.raises(ValueError, match="too short"):
        PostgresDecisionLog(f"{SERVER}?lease_s=2&op_timeout_s=2")
    assert PostgresDecisionLog(f"{SERVER}?lease_s=2").op_timeout_s < 2 - 0.5
    assert PostgresDecisionLog(SERVER).op_timeout_s == 2.0


async def test_lease_renewal_outlives_an_unexpected_database_error(schema: str) -> None:
    """A renewal round that fails with an error other than unreachability (here the
    lease table renamed away) is logged and retried; once the table is back the
    lease is renewed again instead of lapsing for ever."""
    url = f"{SERVER}?schema={schema}"
    async with opened(url, lease_s=1.2, renew_every_s=0.1, op_timeout_s=0.5) as log:
        failures: list[BaseException] = []
        log.watch(adopt=lambda records: None, fail=failures.append)

        def renewed_by() -> Any:
            return sql(f"SELECT expires_at FROM {schema}.instances WHERE id = %s", log.id)[0][0]

        with capture_logs() as events:
            sql(f"ALTER TABLE {schema}.instances RENAME TO instances_away")
            await eventually(lambda: any(e["event"] == "lease_renewal_error" for e in events), what="an error")
            sql(f"ALTER TABLE {schema}.instances_away RENAME TO instances")
        before = renewed_by()
        await eventually(lambda: renewed_by() > before, what="renewals resume")
        assert failures == []
