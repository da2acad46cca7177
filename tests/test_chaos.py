"""The chaos harness: reproducible schedules, and a checker that catches a real bug."""

from __future__ import annotations

import random
from pathlib import Path

from services import chaos


def test_schedule_is_reproducible_and_covers_every_kind() -> None:
    """The same seed plans the same faults; every kind is planned at least once."""
    kinds = [*chaos.KILLS, *chaos.PAUSES, *chaos.PARTITIONS]
    opts = chaos.Options(seed=11, duration_s=60)
    first = chaos.schedule(random.Random(11), opts, kinds)
    assert first == chaos.schedule(random.Random(11), opts, kinds)
    assert first != chaos.schedule(random.Random(12), opts, kinds)
    assert {f.kind for f in first} == set(kinds)
    pauses = [f for f in first if f.kind in chaos.PAUSES]
    assert all(f.length_s > opts.prepare_timeout_s for f in pauses)  # longer than the prepare deadline


async def test_checker_catches_a_participant_that_decides_alone(tmp_path: Path) -> None:
    """Under the same harness, a wallet that aborts prepared transactions on its own
    (rule 1 broken) is reported: committed orders without a debit, and client views that
    do not match."""
    opts = chaos.Options(
        seed=5,
        duration_s=4.0,
        concurrency=2,
        partitions=False,
        net_faults="",
        wallet_module="tests.apps.broken_wallet",
        recovery_timeout_s=5.0,
        workdir=str(tmp_path / "chaos"),
    )
    result = await chaos.run(opts)
    assert result.purchases.get("committed", 0) > 0
    found = "\n".join(result.violations)
    assert "order confirmed, wallet aborted, not debited" in found
    assert "client saw COMMITTED" in found


async def test_short_run_with_faults_keeps_every_invariant(tmp_path: Path) -> None:
    """A short run with kills, pauses and a lossy network ends with no violation and
    nothing in doubt (the long runs are `make chaos`, in CI)."""
    opts = chaos.Options(seed=3, duration_s=8.0, concurrency=4, partitions=False, workdir=str(tmp_path / "c"))
    result = await chaos.run(opts)
    assert result.violations == []
    assert result.recovery_s is not None and result.totals["in_doubt"] == 0
    assert sum(result.faults.get(k, 0) for k in chaos.KILLS + chaos.PAUSES) >= 2
    assert result.purchases.get("committed", 0) > 0
