"""Named crash points: kill this process at an exact step of the protocol.

Tests set `TWOPC_CRASH_AT` in a real process's environment to a comma-separated list
of point names; when the process reaches a listed point it sends itself SIGKILL, the
way a power cut or an OOM kill would end it (no cleanup, no flush). The idea is
FoundationDB's BUGGIFY and Narayana's Byteman rules. With the variable unset the
check is a test of one module-level constant.

The points (each named in the exhaustive model in tests/ too):
    participant.after_prepare_durable  prepared state is on disk, vote not yet sent
    participant.before_commit          a Commit arrived (so the vote was counted), not applied
    coordinator.before_decision        all votes in, nothing logged
    coordinator.after_commit_logged    COMMIT is durable, no Commit sent yet
    coordinator.after_first_commit     one participant acknowledged Commit
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset(
    {
        "participant.after_prepare_durable",
        "participant.before_commit",
        "coordinator.before_decision",
        "coordinator.after_commit_logged",
        "coordinator.after_first_commit",
    }
)

_ARMED = frozenset(p.strip() for p in os.environ.get("TWOPC_CRASH_AT", "").split(",") if p.strip())
if _ARMED - POINTS:
    raise ValueError(f"TWOPC_CRASH_AT names unknown crash points: {sorted(_ARMED - POINTS)}")


def crash_point(name: str) -> None:
    """Dies here, by SIGKILL, if the environment armed this point."""
    if _ARMED and name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
