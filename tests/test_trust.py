"""A participant asks only coordinators it trusts, and no coordinator delays another.

The attacks of issue 12, replayed: a Prepare naming a fake coordinator whose
GetOutcome answers COMMITTED, a Prepare naming nobody, thousands of undecided
Prepares holding a victim's money, and coordinators that accept TCP and never
answer, in front of a legitimate in-doubt transaction.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.apps.kv import KV
from tests.conftest import INSECURE, Served, eventually, listening, prepare_request, serve, txn_state
from twopc import Credentials, Participant, ParticipantConfig, rpc
from twopc.dev.testing import ServiceProcess, free_port, query
from twopc.participant import trust
from twopc.security import pki
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A GetOutcome that answers COMMITTED to everything, and counts who asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def GetOutcome(  # noqa: N802 - the RPC's name
        self, request: coordinator_pb2.GetOutcomeRequest, context: Any
    ) -> coordinator_pb2.GetOutcomeResponse:
        self.asked.append(request.txn_id)
        return coordinator_pb2.GetOutcomeResponse(outcome=coordinator_pb2.OUTCOME_COMMITTED)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeCoordinator, str]]:
    servicer = FakeCoordinator()
    async with listening(lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)) as at:
        yield servicer, at


TRUSTED = "127.0.0.1:1"  # the only coordinator the wallet below trusts (nobody listens there)


@pytest.fixture
def wallet(tmp_path: Path) -> Iterator[ServiceProcess]:
    args = ["--db", str(tmp_path / "w.db"), "--insecure", "--trust-coordinator", TRUSTED]
    args += ["--in-doubt-after-s", "0.1", "--resolve-interval-s", "0.1", "--max-undecided-per-coordinator", "3"]
    proc = ServiceProcess("services.wallet", args, log_path=tmp_path / "w.log").start()
    yield proc
    proc.stop()


async def seeded(proc: ServiceProcess) -> tuple[grpc.aio.Channel, participant_pb2_grpc.ParticipantAsyncStub]:
    ch = rpc.channel(proc.address, INSECURE)
    api = wallet_pb2_grpc.WalletStub(ch)
    await api.OpenAccount(wallet_pb2.OpenAccountRequest(account="victim"), timeout=5)
    await api.Deposit(wallet_pb2.DepositRequest(account="victim", amount=1_000), timeout=5)
    return ch, participant_pb2_grpc.ParticipantStub(ch)


def debit(txn_id: str, coordinator: str, amount: int = 100) -> participant_pb2.PrepareRequest:
    op = any_pb2.Any()
    op.Pack(wallet_pb2.Debit(account="victim", amount=amount))
    return participant_pb2.PrepareRequest(txn_id=txn_id, operation=op, coordinator=coordinator)


async def status(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_a_prepare_naming_a_fake_coordinator_is_refused(
    tmp_path: Path, wallet: ServiceProcess, fake: tuple[FakeCoordinator, str]
) -> None:
    """The fake-coordinator attack fails: PERMISSION_DENIED, nothing held, nothing ever asks it."""
    servicer, address = fake
    ch, stub = await seeded(wallet)
    async with ch:
        assert await status(stub.Prepare(debit("evil", address), timeout=5)) is grpc.StatusCode.PERMISSION_DENIED
        assert await status(stub.Prepare(debit("nobody", ""), timeout=5)) is grpc.StatusCode.INVALID_ARGUMENT
        assert query(tmp_path / "w.db", "SELECT count(*) FROM holds") == [(0,)]
        assert txn_state(tmp_path / "w.db", "evil") is None and txn_state(tmp_path / "w.db", "nobody") is None
        balance = await wallet_pb2_grpc.WalletStub(ch).GetBalance(
            wallet_pb2.GetBalanceRequest(account="victim"), timeout=5
        )
    assert (balance.balance, balance.held) == (1_000, 0)
    assert servicer.asked == []
    assert "prepare_refused_coordinator" in (tmp_path / "w.log").read_text()


async def test_undecided_prepares_per_coordinator_are_capped(tmp_path: Path, wallet: ServiceProcess) -> None:
    """Past the cap a Prepare is RESOURCE_EXHAUSTED and holds nothing; a decision frees a place."""
    ch, stub = await seeded(wallet)
    async with ch:
        for i in range(3):
            assert (await stub.Prepare(debit(f"t{i}", TRUSTED), timeout=5)).vote == participant_pb2.VOTE_COMMIT
        assert await status(stub.Prepare(debit("t3", TRUSTED), timeout=5)) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await stub.Prepare(debit("t0", TRUSTED), timeout=5)).vote == participant_pb2.VOTE_COMMIT  # a repeat
        assert query(tmp_path / "w.db", "SELECT count(*) FROM holds") == [(3,)]
        await stub.Abort(participant_pb2.AbortRequest(txn_id="t0"), timeout=5)
        assert (await stub.Prepare(debit("t3", TRUSTED), timeout=5)).vote == participant_pb2.VOTE_COMMIT


def test_the_caller_s_own_name_is_a_trusted_coordinator() -> None:
    """Under mutual TLS with no coordinator configured, a coordinator may name itself;
    no one else, and no one without a name. A configured list is the whole list: the
    caller's own name outside it is refused."""
    trust.admit(ParticipantConfig(trusted_coordinators=frozenset()), "shop:7000", False, ["shop"])
    config = ParticipantConfig(trusted_coordinators=frozenset({"10.0.0.1:7000"}))
    trust.admit(config, "10.0.0.1:7000", False, [])
    with pytest.raises(trust.Refused, match="does not trust"):
        trust.admit(config, "shop:7000", False, ["shop"])
    trust.admit(config, "", True, [])  # one-phase: decided at once, nobody to ask
    with pytest.raises(trust.Refused, match="does not trust"):
        trust.admit(config, "evil:7000", False, ["shop"])
    with pytest.raises(trust.Refused, match="needs a coordinator"):
        trust.admit(config, "", False, ["shop"])
    with pytest.raises(trust.Refused, match="longer than 255"):
        trust.admit(config, "x" * 10_000, False, ["shop"])
    with pytest.raises(trust.Refused, match="host:port"):
        trust.admit(config, "no port\n", False, ["shop"])


