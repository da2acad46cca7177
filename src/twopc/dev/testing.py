"""Helpers for tests, the demo, chaos runs and benchmarks: real processes, real faults.

`ServiceProcess` runs a service as a real child process (the way it runs in
production), waits for it to announce its port, and lets a test crash it (SIGKILL),
stall it (SIGSTOP/SIGCONT) and restart it on the same port with the same files.

`FaultInjector` is a gRPC client interceptor that loses, delays and duplicates
messages at chosen probabilities, for chaos runs.

`TcpProxy` relays TCP to a server and cuts the path (a partition) on demand.

`snapshot` and `query` read a service's store (a SQLite file or a PostgreSQL
database) the way an auditor in another process would; `wait_until` polls a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

# Re-exported: tests, the demo and chaos read stores through twopc.dev.testing.
from twopc.stores.base import query as query
from twopc.stores.base import snapshot as snapshot


class ServiceProcess:
    """A service in its own process, started with `python -m <module> <args>`.

    The service must bind the port given by `--port` (0 for any) and print
    `READY host:port` on standard output when it serves (`rpc.serve_until_signalled`
    does). Standard error (its logs) goes to `log_path`.

    Args:
        module: the module to run, e.g. "services.wallet".
        args: its arguments, without `--port`.
        log_path: file that collects the process's logs (appended across restarts).
        env: extra environment, e.g. {"TWOPC_CRASH_AT": "..."}.
        port: the port to bind; 0 picks one, kept for restarts.
        host: the address to bind and to reach it at.
        wrapper: a command prefix, e.g. ["ip", "netns", "exec", "ns1"] to run the
            service as its own host in a network namespace.
        command: the program to run instead of `python -m <module>`, e.g.
            ["node", "participant.js"] for a service in another language; it takes
            `--host` and `--port` and prints `READY` the same way. `module` then
            only names it in messages.
    """

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        *,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        wrapper: Sequence[str] = (),
        command: Sequence[str] = (),
    ) -> None:
        self.module = module
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.host = host
        self.port = port
        self.wrapper = list(wrapper)
        self.command = list(command) or [sys.executable, "-m", module]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, env: Mapping[str, str] | None = None, timeout_s: float = 20.0) -> ServiceProcess:
        """Starts the process and waits until it serves. `env` adds to the
        environment for this start only (e.g. to arm a crash point)."""
        full_env = {**os.environ, **self.env, **(env or {})}
        argv = [
            *self.wrapper,
            *self.command,
            *self.args,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=full_env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.kill()
                raise TimeoutError(f"{self.module} did not start within {timeout_s}s; see {self.log_path}")
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"{self.module} exited with {self.proc.wait()} at start; see {self.log_path}")
            line += chunk
        if not line.startswith(b"READY "):
            raise RuntimeError(f"{self.module} printed {line!r} instead of READY")
        self.port = int(line.split()[1].rsplit(b":", 1)[1])
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """Stalls the process (SIGSTOP): it keeps its sockets but answers nothing."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """Crashes the process (SIGKILL): no cleanup, no flush."""
        if self.proc is not None:
            self.signal(signal.SIGCONT)  # a stopped process still dies, but be explicit
            self.signal(signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout_s: float) -> int:
        """Waits for the process to exit by itself (e.g. at a crash point)."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the process gracefully (SIGTERM), killing it if it lingers."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self, *, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """Starts the process again on the same port with the same files."""
        if self.running:
            self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.start(env=env)


