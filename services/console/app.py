"""The console's web server: aiohttp, static files, and a server-sent event stream.

It talks to the services like any client (gRPC), reads their stores read-only for
what is in doubt, and follows the observer events each service appends to its
events file (`--events-file`), so the page shows the protocol as the library
reports it, across crashes and restarts. In demo mode it can also inject faults:
pause a service, kill one after its yes vote, crash the shop right after it logged
COMMIT; a supervisor restarts what crashed so recovery can be watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from services.cluster import Cluster
from services.shop.v1 import shop_pb2
from twopc.dev.testing import ServiceProcess, query

STATIC = Path(__file__).parent / "static"
HISTORY = 2_000  # events replayed to a new page; the page keeps a bounded list too
OUTCOMES = {shop_pb2.OUTCOME_COMMITTED: "COMMITTED", shop_pb2.OUTCOME_ABORTED: "ABORTED"}
FAULTS = {
    "pause": "pause the service (SIGSTOP) past the deadline, then resume it",
    "kill-after-vote": "kill the service when the next Commit arrives (after its yes vote); it is restarted",
    "crash-after-commit-logged": "crash the shop right after it logs COMMIT; it is restarted",
    "drop-next-reply": "lose the next reply a participant sends the shop (the request was served)",
}


@dataclass(frozen=True)
class Catalogue:
    """What the console shows and sells."""

    accounts: tuple[str, ...]
    skus: tuple[str, ...]


class Console:
    """The state behind the page: a cluster, its event feed and its fault controls.

    Args:
        cluster: the running services.
        catalogue: the buyers and products to show.
        demo: whether fault controls are offered.
    """

    def __init__(self, cluster: Cluster, catalogue: Catalogue, *, demo: bool) -> None:
        self.cluster = cluster
        self.catalogue = catalogue
        self.demo = demo
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._orders = itertools.count(1)
        self._supervised: dict[str, ServiceProcess] = {}

    def processes(self) -> dict[str, ServiceProcess]:
        c = self.cluster
        return {"wallet": c.wallet, "orders": c.orders, "shop": c.shop}

    # --- events ------------------------------------------------------------------

    def start(self) -> None:
        for name, path in self.cluster.events_path.items():
            self._spawn(self._follow(name, path))
        self._spawn(self._supervise())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def publish(self, event: dict[str, Any]) -> None:
        self.history.append(event)
        for queue in self._subscribers:
            if queue.qsize() < HISTORY:  # a stalled page loses events, never the server's memory
                queue.put_nowait(event)

    async def _follow(self, source: str, path: Path) -> None:
        """Tails one service's events file (it survives the service's restarts)."""
        offset = 0
        partial = b""
        while True:
            with contextlib.suppress(FileNotFoundError):
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    if line.strip():
                        self.publish({"source": source, **json.loads(line)})
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for event in self.history:
            queue.put_nowait(event)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def note(self, kind: str, service: str, detail: str = "") -> None:
        """A console event: a fault injected, a service down or restarted."""
        self.publish({"source": "console", "kind": kind, "service": service, "reason": detail, "at": time.time()})

    # --- what the page shows -----------------------------------------------------

    async def state(self) -> dict[str, Any]:
        c = self.cluster
        buyers, products = [], []
        for account in self.catalogue.accounts:
            try:
                b = await c.balance(account)
                buyers.append({"account": account, "balance": b.balance, "held": b.held, "available": b.available})
            except grpc.aio.AioRpcError as e:
                buyers.append({"account": account, "error": e.code().name})
        for sku in self.catalogue.skus:
            try:
                s = await c.stock(sku)
                products.append(
                    {"sku": sku, "on_hand": s.on_hand, "reserved": s.reserved, "price": s.unit_price, "sold": s.sold}
                )
            except grpc.aio.AioRpcError as e:
                products.append({"sku": sku, "error": e.code().name})
        in_doubt = {
            name: [
                {"txn_id": t, "age_s": round(time.time() - at, 1)} for t, at in await asyncio.to_thread(_prepared, db)
            ]
            for name, db in (("wallet", c.wallet_db), ("orders", c.orders_db))
        }
        services = {name: {"address": p.address, "running": p.running} for name, p in self.processes().items()}
        return {"buyers": buyers, "products": products, "in_doubt": in_doubt, "services": services, "demo": self.demo}

    async def purchase(self, account: str, items: dict[str, int]) -> dict[str, Any]:
        order_id = f"web-{int(time.time())}-{next(self._orders)}"
        try:
            r = await self.cluster.purchase(order_id, account, items)
        except grpc.aio.AioRpcError as e:
            return {"order_id": order_id, "outcome": "NO ANSWER", "reason": f"{e.code().name}: {e.details()}"}
        return {
            "order_id": order_id,
            "txn_id": r.txn_id,
            "outcome": OUTCOMES.get(r.outcome, "UNKNOWN"),
            "reason": r.reason,
            "amount": r.amount,
            "branches": [{"name": b.name, "vote": b.vote or "no vote", "reason": b.reason} for b in r.branches],
        }

    def invariants(self) -> dict[str, Any]:
        report = self.cluster.check(quiescent=True)
        return {
            "ok": report.ok,
            "money": f"deposited {report.deposited} = balances {report.balances} + spent {report.spent}",
            "stock": f"received {report.received} = on hand {report.on_hand} + sold {report.sold}",
            "committed": report.committed,
            "in_doubt": report.in_doubt,
            "violations": report.violations,
            "heuristic": report.heuristic,
        }

    # --- faults (demo mode only) -------------------------------------------------

    async def fault(self, kind: str, service: str) -> str:
        procs = self.processes()
        if kind not in FAULTS or service not in procs:
            raise web.HTTPBadRequest(text=f"unknown fault {kind!r} or service {service!r}")
        proc = procs[service]
        if kind == "drop-next-reply":
            if service != "shop":
                raise web.HTTPBadRequest(text="replies are dropped on their way to the shop")
            proc.signal(signal.SIGUSR1)
            self.note("armed", service, "the next reply from a participant is lost")
            return "the shop will lose the next reply it gets"
        if kind == "pause":
            proc.pause()
            self.note("paused", service, "SIGSTOP: it answers nothing until resumed")
            self._spawn(self._resume_later(service, proc, self.cluster.settings.prepare_timeout_s + 1.0))
            return f"{service} paused for {self.cluster.settings.prepare_timeout_s + 1.0:.0f} s"
        if kind == "crash-after-commit-logged":
            if service != "shop":
                raise web.HTTPBadRequest(text="only the shop (the coordinator) logs COMMIT")
            point = "coordinator.after_commit_logged"
        else:  # kill-after-vote
            if service == "shop":
                raise web.HTTPBadRequest(text="the shop does not vote; pick wallet or orders")
            point = "participant.before_commit"
        await asyncio.to_thread(proc.restart, env={"TWOPC_CRASH_AT": point})
        self._supervised[service] = proc
        self.note("armed", service, f"{point}: the next transaction kills it there")
        return f"{service} armed: it dies at {point}"

    async def _resume_later(self, service: str, proc: ServiceProcess, after_s: float) -> None:
        await asyncio.sleep(after_s)
        proc.resume()
        self.note("resumed", service)

    async def _supervise(self) -> None:
        """Restarts an armed service once it has died (without the crash point)."""
        while True:
            await asyncio.sleep(0.2)
            for service, proc in list(self._supervised.items()):
                if proc.running:
                    continue
                del self._supervised[service]
                self.note("crashed", service, "SIGKILL at its crash point")
                await asyncio.sleep(1.0)  # long enough to see the transaction stuck
                await asyncio.to_thread(proc.restart, env={"TWOPC_CRASH_AT": ""})
                self.note("restarted", service, "same port, same files: recovery runs")


def _prepared(db: Path | str) -> list[tuple[str, float]]:
    return [(t, at) for t, at in query(db, "SELECT txn_id, prepared_at FROM twopc_txn WHERE state = 'PREPARED'")]


SESSIONS = 100
"""Session tokens kept at once (the oldest is forgotten first)."""
TOKEN_HEADER = "X-Console-Token"


class Guard:
    """What keeps other web pages out of the console (it can pause services, crash
    them and spend buyers' money in demo mode):

    * the Host header must be the console's own address, on every request, so a
      rebound DNS name cannot read `/api/state` or arm a crash;
    * a POST must be `application/json` (a form or `text/plain`, which any page can
      send without asking, is refused: 415), come from the console's own Origin,
      and carry a session token in `X-Console-Token`, which only the console's page
      can read (from `/api/catalogue`, same origin).

    Refusals are 403 (415 for the content type) and change nothing.
    """

    def __init__(self) -> None:
        self.hosts: frozenset[str] = frozenset()
        self.tokens: deque[str] = deque(maxlen=SESSIONS)

    def serve_at(self, host: str, port: int) -> None:
        """The address the console serves at (known once bound)."""
        names = {host, *(("localhost", "127.0.0.1") if host in ("localhost", "127.0.0.1") else ())}
        self.hosts = frozenset(f"{name}:{port}" for name in names)

    def new_session(self) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens.append(token)
        return token

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.host not in self.hosts:
            raise web.HTTPForbidden(text="this console answers only at its own address (Host)")
        if request.method not in ("GET", "HEAD"):
            if request.content_type != "application/json":
                raise web.HTTPUnsupportedMediaType(text="POST bodies are application/json only")
            if request.headers.get("Origin", "") not in {f"http://{h}" for h in self.hosts}:
                raise web.HTTPForbidden(text="cross-origin requests are refused (Origin)")
            token = request.headers.get(TOKEN_HEADER, "")
            if not token or not any(secrets.compare_digest(token, t) for t in self.tokens):
                raise web.HTTPForbidden(text=f"a session token is required ({TOKEN_HEADER})")
        response: web.StreamResponse = await handler(request)
        return response


def make_app(console: Console, guard: Guard) -> web.Application:
    """The console's routes, behind `guard`."""
    app = web.Application(middlewares=[guard.middleware])
    routes = web.RouteTableDef()

    @routes.get("/")
    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    @routes.get("/api/state")
    async def state(request: web.Request) -> web.Response:
        return web.json_response(await console.state())

    @routes.get("/api/catalogue")
    async def catalogue(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "accounts": console.catalogue.accounts,
                "skus": console.catalogue.skus,
                "demo": console.demo,
                "faults": FAULTS if console.demo else {},
                "token": guard.new_session(),  # readable by the console's own page only (same origin)
            }
        )

    @routes.post("/api/purchase")
    async def purchase(request: web.Request) -> web.Response:
        body = await request.json()
        account = str(body.get("account", ""))
        items = {str(k): int(v) for k, v in dict(body.get("items", {})).items() if int(v) > 0}
        if account not in console.catalogue.accounts or not items:
            raise web.HTTPBadRequest(text="choose a buyer and at least one item")
        return web.json_response(await console.purchase(account, items))

    @routes.post("/api/invariants")
    async def invariants(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(console.invariants))

    @routes.post("/api/fault")
    async def fault(request: web.Request) -> web.Response:
        if not console.demo:
            raise web.HTTPForbidden(text="fault controls exist only in demo mode (--demo)")
        body = await request.json()
        return web.json_response({"done": await console.fault(str(body.get("kind")), str(body.get("service")))})

    @routes.get("/api/events")
    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async with console.subscribe() as queue:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15.0)
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                except (ConnectionResetError, asyncio.CancelledError):
                    break
        return response

    app.add_routes(routes)
    app.router.add_static("/static/", STATIC)
    return app