def test_admitted_coordinators_are_bound_to_an_identity() -> None:
    """What the resolver will ask: the configured name at the address, else the caller's own
    name; an address alone only under plaintext; a malformed trusted entry is refused."""
    named = ParticipantConfig(trusted_coordinators=frozenset({"shop@10.0.0.1:7000", "10.0.0.2:7000"}))
    assert trust.admit(named, "10.0.0.1:7000", False, ["orders"]) == "shop@10.0.0.1:7000"
    assert trust.admit(named, "10.0.0.2:7000", False, ["backup"]) == "backup@10.0.0.2:7000"
    assert trust.admit(named, "10.0.0.2:7000", False, []) == "10.0.0.2:7000"  # plaintext: no names
    with pytest.raises(trust.Refused, match="does not trust"):
        trust.admit(named, "10.0.0.3:7000", False, ["shop"])
    unlisted = ParticipantConfig(trusted_coordinators=frozenset())  # the TLS default
    assert trust.admit(unlisted, "10.0.0.9:7000", False, ["shop"]) == "shop@10.0.0.9:7000"
    with pytest.raises(trust.Refused, match="does not trust"):
        trust.admit(unlisted, "10.0.0.9:7000", False, [])
    assert trust.admit(ParticipantConfig(), "10.0.0.9:7000", False, []) == "10.0.0.9:7000"
    for bad in ("shop@", "@10.0.0.1:7000", "sh op@10.0.0.1:7000", "shop@nowhere"):
        with pytest.raises(ValueError, match="trusted coordinator"):
            ParticipantConfig(trusted_coordinators=frozenset({bad}))


async def test_a_dead_coordinator_is_asked_less_often_and_a_live_one_every_round() -> None:
    """Per-coordinator backoff: a coordinator that did not answer is skipped until its delay passes."""
    outreach = trust.Outreach(ParticipantConfig(resolve_interval_s=60.0))
    asked: list[str] = []

    async def ask(coordinator: str, txn_ids: list[str]) -> tuple[int, bool]:
        asked.append(coordinator)
        return (len(txn_ids), True) if coordinator == "live:1" else (0, False)

    in_doubt = [("a", "dead:1"), ("b", "live:1"), ("c", "dead:1")]
    assert await outreach.ask(in_doubt, ask) == 1
    assert await outreach.ask(in_doubt, ask) == 1
    assert asked == ["dead:1", "live:1", "live:1"]
    assert outreach.backoff() == {"dead:1": 60.0}


