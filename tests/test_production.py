"""examples/production runs as its README says: participants on PostgreSQL, the
coordinator as a long-lived service, mutual TLS with identities and a policy, metrics
and probes on a chosen host; and a participant SIGKILLed between its vote and its
Commit finishes its transaction through that coordinator once it is back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.order.v1 import order_pb2, order_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess, free_port, wait_until
from twopc.security import pki
from twopc.v1 import transactions_pb2, transactions_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "production"


class Deployment:
    """The example's processes, on free ports instead of the README's fixed ones."""

    def __init__(self, tmp_path: Path, pg: PostgresServer) -> None:
        self.dir = tmp_path / "production"
        shutil.copytree(EXAMPLE, self.dir, ignore=shutil.ignore_patterns("certs", "__pycache__"))
        pki.issue(self.dir / "certs", ["coordinator", "wallet", "orders", "checkout", "operator"])
        self.ports = {name: free_port() for name in ("coordinator", "wallet", "orders", "metrics")}
        self.coordinator_address = f"127.0.0.1:{self.ports['coordinator']}"
        config = (self.dir / "coordinator.toml").read_text()
        for name, fixed in (("coordinator", 7000), ("wallet", 7001), ("orders", 7002), ("metrics", 9464)):
            config = config.replace(f":{fixed}", f":{self.ports[name]}").replace(f"= {fixed}", f"= {self.ports[name]}")
        self.db = pg.url
        config = config.replace("postgresql://postgres@127.0.0.1:5433/postgres", self.db)
        (self.dir / "coordinator.toml").write_text(config)
        self.env = {"PYTHONPATH": str(ROOT)}
        self.wallet = self._participant("wallet", "services.wallet")
        self.orders = self._participant("orders", "services.order")
        self.coordinator = ServiceProcess(
            "twopc coordinator",
            ["--config", str(self.dir / "coordinator.toml")],
            log_path=tmp_path / "coordinator.log",
            command=[sys.executable, "-m", "twopc.ops.cli", "coordinator"],
            port=self.ports["coordinator"],
        )

    def _participant(self, name: str, module: str) -> ServiceProcess:
        args = ["--db", f"{self.db}?schema={name}", "--tls-dir", str(self.dir / "certs" / name)]
        args += ["--coordinators", "coordinator", "--trust-coordinator", f"coordinator@{self.coordinator_address}"]
        args += ["--readers", "operator"]
        args += ["--in-doubt-after-s", "1", "--resolve-interval-s", "0.3"]
        return ServiceProcess(module, args, log_path=self.dir / f"{name}.log", port=self.ports[name], env=self.env)

    def script(self, name: str, *args: str) -> list[str]:
        env = {**os.environ, **self.env, "COORDINATOR": self.coordinator_address}
        env |= {"WALLET": self.wallet.address, "ORDERS": self.orders.address}
        done = subprocess.run([sys.executable, str(self.dir / name), *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    def stop(self) -> None:
        for proc in (self.coordinator, self.wallet, self.orders):
            proc.stop()


@pytest.fixture
def deployment(tmp_path: Path, pg_killable: PostgresServer) -> Iterator[Deployment]:
    d = Deployment(tmp_path, pg_killable)
    d.wallet.start()
    d.orders.start()
    d.coordinator.start()
    yield d
    d.stop()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status, reply.read().decode()


async def test_production_example_survives_a_participant_killed_after_its_vote(deployment: Deployment) -> None:
    """The README's steps commit a purchase under mutual TLS; the wallet SIGKILLed when
    its Commit arrives restarts holding the money, and the long-lived coordinator's
    retries commit it; /readyz on the metrics host answers SERVING over plain HTTP; the
    coordinator's policy refuses Execute to another identity but lets it check health."""
    d = deployment
    assert d.script("seed.py", "alice", "10000", "widget", "10", "1500") == ["alice: 10000 cents; widget: 10 in stock"]
    first = d.script("checkout.py", "order-1", "alice", "widget", "2", "3000")
    assert first[1] == "committed"
    assert get(f"http://127.0.0.1:{d.ports['metrics']}/readyz") == (200, "SERVING\n")

    d.wallet.stop()
    d.wallet.start(env={"TWOPC_CRASH_AT": "participant.before_commit"})
    second = d.script("checkout.py", "order-2", "alice", "widget", "1", "1500")
    assert second[1] == "committed"  # answered at the commit point
    assert d.wallet.wait(timeout_s=15) == -signal.SIGKILL  # killed by the Commit, after voting yes
    d.wallet.start()  # the same store, no crash point: it still holds the 1500

    certs = d.dir / "certs" / "operator"
    tls = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "key.pem").read_bytes(), (certs / "cert.pem").read_bytes()
    )
    async with (
        grpc.aio.secure_channel(d.wallet.address, tls) as w,
        grpc.aio.secure_channel(d.orders.address, tls) as o,
    ):
        wallet = wallet_pb2_grpc.WalletStub(w)
        orders = order_pb2_grpc.OrdersStub(o)

        async def state() -> tuple[int, int, int]:
            b = await wallet.GetBalance(wallet_pb2.GetBalanceRequest(account="alice"), timeout=5)
            s = await orders.GetStock(order_pb2.GetStockRequest(sku="widget"), timeout=5)
            return b.balance, b.held, s.sold

        async def finished() -> bool:
            return await state() == (10_000 - 3_000 - 1_500, 0, 3)

        assert await wait_until(finished, timeout_s=30), await state()

    async with grpc.aio.secure_channel(d.coordinator_address, tls) as c:  # the operator's certificate
        health = await health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health: any certificate of the CA
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await transactions_pb2_grpc.TransactionsStub(c).Execute(
                transactions_pb2.ExecuteRequest(txn_id="by-operator"), timeout=5
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED  # Execute: only "checkout"


def test_the_coordinator_service_dials_participants_by_identity(tmp_path: Path, pg_killable: PostgresServer) -> None:
    """Under TLS the coordinator service dials each configured participant bound to its
    `identity`: an impostor holding the wallet's certificate from the same CA on the
    orders' address gets no Prepare, and the purchase aborts naming the TLS failure."""
    d = Deployment(tmp_path, pg_killable)
    fake = ServiceProcess(
        "tests.apps.impostor",
        ["--tls-dir", str(d.dir / "certs" / "wallet")],
        log_path=tmp_path / "impostor.log",
        port=d.ports["orders"],
    )
    try:
        d.wallet.start()
        fake.start()
        d.coordinator.start()
        env = {**os.environ, **d.env, "WALLET": d.wallet.address, "ORDERS": fake.address}
        seeding = [sys.executable, str(d.dir / "seed.py"), "alice", "10000", "widget", "10", "1500"]
        subprocess.run(seeding, env=env, capture_output=True, check=False)  # the wallet part is all it can do
        out = d.script("checkout.py", "order-x", "alice", "widget", "1", "1500")
        assert out[1].startswith("aborted orders:") and "TLS" in out[1], out  # the wallet voted yes
        assert '"served"' not in (tmp_path / "impostor.log").read_text()  # no Prepare reached it
    finally:
        fake.stop()
        d.stop()