@dataclass(frozen=True)
class NetFaults:
    """What a `FaultInjector` does to each unary call, as probabilities.

    Attributes:
        lose_request: the request never arrives (the caller sees UNAVAILABLE).
        lose_reply: the request is served but the reply is lost (UNAVAILABLE).
        delay: the request is held back up to `delay_max_s` first.
        duplicate: a second copy is delivered later (up to `delay_max_s`).
        delay_max_s: the longest delay.
        seed: for the random choices.
    """

    lose_request: float = 0.0
    lose_reply: float = 0.0
    delay: float = 0.0
    duplicate: float = 0.0
    delay_max_s: float = 0.5
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> NetFaults:
        """Reads "lose_request=0.05,delay=0.1,seed=7" (unnamed fields keep defaults)."""
        names = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in filter(None, spec.split(",")):
            name, _, value = part.partition("=")
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {sorted(names)}")
            values[name] = int(value) if name == "seed" else float(value)
        return cls(**values)


if TYPE_CHECKING:
    _Interceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.UnaryUnaryClientInterceptor


class FaultInjector(_Interceptor):
    """Loses, delays and duplicates unary calls, as a flaky network would.

    Each injected fault is counted in `counts` and logged as a `net_fault` event.
    """

    def __init__(self, faults: NetFaults) -> None:
        self.faults = faults
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(faults.seed)
        self._log = structlog.get_logger("twopc.dev.testing")
        self._copies: set[asyncio.Task[Any]] = set()
        self._armed: set[str] = set()

    def arm(self, kind: str) -> None:
        """Makes the next call suffer `kind` (a `NetFaults` field, e.g. "lose_reply")
        for sure, whatever its probability: a fault on demand (the web console)."""
        self._armed.add(kind)

    def _hit(self, kind: str, probability: float, method: str) -> bool:
        if kind in self._armed:
            self._armed.discard(kind)
        elif probability <= 0 or self._rng.random() >= probability:
            return False
        self.counts[kind] += 1
        self._log.info("net_fault", kind=kind, method=method)
        return True

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        f = self.faults
        if self._hit("delay", f.delay, name):
            await asyncio.sleep(self._rng.uniform(0, f.delay_max_s))
        if self._hit("lose_request", f.lose_request, name):
            raise _lost(f"chaos: request to {name} lost")
        if self._hit("duplicate", f.duplicate, name):
            copy = asyncio.create_task(self._later(continuation, client_call_details, request))
            self._copies.add(copy)
            copy.add_done_callback(self._copies.discard)
        call = await continuation(client_call_details, request)
        if self._hit("lose_reply", f.lose_reply, name):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            raise _lost(f"chaos: reply from {name} lost")
        return call

    async def _later(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.faults.delay_max_s))
        with contextlib.suppress(grpc.aio.AioRpcError):  # its answer goes nowhere, as on a real network
            await (await continuation(details, request))


def _lost(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a process that cannot pick its own)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float, *, interval_s: float = 0.05
) -> bool:
    """Polls `check` (plain or async) until it holds; False once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)


class TcpProxy:
    """A TCP relay to a server (PostgreSQL, say) that a test can cut and heal: a
    partition between the processes on one side and the server on the other.

    While cut, connections stay open but no byte moves (a silent network: the
    client's writes are accepted and held, as TCP would hold them in retransmission)
    and new connections are accepted but go nowhere. `cut_replies` holds only what
    the server sends back (requests still arrive and are served). `heal` lets the
    held bytes through; `reset` drops every open connection (a lost connection
    mid-statement, or with `cut`, the held bytes lost).

    Args:
        host: the server's host.
        port: the server's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._open = asyncio.Event()
        self._open.set()
        self._replies = asyncio.Event()  # the server's bytes to the client may move
        self._replies.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def cut(self) -> None:
        self._open.clear()

    def cut_replies(self) -> None:
        self._replies.clear()

    def heal(self) -> None:
        self._open.set()
        self._replies.set()

    def reset(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._open.wait()
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst, gate in ((reader, up_writer, self._open), (up_reader, writer, self._replies)):
            task = asyncio.create_task(self._pump(src, dst, gate))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event) -> None:
        try:
            while chunk := await src.read(65536):
                await self._open.wait()
                await gate.wait()
                dst.write(chunk)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)
