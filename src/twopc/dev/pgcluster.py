"""A PostgreSQL cluster that survives its own primary, for tests, chaos runs and benchmarks.

`PgCluster` starts three etcd members and two or three PostgreSQL 15 nodes managed
by Patroni (Debian's `patroni`, `etcd-server`), each on a host of its own (a network
namespace, `twopc.dev.netns`), and lets a run kill, pause and partition any of them.
Failover is Patroni's, configured through its own YAML: this module only starts
processes, reads Patroni's REST API, and injects faults.

The configuration, and why:

* `synchronous_mode` and `synchronous_mode_strict`: a commit is acknowledged only
  once a synchronous standby has its WAL, and Patroni promotes only that standby.
  Strict mode keeps this true when no standby is left: the primary then blocks
  writes instead of accepting commits no other node has (non-strict mode lets a lone
  leader, or a restarted one for a few seconds, acknowledge commits a failover would
  lose). Three nodes, so that one node down still leaves a synchronous standby and
  writes go on.
* `max_prepared_transactions` for the PREPARE TRANSACTION participant (prepared
  transactions are replicated, and listed by the new primary once promoted).
* etcd's v2 API (`etcd:`), not `etcd3:`: see `_write_patroni_config`.
* `ttl` 5, `loop_wait` 1, `retry_timeout` 2: the leader key expires 5 s after its
  holder stops renewing it. Patroni needs `loop_wait + 2 * retry_timeout <= ttl`;
  `retry_timeout` 1 makes a leader demote itself for a slow etcd round.
* `use_pg_rewind`: a former primary rejoins as a standby of the new one.

Node death (`kill`) is SIGKILL of every process on the node's host, Patroni and the
postmaster with its backends alike (the postmaster is not Patroni's child: killing
Patroni alone leaves it running, killing it alone makes Patroni restart it). Clients
reach the cluster through a multi-host URL with `target_session_attrs=read-write`
(`url`), which connects to whichever node is the primary.

PostgreSQL and Patroni run as the `postgres` user on directories it owns; etcd as
root. Everything lives in a temporary directory removed by `close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twopc.dev import netns, pgserver

PATRONI = "/usr/bin/patroni"
"""Debian's patroni, run as packaged: its `#!/usr/bin/python3` has its modules (the
`python3` first on PATH may not)."""

PG_PORT = 5432
REST_PORT = 8008
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
_USER = "postgres"
SCOPE = "twopc"


def missing() -> str | None:
    """Why a cluster cannot run here (a skip reason starting "needs "), or None."""
    if not Path(PATRONI).exists():
        return "needs Patroni (apt-get install patroni etcd-server etcd-client)"
    if shutil.which("etcd") is None:
        return "needs etcd (apt-get install etcd-server etcd-client)"
    reason = pgserver.missing()
    if reason:
        return reason
    ok, why = netns.available()
    return None if ok else why


class PgCluster:
    """etcd members and Patroni-managed PostgreSQL nodes, each on a host of its own.

    Args:
        nodes: PostgreSQL nodes (2 or 3); the hosts are "pg0", "pg1"...
        etcd: etcd members (1 or 3); the hosts are "etcd0"...
        synchronous: `synchronous_mode`; without it a commit is acknowledged before
            any standby has it (for comparisons only: a failover loses such commits).
        strict: `synchronous_mode_strict` (see the module's docstring).
        ttl_s: Patroni's `ttl`: how long a dead leader holds the leader key.
        max_prepared_transactions: the PostgreSQL setting.
        prefix: names of the run's interfaces and namespaces.
        net: second octet of its addresses (10.<net>.x.y).
        workdir: where the nodes' logs go (default: inside the cluster's own
            temporary directory, removed by `close`).
        hosts: more hosts on the cluster's network, for its clients (a chaos run's
            services), so that they reach the nodes and can be partitioned too.
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        etcd: int = 3,
        synchronous: bool = True,
        strict: bool = True,
        ttl_s: int = 5,
        max_prepared_transactions: int = 64,
        prefix: str = "pgc",
        net: int = 235,
        workdir: str | os.PathLike[str] | None = None,
        hosts: Sequence[str] = (),
    ) -> None:
        if nodes not in (2, 3) or etcd not in (1, 3):
            raise ValueError("a cluster has 2 or 3 PostgreSQL nodes and 1 or 3 etcd members")
        found = pgserver.bindir()
        if found is None:
            raise RuntimeError(pgserver.missing())
        self._bin = found
        self.nodes = [f"pg{i}" for i in range(nodes)]
        self.members = [f"etcd{i}" for i in range(etcd)]
        self.network = netns.Network([*self.members, *self.nodes, *hosts], prefix=prefix, net=net)
        self.synchronous = synchronous
        self.strict = strict
        self.ttl_s = ttl_s
        self.max_prepared_transactions = max_prepared_transactions
        self.root = Path(tempfile.mkdtemp(prefix="twopc-pgc-"))
        self.logs = Path(workdir) if workdir else self.root / "logs"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._up = False

    # --- addresses ---------------------------------------------------------------

    @property
    def gateway(self) -> str:
        """This machine's address as the nodes see it (where clients come from)."""
        return self.network.gateway

    def address(self, host: str) -> str:
        return self.network.address(host)

    def url(self, database: str = "postgres", **options: str) -> str:
        """The multi-host URL of `database` on the primary, whichever node it is;
        `options` are more query parameters (for example a log's `schema=`)."""
        hosts = ",".join(f"{self.address(n)}:{PG_PORT}" for n in self.nodes)
        query = {"target_session_attrs": "read-write", **options}
        return f"postgresql://{_USER}@{hosts}/{database}?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())

    def node_url(self, node: str, database: str = "postgres") -> str:
        """The URL of one node, whatever its role (for auditors reading it)."""
        return f"postgresql://{_USER}@{self.address(node)}:{PG_PORT}/{database}?connect_timeout=2"

    # --- life cycle --------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> PgCluster:
        """Makes the hosts, starts etcd then Patroni everywhere, and returns once
        there is a leader with a synchronous standby and every node streams."""
        self.logs.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, _USER, _USER)
        os.chmod(self.root, 0o755)
        self.network.up()
        self._up = True
        for member in self.members:
            self._start_etcd(member)
        for node in self.nodes:
            self._write_patroni_config(node)
            self.start_node(node)
        self.wait_healthy(timeout_s)
        return self

    def _start_etcd(self, member: str) -> None:
        peers = ",".join(f"{m}=http://{self.address(m)}:{ETCD_PEER_PORT}" for m in self.members)
        me = self.address(member)
        data = self.root / member
        argv = [
            "etcd",
            f"--name={member}",
            f"--data-dir={data}",
            f"--listen-client-urls=http://{me}:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://{me}:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://{me}:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://{me}:{ETCD_PEER_PORT}",
            f"--initial-cluster={peers}",
            f"--initial-cluster-state={'existing' if data.exists() else 'new'}",
            f"--initial-cluster-token=twopc-{self.network.bridge}",
            # A short election keeps an etcd fault short (this is one machine).
            "--enable-v2=true",  # Patroni's `etcd:` client (see the Patroni configuration)
            "--heartbeat-interval=100",
            "--election-timeout=1000",
        ]
        self._spawn(member, argv)

    def _write_patroni_config(self, node: str) -> None:
        me = self.address(node)
        home = self.root / node
        home.mkdir(exist_ok=True)
        shutil.chown(home, _USER, _USER)
        os.chmod(home, 0o700)
        etcd_hosts = [f"{self.address(m)}:{ETCD_CLIENT_PORT}" for m in self.members]
        trust = [f"host all all {self.network.subnet} trust", f"host replication all {self.network.subnet} trust"]
        config: dict[str, Any] = {
            "scope": SCOPE,
            "name": node,
            "restapi": {"listen": f"{me}:{REST_PORT}", "connect_address": f"{me}:{REST_PORT}"},
            # etcd's v2 API: Patroni 3.0's etcd3 client keeps a watch cache that can go
            # stale under load (the leader then fails to update the sync key for
            # ever, "Synchronous replication key updated by someone else", and with
            # no synchronous standby a strict cluster takes no writes; fixed in
            # Patroni 3.1, patroni/patroni#2783). The v2 client reads every loop.
            "etcd": {"hosts": etcd_hosts},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl_s,
                    "loop_wait": 1,
                    "retry_timeout": 2,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "synchronous_mode": self.synchronous,
                    "synchronous_mode_strict": self.strict,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_prepared_transactions": self.max_prepared_transactions,
                            "max_connections": 200,
                            "wal_log_hints": "on",
                            "synchronous_commit": "on",
                            "fsync": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"username": _USER}],
                "pg_hba": ["local all all trust", *trust],
            },
            "postgresql": {
                "listen": f"{me}:{PG_PORT}",
                "connect_address": f"{me}:{PG_PORT}",
                "data_dir": str(home / "data"),
                "bin_dir": str(self._bin),
                "pgpass": str(home / "pgpass"),
                "authentication": {
                    "superuser": {"username": _USER},
                    "replication": {"username": _USER},
                    "rewind": {"username": _USER},
                },
                "parameters": {"unix_socket_directories": str(home), "shared_buffers": "32MB"},
                "pg_hba": ["local all all trust", *trust],
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }
        path = home / "patroni.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        shutil.chown(path, _USER, _USER)

    def start_node(self, node: str) -> None:
        """Starts Patroni on `node` (again, after `kill`): it starts PostgreSQL and
        rejoins the cluster as Patroni decides (pg_rewind for a former primary)."""
        if node in self.members:
            self._start_etcd(node)
            return
        self._spawn(node, ["runuser", "-u", _USER, "--", PATRONI, str(self.root / node / "patroni.yml")])

    def _spawn(self, host: str, argv: Sequence[str]) -> None:
        with (self.logs / f"{host}.log").open("ab") as log:
            self._procs[host] = subprocess.Popen(
                [*self.network.host(host).wrapper, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def close(self) -> None:
        """Kills every process of the cluster, removes its hosts and its files."""
        if self._up:
            for host in [*self.nodes, *self.members]:
                self.kill(host)
            self.network.down()
            self._up = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- faults ------------------------------------------------------------------

    def kill(self, host: str, timeout_s: float = 10.0) -> None:
        """SIGKILL to every process on `host` (Patroni, the postmaster and its
        backends, or an etcd member): the node dies at once. Returns when all are
        gone."""
        self.resume(host)  # a stopped process must not linger: SIGKILL ends it anyway
        pids = self.network.signal(host, signal.SIGKILL)
        proc = self._procs.pop(host, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while any(pgserver._alive(p) for p in pids) or self.network.pids(host):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes on {host} survived SIGKILL")
            self.network.signal(host, signal.SIGKILL)  # a child forked meanwhile
            time.sleep(0.02)

    def pause(self, host: str) -> None:
        """SIGSTOP to every process on `host`."""
        self.network.signal(host, signal.SIGSTOP)

    def resume(self, host: str) -> None:
        self.network.signal(host, signal.SIGCONT)

    def cut(self, host: str) -> None:
        """Partitions `host` from every other node, etcd member and client."""
        self.network.cut(host)

    def heal(self, host: str) -> None:
        self.network.heal(host)

    # --- what Patroni says -------------------------------------------------------

    def members_of(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """The cluster's members as Patroni's REST API lists them (asking each node
        until one answers), or [] when none answers."""
        for node in self.nodes:
            try:
                with urllib.request.urlopen(f"http://{self.address(node)}:{REST_PORT}/cluster", timeout=timeout_s) as r:
                    return list(json.load(r).get("members", []))
            except (OSError, urllib.error.URLError, ValueError):
                continue
        return []

    def primary(self) -> str | None:
        """The node Patroni has as leader, if any node answers and says so."""
        for m in self.members_of():
            if m.get("role") == "leader" and m.get("state") == "running":
                return str(m["name"])
        return None

    def sync_standbys(self) -> list[str]:
        return [str(m["name"]) for m in self.members_of() if m.get("role") == "sync_standby"]

    def healthy(self) -> bool:
        """A running leader, a synchronous standby (if synchronous), and every node
        running or streaming."""
        members = self.members_of()
        if len(members) != len(self.nodes):
            return False
        roles = [m.get("role") for m in members]
        states = {m.get("state") for m in members}
        synced = "sync_standby" in roles or not self.synchronous
        return "leader" in roles and synced and states <= {"running", "streaming"}

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Returns once `healthy`, or raises TimeoutError naming the members."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy within {timeout_s}s: {self.members_of()}; logs in {self.logs}")
            time.sleep(0.2)

    def wait_primary(self, *, other_than: str | None = None, timeout_s: float = 60.0) -> str:
        """The primary once there is one (other than `other_than`) that takes writes."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.primary()
            if leader is not None and leader != other_than:
                with contextlib.suppress(psycopg.Error), psycopg.connect(self.node_url(leader)) as conn:
                    if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,):
                        return leader
            time.sleep(0.1)
        raise TimeoutError(f"no primary other than {other_than} within {timeout_s}s: {self.members_of()}")

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Runs one statement on the primary, outside a transaction."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.encode())
