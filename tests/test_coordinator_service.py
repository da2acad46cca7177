"""`twopc coordinator`: the coordinator as a service (twopc.v1.Transactions), run as a
real process over real kv participants, reached through `twopc.TransactionsClient`;
and the HTTP probes (`/healthz`, `/readyz`) that tell the truth."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Kv, eventually, op
from twopc import Branch, Outcome, ServiceError, TransactionsClient, Vote, rpc
from twopc.config import Credentials
from twopc.dev import pgserver
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess, free_port
from twopc.ops import coordinatord
from twopc.security.auth import Policy, coordinator_rules, grant
from twopc.stores import execute
from twopc.stores.base import query

INSECURE = Credentials.insecure()


def http(url: str) -> tuple[int, str]:
    """GET `url`: its status and body, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def service(
    start_kv: Callable[..., Kv], start_coordinator_service: Callable[..., ServiceProcess]
) -> tuple[ServiceProcess, Kv, Kv, int]:
    """A `twopc coordinator` process over two kv participants (a and b), with metrics."""
    a, b = start_kv("a"), start_kv("b")
    metrics_port = free_port()
    proc = start_coordinator_service({"a": a.target, "b": b.target}, metrics_port=metrics_port, prepare_timeout_s=3.0)
    return proc, a, b, metrics_port


async def test_execute_commits_aborts_and_answers_a_retry_from_the_log(
    service: tuple[ServiceProcess, Kv, Kv, int],
) -> None:
    """Execute commits over two participants, answers a retry of that id COMMITTED
    without running it again, and returns an abort's votes and reason as a result."""
    proc, a, b, _ = service
    async with TransactionsClient(proc.address, credentials=INSECURE) as client:
        branches = [Branch("a", op(key="k", amount=5), name="wallet"), Branch(b.target, op(key="k", amount=7))]
        result = await client.execute(branches, txn_id="order-1")
        assert result.outcome is Outcome.COMMITTED
        assert result.txn_id.endswith(":order-1")
        assert [(r.name, r.target, r.vote) for r in result.branches] == [
            ("wallet", a.target, Vote.COMMIT),
            (b.target, b.target, Vote.COMMIT),
        ]
        await eventually(lambda: len(a.applied()) == 1 and len(b.applied()) == 1, what="phase 2 applied")

        again = await client.execute(branches, txn_id="order-1")
        assert (again.txn_id, again.outcome) == (result.txn_id, Outcome.COMMITTED)
        assert a.applied() == [(result.txn_id, "k", 5)]  # once, not twice
        assert await client.outcome(result.txn_id) is Outcome.COMMITTED

        aborted = await client.execute([Branch("a", op(key="k")), Branch("b", op(behave="abort"))], txn_id="order-2")
        assert aborted.outcome is Outcome.ABORTED
        assert "told to abort" in aborted.reason
        assert aborted.branches[1].vote is Vote.ABORT
        assert await client.outcome(aborted.txn_id) is Outcome.ABORTED
        await eventually(lambda: not a.reserved(), what="the abort released a's reservation")


async def test_execute_refuses_bad_requests_with_their_documented_status(
    service: tuple[ServiceProcess, Kv, Kv, int],
) -> None:
    """A target outside the configured participants is FAILED_PRECONDITION; a bad id, no
    branches, a missing operation or one target twice is INVALID_ARGUMENT; none sends anything."""
    proc, a, b, _ = service
    async with TransactionsClient(proc.address, credentials=INSECURE) as client:
        with pytest.raises(ServiceError) as refused:
            await client.execute([Branch("127.0.0.1:1", op(key="k"))], txn_id="t1")
        assert refused.value.status == "FAILED_PRECONDITION"
        for branches, txn_id in (
            ([Branch("a", op(key="k"))], "bad id!"),
            ([], "t2"),
            ([Branch("a", op(key="k")), Branch(a.target, op(key="k"))], "t3"),
        ):
            with pytest.raises(ServiceError) as bad:
                await client.execute(branches, txn_id=txn_id)
            assert bad.value.status == "INVALID_ARGUMENT", branches
    assert a.reserved() == a.applied() == b.reserved() == []


