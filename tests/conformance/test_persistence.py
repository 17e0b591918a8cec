"""persistence=object volumes through the CSI calls: NodeUnstage flushes and commits a generation
to the object store (the file:// catalog here), a later NodeStage — on this node or another node
of the pool — finds the data again; the controller reports a missing generation as abnormal."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog
from csi_perssd.remote.filestore import FileStore
from tests.harness.procs import DriverProcess
from tests.plugins.driver import MiB, NODE_ID, POOL, XFS_SIZE, block_cap, cleanup_under, mount_cap

pytestmark = pytest.mark.root
C = grpc.StatusCode
OBJECT = {"persistence": "object", "chunkSize": "1Mi"}


def catalog(d) -> Catalog:
    return Catalog(FileStore(d.proc.catalog.removeprefix("file://")))


def fill(path: str, seed: int, size: int = 3 * MiB) -> str:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def release_node(d, vid: str, staging: str, target: str, node: object = None) -> None:
    n = node or d.node
    n.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
    n.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))


@pytest.fixture
def node_b(driver, tmp_path_factory):
    """A second node plugin (--mode node) of the same pool, sharing the object store."""
    base = tmp_path_factory.mktemp("node-b")
    proc = DriverProcess(base, mode="node", node_id="node-b", pool=POOL, catalog=driver.proc.catalog).start()
    try:
        yield proc
    finally:
        proc.stop()
        cleanup_under(str(base))


class TestObjectPersistence:
    @pytest.mark.parametrize("fs_type,size", [("ext4", 32 * MiB), ("xfs", XFS_SIZE)])
    def test_unstage_commits_a_generation_and_restage_finds_the_data(self, driver, fs_type, size):
        cap = mount_cap(fs_type)
        vid, staging, target = driver.published(cap, size=size, parameters=OBJECT)
        want = fill(os.path.join(target, "blob"), 1)
        release_node(driver, vid, staging, target)
        rec = catalog(driver).volume(vid)
        assert rec.generation >= 1 and rec.generation_node == NODE_ID
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
        assert not got.status.volume_condition.abnormal
        driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))
        assert digest(os.path.join(staging, "blob")) == want

    def test_volume_moves_to_another_node_of_the_pool(self, driver, node_b):
        cap = mount_cap()
        vid, staging, target = driver.published(cap, size=32 * MiB, parameters=OBJECT)
        want = fill(os.path.join(target, "blob"), 2)
        release_node(driver, vid, staging, target)
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))
        ctx = driver.publish(vid, cap, node_id="node-b")
        b_staging, b_target = driver.path("b-staging"), driver.path("b-target")
        node_b.node.NodeStageVolume(driver.stage_request(vid, b_staging, cap, ctx))
        node_b.node.NodePublishVolume(driver.publish_request(vid, b_staging, b_target, cap))
        assert digest(os.path.join(b_target, "blob")) == want
        fill(os.path.join(b_target, "second"), 3)
        release_node(driver, vid, b_staging, b_target, node_b.node)
        assert catalog(driver).volume(vid).generation_node == "node-b"
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))

    def test_block_volume_contents_survive_a_flush(self, driver):
        cap = block_cap()
        vid, staging, target = driver.published(cap, size=8 * MiB, parameters=OBJECT)
        payload = os.urandom(64 * 1024)
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, payload, 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        release_node(driver, vid, staging, target)
        assert catalog(driver).volume(vid).generation >= 1
        driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))
        driver.node.NodePublishVolume(driver.publish_request(vid, staging, target, cap))
        fd = os.open(target, os.O_RDONLY)
        try:
            assert os.pread(fd, len(payload), 2 * MiB) == payload
        finally:
            os.close(fd)

    def test_controller_reports_a_missing_generation_as_abnormal(self, driver):
        vid, staging, target = driver.published(parameters=OBJECT)
        fill(os.path.join(target, "blob"), 4, MiB)
        release_node(driver, vid, staging, target)
        rec = catalog(driver).volume(vid)
        store_root = Path(driver.proc.catalog.removeprefix("file://"))
        manifest = store_root / "volumes" / vid / "gen" / f"{rec.generation:010d}.manifest"
        assert manifest.is_file()
        manifest.unlink()
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
        assert got.status.volume_condition.abnormal
        assert str(rec.generation) in got.status.volume_condition.message
        listed = {e.volume.volume_id: e for e in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries}
        assert listed[vid].status.volume_condition.abnormal
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))
        driver.created.remove(vid)
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
