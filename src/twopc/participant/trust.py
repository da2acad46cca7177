"""Which coordinators a participant believes, and how it asks them.

A participant that voted COMMIT must later learn the outcome, and it learns it from
the coordinator address the Prepare named. Anyone who could choose that address
could answer COMMITTED for a transaction no coordinator decided, or never answer
and keep a reservation for ever. So:

* `admit` refuses a Prepare whose coordinator the participant does not trust, and
  binds the one it trusts to an identity: the resolver later asks
  "name@host:port", and under mutual TLS its channel (`twopc.rpc.channel`) verifies
  that the server at that address holds a certificate for `name`. Another holder of
  a certificate from the same CA listening there (the coordinator is down, and
  `client` took its port) fails the handshake: its answer is never believed. The
  name is the one `ParticipantConfig.trusted_coordinators` gives for the address
  ("shop@10.0.0.1:7000"), or else the authenticated caller's own (the coordinator
  that sent the Prepare answers for it). A two-phase Prepare with no coordinator at
  all is refused unless `allow_no_coordinator` says otherwise.
* `Outreach` asks several coordinators at once, at most `resolve_concurrency` in
  flight, and backs off per coordinator (exponentially, to `resolve_backoff_max_s`)
  while one does not answer, so a dead or hostile coordinator delays nobody else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from twopc.config import ParticipantConfig
from twopc.security import limits


class Refused(Exception):  # noqa: N818 - a refusal with its gRPC status name, not an error
    """A Prepare the trust rules refuse; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def admit(config: ParticipantConfig, coordinator: str, one_phase: bool, caller: Sequence[str]) -> str:
    """Checks the coordinator a Prepare names, and binds it to an identity.

    Args:
        config: the participant's trust settings.
        coordinator: the Prepare's `coordinator` ("host:port", or empty).
        one_phase: a one-phase Prepare is decided at once and needs no coordinator.
        caller: the caller's authenticated identities (empty without mutual TLS).

    Returns:
        Whom the resolver asks: "name@host:port" under mutual TLS (the name the
        server's certificate must hold), the address alone under plaintext (no
        names to check), or "" for a Prepare that needs no coordinator.

    Raises:
        Refused: INVALID_ARGUMENT for a malformed or missing address,
            PERMISSION_DENIED for one the participant does not trust.
    """
    try:
        limits.check_address("coordinator", coordinator)
    except limits.LimitError as e:
        raise Refused("INVALID_ARGUMENT", str(e)) from e
    if not coordinator:
        if one_phase or config.allow_no_coordinator:
            return ""
        raise Refused("INVALID_ARGUMENT", "a two-phase Prepare needs a coordinator address to resolve it if in doubt")
    if config.trusted_coordinators is None:  # plaintext, nothing configured: tests and loopback demos
        return coordinator
    configured = trusted_by_address(config.trusted_coordinators)
    host = coordinator.rsplit(":", 1)[0]
    if coordinator in configured:
        name = configured[coordinator] or (caller[0] if caller else "")
    elif caller and not configured:
        # No list: the coordinator that sent the Prepare answers for it, under its own name.
        # A configured list is the whole list: a caller cannot add `shop:2`, `shop:3`...
        # that nobody serves (and that would hold transactions the resolver never settles).
        name = host if host in caller else caller[0]
    else:
        raise Refused("PERMISSION_DENIED", "this participant does not trust the coordinator named in the Prepare")
    return f"{name}@{coordinator}" if name else coordinator


def trusted_by_address(trusted: Iterable[str]) -> dict[str, str]:
    """{"host:port": "name"} from trusted coordinators ("name@host:port" or
    "host:port", whose name is then the caller's)."""
    found: dict[str, str] = {}
    for entry in trusted:
        name, _, address = entry.rpartition("@")
        found[address] = name
    return found


Ask = Callable[[str, list[str]], Awaitable[tuple[int, bool]]]
"""Asks one coordinator about its txn ids: returns (how many resolved, answered)."""


class Outreach:
    """Asks coordinators concurrently, with a bound and per-coordinator backoff."""

    def __init__(self, config: ParticipantConfig) -> None:
        self.config = config
        self._next_try: dict[str, float] = {}  # coordinator -> monotonic time
        self._delay: dict[str, float] = {}

    async def ask(self, in_doubt: Iterable[tuple[str, str]], ask_one: Ask) -> int:
        """Asks each due coordinator about its in-doubt txn ids; returns how many
        were resolved. Coordinators in backoff are skipped this round."""
        groups: dict[str, list[str]] = {}
        for txn_id, coordinator in in_doubt:
            groups.setdefault(coordinator, []).append(txn_id)
        now = time.monotonic()
        due = {c: ids for c, ids in groups.items() if self._next_try.get(c, 0.0) <= now}
        gate = asyncio.Semaphore(self.config.resolve_concurrency)

        async def one(coordinator: str, txn_ids: list[str]) -> int:
            async with gate:
                resolved, answered = await ask_one(coordinator, txn_ids)
            self._note(coordinator, answered)
            return resolved

        counts = await asyncio.gather(*(one(c, ids) for c, ids in due.items()))
        self._forget(groups)
        return sum(counts)

    def backoff(self) -> Mapping[str, float]:
        """Each coordinator's current backoff delay (seconds); for tests and logs."""
        return dict(self._delay)

    def _note(self, coordinator: str, answered: bool) -> None:
        if answered:
            self._delay.pop(coordinator, None)
            self._next_try.pop(coordinator, None)
            return
        previous = self._delay.get(coordinator)
        delay = self.config.resolve_interval_s if previous is None else previous * 2
        delay = min(delay, self.config.resolve_backoff_max_s)
        self._delay[coordinator] = delay
        self._next_try[coordinator] = time.monotonic() + delay

    def _forget(self, current: Mapping[str, object]) -> None:
        """Drops the backoff of coordinators with nothing in doubt any more."""
        for c in [c for c in self._delay if c not in current]:
            self._delay.pop(c, None)
            self._next_try.pop(c, None)


LOG_TAG = "log="
"""Marks the owner's log identity among the addresses a prepared row keeps to ask
(`PrepareRequest.coordinator_log`): kept beside them, so every kind of participant
stores it with its row without a column of its own."""


def with_log(addresses: str, log_id: str) -> str:
    """The addresses to ask ("a:1 b:1"), with the owner's log identity kept beside them."""
    return f"{addresses} {LOG_TAG}{log_id}".strip() if log_id else addresses


def whom_to_ask(kept: str) -> tuple[list[str], str]:
    """What `with_log` kept, as (the addresses in order, the owner's log identity or
    "" from a coordinator that predates it)."""
    words = kept.split()
    log_id = next((w.removeprefix(LOG_TAG) for w in words if w.startswith(LOG_TAG)), "")
    return [w for w in words if not w.startswith(LOG_TAG)], log_id


def believed(owner_log: str, answer_log: str) -> bool:
    """Rule 12: a decided answer counts only if it was read from the owner's log. An
    instance on another log (a mistyped schema, a file of its own) cannot know."""
    return not owner_log or answer_log == owner_log