async def test_metrics_port_answers_probes_and_404_elsewhere(service: tuple[ServiceProcess, Kv, Kv, int]) -> None:
    """The coordinator's metrics port answers /healthz and /readyz (SERVING once its log
    is read), /metrics, and 404 for every other path."""
    _, _, _, port = service
    base = f"http://127.0.0.1:{port}"
    assert http(f"{base}/healthz")[0] == 200
    assert http(f"{base}/readyz") == (200, "SERVING\n")
    status, body = http(f"{base}/metrics")
    assert status == 200 and "twopc_" in body
    assert http(f"{base}/")[0] == 404
    assert http(f"{base}/other")[0] == 404


def test_coordinator_help_and_a_bad_config_in_one_line(tmp_path: Path) -> None:
    """`twopc coordinator --help` describes the service; a config that names no
    participant is one line of error and exit status 1, not a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "twopc.ops.cli", "coordinator", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "Transactions/Execute" in done.stdout and "ephemeral" in done.stdout
    (tmp_path / "c.toml").write_text('listen = "127.0.0.1:0"\nlog = "d.db"\n')
    done = subprocess.run(
        [sys.executable, "-m", "twopc.ops.cli", "coordinator", "--config", str(tmp_path / "c.toml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "twopc: error: no [participants.NAME] tables: a branch could target nothing"
    ]


@pytest.mark.parametrize("app", ["tests.apps.kv", "tests.apps.debits"], ids=["helper", "adapter"])
def test_readyz_follows_a_postgresql_store_down_and_up(tmp_path: Path, pg_killable: PostgresServer, app: str) -> None:
    """A participant on PostgreSQL (the reservation helper, the PREPARE TRANSACTION
    adapter) answers /readyz 503 while its server is stopped and 200 once it is back;
    /healthz stays 200 (the process is alive) throughout."""
    port = free_port()
    proc = ServiceProcess(app, ["--db", pg_killable.url, "--metrics-port", str(port)], log_path=tmp_path / "p.log")
    proc.start()
    try:
        _down_and_up(f"http://127.0.0.1:{port}", pg_killable)
    finally:
        proc.stop()


def test_coordinator_readyz_follows_its_postgresql_log_down_and_up(
    tmp_path: Path,
    pg_killable: PostgresServer,
    start_kv: Callable[..., Kv],
    start_coordinator_service: Callable[..., ServiceProcess],
) -> None:
    """A coordinator service on a PostgreSQL log answers /readyz 503 once its lease
    cannot be renewed (the server stopped) and 200 once it holds it again."""
    port = free_port()
    kv = start_kv("kv")
    log = f"{pg_killable.url}?schema=twopc_log&lease_s=1"
    start_coordinator_service({"kv": kv.target}, log=log, metrics_port=port)
    _down_and_up(f"http://127.0.0.1:{port}", pg_killable)


def _down_and_up(base: str, server: PostgresServer) -> None:
    """/readyz 200, then 503 with `server` stopped (while /healthz stays 200), then 200 again."""
    assert http(f"{base}/readyz") == (200, "SERVING\n")
    server.stop()
    assert _poll(lambda: http(f"{base}/readyz")[0] == 503), "readyz stayed 200 with the server stopped"
    assert http(f"{base}/healthz")[0] == 200
    server.start()
    assert _poll(lambda: http(f"{base}/readyz") == (200, "SERVING\n")), "readyz did not recover"


def _poll(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Polls a blocking `check` until it holds; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


async def test_a_port_in_time_wait_binds_and_a_live_owner_is_refused() -> None:
    """A server binds a port whose last connection is in TIME-WAIT (a restart on its
    stable address), and a second server on a live owner's port is refused."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.1", port))
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    client.close()  # the side that closes first keeps TIME-WAIT: here, on `port`
    accepted.close()
    listener.close()
    # The TIME-WAIT is there: a bind without SO_REUSEADDR (the failed restart) meets it.
    with socket.socket() as naive, pytest.raises(OSError, match="in use"):
        naive.bind(("127.0.0.1", port))
    first = rpc.server()
    rpc.add_port(first, f"127.0.0.1:{port}", INSECURE)
    await first.start()
    try:
        with pytest.raises(OSError, match="cannot bind"):
            rpc.add_port(rpc.server(), f"127.0.0.1:{port}", INSECURE)
    finally:
        await first.stop(None)


