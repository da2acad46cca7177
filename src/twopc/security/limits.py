"""Every bound on input, in one place: the library and the services check these.

Anything a peer sends has a size and a shape it must keep: ids are short and
printable, lists are bounded, times are finite. A request outside them is refused
with INVALID_ARGUMENT before it touches a store, and the refusal's message never
echoes the input back (a 1 MB id in an error message is an amplifier, and gRPC
turns an oversized status message into RESOURCE_EXHAUSTED at the client). The
protos document the same numbers beside each field.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

from twopc.errors import InvalidOperation

MAX_TXN_ID_LEN = 200
"""A transaction id ("<coordinator id>:<local id>"), in characters."""

MAX_ID_LEN = 128
"""Any other id (account, sku, order id), in characters."""

MAX_ADDRESS_LEN = 255
"""A coordinator's address ("host:port") in a Prepare."""

MAX_TYPE_URL_LEN = 256
"""The type URL of a Prepare's operation."""

MAX_PAGE_TOKEN_LEN = 1024
"""A list RPC's page_token (the services hand out far shorter ones)."""

MAX_BRANCHES = 64
"""Branches (participants) in one transaction."""

MAX_COORDINATORS = 16
"""Other coordinator instances one Prepare may name (PrepareRequest.coordinators)."""

MAX_ITEMS = 100
"""Items (distinct skus) in one order."""

MAX_COMMIT_MANY = 1000
"""Transaction ids in one CommitMany."""

MAX_PREPARE_MANY = 1000
"""Items in one PrepareMany."""

MAX_OPERATION_BYTES = 64 * 1024
"""The packed operation (`google.protobuf.Any` value) of one Prepare."""

MAX_TIMEOUT_S = 300.0
"""The longest deadline a caller may ask for (seconds)."""

MAX_UNDECIDED_PER_COORDINATOR = 10_000
"""Default cap on prepared, undecided transactions one coordinator may hold at a
participant; past it Prepare answers RESOURCE_EXHAUSTED."""

MAX_LOGGED_CHARS = 200
"""Longest string a log line or error message carries from input (then "...")."""

INT64_MAX = 2**63 - 1

_ID = re.compile(r"[A-Za-z0-9._:@+/=~-]+")
_ADDRESS = re.compile(r"[A-Za-z0-9._:\[\]-]+")


class LimitError(InvalidOperation, ValueError):
    """An input outside its documented bound (INVALID_ARGUMENT). The message names
    the field and the bound, never the input itself. An `InvalidOperation`, so a
    handler may raise it from `prepare`; a `ValueError` for local callers."""


def clip(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` cut to `limit` characters, marked when cut: for logs and messages."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def check_id(field: str, value: str, *, max_len: int = MAX_ID_LEN, required: bool = True) -> None:
    """Raises LimitError unless `value` is a well-formed id: 1 to `max_len`
    characters from A-Z a-z 0-9 and . _ : @ + / = ~ - (empty allowed if not required).
    """
    if not value:
        if required:
            raise LimitError(f"{field} is required")
        return
    if len(value) > max_len:
        raise LimitError(f"{field} is longer than {max_len} characters")
    if not _ID.fullmatch(value):
        raise LimitError(f"{field} has characters outside A-Z a-z 0-9 . _ : @ + / = ~ -")


def check_txn_id(value: str, field: str = "txn_id") -> None:
    """`check_id` with the transaction id's bound."""
    check_id(field, value, max_len=MAX_TXN_ID_LEN)


def check_address(field: str, value: str) -> None:
    """Raises LimitError unless `value` is empty or a plausible "host:port"."""
    if not value:
        return
    if len(value) > MAX_ADDRESS_LEN:
        raise LimitError(f"{field} is longer than {MAX_ADDRESS_LEN} characters")
    if not _ADDRESS.fullmatch(value) or ":" not in value:
        raise LimitError(f"{field} is not a host:port address")


def check_count(field: str, count: int, maximum: int) -> None:
    """Raises LimitError if a list has more than `maximum` entries."""
    if count > maximum:
        raise LimitError(f"{field} has {count} entries; at most {maximum} allowed")


def check_timeout(field: str, seconds: float, *, maximum: float = MAX_TIMEOUT_S) -> None:
    """Raises LimitError unless 0 <= seconds <= maximum and finite (0 = default)."""
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or seconds > maximum:
        raise LimitError(f"{field} must be a finite number of seconds from 0 to {maximum:g}")


def checked_product(field: str, a: int, b: int, maximum: int = INT64_MAX) -> int:
    """a * b, or LimitError if it exceeds `maximum` (int64 by default)."""
    product = a * b
    if product > maximum or product < -maximum - 1:
        raise LimitError(f"{field} exceeds {maximum}")
    return product


class RateLimit:
    """A token bucket per caller identity: `rate_per_s` sustained, `burst` at once.

    `allow(identity)` takes a token if one is left. Buckets are kept for at most
    `max_identities` identities (the oldest is dropped past it; identities come from
    certificates the CA signed, so there are few), which bounds the memory a caller
    can make it use.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_identities: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0) or burst < 1:
            raise ValueError("a rate limit needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s, self.burst, self.max_identities = rate_per_s, burst, max_identities
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at)

    def allow(self, identity: str) -> bool:
        """True (and one token spent) if `identity` is within its rate."""
        now = self._clock()
        tokens, at = self._buckets.pop(identity, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[identity] = (tokens - 1.0 if allowed else tokens, now)  # re-inserted: most recent last
        while len(self._buckets) > self.max_identities:
            del self._buckets[next(iter(self._buckets))]
        return allowed
