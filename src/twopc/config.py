"""Settings: frozen dataclasses, validated on construction, units in the names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from twopc.security.limits import (
    MAX_COMMIT_MANY,
    MAX_PREPARE_MANY,
    MAX_UNDECIDED_PER_COORDINATOR,
    check_address,
    check_id,
)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Credentials:
    """Transport security for channels and servers, chosen explicitly.

    `Credentials.mutual_tls(cert, key, ca)` (or `Credentials.from_dir(path)`) is
    mutual TLS: servers present `cert` and require a client certificate signed by
    `ca`; channels present `cert` and accept only servers whose certificate `ca`
    signed and names the host dialled. `Credentials.insecure()` is plaintext, an
    explicit choice for tests and loopback demos: a plaintext server binds only a
    loopback address unless `beyond_loopback=True` says otherwise. Call sites never
    change; `twopc.rpc` is the only reader.

    Attributes:
        channel: gRPC channel credentials, None for plaintext.
        server: gRPC server credentials, None for plaintext.
        plaintext_beyond_loopback: a plaintext server may bind a non-loopback address.
    """

    channel: grpc.ChannelCredentials | None
    server: grpc.ServerCredentials | None
    plaintext_beyond_loopback: bool = False

    @classmethod
    def insecure(cls, *, beyond_loopback: bool = False) -> Credentials:
        """Plaintext HTTP/2: an explicit choice, never a default.

        Args:
            beyond_loopback: allow a plaintext server on a non-loopback address,
                where anyone on the network can read and forge its traffic.
        """
        return cls(channel=None, server=None, plaintext_beyond_loopback=beyond_loopback)

    @classmethod
    def mutual_tls(
        cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]
    ) -> Credentials:
        """Mutual TLS from PEM files: this process's certificate chain and private
        key, and the CA certificate(s) that every peer's certificate must chain to.

        Raises:
            ValueError: a file is missing, empty or not PEM.
        """
        chain, private, roots = (_pem(name, Path(path)) for name, path in (("cert", cert), ("key", key), ("ca", ca)))
        return cls(
            channel=grpc.ssl_channel_credentials(root_certificates=roots, private_key=private, certificate_chain=chain),
            server=grpc.ssl_server_credentials([(private, chain)], root_certificates=roots, require_client_auth=True),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Credentials:
        """`mutual_tls` from a directory holding cert.pem, key.pem and ca.pem (the
        layout `python -m twopc.security.pki` writes)."""
        d = Path(path)
        return cls.mutual_tls(d / "cert.pem", d / "key.pem", d / "ca.pem")

    @property
    def secure(self) -> bool:
        """True for TLS: peers are authenticated, and authorization can apply."""
        return self.server is not None or self.channel is not None


def _pem(name: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"TLS {name} file {str(path)!r}: {e.strerror}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {name} file {str(path)!r} is not PEM")
    return data


@dataclass(frozen=True)
class CoordinatorConfig:
    """How a `Coordinator` times and retries its work.

    Attributes:
        prepare_timeout_s: default transaction deadline for phase 1 (per `run`); it
            travels as the gRPC deadline of every Prepare.
        rpc_timeout_s: deadline of each phase-2 Commit/Abort attempt and of GetOutcome.
        retry_initial_s: first backoff between phase-2 attempts.
        retry_max_s: the backoff's ceiling (exponential with jitter up to it).
        abort_retry_s: how long Abort is retried. Aborts are not logged (presumed
            abort), so past this a participant still in doubt learns ABORTED from
            GetOutcome instead.
        phase2_wait_s: how long `run` waits for Commit acknowledgements before it
            returns (the decision is already durable; delivery goes on in the
            background), so the caller normally reads its own writes. 0 answers the
            caller at the commit point. An abort always returns at once.
        one_phase: with a single branch, use one-phase commit (no log write).
        shutdown_grace_s: on close, how long background phase-2 work may finish
            before it is cancelled (committed work resumes on the next start).
        max_commit_batch: the most transactions one CommitMany carries.
        max_prepare_batch: the most transactions one PrepareMany carries (at most
            `twopc.security.limits.MAX_PREPARE_MANY`, what participants accept).
        batches_in_flight: how many messages of one kind (Prepare or PrepareMany,
            Commit or CommitMany) may be in flight to one participant at a time;
            the requests that queue meanwhile share the next message. 1 suits a
            participant with one writer (SQLite); one on PostgreSQL with a pool
            of connections can run several batches at once.
        recovery_concurrency: how many logged commits recovery re-drives at once.
    """

    prepare_timeout_s: float = 5.0
    rpc_timeout_s: float = 5.0
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    abort_retry_s: float = 30.0
    phase2_wait_s: float = 5.0
    one_phase: bool = True
    shutdown_grace_s: float = 1.0
    max_commit_batch: int = 256
    max_prepare_batch: int = 256
    recovery_concurrency: int = 64
    batches_in_flight: int = 1

    def __post_init__(self) -> None:
        _positive(
            max_commit_batch=self.max_commit_batch,
            max_prepare_batch=self.max_prepare_batch,
            recovery_concurrency=self.recovery_concurrency,
            batches_in_flight=self.batches_in_flight,
            prepare_timeout_s=self.prepare_timeout_s,
            rpc_timeout_s=self.rpc_timeout_s,
            retry_initial_s=self.retry_initial_s,
            retry_max_s=self.retry_max_s,
            abort_retry_s=self.abort_retry_s,
        )
        if not all(v >= 0 and math.isfinite(v) for v in (self.phase2_wait_s, self.shutdown_grace_s)):
            raise ValueError("phase2_wait_s and shutdown_grace_s must be finite numbers >= 0")
        if self.max_commit_batch > MAX_COMMIT_MANY:
            raise ValueError(f"max_commit_batch must be at most {MAX_COMMIT_MANY} (what a participant accepts)")
        if self.max_prepare_batch > MAX_PREPARE_MANY:
            raise ValueError(f"max_prepare_batch must be at most {MAX_PREPARE_MANY} (what a participant accepts)")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")


@dataclass(frozen=True)
class ParticipantConfig:
    """How the participant helper resolves transactions left in doubt.

    Attributes:
        in_doubt_after_s: a transaction prepared for longer than this, with no
            decision received, is in doubt: the helper asks the coordinator.
        resolve_interval_s: how often the helper looks for in-doubt transactions
            (with jitter); PENDING or an unreachable coordinator waits this long.
        rpc_timeout_s: deadline of each GetOutcome call.
        retention_s: decided transactions (and abort tombstones) are kept this long,
            so late duplicates are still recognised, then purged. Keep it longer
            than the longest coordinator outage: a coordinator that lost an END
            (power loss) re-sends Commit at its restart, and a purged transaction
            would refuse it as never prepared.
        trusted_coordinators: the coordinators a Prepare may name, each an
            identity at an address ("shop@host:port"; a bare "host:port" takes the
            mutually authenticated caller's name). A Prepare naming another address
            is refused (PERMISSION_DENIED), even one whose host is the caller's own
            name: a configured list is the whole list. The resolver believes only a server holding that identity's
            certificate at that address (`twopc.participant.trust`). None: under
            TLS, any address the caller names, bound to the caller's identity;
            under plaintext, every address (tests and loopback demos only).
        allow_no_coordinator: accept a two-phase Prepare with no coordinator
            address (nobody to ask if it is left in doubt). Refused by default.
        max_undecided_per_coordinator: prepared, undecided transactions one
            coordinator may hold here, counted per its authenticated identity
            under mutual TLS (its certificate's name, whatever addresses it
            names), per the address it names otherwise; past it Prepare answers
            RESOURCE_EXHAUSTED.
        resolve_concurrency: coordinators asked at once by the in-doubt resolver.
        resolve_backoff_max_s: ceiling of the per-coordinator backoff while a
            coordinator does not answer (it starts at `resolve_interval_s`).
    """

    in_doubt_after_s: float = 10.0
    resolve_interval_s: float = 2.0
    rpc_timeout_s: float = 2.0
    retention_s: float = 7 * 24 * 3600.0
    trusted_coordinators: frozenset[str] | None = None
    allow_no_coordinator: bool = False
    max_undecided_per_coordinator: int = MAX_UNDECIDED_PER_COORDINATOR
    resolve_concurrency: int = 16
    resolve_backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        _positive(
            in_doubt_after_s=self.in_doubt_after_s,
            resolve_interval_s=self.resolve_interval_s,
            rpc_timeout_s=self.rpc_timeout_s,
            retention_s=self.retention_s,
            max_undecided_per_coordinator=self.max_undecided_per_coordinator,
            resolve_concurrency=self.resolve_concurrency,
            resolve_backoff_max_s=self.resolve_backoff_max_s,
        )
        for entry in self.trusted_coordinators or ():
            name, _, address = entry.rpartition("@")
            if ":" not in address:
                raise ValueError(f"a trusted coordinator is name@host:port, got {entry!r}")
            check_address("a trusted coordinator", address)
            if name or "@" in entry:
                check_id("a trusted coordinator's name", name)
