"""The gRPC stubs of a driver listening on a unix socket, for whatever runs one (a host process,
tests.harness.procs.DriverProcess; a container, tests.container.pods.ContainerPod)."""
from __future__ import annotations

from typing import Any

import grpc

from csi_perssd.csi import csi_pb2_grpc as rpc


class CsiStubs:
    """Mixin: `socket` is the unix socket path; one channel, opened on first use, closed by `_close`."""
    socket: str
    _channel: grpc.Channel | None = None

    def _chan(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self._channel

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def identity(self) -> Any:
        return rpc.IdentityStub(self._chan())

    @property
    def controller(self) -> Any:
        return rpc.ControllerStub(self._chan())

    @property
    def node(self) -> Any:
        return rpc.NodeStub(self._chan())

    @property
    def group(self) -> Any:
        return rpc.GroupControllerStub(self._chan())

    @property
    def metadata(self) -> Any:
        return rpc.SnapshotMetadataStub(self._chan())
