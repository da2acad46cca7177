"""What every Prepare passes before any kind of participant sees it.

A Prepare is admitted once, above the hooks a kind of participant implements
(`twopc.participant.base`), so that no kind can skip a check:

* input limits (`twopc.security.limits`): the id, the operation's size and type,
  the coordinator addresses;
* trust (`twopc.participant.trust`): the coordinators it names must be trusted;
* the operation must be one of the participant's types and parse;
* its digest is kept, so that a repeated Prepare with another operation under the
  same id is told apart from a true repeat (`repeated`);
* the cap of undecided transactions is counted per `holder`: the authenticated
  caller's identity under mutual TLS (so naming many addresses gains nothing), the
  coordinator's address otherwise (`twopc.participant.table.undecided`).

Each failure is a `StatusError` with the gRPC status the caller gets, or, for an
error of the business step or the database, an ABORT vote's reason (`refusal`).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from twopc.config import ParticipantConfig
from twopc.errors import InvalidOperation, NotFound, VoteAbort
from twopc.participant import trust
from twopc.participant.table import ABORTED
from twopc.security import limits
from twopc.stores.base import ConflictError, StoreUnavailableError, item_conflict
from twopc.types import Vote
from twopc.v1 import participant_pb2

_log = structlog.get_logger("twopc.participant.admission")


@dataclass(frozen=True, slots=True)
class Item:
    """One Prepare, admitted and unpacked: what a kind of participant's hooks get.

    Attributes:
        txn_id: the transaction's global id.
        coordinator: whom to ask GetOutcome if it is left in doubt: "name@host:port"
            under mutual TLS (the identity the server must hold, `trust.admit`),
            the address alone under plaintext.
        alternates: the other coordinator instances', the same way, space-separated.
        operation: the unpacked operation message.
        digest: identifies the operation's content; a repeat carries the same.
        deadline: `time.monotonic()` past which it votes ABORT; None: no deadline.
        one_phase: decided at once (commit in the same local transaction).
        holder: whom the cap of undecided transactions counts it for.
    """

    txn_id: str
    coordinator: str
    alternates: str
    operation: Message
    digest: str
    deadline: float | None
    one_phase: bool
    holder: str


class StatusError(Exception):
    """A Prepare answered with a gRPC status instead of a vote; nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DecisionRefused(Exception):  # noqa: N818 - answered FAILED_PRECONDITION, not an error of ours
    """A Commit or Abort that the transaction's state forbids (FAILED_PRECONDITION):
    commit of an aborted or never prepared transaction, abort of a committed one.
    A kind's `commit_txn` and `abort_txn` raise it; nothing changed."""


class CapReached(Exception):  # noqa: N818 - answered RESOURCE_EXHAUSTED
    """The holder has its cap of undecided transactions here."""


def check_prepare(request: participant_pb2.PrepareRequest) -> None:
    """The bounds of one Prepare; raises `limits.LimitError`."""
    limits.check_txn_id(request.txn_id)
    if not request.HasField("operation"):
        raise limits.LimitError("operation is required")
    if len(request.operation.value) > limits.MAX_OPERATION_BYTES:
        raise limits.LimitError(f"operation is larger than {limits.MAX_OPERATION_BYTES} bytes")
    if len(request.operation.type_url) > limits.MAX_TYPE_URL_LEN:
        raise limits.LimitError(f"operation type_url is longer than {limits.MAX_TYPE_URL_LEN} characters")
    limits.check_count("coordinators", len(request.coordinators), limits.MAX_COORDINATORS)
    for address in request.coordinators:
        limits.check_address("each of coordinators", address)
    limits.check_id("coordinator_log", request.coordinator_log, required=False)


def check_commit_many(txn_ids: Sequence[str]) -> None:
    """The bounds of a CommitMany; raises `limits.LimitError`."""
    if not txn_ids:
        raise limits.LimitError("txn_ids are required")
    limits.check_count("txn_ids", len(txn_ids), limits.MAX_COMMIT_MANY)
    for txn_id in txn_ids:
        limits.check_txn_id(txn_id, "each of txn_ids")


def digest(type_url: str, value: bytes) -> str:
    """What identifies an operation's content: a repeat of a Prepare carries the same."""
    h = hashlib.sha256(type_url.encode())
    h.update(b"\0")
    h.update(value)
    return h.hexdigest()[:32]


