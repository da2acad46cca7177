"""A deliberately broken wallet, to prove the chaos checker can fail.

It breaks docs/design.md rule 1: a transaction it prepared more than 0.3 s ago is aborted
on its own, without asking the coordinator. Its Commit handling (one by one or batched) is slow (0.5 s), so
every committed purchase hits that window: the shop has logged COMMIT and the order
service confirms the order, while this wallet has already released the hold.

Run: python -m tests.apps.broken_wallet --db wallet.db  (the wallet's flags)
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import participant_parser, run_participant
from services.wallet.service import ACCESS, WalletApi, WalletHandler
from services.wallet.v1 import wallet_pb2_grpc
from twopc import Participant
from twopc.participant.helper import ABORTED
from twopc.v1 import participant_pb2

GIVE_UP_AFTER_S = 0.3


class ImpatientParticipant(Participant):
    """Aborts prepared transactions on its own: what 2PC forbids."""

    async def open(self) -> None:
        await super().open()
        self._rogue = asyncio.create_task(self._give_up_forever())

    async def close(self) -> None:
        rogue = getattr(self, "_rogue", None)  # None if the store never opened
        if rogue is not None:
            rogue.cancel()
        await super().close()

    async def _give_up_forever(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            for txn_id, _ in await self.in_doubt(GIVE_UP_AFTER_S):
                await self.apply(txn_id, ABORTED)

    async def Commit(self, request: participant_pb2.CommitRequest, context: Any) -> participant_pb2.CommitResponse:  # noqa: N802
        await asyncio.sleep(0.5)
        return await super().Commit(request, context)

    async def CommitMany(  # noqa: N802 - the RPC's name
        self, request: participant_pb2.CommitManyRequest, context: Any
    ) -> participant_pb2.CommitManyResponse:
        await asyncio.sleep(0.5)
        return await super().CommitMany(request, context)


if __name__ == "__main__":
    args = participant_parser("python -m tests.apps.broken_wallet", __doc__.split("\n\n")[0]).parse_args()
    run_participant(
        WalletHandler(),
        lambda server, p, readers: wallet_pb2_grpc.add_WalletServicer_to_server(WalletApi(p, readers), server),
        args,
        ImpatientParticipant,
        access=ACCESS,
    )
