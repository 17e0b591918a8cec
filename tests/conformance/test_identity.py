"""Identity service, per spec.md "Identity Service RPC"."""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from csi_perssd import DRIVER_NAME, __version__
from csi_perssd.csi import csi_pb2 as pb
from tests.plugins.driver import expect

pytestmark = pytest.mark.root
Svc = pb.PluginCapability.Service
Exp = pb.PluginCapability.VolumeExpansion


class TestGetPluginInfo:
    def test_should_return_the_driver_name_and_version(self, driver):
        resp = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        assert resp.name == DRIVER_NAME
        assert resp.vendor_version == __version__

    def test_name_should_follow_domain_name_notation(self, driver):
        # "The name MUST follow domain name notation format ... 63 characters or less,
        # beginning and ending with an alphanumeric character"
        name = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest()).name
        assert len(name) <= 63
        assert re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name)

    def test_vendor_version_should_be_set(self, driver):
        assert driver.identity.GetPluginInfo(pb.GetPluginInfoRequest()).vendor_version

    def test_should_be_idempotent(self, driver):
        a = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        b = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        assert a == b


class TestGetPluginCapabilities:
    def test_should_advertise_controller_topology_and_online_expansion(self, driver):
        caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        services = {c.service.type for c in caps if c.HasField("service")}
        expansion = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
        assert services == {Svc.CONTROLLER_SERVICE, Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS, Svc.GROUP_CONTROLLER_SERVICE}
        assert expansion == {Exp.ONLINE}

    def test_should_not_advertise_unknown_capabilities(self, driver):
        caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        for c in caps:
            assert c.WhichOneof("type") in ("service", "volume_expansion")
            if c.HasField("service"):
                assert c.service.type != Svc.UNKNOWN
                # alpha capability: off unless enabled
                assert c.service.type != Svc.SNAPSHOT_METADATA_SERVICE


class TestProbe:
    def test_should_report_ready(self, driver):
        resp = driver.identity.Probe(pb.ProbeRequest())
        assert resp.HasField("ready") and resp.ready.value is True

    def test_should_be_repeatable(self, driver):
        for _ in range(3):
            assert driver.identity.Probe(pb.ProbeRequest()).ready.value

    def test_should_fail_with_failed_precondition_when_not_healthy(self, fresh_driver):
        # the rawfile backend's directory replaced by a file: the backend cannot work
        root = Path(fresh_driver.proc.rawfile_dir)
        moved = root.with_name("volumes.moved")
        root.rename(moved)
        root.write_text("not a directory")
        try:
            e = expect(grpc.StatusCode.FAILED_PRECONDITION, fresh_driver.identity.Probe, pb.ProbeRequest())
            assert str(root) in e.details()
        finally:
            root.unlink()
            moved.rename(root)
        assert fresh_driver.identity.Probe(pb.ProbeRequest()).ready.value


class TestModes:
    """A node plugin and a controller plugin each serve only their services (the others are
    UNIMPLEMENTED), while both report the same plugin capabilities: the plugin as a whole."""

    @pytest.fixture
    def proc(self, request, tmp_path_factory):
        from tests.plugins.driver import cleanup_under
        from tests.harness.procs import DriverProcess
        base = tmp_path_factory.mktemp("mode")
        p = DriverProcess(base, mode=request.param, node_id="node-m", pool="pool-m").start()
        try:
            yield p
        finally:
            assert p.stop() == 0
            cleanup_under(str(base))

    @pytest.mark.parametrize("proc", ["node"], indirect=True)
    def test_node_mode_serves_no_controller_but_reports_the_whole_plugin(self, proc):
        # spec: GetPluginCapabilities describes the plugin "as a whole", the same set in every
        # instance "regardless of which RPCs an instance is serving"
        caps = proc.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        assert {Svc.CONTROLLER_SERVICE, Svc.GROUP_CONTROLLER_SERVICE} <= {c.service.type for c in caps if c.HasField("service")}
        expect(grpc.StatusCode.UNIMPLEMENTED, proc.controller.ControllerGetCapabilities,
               pb.ControllerGetCapabilitiesRequest())
        expect(grpc.StatusCode.UNIMPLEMENTED, proc.group.GroupControllerGetCapabilities,
               pb.GroupControllerGetCapabilitiesRequest())
        assert proc.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "node-m"

    @pytest.mark.parametrize("proc", ["controller"], indirect=True)
    def test_controller_mode_has_no_node_service(self, proc):
        caps = proc.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        assert Svc.CONTROLLER_SERVICE in {c.service.type for c in caps if c.HasField("service")}
        expect(grpc.StatusCode.UNIMPLEMENTED, proc.node.NodeGetInfo, pb.NodeGetInfoRequest())
        assert proc.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
