"""The `twopc coordinator` process: one TOML file, a Coordinator, the Transactions API.

    twopc coordinator --config coordinator.toml

The configuration (`load`), every path relative to the file::

    listen = "127.0.0.1:7000"         # keep it stable, outside the ephemeral range
    log = "decisions.db"              # or "postgresql://host/db?schema=twopc_log"
    executors = ["checkout"]          # identities that may call Execute ("*": any)
    peers = []                        # GetOutcome addresses of the other instances
    prepare_timeout_s = 5.0

    [tls]                             # absent: plaintext, loopback addresses only
    ca = "ca.pem"
    cert = "coordinator.pem"
    key = "coordinator.key"

    [metrics]                         # absent: no HTTP port
    host = "127.0.0.1"
    port = 9464

    [participants.wallet]             # a branch may target only these
    address = "127.0.0.1:7001"
    identity = "wallet"               # its certificate's name: may ask GetOutcome

Several processes on one PostgreSQL log serve the same API (each an instance with
its own lease); give each the others as `peers`.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from twopc.config import CoordinatorConfig, Credentials
from twopc.coordinator.core import Coordinator
from twopc.coordinator.service import TRANSACTIONS_SERVICE, TransactionsServicer
from twopc.errors import TwoPCError
from twopc.observe.health import COORDINATOR_SERVICE, Health
from twopc.ops import metrics
from twopc.security.auth import ANYONE, HEALTH_RULES, Policy, coordinator_rules, grant, operations_rules
from twopc.stores.base import POSTGRES_SCHEMES

_log = structlog.get_logger("twopc.ops.coordinatord")


class ConfigError(TwoPCError):
    """The configuration file is missing, not TOML, or names something wrong."""


@dataclass(frozen=True)
class Participant:
    """A participant the coordinator may dial: its address and certificate identity."""

    address: str
    identity: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    """What `twopc coordinator` runs; see the module's docstring for the file.

    Attributes:
        listen: "host:port" of the Transactions, GetOutcome and health services.
        log: the decision log: a SQLite path or a PostgreSQL URL (`?schema=`).
        participants: name -> participant, the only targets a branch may name.
        executors: identities allowed to call Execute under mutual TLS (`*` any).
        peers: GetOutcome addresses of the other instances on the same log.
        advertise: the address participants reach GetOutcome at, if not `listen`'s.
        tls: ca, cert and key paths; empty for plaintext (loopback only).
        metrics_host: where `/metrics`, `/healthz` and `/readyz` listen.
        metrics_port: their port; None for none.
        prepare_timeout_s: the phase-1 deadline when a request gives none.
        grace_s: on SIGTERM, how long to drain.
    """

    listen: str
    log: str
    participants: dict[str, Participant] = field(default_factory=dict)
    executors: tuple[str, ...] = (ANYONE,)
    peers: tuple[str, ...] = ()
    advertise: str = ""
    tls: dict[str, str] = field(default_factory=dict)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    prepare_timeout_s: float = 5.0
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.listen or not self.log:
            raise ConfigError("`listen` and `log` are required")
        if not self.participants:
            raise ConfigError("no [participants.NAME] tables: a branch could target nothing")
        missing = {"ca", "cert", "key"} - set(self.tls)
        if self.tls and missing:
            raise ConfigError(f"[tls] needs ca, cert and key (missing {', '.join(sorted(missing))})")

    def credentials(self) -> Credentials:
        """Mutual TLS from `tls`, or plaintext."""
        if not self.tls:
            return Credentials.insecure()
        try:
            return Credentials.mutual_tls(self.tls["cert"], self.tls["key"], self.tls["ca"])
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def policy(self) -> Policy | None:
        """Execute for `executors`, GetOutcome for the participants' identities,
        reflection for executors, health for any certificate of the CA; None
        without TLS."""
        if not self.tls:
            return None
        identities = [p.identity or name for name, p in self.participants.items()]
        rules = (
            coordinator_rules(identities)
            | grant(self.executors, TRANSACTIONS_SERVICE, "Execute")
            | operations_rules(self.executors)
            | HEALTH_RULES  # probes and load balancers hold some certificate of the CA, not an executor's
        )
        return Policy(rules)


def load(path: str | os.PathLike[str], **overrides: Any) -> ServiceConfig:
    """The configuration in the TOML file at `path`, with `overrides` (flags; None
    means not given) on top. Relative paths in it are relative to the file.

    Raises:
        ConfigError: the file cannot be read or parsed, or names something wrong.
    """
    where = Path(path)
    try:
        raw = tomllib.loads(where.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not TOML: {e}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    host, port = given.pop("host", None), given.pop("port", None)
    base = where.parent

    def local(value: str) -> str:
        return value if "://" in value or Path(value).is_absolute() else str(base / value)

    if "log" in raw:  # the file's paths are relative to the file; a flag's, to where it is typed
        raw["log"] = local(str(raw["log"]))
    raw.update(given)
    if host is not None or port is not None:
        file_host, _, file_port = str(raw.get("listen", "127.0.0.1:0")).rpartition(":")
        raw["listen"] = f"{host if host is not None else file_host}:{port if port is not None else file_port}"
    try:
        participants = {}
        for name, table in raw.pop("participants", {}).items():
            extra = set(table) - {"address", "identity"}
            if extra:
                raise ConfigError(f"{where}: participants.{name}: unknown settings {', '.join(sorted(extra))}")
            participants[name] = Participant(str(table["address"]), str(table.get("identity", "")))
        tls = {k: local(str(v)) for k, v in raw.pop("tls", {}).items()}
        metrics_table = raw.pop("metrics", {})
        known = {
            "listen", "log", "executors", "peers", "advertise", "prepare_timeout_s", "grace_s",
            "metrics_host", "metrics_port",
        }  # fmt: skip
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
        return ServiceConfig(
            listen=str(raw.get("listen", "")),
            log=str(raw.get("log", "")),
            participants=participants,
            executors=tuple(raw.get("executors", (ANYONE,))),
            peers=tuple(raw.get("peers", ())),
            advertise=str(raw.get("advertise", "")),
            tls=tls,
            metrics_host=str(raw.get("metrics_host", metrics_table.get("host", "127.0.0.1"))),
            metrics_port=raw.get("metrics_port", metrics_table.get("port")),
            prepare_timeout_s=float(raw.get("prepare_timeout_s", 5.0)),
            grace_s=float(raw.get("grace_s", 5.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: {e!r}") from None


async def run(config: ServiceConfig) -> None:
    """Runs the coordinator service until SIGTERM or SIGINT.

    Raises:
        CoordinatorFailedError: the decision log failed; restart the process.
    """
    credentials = config.credentials()
    async with contextlib.AsyncExitStack() as stack:
        coordinator = await stack.enter_async_context(
            Coordinator(
                config.log,
                credentials=credentials,
                advertise=config.advertise or None,
                # No one-phase commit: it logs nothing, and a retry of the txn id must be
                # answered from the log (on any instance), never run again.
                config=CoordinatorConfig(prepare_timeout_s=config.prepare_timeout_s, one_phase=False),
                peers=config.peers,
            )
        )
        claims = None
        if config.log.startswith(POSTGRES_SCHEMES):  # several instances may share it: claim ids
            from twopc.coordinator.claims import PostgresClaims  # the postgres extra

            claims = PostgresClaims(config.log)
            await claims.open()
            stack.push_async_callback(claims.close)
        # Under TLS each participant is dialled bound to its identity: an impostor with
        # another certificate from the CA on its address fails the handshake.
        targets = {
            n: f"{p.identity or n}@{p.address}" if config.tls else p.address for n, p in config.participants.items()
        }
        service = TransactionsServicer(coordinator, targets, claims=claims)
        health = Health([COORDINATOR_SERVICE, TRANSACTIONS_SERVICE])
        stack.push_async_callback(health.close)
        health.watch(coordinator.wait_failed)
        if config.metrics_port is not None:
            metrics.CoordinatorMetrics(coordinator)
            port = metrics.serve(config.metrics_port, config.metrics_host, health=health)
            _log.info("metrics_serving", address=f"{config.metrics_host}:{port}")
        await coordinator.serve(
            config.listen,
            services=[service.add_to_server],
            grace_s=config.grace_s,
            health=health,
            drain=service.drain,
            policy=config.policy(),
        )