async def test_blackhole_coordinators_do_not_delay_a_legitimate_resolution(
    tmp_path: Path, fake: tuple[FakeCoordinator, str]
) -> None:
    """20 coordinators that accept TCP and never answer: the legitimate in-doubt transaction is
    still resolved within a few GetOutcome timeouts, not after all 20 (40 s one at a time)."""
    servicer, legit = fake
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # accept, read nothing, answer nothing

    holes = [await asyncio.start_server(hold, "127.0.0.1", 0) for _ in range(20)]
    config = ParticipantConfig(in_doubt_after_s=0.05, resolve_interval_s=0.1, rpc_timeout_s=2.0)
    db = tmp_path / "kv.db"
    try:
        async with serve(Participant(KV(), str(db), credentials=INSECURE, config=config), str(db), Served) as local:
            for i, hole in enumerate(holes):
                request = prepare_request(f"hole{i}")
                request.coordinator = f"127.0.0.1:{hole.sockets[0].getsockname()[1]}"
                await local.stub.Prepare(request, timeout=5)
            request = prepare_request("legit")
            request.coordinator = legit
            await local.stub.Prepare(request, timeout=5)
            started = time.monotonic()
            await eventually(lambda: txn_state(db, "legit") == "COMMITTED", 10.0, "the legitimate resolution")
            assert time.monotonic() - started < 10.0
            assert all(txn_state(db, f"hole{i}") == "PREPARED" for i in range(20))
    finally:
        for hole in holes:
            hole.close()
        for w in silent:
            w.close()
    assert servicer.asked.count("legit") >= 1


async def test_under_tls_the_default_trusts_only_the_caller_s_own_name(tmp_path: Path) -> None:
    """A participant with TLS credentials and no trusted addresses trusts no address by default."""
    pytest.importorskip("cryptography", reason="needs the cryptography package (pip install twopc[tls])")
    root = pki.issue(tmp_path / "pki", ["kv"])
    tls = Participant(KV(), str(tmp_path / "a.db"), credentials=Credentials.from_dir(root / "kv"))
    plain = Participant(KV(), str(tmp_path / "b.db"), credentials=INSECURE)
    assert tls.config.trusted_coordinators == frozenset()
    assert plain.config.trusted_coordinators is None


# --- trust by identity: an impostor holding another certificate from the CA ----------------


