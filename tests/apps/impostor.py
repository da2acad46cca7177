"""An impostor: whoever holds some certificate from the CA, listening where a
coordinator or a participant is expected, answering as one would.

It answers every GetOutcome with `--outcome` (COMMITTED by default) and votes
COMMIT to every Prepare, and logs each call it serves (`served` events), so a test
sees whether anyone believed it.

    python -m tests.apps.impostor --tls-dir pki/client --port 50050 [--outcome ABORTED]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import structlog

from twopc import Credentials, rpc
from twopc.observe.logconfig import configure as configure_logs
from twopc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
)

_log = structlog.get_logger("impostor")


class Outcomes(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, outcome: coordinator_pb2.Outcome.ValueType) -> None:
        self.outcome = outcome

    async def GetOutcome(  # noqa: N802 - the RPC's name
        self, request: coordinator_pb2.GetOutcomeRequest, context: Any
    ) -> coordinator_pb2.GetOutcomeResponse:
        _log.warning("served", rpc="GetOutcome", txn_id=request.txn_id)
        return coordinator_pb2.GetOutcomeResponse(outcome=self.outcome)


class Votes(participant_pb2_grpc.ParticipantServicer):
    async def Prepare(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.PrepareRequest, context: Any
    ) -> participant_pb2.PrepareResponse:
        _log.warning("served", rpc="Prepare", txn_id=request.txn_id)
        return participant_pb2.PrepareResponse(vote=participant_pb2.VOTE_COMMIT)

    async def Commit(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitRequest, context: Any
    ) -> participant_pb2.CommitResponse:
        _log.warning("served", rpc="Commit", txn_id=request.txn_id)
        return participant_pb2.CommitResponse()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tls-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--outcome", choices=["COMMITTED", "ABORTED"], default="COMMITTED")
    args = p.parse_args()
    configure_logs("json", level="info")
    outcome = coordinator_pb2.Outcome.Value(f"OUTCOME_{args.outcome}")
    await rpc.serve(
        f"{args.host}:{args.port}",
        Credentials.from_dir(args.tls_dir),
        [
            lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Outcomes(outcome), server),
            # Serves only Prepare and Commit, all an impostor needs to be believed.
            lambda server: participant_pb2_grpc.add_ParticipantServicer_to_server(Votes(), server),  # type: ignore[abstract]
        ],
        grace_s=0.1,
    )


if __name__ == "__main__":
    asyncio.run(main())
