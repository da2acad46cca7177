"""The coordinator role: phase 1 with deadlines, the durable decision, phase 2 delivery,
recovery, and the GetOutcome server (rules 2-5 and 9-12 of docs/design.md).

`core` holds `Coordinator` (its lifecycle, `run`, the decision), built from
`phase1` (Prepares and votes), `delivery` (phase 2, recovery, END), `outcomes`
(GetOutcome and the peer check) and `channels` (one channel per participant, with
the `batching` of its Prepares and Commits). The decision logs it writes to are in
`twopc.decisions`.
"""

from twopc.coordinator.core import Coordinator

__all__ = ["Coordinator"]
