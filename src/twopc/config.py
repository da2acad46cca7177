"""Settings: frozen dataclasses, validated on construction, units in the names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Credentials:
    """Transport security for channels and servers, chosen explicitly.

    Use `Credentials.insecure()` for plaintext (tests, loopback demos) or pass gRPC
    TLS credentials (`grpc.ssl_channel_credentials`, `grpc.ssl_server_credentials`,
    with `require_client_auth=True` for mutual TLS). Call sites never change.
    """

    channel: grpc.ChannelCredentials | None
    server: grpc.ServerCredentials | None

    @classmethod
    def insecure(cls) -> Credentials:
        """Plaintext HTTP/2: an explicit choice, never a default."""
        return cls(channel=None, server=None)


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
    recovery_concurrency: int = 64

    def __post_init__(self) -> None:
        _positive(
            max_commit_batch=self.max_commit_batch,
            recovery_concurrency=self.recovery_concurrency,
            prepare_timeout_s=self.prepare_timeout_s,
            rpc_timeout_s=self.rpc_timeout_s,
            retry_initial_s=self.retry_initial_s,
            retry_max_s=self.retry_max_s,
            abort_retry_s=self.abort_retry_s,
        )
        if not (0 <= self.phase2_wait_s < math.inf and 0 <= self.shutdown_grace_s < math.inf):
            raise ValueError("phase2_wait_s and shutdown_grace_s must be >= 0")
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
    """

    in_doubt_after_s: float = 10.0
    resolve_interval_s: float = 2.0
    rpc_timeout_s: float = 2.0
    retention_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        _positive(
            in_doubt_after_s=self.in_doubt_after_s,
            resolve_interval_s=self.resolve_interval_s,
            rpc_timeout_s=self.rpc_timeout_s,
            retention_s=self.retention_s,
        )
