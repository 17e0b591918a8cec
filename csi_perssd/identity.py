"""Identity service: plugin info, capabilities, readiness."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import wrappers_pb2

from . import DRIVER_NAME, __version__
from .csi import csi_pb2 as pb
from .csi import csi_pb2_grpc as rpc
from .errors import precondition

Svc = pb.PluginCapability.Service
Exp = pb.PluginCapability.VolumeExpansion


class Identity(rpc.IdentityServicer):
    def __init__(self, has_controller: bool, problems: Callable[[], list[str]], has_group_controller: bool = False,
                 has_snapshot_metadata: bool = False):
        self.has_controller = has_controller
        self.has_group_controller = has_group_controller
        self.has_snapshot_metadata = has_snapshot_metadata      # alpha: only with --enable-snapshot-metadata
        self.problems = problems

    def GetPluginInfo(self, request: Any, context: Any) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(self, request: Any, context: Any) -> pb.GetPluginCapabilitiesResponse:
        caps = [pb.PluginCapability(service=Svc(type=Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
                pb.PluginCapability(volume_expansion=Exp(type=Exp.ONLINE))]
        if self.has_controller:
            caps.insert(0, pb.PluginCapability(service=Svc(type=Svc.CONTROLLER_SERVICE)))
        if self.has_group_controller:
            caps.append(pb.PluginCapability(service=Svc(type=Svc.GROUP_CONTROLLER_SERVICE)))
        if self.has_snapshot_metadata:
            caps.append(pb.PluginCapability(service=Svc(type=Svc.SNAPSHOT_METADATA_SERVICE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: Any, context: Any) -> pb.ProbeResponse:
        # spec: an unhealthy plugin or a missing dependency is FAILED_PRECONDITION (ready=false is
        # only for a healthy plugin that is still initialising, which this one never is)
        problems = self.problems()
        if problems:
            raise precondition("not healthy: " + "; ".join(problems)[:1000])
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
