"""One gRPC channel per participant, with its stub and its batchers.

The coordinator reuses one channel to each participant for every transaction; the
Prepares and the Commits bound for it go through that channel's two batchers
(`twopc.coordinator.batching`), so batching is per participant channel.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc

from twopc import rpc
from twopc.config import CoordinatorConfig, Credentials
from twopc.coordinator.batching import Batcher, batchers
from twopc.v1 import participant_pb2, participant_pb2_grpc


class Channels:
    """The coordinator's channels to participants, made on first use.

    Args:
        credentials: transport security for every channel.
        interceptors: client interceptors for every channel.
        config: the batch sizes, batches in flight and RPC timeout.
        spawn: starts a batch's sender as a task the coordinator cancels on close.
        sent: called once for every message sent (the coordinator's count).
    """

    def __init__(
        self,
        credentials: Credentials,
        interceptors: Sequence[Any],
        config: CoordinatorConfig,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        sent: Callable[[], None],
    ) -> None:
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._config = config
        self._spawn = spawn
        self.sent = sent
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, participant_pb2_grpc.ParticipantAsyncStub] = {}
        self._prepares: dict[str, Batcher[participant_pb2.PrepareRequest, participant_pb2.PrepareResponse]] = {}
        self._commits: dict[str, Batcher[str, None]] = {}

    def stub(self, target: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        """The stub of `target`'s channel."""
        stub = self.stubs.get(target)
        if stub is None:
            self._channels[target] = rpc.channel(target, self._credentials, self._interceptors)
            stub = self.stubs[target] = participant_pb2_grpc.ParticipantStub(self._channels[target])
        return stub

    def prepares(self, target: str) -> Batcher[participant_pb2.PrepareRequest, participant_pb2.PrepareResponse]:
        """The Prepares bound for `target`."""
        if target not in self._prepares:
            self._open(target)
        return self._prepares[target]

    def commits(self, target: str) -> Batcher[str, None]:
        """The Commits bound for `target`."""
        if target not in self._commits:
            self._open(target)
        return self._commits[target]

    def _open(self, target: str) -> None:
        c = self._config
        self._prepares[target], self._commits[target] = batchers(
            target,
            self.stub(target),
            max_prepare_batch=c.max_prepare_batch,
            max_commit_batch=c.max_commit_batch,
            in_flight=c.batches_in_flight,
            rpc_timeout_s=c.rpc_timeout_s,
            spawn=self._spawn,
            sent=self.sent,
        )

    async def close(self) -> None:
        """Closes every channel; the next use opens new ones."""
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        self.stubs.clear()
        self._prepares.clear()
        self._commits.clear()
