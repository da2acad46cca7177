"""A private PostgreSQL server for tests, the demo, chaos runs and benchmarks, and
for development: `python -m twopc.dev.pgserver` starts one with
`max_prepared_transactions` set (what the PREPARE TRANSACTION adapter needs),
prints its URL, and stops it on Ctrl-C (docs/postgres.md).

`PostgresServer` runs `initdb` and `postgres` from the installed server binaries
(`pg_config --bindir`) on a data directory of its own, on a free loopback port, with
`max_prepared_transactions` set and `fsync` on, and can crash it (SIGKILL of the
postmaster and every backend, as a power cut or an OOM kill would end it) and start
it again on the same port and files, where PostgreSQL's own crash recovery replays
its WAL. PostgreSQL refuses to run as root, so as root it runs as the `postgres`
user (`runuser -u postgres --`) on a directory that user owns.

The data directory lives in a temporary directory of its own under the system's
temp dir (not under a test's `tmp_path`, whose parents only root may enter); `close`
stops the server and removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from twopc.dev.testing import free_port

_USER = "postgres"


def bindir() -> Path | None:
    """Where initdb and postgres are, or None when the server binaries are missing."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    found = Path(out)
    return found if (found / "initdb").exists() and (found / "postgres").exists() else None


def missing() -> str | None:
    """Why a private server cannot run here (a skip reason starting "needs "), or None."""
    if bindir() is None:
        return "needs PostgreSQL server binaries (initdb and postgres in `pg_config --bindir`)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "needs runuser to start PostgreSQL as the postgres user (it refuses root)"
    with contextlib.suppress(ImportError):
        import psycopg  # noqa: F401 - only whether it is installed

        return None
    return "needs psycopg (pip install 'twopc[postgres]')"


