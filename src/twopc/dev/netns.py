"""Separate hosts on one machine: a bridge and one network namespace per host.

Chaos runs, failover runs and the PostgreSQL cluster put each process on a host of
its own so that a partition (a host's link taken down) cuts it off from everyone,
and a kill can take every process of a host at once. Addresses are in
10.<net>.<tag>.0/24 inside namespaces the run creates and deletes; the machine
itself is the bridge's address (`gateway`); no traffic leaves the machine.
Needs root and iproute2's `ip`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """Where a process runs: its address, and a command prefix that puts it there
    (e.g. `ip netns exec NS` for a network namespace of its own)."""

    address: str = "127.0.0.1"
    wrapper: tuple[str, ...] = ()


def available() -> tuple[bool, str]:
    """Whether namespaces can be made here, and why not."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return False, "needs iproute2's `ip`"
    probe = f"tpcprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok, "" if ok else "needs `ip netns add`, which is not permitted here"


class Network:
    """A bridge and one network namespace per name.

    Args:
        names: the hosts.
        prefix: keeps the interface and namespace names of different runs apart.
        net: the second octet of the addresses, likewise.
    """

    def __init__(self, names: Sequence[str], *, prefix: str = "tpc", net: int = 231) -> None:
        tag = os.getpid() % 250
        self.bridge = f"{prefix}{tag}br"
        self.hosts = {
            n: (f"{prefix}{tag}-{n}", f"{prefix}{tag}v{i}", f"10.{net}.{tag}.{i + 2}") for i, n in enumerate(names)
        }
        self.gateway = f"10.{net}.{tag}.1"
        self.subnet = f"10.{net}.{tag}.0/24"

    available = staticmethod(available)

    def up(self) -> None:
        self.down()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for ns, veth, address in self.hosts.values():
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def host(self, name: str) -> Host:
        ns, _, address = self.hosts[name]
        return Host(address, ("ip", "netns", "exec", ns))

    def address(self, name: str) -> str:
        return self.hosts[name][2]

    def cut(self, name: str) -> None:
        """Partitions `name` from every other host and from the machine."""
        _ip("link", "set", self.hosts[name][1], "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.hosts[name][1], "up")

    def pids(self, name: str) -> list[int]:
        """Every process running on host `name`."""
        done = subprocess.run(["ip", "netns", "pids", self.hosts[name][0]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def signal(self, name: str, sig: signal.Signals) -> list[int]:
        """Sends `sig` to every process on host `name` (SIGKILL: the host dies);
        returns their pids."""
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        return pids

    def down(self) -> None:
        for name, (ns, veth, _) in self.hosts.items():
            if os.path.exists(f"/run/netns/{ns}"):
                self.signal(name, signal.SIGKILL)
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
