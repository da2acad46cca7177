"""The coordinator role: phase 1 with deadlines, the durable decision, phase 2 delivery,
recovery, and the GetOutcome server (rules 2-5 and 9-12 of docs/design.md).

`core` holds `Coordinator`; `batching` sends a participant's Prepares as PrepareMany
batches. The decision logs it writes to are in `twopc.decisions`.
"""

from twopc.coordinator.core import Coordinator

__all__ = ["Coordinator"]