class PostgresServer:
    """One PostgreSQL instance (on 127.0.0.1 unless told), owned by this object.

    Args:
        max_prepared_transactions: the server setting (0 disables PREPARE TRANSACTION).
        settings: more `postgresql.conf` settings, e.g. {"max_connections": "200"}.
        port: the port to listen on; 0 picks a free one, kept across restarts.
        listen: the addresses to listen on (besides, say, a bridge's for services
            in network namespaces).
        trust: networks (CIDR) whose clients connect without a password, besides
            loopback.
        log_path: where the server's log goes (default: beside its data, removed
            by `close`).
        wrapper: a command prefix that runs the server on another host, e.g.
            `ip netns exec NS`; clients then reach it at the first `listen` address.
    """

    def __init__(
        self,
        *,
        max_prepared_transactions: int = 256,
        settings: Mapping[str, str] | None = None,
        port: int = 0,
        listen: Sequence[str] = ("127.0.0.1",),
        trust: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError(missing())
        self._bin = found
        self.port = port or free_port()
        self.host = listen[0]
        self.wrapper = list(wrapper)
        self.settings = {
            "listen_addresses": ",".join(listen),
            "unix_socket_directories": "",
            "max_prepared_transactions": str(max_prepared_transactions),
            "max_connections": "200",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": "32MB",
            **(settings or {}),
        }
        self.root = Path(tempfile.mkdtemp(prefix="twopc-pg-"))
        self.data = self.root / "data"
        self.log_path = Path(log_path) if log_path else self.root / "server.log"
        self.trust = list(trust)
        self._as_postgres = os.geteuid() == 0
        self._initialised = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL of its `postgres` database."""
        return self.url_of("postgres")

    def url_of(self, database: str, *, search_path: str | None = None) -> str:
        """The URL of one of its databases, optionally with a schema as search_path."""
        url = f"postgresql://{_USER}@{self.host}:{self.port}/{database}"
        if search_path:
            url += "?options=" + quote(f"-csearch_path={search_path}")
        return url

    @property
    def _prefix(self) -> list[str]:
        return ["runuser", "-u", _USER, "--"] if self._as_postgres else []

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._prefix, *argv], capture_output=True, text=True, check=check)

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        """Initialises the data directory (first time only) and starts the server;
        after a crash PostgreSQL recovers from its WAL first. Returns once it
        accepts connections.

        The postmaster is this process's child (not daemonised, as `pg_ctl start` would), so that
        after a SIGKILL it is reaped here and its pid file is seen to be stale.
        """
        if not self._initialised:
            self._init()
        opts = [a for k, v in self.settings.items() for a in ("-c", f"{k}={v}")]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    *self.wrapper,
                    *self._prefix,
                    str(self._bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    *opts,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self._proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {self._proc.returncode} at start; log {self.log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"PostgreSQL did not accept connections within {timeout_s}s; log {self.log_path}")
            time.sleep(0.05)
        return self

    def _accepts(self) -> bool:
        done = self._run(str(self._bin / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), check=False)
        return done.returncode == 0

    def _init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, _USER, _USER)
        os.chmod(self.root, 0o755)  # the log and data are postgres's; others may read the log
        done = self._run(
            str(self._bin / "initdb"), "-D", str(self.data), "-U", _USER, "-A", "trust", "-E", "UTF8", check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        if self.trust:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in self.trust)
        self._initialised = True

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, WAL writer, ...)."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        found = [postmaster]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    found.append(int(entry.name))
        return found

    @property
    def running(self) -> bool:
        pids = self.pids()
        return bool(pids) and _alive(pids[0])

    def kill(self, timeout_s: float = 10.0) -> None:
        """Crashes the server: SIGKILL to the postmaster and all its processes at
        once; no checkpoint, no shutdown. Returns when all are gone."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout_s)  # runuser (or the postmaster itself) reaped here
        deadline = time.monotonic() + timeout_s
        for pid in pids:
            while _alive(pid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL process {pid} survived SIGKILL")
                time.sleep(0.01)

    def restart(self) -> PostgresServer:
        """Starts the server again (after `kill`, PostgreSQL recovers first)."""
        if self.running:
            self.kill()
        return self.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the server cleanly (fast shutdown: a checkpoint, no recovery at start)."""
        if self._proc is not None and self._proc.poll() is None:
            pids = self.pids()
            if pids:
                os.kill(pids[0], signal.SIGINT)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stops the server and removes its files."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError, IndexError):
                os.kill(self.pids()[0], signal.SIGQUIT)  # immediate shutdown
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Runs one statement outside a transaction (CREATE DATABASE may not run in one)."""
        import psycopg

        with psycopg.connect(self.url_of(database), autocommit=True) as conn:
            conn.execute(sql.encode())


@contextlib.contextmanager
def schema(url: str, prefix: str = "t") -> Iterator[str]:
    """A fresh schema in the database at `url`, dropped afterwards: yields a URL whose
    connections use it as search_path, so concurrent runs never see each other's
    tables (also on a shared server)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"'.encode())
    sep = "&" if "?" in url else "?"
    try:
        yield url + sep + "options=" + quote(f"-csearch_path={name}")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            # Prepared transactions left by its participants would hold its tables.
            if conn.execute(b"SELECT to_regclass(%s)", (f'"{name}".twopc_prepared',)).fetchone() != (None,):
                join = f'SELECT p.gid FROM pg_prepared_xacts p JOIN "{name}".twopc_prepared t USING (gid)'
                for (gid,) in conn.execute(join.encode()).fetchall():
                    conn.execute(f"ROLLBACK PREPARED '{gid}'".encode())
            conn.execute(f'DROP SCHEMA "{name}" CASCADE'.encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of someone else lingers as a zombie until reaped; it is dead.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m twopc.dev.pgserver`: a private server until Ctrl-C or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m twopc.dev.pgserver",
        description="Start a private PostgreSQL server for development, with max_prepared_transactions"
        " set (the PREPARE TRANSACTION adapter needs it), on a data directory of its own. Prints its URL"
        " (add ?schema=NAME for a schema of your own), keeps it running, and stops it and removes its"
        " files on Ctrl-C or SIGTERM. Needs the PostgreSQL server binaries (pg_config --bindir); as root"
        " it runs the server as the postgres user.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--max-prepared-transactions", type=int, default=256, help="the server setting (default %(default)s)"
    )
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        parser.exit(1, f"python -m twopc.dev.pgserver: error: {reason}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    with PostgresServer(
        max_prepared_transactions=args.max_prepared_transactions, port=args.port, listen=(args.host,)
    ) as server:
        print(server.url, flush=True)
        print(f"max_prepared_transactions={args.max_prepared_transactions}; Ctrl-C stops it", file=sys.stderr)
        stop.wait()
        print("stopping", file=sys.stderr)


if __name__ == "__main__":
    main()
