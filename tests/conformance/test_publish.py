"""ControllerPublishVolume's readonly flag and the node attach limit, per spec.md
"ControllerPublishVolume" (errors: "Volume published but is incompatible", "Max volumes
attached") and "NodeGetInfo" (max_volumes_per_node). One test per sentence."""
from __future__ import annotations

import errno
import os

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog, NodeRecord
from csi_perssd.remote.filestore import FileStore
from tests.plugins.driver import (
    NODE_ID,
    POOL,
    AccessMode,
    create_request,
    expect,
    mount_cap,
)

pytestmark = pytest.mark.root
C = grpc.StatusCode
Cap = pb.ControllerServiceCapability.RPC
LIMIT = 3
DRIVER_FLAGS = ["--max-volumes-per-node", str(LIMIT)]
OBJECT = {"persistence": "object"}


def catalog(driver) -> Catalog:
    return Catalog(FileStore(driver.proc.catalog.removeprefix("file://")))


def publish(driver, vid: str, node: str = NODE_ID, cap: pb.VolumeCapability | None = None,
            readonly: bool = False) -> pb.ControllerPublishVolumeResponse:
    return driver.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap or mount_cap(), readonly=readonly))


def unpublish(driver, vid: str, node: str = NODE_ID) -> None:
    driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node))


class TestReadonlyPublish:
    def test_publish_readonly_should_be_advertised(self, driver):
        caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()).capabilities}
        assert Cap.PUBLISH_READONLY in caps

    def test_the_published_capability_should_be_recorded(self, driver):
        vol = driver.create(create_request())
        publish(driver, vol.volume_id, readonly=True)
        rec = catalog(driver).volume(vol.volume_id)
        assert rec.published["readonly"] is True
        assert rec.published["capability"]["access_type"] == "mount"
        unpublish(driver, vol.volume_id)
        assert catalog(driver).volume(vol.volume_id).published == {}

    def test_an_identical_republish_should_succeed(self, driver):
        vol = driver.create(create_request())
        a = publish(driver, vol.volume_id, readonly=True)
        b = publish(driver, vol.volume_id, readonly=True)
        assert a.publish_context == b.publish_context and a.publish_context["readonly"] == "true"
        unpublish(driver, vol.volume_id)

    @pytest.mark.parametrize("change", ["readonly", "mode", "fs_type", "flags"])
    def test_an_incompatible_republish_should_fail_with_already_exists(self, driver, change):
        vol = driver.create(create_request())
        publish(driver, vol.volume_id)
        again = {"readonly": {"readonly": True},
                 "mode": {"cap": mount_cap(mode=AccessMode.SINGLE_NODE_READER_ONLY)},
                 "fs_type": {"cap": mount_cap("xfs")},
                 "flags": {"cap": mount_cap(flags=["noatime"])}}[change]
        epoch = catalog(driver).volume(vol.volume_id).epoch
        expect(C.ALREADY_EXISTS, publish, driver, vol.volume_id, **again)
        rec = catalog(driver).volume(vol.volume_id)
        assert rec.epoch == epoch and rec.published["readonly"] is False      # nothing changed
        unpublish(driver, vol.volume_id)

    def test_a_readonly_publish_should_stage_read_only(self, driver):
        vol = driver.create(create_request())
        ctx = dict(publish(driver, vol.volume_id, readonly=True).publish_context)
        staging = driver.path("staging")
        driver.node.NodeStageVolume(driver.stage_request(vol.volume_id, staging, mount_cap(), ctx))
        with pytest.raises(OSError) as e, open(os.path.join(staging, "f"), "wb") as f:
            f.write(b"x")
        assert e.value.errno == errno.EROFS


class TestAttachLimit:
    def test_node_get_info_should_report_the_limit(self, driver):
        assert driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).max_volumes_per_node == LIMIT

    def test_publishing_past_the_limit_should_fail_with_resource_exhausted(self, driver):
        held = [v for v in (r.id for r in catalog(driver).list_volumes() if r.owner == NODE_ID)]
        for vid in held:
            unpublish(driver, vid)
        vols = [driver.create(create_request()).volume_id for _ in range(LIMIT + 1)]
        for vid in vols[:LIMIT]:
            publish(driver, vid)
        publish(driver, vols[0])                   # a re-publish is not a new attachment
        e = expect(C.RESOURCE_EXHAUSTED, publish, driver, vols[LIMIT])
        assert str(LIMIT) in e.details()
        assert catalog(driver).volume(vols[LIMIT]).owner == ""
        unpublish(driver, vols[0])
        publish(driver, vols[LIMIT])               # room again after a detach
        for vid in vols[1:]:
            unpublish(driver, vid)

    def test_the_limit_of_another_node_should_come_from_its_catalog_record(self, driver):
        catalog(driver).put_node(NodeRecord(id="node-one", pool=POOL, max_volumes=1))
        a, b = (driver.create(create_request(parameters=OBJECT)).volume_id for _ in range(2))
        publish(driver, a, node="node-one")
        expect(C.RESOURCE_EXHAUSTED, publish, driver, b, node="node-one")
        publish(driver, b)                         # this node still has room
        unpublish(driver, a, "node-one")
        unpublish(driver, b)
