"""The `twopc` console script, run as a process against the services' real files and
a real coordinator: listing, asking, and a guarded heuristic decision."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from services.cluster import Cluster, Settings
from tests.conftest import Kv, prepare_request
from twopc.dev.testing import query, wait_until
from twopc.v1 import participant_pb2, participant_pb2_grpc

TWOPC = str(Path(sys.executable).parent / "twopc")
WALLET_HANDLER = "services.wallet.service:WalletHandler"


def twopc(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # The repository's root on the path, so that --handler can name a test app's class.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([TWOPC, *args], capture_output=True, text=True, input=stdin, timeout=60, check=False, env=env)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path, Settings(prepare_timeout_s=3.0)) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 100, 1_500)
        yield c


async def in_doubt_after_shop_crash(c: Cluster) -> str:
    """A purchase whose shop dies right after logging COMMIT; returns its txn id."""
    await asyncio.to_thread(c.shop.restart, env={"TWOPC_CRASH_AT": "coordinator.after_commit_logged"})
    with pytest.raises(grpc.aio.AioRpcError):
        await c.purchase("o1", "alice", {"widget": 2})
    found = json.loads(twopc("participant", "in-doubt", str(c.wallet_db), "--json").stdout)
    assert len(found) == 1 and found[0]["coordinator"] == c.shop.address
    return str(found[0]["txn_id"])


async def test_log_participant_and_outcome_show_a_stuck_transaction(cluster: Cluster) -> None:
    """The in-doubt transaction appears in the log (pending, both branches) and at the wallet
    (with its coordinator); outcome fails in one line while the shop is down, then says
    COMMITTED; a table is the default output."""
    txn = await in_doubt_after_shop_crash(cluster)
    table = twopc("participant", "in-doubt", str(cluster.wallet_db))
    assert table.returncode == 0 and table.stdout.split()[:3] == ["TXN_ID", "AGE_S", "COORDINATOR"]
    assert txn in table.stdout
    (record,) = json.loads(twopc("log", "list", str(cluster.shop_db), "--json").stdout)
    assert record["txn_id"] == txn and record["state"] == "pending"
    assert sorted(record["branches"]) == sorted([cluster.wallet.address, cluster.orders.address])
    down = twopc("outcome", txn, "--coordinator", cluster.shop.address, "--timeout-s", "1")
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1 and down.stderr.startswith("twopc: error: ") and "did not answer" in down.stderr
    await asyncio.to_thread(cluster.shop.restart)
    assert twopc("outcome", txn, "--coordinator", cluster.shop.address).stdout.strip() in {"COMMITTED", "ABORTED"}
    await cluster.settled()
    assert "no pending commits" in twopc("log", "list", str(cluster.shop_db)).stdout
    (ended,) = json.loads(twopc("log", "show", str(cluster.shop_db), txn, "--json").stdout)
    assert ended["state"] == "ended" and ended["acknowledged"] == "all"
    missing = twopc("log", "show", str(cluster.shop_db), "nope")
    assert missing.returncode == 1 and "presumed abort" in missing.stderr


async def test_resolve_is_refused_while_the_coordinator_can_settle_it(cluster: Cluster) -> None:
    """While the restarted shop says COMMITTED, a heuristic abort is refused and changes nothing."""
    txn = await in_doubt_after_shop_crash(cluster)
    cluster.wallet.pause()  # the re-driven Commit cannot reach the wallet yet
    await asyncio.to_thread(cluster.shop.restart)
    said = twopc("outcome", txn, "--coordinator", cluster.shop.address, "--json")
    assert json.loads(said.stdout) == {"txn_id": txn, "outcome": "COMMITTED"}
    refused = twopc("resolve", txn, "--db", str(cluster.wallet_db), "--handler", WALLET_HANDLER, "--abort", "--yes")
    assert refused.returncode == 1 and "says COMMITTED" in refused.stderr and "--force" in refused.stderr
    assert query(cluster.wallet_db, "SELECT state FROM twopc_txn WHERE txn_id = ?", txn) == [("PREPARED",)]
    cluster.wallet.resume()
    await cluster.settled()


async def test_heuristic_abort_is_recorded_and_reported_as_heuristic(cluster: Cluster) -> None:
    """With the coordinator gone: an unconfirmed resolve changes nothing; a confirmed abort
    releases the hold, is recorded in twopc_heuristic, and the invariant checker reports the
    broken atomicity it causes as heuristic, not as a protocol violation."""
    txn = await in_doubt_after_shop_crash(cluster)
    resolve = ("resolve", txn, "--db", str(cluster.wallet_db), "--handler", WALLET_HANDLER, "--abort")
    unconfirmed = twopc(*resolve, stdin="n\n")
    assert unconfirmed.returncode == 1 and "not confirmed" in unconfirmed.stderr
    assert "unreachable" in unconfirmed.stdout
    assert query(cluster.wallet_db, "SELECT state FROM twopc_txn WHERE txn_id = ?", txn) == [("PREPARED",)]
    done = twopc(*resolve, stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert "heuristic_decision" in done.stderr  # the operator's log line
    assert query(cluster.wallet_db, "SELECT state FROM twopc_txn WHERE txn_id = ?", txn) == [("ABORTED",)]
    assert query(cluster.wallet_db, "SELECT decision, forced FROM twopc_heuristic WHERE txn_id = ?", txn) == [
        ("ABORTED", 0)
    ]
    assert query(cluster.wallet_db, "SELECT count(*) FROM holds") == [(0,)]
    await asyncio.to_thread(cluster.shop.restart)  # recovery commits the orders branch; the wallet refuses
    assert await wait_until(lambda: _confirmed(cluster, "o1"), 15)
    report = cluster.check()
    assert report.ok, report.violations
    assert any("heuristic decision at wallet aborted" in h for h in report.heuristic)
    assert any("order confirmed" in h for h in report.heuristic)


async def _confirmed(cluster: Cluster, order_id: str) -> bool:
    return await cluster.order_state(order_id) == "confirmed"


async def test_log_in_doubt_and_resolve_work_on_postgresql_too(
    tmp_path: Path, pg_url: str, start_kv: Callable[..., Kv]
) -> None:
    """`twopc log list|show` reads a shared decision log in PostgreSQL (a URL with its
    schema), `twopc participant in-doubt` a participant's PostgreSQL store, with the
    same output as for SQLite files, and `twopc resolve` settles and records there."""
    from twopc.decisions.postgres import PostgresDecisionLog

    log_url = f"{pg_url}&schema=clilog" if "?" in pg_url else f"{pg_url}?schema=clilog"
    log = PostgresDecisionLog(log_url, lease_s=60)
    await log.open()
    try:
        pending, ended = f"{log.id}:pending", f"{log.id}:ended"
        assert await log.log_commit(pending, ["wallet:1", "orders:2"])
        assert await log.log_commit(ended, ["wallet:1"])
        await log.log_end(ended)
    finally:
        await log.close()
    (record,) = json.loads(twopc("log", "list", log_url, "--json").stdout)
    assert record["txn_id"] == pending and record["state"] == "pending"
    assert record["branches"] == ["wallet:1", "orders:2"] and record["age_s"] >= 0
    assert {r["txn_id"] for r in json.loads(twopc("log", "list", log_url, "--all", "--json").stdout)} == {
        pending,
        ended,
    }
    (shown,) = json.loads(twopc("log", "show", log_url, ended, "--json").stdout)
    assert shown["state"] == "ended" and shown["acknowledged"] == "all"

    kv = start_kv("pg", db=pg_url, args=["--in-doubt-after-s", "600"])
    async with grpc.aio.insecure_channel(kv.target) as ch:
        vote = await participant_pb2_grpc.ParticipantStub(ch).Prepare(prepare_request("t-pg"), timeout=5)
    assert vote.vote == participant_pb2.VOTE_COMMIT
    (held,) = json.loads(twopc("participant", "in-doubt", pg_url, "--json").stdout)
    assert held["txn_id"] == "t-pg" and held["age_s"] >= 0
    settled = twopc("resolve", "t-pg", "--db", pg_url, "--handler", "tests.apps.kv:KV", "--abort", "--yes")
    assert settled.returncode == 0, settled.stderr
    assert kv.state("t-pg") == "ABORTED" and kv.reserved() == []
    assert query(pg_url, "SELECT txn_id, decision FROM twopc_heuristic") == [("t-pg", "ABORTED")]
    down = twopc("participant", "in-doubt", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert down.returncode == 1 and down.stderr.count("\n") == 1


async def test_resolve_fails_closed_unless_the_coordinator_cannot_be_reached_at_all(tmp_path: Path) -> None:
    """Under mutual TLS, with the shop up and holding COMMITTED: a resolve whose GetOutcome is
    refused (operator is not a participant) or sent without TLS stops with that error, names
    the refused identity or the TLS mistake, and decides nothing; `twopc outcome` without a
    client certificate names the TLS failure, not "Socket closed"."""
    pytest.importorskip("cryptography", reason="needs the cryptography package (pip install twopc[tls])")
    async with Cluster(tmp_path, Settings(prepare_timeout_s=3.0), tls=True) as c:
        await c.open_account("alice", 10_000)
        await c.add_stock("widget", 100, 1_500)
        await asyncio.to_thread(c.shop.restart, env={"TWOPC_CRASH_AT": "coordinator.after_commit_logged"})
        with pytest.raises(grpc.aio.AioRpcError):
            await c.purchase("o1", "alice", {"widget": 2})
        ((txn, coordinator),) = query(c.wallet_db, "SELECT txn_id, coordinator FROM twopc_txn")
        assert coordinator == f"shop@{c.shop.address}"  # the coordinator is kept with its identity
        c.wallet.pause()  # the re-driven Commit cannot reach the wallet yet
        await asyncio.to_thread(c.shop.restart)
        operator = [f"--tls-{k}={c.pki / 'operator' / f'{k}.pem'}" for k in ("ca", "cert", "key")]
        resolve = ("resolve", txn, "--db", str(c.wallet_db), "--handler", WALLET_HANDLER, "--abort", "--yes")
        refused = twopc(*resolve, *operator)
        assert refused.returncode == 1, refused.stdout
        assert "refused this client" in refused.stderr and "operator may not call" in refused.stderr
        plaintext = twopc(*resolve)
        assert plaintext.returncode == 1 and "expects TLS" in plaintext.stderr, plaintext.stderr
        assert query(c.wallet_db, "SELECT state FROM twopc_txn WHERE txn_id = ?", txn) == [("PREPARED",)]
        tables = {t for (t,) in query(c.wallet_db, "SELECT name FROM sqlite_master")}
        assert "twopc_heuristic" not in tables or query(c.wallet_db, "SELECT count(*) FROM twopc_heuristic") == [(0,)]
        no_cert = twopc("outcome", txn, "--coordinator", coordinator, f"--tls-ca={c.pki / 'ca.pem'}")
        assert no_cert.returncode == 1 and "TLS with" in no_cert.stderr
        assert "refused this client's certificate" in no_cert.stderr and "DEADLINE" not in no_cert.stderr
        c.wallet.resume()
        await c.settled()
