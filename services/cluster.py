"""The demo's three services as real processes, with clients for each.

`Cluster` starts wallet, orders and shop as separate processes on free loopback
ports, each with its own SQLite file and log file in one working directory, and
gives the demo, the tests and chaos runs one place to buy, seed, look, crash and
restart. With a PostgreSQL decision log it runs several shops on it (coordinator
instances that take each other's work over), each told of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from services import invariants
from services.order.v1 import order_pb2, order_pb2_grpc
from services.shop.v1 import shop_pb2, shop_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc import Credentials, rpc
from twopc.dev.netns import Host as Host  # re-exported: where a service runs
from twopc.dev.pgserver import PostgresServer
from twopc.dev.testing import ServiceProcess, TcpProxy, free_port, wait_until
from twopc.security import pki

RPC_TIMEOUT_S = 5.0
SERVICES = ("wallet", "orders", "shop")
OPERATOR = "operator"
"""The identity of the cluster's own client that seeds (an operator) and reads."""
CLIENT = "client"
"""The identity the cluster buys as: it owns every account `open_account` opens."""


@dataclass(frozen=True)
class Settings:
    """Timing of the demo cluster: short, so failures resolve while you watch."""

    prepare_timeout_s: float = 2.0
    in_doubt_after_s: float = 1.0
    resolve_interval_s: float = 0.3
    log_level: str = "info"