def events(log: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log events named `event` in a process's log file."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == event]


def impostor(root: Path, identity: str, port: int, log: Path) -> ServiceProcess:
    """tests/apps/impostor.py holding `identity`'s certificate, on `port`."""
    return ServiceProcess("tests.apps.impostor", ["--tls-dir", str(root / identity)], log_path=log, port=port).start()


@pytest.fixture
def tls_pki(tmp_path: Path) -> Path:
    pytest.importorskip("cryptography", reason="needs the cryptography package (pip install twopc[tls])")
    return pki.issue(tmp_path / "pki", ["shop", "wallet", "orders", "operator", "client"])


async def test_an_impostor_on_the_coordinator_s_address_is_not_believed(tmp_path: Path, tls_pki: Path) -> None:
    """The shop is down and `client`, then `wallet` (valid certificates from the same CA) answer
    COMMITTED on its address: the wallet's resolver refuses both in the handshake and keeps the
    hold; only a server holding the `shop` certificate there is believed."""
    shop_port = free_port()
    trusted = f"shop@127.0.0.1:{shop_port}"
    wallet_log = tmp_path / "wallet.log"
    args = ["--db", str(tmp_path / "w.db"), "--tls-dir", str(tls_pki / "wallet"), "--trust-coordinator", trusted]
    args += ["--in-doubt-after-s", "0.1", "--resolve-interval-s", "0.1", "--resolve-backoff-max-s", "0.5"]
    args += ["--readers", "operator"]
    wallet = ServiceProcess("services.wallet", args, log_path=wallet_log).start()
    try:
        async with (
            rpc.channel(f"wallet@{wallet.address}", Credentials.from_dir(tls_pki / "operator")) as operator,
            rpc.channel(f"wallet@{wallet.address}", Credentials.from_dir(tls_pki / "shop")) as shop,
        ):
            api = wallet_pb2_grpc.WalletStub(operator)
            await api.OpenAccount(wallet_pb2.OpenAccountRequest(account="victim"), timeout=5)
            await api.Deposit(wallet_pb2.DepositRequest(account="victim", amount=1_000), timeout=5)
            prepare = debit("t1", f"127.0.0.1:{shop_port}")
            vote = await participant_pb2_grpc.ParticipantStub(shop).Prepare(prepare, timeout=5)
            assert vote.vote == participant_pb2.VOTE_COMMIT
            why = {"client": "not for server use", "wallet": "not for the name expected"}
            for who, meaning in why.items():
                log = tmp_path / f"impostor-{who}.log"
                fake = impostor(tls_pki, who, shop_port, log)
                refused = len(events(wallet_log, "tls_failed")) + 2
                try:
                    await eventually(
                        lambda: len(events(wallet_log, "tls_failed")) >= refused,  # noqa: B023 - awaited here
                        30.0,
                        "two refusals",
                    )
                finally:
                    fake.stop()
                assert events(log, "served") == [], f"the wallet believed {who}"
                assert txn_state(tmp_path / "w.db", "t1") == "PREPARED"
                failed = events(wallet_log, "tls_failed")[-1]
                assert failed["target"] == trusted and meaning in failed["meaning"]
            balance = await api.GetBalance(wallet_pb2.GetBalanceRequest(account="victim"), timeout=5)
            assert (balance.balance, balance.held) == (1_000, 100)
            genuine = impostor(tls_pki, "shop", shop_port, tmp_path / "shop.log")  # the real identity
            try:
                await eventually(lambda: txn_state(tmp_path / "w.db", "t1") == "COMMITTED", 30.0, "the shop believed")
            finally:
                genuine.stop()
    finally:
        wallet.stop()


def read_line(proc: ServiceProcess, timeout_s: float) -> str:
    """The next line a process prints on standard output (after READY)."""
    assert proc.proc is not None and proc.proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.proc.stdout], [], [], left)[0], "no line in time"
        chunk = os.read(proc.proc.stdout.fileno(), 1)
        assert chunk, "the process exited"
        line += chunk
    return line.decode()


@pytest.mark.parametrize("who", ["client", "orders"])
async def test_an_impostor_on_a_participant_s_address_gets_no_prepare(tmp_path: Path, tls_pki: Path, who: str) -> None:
    """A coordinator whose branch is `wallet@address` refuses an impostor there holding another
    identity's valid certificate: the handshake fails, no Prepare reaches it, the transaction
    aborts and says the TLS check failed; a server holding `wallet` gets the Prepare."""
    port = free_port()
    outcomes = {}
    for holder in (who, "wallet"):
        log = tmp_path / f"participant-{holder}.log"
        fake = impostor(tls_pki, holder, port, log)
        # A second branch, genuinely "orders", keeps the transaction two-phase.
        orders = impostor(tls_pki, "orders", 0, tmp_path / f"orders-{holder}.log")
        coordinator = ServiceProcess(
            "tests.apps.coordinator",
            [
                *("--db", str(tmp_path / f"{holder}.db"), "--tls-dir", str(tls_pki / "shop"), "--timeout-s", "2"),
                *("--run", f"k0=wallet@127.0.0.1:{port}", f"k1=orders@{orders.address}"),
            ],
            log_path=tmp_path / f"coordinator-{holder}.log",
        ).start()
        try:
            outcomes[holder] = json.loads(read_line(coordinator, 20.0))
        finally:
            coordinator.stop()
            orders.stop()
            fake.stop()
        served = events(log, "served")
        assert (served != []) is (holder == "wallet"), f"{holder} served {served}"
    assert outcomes[who]["outcome"] == "aborted"
    meaning = {"client": "not for server use", "orders": "not for the name expected"}[who]
    assert "TLS with wallet@" in outcomes[who]["reason"] and meaning in outcomes[who]["reason"]
    assert events(tmp_path / f"coordinator-{who}.log", "tls_failed")
    assert outcomes["wallet"]["outcome"] == "committed"