class Admission:
    """Admits Prepares for one participant: its trust settings and operation types."""

    def __init__(self, config: ParticipantConfig, operations: Sequence[type[Message]]) -> None:
        self.config = config
        self.types: Mapping[str, type[Message]] = {t.DESCRIPTOR.full_name: t for t in operations}

    def item(self, request: participant_pb2.PrepareRequest, deadline: float | None, caller: Sequence[str]) -> Item:
        """Checks one Prepare (its bounds, and the coordinators it names against the
        trusted ones, for `caller`'s identities) and unpacks its operation, before
        any store work.

        Raises:
            StatusError: INVALID_ARGUMENT or PERMISSION_DENIED, with what is wrong.
        """
        try:
            check_prepare(request)
        except limits.LimitError as e:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            # Each address is kept bound to the identity that must answer there.
            coordinator = trust.admit(self.config, request.coordinator, request.one_phase, caller)
            others = [
                trust.admit(self.config, address, request.one_phase, caller)
                for address in request.coordinators  # any of them will be believed
                if address
            ]
        except trust.Refused as e:
            _log.warning(
                "prepare_refused_coordinator",
                txn_id=request.txn_id,
                coordinator=limits.clip(request.coordinator),
                caller=",".join(caller[:4]),
            )
            raise StatusError(grpc.StatusCode[e.code], str(e)) from None
        kind = self.types.get(request.operation.TypeName())
        if kind is None:
            accepted = ", ".join(sorted(self.types))
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown operation type {limits.clip(request.operation.type_url, 100)!r};"
                f" this participant accepts {accepted}",
            )
        operation = kind()
        try:
            unpacked = request.operation.Unpack(operation)
        except DecodeError:
            unpacked = False
        if not unpacked:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "operation does not parse")
        # Several coordinator instances sharing a log: any of them can answer.
        alternates = " ".join(dict.fromkeys(a for a in others if a != coordinator))
        alternates = trust.with_log(alternates, request.coordinator_log)  # rule 12: whose answer counts
        return Item(
            txn_id=request.txn_id,
            coordinator=coordinator,
            alternates=alternates,
            operation=operation,
            digest=digest(request.operation.type_url, request.operation.value),
            deadline=deadline,
            one_phase=request.one_phase,
            # The caller's certificate name when there is one: a coordinator that names
            # other addresses of its own still counts against one cap.
            holder=caller[0] if caller else request.coordinator,
        )


def repeated(state: str, recorded_digest: str, item: Item) -> tuple[Vote, str]:
    """The answer to a Prepare of a transaction already known here (in `state`, its
    operation's digest kept): the first answer again, with no work."""
    if state == ABORTED:
        return Vote.ABORT, "transaction already aborted"
    if recorded_digest != item.digest:
        # Not a repeat but another transaction under a used id: refuse it and leave
        # the first one as it is.
        return Vote.ABORT, "transaction id already used for another operation"
    return Vote.COMMIT, ""


def refusal(error: Exception) -> str | StatusError:
    """What a Prepare whose business step or database work raised answers: an ABORT
    vote's reason, or a status."""
    if isinstance(error, VoteAbort):
        return error.reason
    conflict = item_conflict(error)
    if conflict is not None:  # this item lost to the database (a lock wait, a constraint)
        return f"conflict: {conflict}"
    if isinstance(error, sqlite3.IntegrityError):  # a constraint of the business tables
        return f"conflict: {error}"
    if isinstance(error, ConflictError):  # lost to concurrent transactions; nothing reserved
        return f"conflict: {error}"
    if isinstance(error, StoreUnavailableError):  # no vote it could not stand behind
        return StatusError(grpc.StatusCode.UNAVAILABLE, f"participant store unavailable: {error}")
    if isinstance(error, CapReached):
        return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, InvalidOperation):
        return StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, NotFound):
        return StatusError(grpc.StatusCode.NOT_FOUND, str(error))
    return StatusError(grpc.StatusCode.INTERNAL, f"prepare failed: {limits.clip(repr(error))}")


def report(item: Item, failure: StatusError, error: Exception) -> None:
    """Logs a Prepare answered with a status: a bug loudly, a capped coordinator as a warning."""
    if failure.code is grpc.StatusCode.INTERNAL:
        _log.error("prepare_raised", txn_id=item.txn_id, exc_info=error)
    elif failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        _log.warning("prepare_refused_cap", txn_id=item.txn_id, coordinator=item.coordinator, holder=item.holder)