class Cluster:
    """wallet + orders + shop, each its own process, in `workdir`.

    Args:
        workdir: where the SQLite files and log files go.
        settings: timing.
        hosts: per service name ("wallet", "orders", "shop", "shop1"...), where it
            runs.
        shop_args: extra flags for the shop (e.g. `--net-faults`).
        wallet_module: the wallet's module (tests swap in a deliberately broken one).
        metrics: serve Prometheus /metrics from each service, at `metrics_address[name]`.
        events: each service appends its observer events as JSON lines to
            `events_path[name]` (what the web console shows).
        traces: each service writes its OpenTelemetry spans as JSON lines to
            `trace_path[name]`.
        tls: mutual TLS everywhere, with a throwaway CA made in `workdir`/pki: the
            services are "wallet", "orders" and "shop" (each trusted under its
            name at its address), this client seeds and reads as "operator" and
            buys as "client" (the owner of the accounts it opens, the shop's only
            purchaser). Otherwise plaintext (`--insecure`).
        identities: more client identities to issue certificates for (tests).
        log_url: a postgresql:// decision log for the shops instead of a file.
        shops: how many shops (coordinator instances) share `log_url`; `shop` is
            the first, `shops` all of them ("shop", "shop1", "shop2"...). The
            participants trust every shop's address.
        stores: per participant ("wallet", "orders"), a PostgreSQL URL to keep its
            data in instead of a SQLite file in `workdir` (see `postgres_stores`).
        proxied: participants ("wallet", "orders") the shops reach through a
            `TcpProxy` of this process (`proxies[name]`), which a caller cuts to
            part them from the shops alone (they still reach the shops).
    """

    def __init__(
        self,
        workdir: Path,
        settings: Settings | None = None,
        *,
        hosts: Mapping[str, Host] | None = None,
        shop_args: Sequence[str] = (),
        wallet_module: str = "services.wallet",
        metrics: bool = False,
        events: bool = False,
        traces: bool = False,
        tls: bool = False,
        identities: Sequence[str] = (),
        log_url: str = "",
        shops: int = 1,
        stores: Mapping[str, str] | None = None,
        proxied: Sequence[str] = (),
    ) -> None:
        if shops > 1 and not log_url:
            raise ValueError("several shops need a shared log: give log_url")
        self.workdir = workdir
        self.settings = s = settings or Settings()
        workdir.mkdir(parents=True, exist_ok=True)
        stores = stores or {}
        self.wallet_db, self.orders_db = (stores.get(n) or workdir / f"{n}.db" for n in ("wallet", "orders"))
        self.shop_db = workdir / "shop.db"
        hosts = hosts or {}
        self.metrics_address: dict[str, str] = {}
        self.events_path: dict[str, Path] = {}
        self.trace_path: dict[str, Path] = {}
        self.pki = workdir / "pki"
        if tls:
            addresses = {h.address for h in hosts.values()}
            pki.issue(
                self.pki, [*SERVICES, OPERATOR, CLIENT, *identities], hosts=sorted({*pki.DEFAULT_HOSTS, *addresses})
            )
        self.credentials = Credentials.from_dir(self.pki / OPERATOR) if tls else Credentials.insecure()
        self.buyer_credentials = Credentials.from_dir(self.pki / CLIENT) if tls else Credentials.insecure()
        # The participants trust exactly the shops' addresses (and each shop is told
        # the others'): pick their ports now. On a host of its own (a namespace)
        # any fixed port is free; on loopback ask.
        shop_addresses = {
            name: f"{hosts.get(name, Host()).address}:{50050 if hosts.get(name, Host()).wrapper else free_port()}"
            for name in ["shop", *(f"shop{i}" for i in range(1, shops))]
        }
        # Under TLS the participants trust the shop's identity at each address, and
        # let the operator (the console, checks) and the shop (prices, owners) read.
        resolve = [
            *("--in-doubt-after-s", str(s.in_doubt_after_s), "--resolve-interval-s", str(s.resolve_interval_s)),
            *(
                a
                for address in shop_addresses.values()
                for a in ("--trust-coordinator", f"shop@{address}" if tls else address)
            ),
            *("--readers", f"{OPERATOR},shop"),
        ]

        def process(name: str, module: str, args: list[str], port: int = 0) -> ServiceProcess:
            host = hosts.get(name, Host())
            if metrics:
                self.metrics_address[name] = f"127.0.0.1:{free_port()}"
                args += ["--metrics-port", self.metrics_address[name].rsplit(":", 1)[1]]
            if events:
                self.events_path[name] = workdir / f"{name}.events.jsonl"
                args += ["--events-file", str(self.events_path[name])]
            if traces:
                self.trace_path[name] = workdir / f"{name}.spans.jsonl"
                args += ["--trace-file", str(self.trace_path[name])]
            if tls:
                # Every shop is the one service "shop" (one identity, several hosts).
                security = ["--tls-dir", str(self.pki / ("shop" if name.startswith("shop") else name))]
            else:
                security = ["--insecure"]
                if not rpc.is_loopback(f"{host.address}:0"):
                    security.append("--insecure-beyond-loopback")
            return ServiceProcess(
                module,
                [*args, "--log-level", s.log_level, *security],
                log_path=workdir / f"{name}.log",
                host=host.address,
                wrapper=host.wrapper,
                port=port,
            )

        self.wallet = process("wallet", wallet_module, ["--db", str(self.wallet_db), *resolve])
        self.orders = process("orders", "services.order", ["--db", str(self.orders_db), *resolve])
        self.log: Path | str = log_url or self.shop_db
        self.shops = [
            process(
                name,
                "services.shop",
                [
                    "--db",
                    str(self.log),
                    "--prepare-timeout-s",
                    str(s.prepare_timeout_s),
                    *("--purchasers", CLIENT),
                    # Chaos and benchmarks buy as one identity, fast: the limit is tested on its own.
                    *("--purchase-rate-per-s", "0"),
                    *shop_args,
                    *(["--peers", *(a for o, a in shop_addresses.items() if o != name)] if shops > 1 else []),
                ],
                port=int(shop_addresses[name].rsplit(":", 1)[1]),
            )
            for name in shop_addresses
        ]
        self.shop = self.shops[0]
        self._channels: list[grpc.aio.Channel] = []
        self._proxied = tuple(proxied)
        self.proxies: dict[str, TcpProxy] = {}

    def start(self) -> None:
        """Starts the three processes (blocking); `async with` does it for you."""
        if self._proxied:
            raise RuntimeError("proxied participants need `async with`: the proxies run on its event loop")
        self._start_participants()
        self._start_shops()

    def _start_participants(self) -> None:
        try:
            self.wallet.start()
            self.orders.start()
        except BaseException:
            self.stop()
            raise

    def _start_shops(self) -> None:
        dialed = {"wallet": self.wallet.address, "orders": self.orders.address}
        dialed |= {name: f"127.0.0.1:{proxy.port}" for name, proxy in self.proxies.items()}
        try:
            for shop in self.shops:
                shop.args += ["--wallet", dialed["wallet"], "--orders", dialed["orders"]]
                shop.start()
        except BaseException:
            self.stop()
            raise

    async def __aenter__(self) -> Cluster:
        await asyncio.to_thread(self._start_participants)
        try:
            for name in self._proxied:
                host, port = {"wallet": self.wallet, "orders": self.orders}[name].address.rsplit(":", 1)
                self.proxies[name] = await TcpProxy(host, int(port)).start()
        except BaseException:
            self.stop()
            raise
        await asyncio.to_thread(self._start_shops)
        self.wallet_api = wallet_pb2_grpc.WalletStub(self._channel(self.wallet.address))
        self.orders_api = order_pb2_grpc.OrdersStub(self._channel(self.orders.address))
        self.shop_apis = [
            shop_pb2_grpc.ShopStub(self._channel(shop.address, self.buyer_credentials)) for shop in self.shops
        ]
        self.shop_api = self.shop_apis[0]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for ch in self._channels:
            await ch.close(None)
        for proxy in self.proxies.values():
            await proxy.close()
        self.stop()

    def stop(self) -> None:
        """Stops every process (also stopped or crashed ones)."""
        for proc in (*self.shops, self.orders, self.wallet):
            proc.stop()

    def _channel(self, address: str, credentials: Credentials | None = None) -> grpc.aio.Channel:
        ch = rpc.channel(address, credentials or self.credentials)
        self._channels.append(ch)
        return ch

    # --- seeding and looking -----------------------------------------------------

    async def open_account(self, account: str, deposit: int, *, owners: Sequence[str] = (CLIENT,)) -> None:
        """Opens `account` for `owners` (the cluster's buyer by default) and deposits."""
        request = wallet_pb2.OpenAccountRequest(account=account, owners=owners)
        await self.wallet_api.OpenAccount(request, timeout=RPC_TIMEOUT_S)
        await self.deposit(account, deposit)

    async def deposit(self, account: str, amount: int) -> None:
        await self.wallet_api.Deposit(wallet_pb2.DepositRequest(account=account, amount=amount), timeout=RPC_TIMEOUT_S)

    async def add_stock(self, sku: str, quantity: int, unit_price: int) -> None:
        request = order_pb2.AddStockRequest(sku=sku, quantity=quantity, unit_price=unit_price)
        await self.orders_api.AddStock(request, timeout=RPC_TIMEOUT_S)

    async def balance(self, account: str) -> wallet_pb2.Balance:
        return await self.wallet_api.GetBalance(wallet_pb2.GetBalanceRequest(account=account), timeout=RPC_TIMEOUT_S)

    async def stock(self, sku: str) -> order_pb2.Stock:
        return await self.orders_api.GetStock(order_pb2.GetStockRequest(sku=sku), timeout=RPC_TIMEOUT_S)

    async def order_state(self, order_id: str) -> str:
        """ "pending", "confirmed", "cancelled" or "absent"."""
        try:
            order = await self.orders_api.GetOrder(order_pb2.GetOrderRequest(order_id=order_id), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND:
                return "absent"
            raise
        return order_pb2.OrderState.Name(order.state).removeprefix("ORDER_STATE_").lower()

    async def purchase(
        self, order_id: str, account: str, items: Mapping[str, int], *, timeout_s: float = 0.0, shop: int = 0
    ) -> shop_pb2.PurchaseResponse:
        """Buys `items` ({sku: quantity}) through the shop (`shop`: which of
        several); raises the RPC error if the shop gives no answer (e.g. it
        crashed)."""
        request = shop_pb2.PurchaseRequest(
            order_id=order_id,
            account=account,
            items=[order_pb2.Item(sku=s, quantity=q) for s, q in items.items()],
            timeout_s=timeout_s,
        )
        api = self.shop_apis[shop % len(self.shop_apis)]
        return await api.Purchase(request, timeout=RPC_TIMEOUT_S + timeout_s + 10.0)

    def check(self, *, quiescent: bool = True) -> invariants.Report:
        """The invariants of docs/design.md over both services' stores and the shop's log."""
        return invariants.check(self.wallet_db, self.orders_db, self.log, quiescent=quiescent)

    async def settled(self, timeout_s: float = 20.0) -> invariants.Report:
        """Waits (bounded) until nothing is in doubt, then returns the full check."""
        report = self.check()

        def ok() -> bool:
            nonlocal report
            report = self.check()
            return report.ok

        await wait_until(ok, timeout_s, interval_s=0.1)
        return report


@contextlib.contextmanager
def postgres_stores(
    workdir: Path, names: Sequence[str] = ("wallet", "orders"), *, address: str = "127.0.0.1"
) -> Iterator[tuple[PostgresServer, dict[str, str]]]:
    """A private PostgreSQL server (its log in `workdir`) with one schema per
    participant; yields the server and each participant's URL. `address` is where
    the services reach it (a bridge's address when they run in network namespaces);
    the server also listens on loopback."""
    listen = ["127.0.0.1"] + ([address] if address != "127.0.0.1" else [])  # loopback first: its URLs
    trust = [f"{address.rsplit('.', 1)[0]}.0/24"] if address != "127.0.0.1" else []
    workdir.mkdir(parents=True, exist_ok=True)
    with PostgresServer(listen=listen, trust=trust, log_path=workdir / "postgres.log") as server:
        for name in names:
            server.execute(f'CREATE SCHEMA "{name}"')
        urls = {n: server.url_of("postgres", search_path=n).replace("127.0.0.1", address, 1) for n in names}
        yield server, urls
