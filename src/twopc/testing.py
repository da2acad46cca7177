"""Helpers for tests, the demo, chaos runs and benchmarks: real processes.

`ServiceProcess` runs a service as a real child process (the way it runs in
production), waits for it to announce its port, and lets a test crash it (SIGKILL),
stall it (SIGSTOP/SIGCONT) and restart it on the same port with the same files.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


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
    ) -> None:
        self.module = module
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, env: Mapping[str, str] | None = None, timeout_s: float = 20.0) -> ServiceProcess:
        """Starts the process and waits until it serves. `env` adds to the
        environment for this start only (e.g. to arm a crash point)."""
        full_env = {**os.environ, **self.env, **(env or {})}
        argv = [sys.executable, "-m", self.module, *self.args, "--host", self.host, "--port", str(self.port)]
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