def test_pgserver_module_runs_a_server_for_development_until_ctrl_c() -> None:
    """`python -m twopc.dev.pgserver` says what it does in --help, prints a URL that
    connects to a server with max_prepared_transactions set, and stops it on SIGINT."""
    import psycopg

    if pgserver.missing():
        pytest.skip(pgserver.missing() or "")
    helped = subprocess.run([sys.executable, "-m", "twopc.dev.pgserver", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "max_prepared_transactions" in helped.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "twopc.dev.pgserver", "--max-prepared-transactions", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with psycopg.connect(url) as conn:
            assert conn.execute("SHOW max_prepared_transactions").fetchone() == ("7",)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2).close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("autocommit", [False, True], ids=["helper", "adapter"])
async def test_a_store_url_with_schema_creates_the_schema(pg_server: PostgresServer, autocommit: bool) -> None:
    """A participant store opened on `?schema=NAME` for a schema that does not exist
    creates it and keeps its tables there (the helper's pool and the adapter's
    autocommit mode); a bad schema name is one line of ValueError before any connection."""
    from twopc.stores.postgres import PostgresStore

    name = f"fresh_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(
        f"{pg_server.url}?schema={name}", "CREATE TABLE IF NOT EXISTS notes (n INTEGER)", autocommit=autocommit
    )
    async with store:
        await store.write(lambda db: execute(db, "INSERT INTO notes VALUES (1)") and None)
    rows = query(pg_server.url, "SELECT table_name FROM information_schema.tables WHERE table_schema = :s", s=name)
    assert sorted(r[0] for r in rows) == ["notes", "twopc_schema"]
    assert query(f"{pg_server.url}?schema={name}", "SELECT n FROM notes") == [(1,)]
    with pytest.raises(ValueError, match="lowercase SQL identifier") as bad:
        PostgresStore(f"{pg_server.url}?schema=Bad;Name")
    assert "\n" not in str(bad.value)


async def test_a_retry_on_another_instance_of_a_shared_log_is_not_run_again(
    pg_url: str, start_kv: Callable[..., Kv], start_coordinator_service: Callable[..., ServiceProcess]
) -> None:
    """Two service instances on one PostgreSQL log: a retry of an id that reaches the
    other instance while the first attempt is still in phase 1 waits for it and gets
    its commit (same global id), and the participant applies it once."""
    kv = start_kv("kv")
    log = pg_url.replace("?options=", "?schema=twopc_log&options=")
    first = start_coordinator_service({"kv": kv.target}, log=log)
    second = start_coordinator_service({"kv": kv.target}, log=log)
    slow = [Branch("kv", op(key="k", amount=3, delay_s=1.5))]
    async with (
        TransactionsClient(first.address, credentials=INSECURE) as a,
        TransactionsClient(second.address, credentials=INSECURE) as b,
    ):
        running = asyncio.ensure_future(a.execute(slow, txn_id="dup-1"))
        await eventually(lambda: bool(kv.reserved()) or running.done(), what="the first attempt's Prepare")
        retried = await b.execute(slow, txn_id="dup-1")
        result = await running
    assert result.outcome is Outcome.COMMITTED
    assert (retried.txn_id, retried.outcome) == (result.txn_id, Outcome.COMMITTED)
    await eventually(lambda: kv.applied() == [(result.txn_id, "k", 3)], what="one application of dup-1")


async def test_an_id_settled_as_aborted_is_answered_aborted(
    pg_url: str, start_kv: Callable[..., Kv], start_coordinator_service: Callable[..., ServiceProcess]
) -> None:
    """An id whose earlier attempt the shared log settled as aborted (an abort marker,
    left by a COMMIT write whose result was lost) is answered ABORTED at once, never
    run again, and not UNAVAILABLE for ever."""
    import psycopg

    from twopc.decisions.postgres import connection_info

    kv = start_kv("kv")
    log = pg_url.replace("?options=", f"?schema=settled_{uuid.uuid4().hex[:8]}&options=")  # a log of its own
    start = start_coordinator_service({"kv": kv.target}, log=log)
    conninfo, schema = connection_info(log)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        [(instance,)] = conn.execute(f"SELECT id FROM {schema}.instances").fetchall()
        conn.execute(
            f"INSERT INTO {schema}.decisions (txn_id, owner, driver, decision, targets, ended_at)"
            " VALUES (%s, %s, %s, 'abort', '[]', now())",
            (f"{instance}:settled-1", instance, instance),
        )
    async with TransactionsClient(start.address, credentials=INSECURE) as client:
        result = await client.execute([Branch("kv", op(key="k", amount=1))], txn_id="settled-1", timeout_s=5)
    assert (result.txn_id, result.outcome) == (f"{instance}:settled-1", Outcome.ABORTED)
    assert kv.reserved() == [] and kv.applied() == []


def test_every_policy_lets_an_authenticated_caller_check_health() -> None:
    """A Policy built as the README shows allows its rules, refuses other methods, and
    allows health checks to any identity unless its rules name them."""
    policy = Policy({**coordinator_rules(["wallet"]), **grant(["buyer"], "shop.v1.Shop", "Purchase")})
    assert policy.allows("/shop.v1.Shop/Purchase", ["buyer"])
    assert not policy.allows("/shop.v1.Shop/Purchase", ["wallet"])
    assert policy.allows("/grpc.health.v1.Health/Check", ["a-load-balancer"])
    assert not policy.allows("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ["a-load-balancer"])
    named = Policy(grant(["ops"], "grpc.health.v1.Health", "Check"))
    assert not named.allows("/grpc.health.v1.Health/Check", ["a-load-balancer"])


def test_the_cli_reads_a_store_by_schema_and_says_a_bad_url_in_one_line(
    pg_server: PostgresServer, start_kv: Callable[..., Kv]
) -> None:
    """A participant started on `?schema=` for a schema that does not exist creates it,
    `twopc participant in-doubt` reads its store by the same URL, and a bad schema
    name is one line of error, not a traceback."""
    name = f"cli_{uuid.uuid4().hex[:8]}"
    url = f"{pg_server.url}?schema={name}"
    start_kv("kv", db=url)
    tables = query(pg_server.url, "SELECT table_name FROM information_schema.tables WHERE table_schema = :s", s=name)
    assert ("reserved",) in tables  # the kv's own table, in the schema the URL named
    twopc = [sys.executable, "-m", "twopc.ops.cli", "participant", "in-doubt"]
    done = subprocess.run([*twopc, url, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    bad = subprocess.run([*twopc, f"{pg_server.url}?schema=Bad;Name"], capture_output=True, text=True)
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("twopc: error: ") and line.endswith("must be one lowercase SQL identifier, got 'Bad;Name'")


def test_the_config_file_reads_paths_from_its_directory_and_flags_win(tmp_path: Path) -> None:
    """Paths in the TOML file are relative to it, a flag's as given; --host and --port
    replace `listen`'s parts; an unknown setting is a ConfigError naming it."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "c.toml"
    config.write_text(
        'listen = "127.0.0.1:7000"\nlog = "d.db"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
        '[participants.wallet]\naddress = "127.0.0.1:7001"\n'
    )
    loaded = coordinatord.load(config)
    assert (loaded.log, loaded.tls["ca"], loaded.listen) == (
        str(tmp_path / "etc" / "d.db"),
        str(tmp_path / "etc" / "ca.pem"),
        "127.0.0.1:7000",
    )
    flagged = coordinatord.load(config, log="here.db", port=7100, host="0.0.0.0")
    assert (flagged.log, flagged.listen) == ("here.db", "0.0.0.0:7100")
    config.write_text('lisen = "typo"\n' + config.read_text())
    with pytest.raises(coordinatord.ConfigError, match="unknown settings lisen"):
        coordinatord.load(config)
    config.write_text(config.read_text().removeprefix('lisen = "typo"\n') + 'adress = "typo"\n')
    with pytest.raises(coordinatord.ConfigError, match=r"participants.wallet: unknown settings adress"):
        coordinatord.load(config)
