"""Node service, per spec.md "Node Service RPC": one test per sentence, on real loop devices,
real ext4/xfs file systems and real mounts. One server for the module; each test starts from
fresh volumes (created, controller-published and staged through the fixture helpers)."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading

import grpc
import pytest

from csi_perssd import TOPOLOGY_NODE_KEY as NODE_KEY
from csi_perssd import TOPOLOGY_POOL_KEY as POOL_KEY
from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.local import fs
from tests.harness.blockio import write_file
from tests.plugins.driver import (MiB, NODE_ID, POOL, XFS_SIZE, AccessMode, block_cap, expect,
                                  mount_cap, mounts_under)

pytestmark = pytest.mark.root
C = grpc.StatusCode
NCap = pb.NodeServiceCapability.RPC
GONE = "pvol-" + "0" * 32          # a well-formed ID of a volume that does not exist


# ----------------------------------------------------------------------------- helpers

def mount_entry(path: str) -> tuple[str, str, set[str]] | None:
    """(fs type, source, options) of the topmost mount at `path`."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if parts[4] == real:
                fstype, source, sopts = right.split()[:3]
                found = (fstype, source, set(parts[5].split(",")) | set(sopts.split(",")))
    return found


def statfs_total(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def unpublish(driver, vid: str, target: str) -> None:
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))


def unstage(driver, vid: str, staging: str) -> None:
    driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))


# ----------------------------------------------------------------------------- info / capabilities

class TestNodeGetInfo:
    def test_should_return_node_id_max_volumes_and_topology(self, driver):
        resp = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert resp.node_id == NODE_ID
        assert resp.max_volumes_per_node > 0
        assert dict(resp.accessible_topology.segments) == {NODE_KEY: NODE_ID, POOL_KEY: POOL}

    def test_node_id_should_be_accepted_by_controller_publish(self, driver):
        node_id = driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
        vol = driver.create()
        assert "epoch" in driver.publish(vol.volume_id, node_id=node_id)


class TestNodeGetCapabilities:
    def test_should_return_the_implemented_capabilities(self, driver):
        caps = {c.rpc.type for c in driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
        assert caps == {NCap.STAGE_UNSTAGE_VOLUME, NCap.GET_VOLUME_STATS, NCap.EXPAND_VOLUME,
                        NCap.VOLUME_CONDITION, NCap.SINGLE_NODE_MULTI_WRITER}


# ----------------------------------------------------------------------------- NodeStageVolume

class TestNodeStageVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.node.NodeStageVolume,
               pb.NodeStageVolumeRequest(staging_target_path=driver.path("s"), volume_capability=mount_cap()))

    def test_should_fail_when_no_staging_path_is_provided(self, driver):
        vol = driver.create()
        expect(C.INVALID_ARGUMENT, driver.node.NodeStageVolume,
               pb.NodeStageVolumeRequest(volume_id=vol.volume_id, volume_capability=mount_cap()))

    def test_should_fail_when_no_volume_capability_is_provided(self, driver):
        vol = driver.create()
        expect(C.INVALID_ARGUMENT, driver.node.NodeStageVolume,
               pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=driver.path("s")))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        staging = driver.path("s")
        expect(C.NOT_FOUND, driver.node.NodeStageVolume, driver.stage_request(GONE, staging))
        assert not os.path.exists(staging)

    def test_should_fail_when_not_controller_published_to_this_node(self, driver):
        vol = driver.create()
        expect(C.FAILED_PRECONDITION, driver.node.NodeStageVolume,
               driver.stage_request(vol.volume_id, driver.path("s")))

    def test_should_fail_for_a_stale_publish_context(self, driver):
        vol = driver.create()
        ctx = driver.publish(vol.volume_id)
        ctx["epoch"] = str(int(ctx["epoch"]) - 1)
        expect(C.FAILED_PRECONDITION, driver.node.NodeStageVolume,
               driver.stage_request(vol.volume_id, driver.path("s"), ctx=ctx))

    def test_should_stage_at_a_path_that_does_not_exist_yet(self, driver):
        vid, staging = driver.staged()
        fstype, source, _ = mount_entry(staging)
        assert fstype == "ext4" and source.startswith("/dev/loop")

    def test_should_stage_at_an_existing_directory(self, driver):
        vol = driver.create()
        ctx = driver.publish(vol.volume_id)
        staging = driver.path("s")
        os.makedirs(staging)
        driver.node.NodeStageVolume(driver.stage_request(vol.volume_id, staging, ctx=ctx))
        assert mount_entry(staging) is not None

    def test_should_be_idempotent(self, driver):
        vid, staging = driver.staged()
        before = mount_entry(staging)
        driver.node.NodeStageVolume(driver.stage_request(vid, staging))
        assert mount_entry(staging) == before
        assert len([m for m in mounts_under(staging)]) == 1

    @pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
    def test_should_format_with_the_requested_file_system(self, driver, fs_type):
        vid, staging = driver.staged(mount_cap(fs_type), size=XFS_SIZE)
        assert mount_entry(staging)[0] == fs_type

    def test_should_use_the_volumes_file_system_when_the_capability_names_none(self, driver):
        vid, staging = driver.staged(mount_cap(""), size=XFS_SIZE, parameters={"persistence": "local", "fsType": "xfs"})
        assert mount_entry(staging)[0] == "xfs"
        driver.node.NodeStageVolume(driver.stage_request(vid, staging, mount_cap("")))      # idempotent

    def test_should_mount_with_the_requested_flags(self, driver):
        vid, staging = driver.staged(mount_cap(flags=["noatime", "nodiratime"]))
        assert {"noatime", "nodiratime"} <= mount_entry(staging)[2]

    def test_should_fail_with_already_exists_for_a_different_capability_at_the_same_path(self, driver):
        vid, staging = driver.staged()
        expect(C.ALREADY_EXISTS, driver.node.NodeStageVolume,
               driver.stage_request(vid, staging, mount_cap(flags=["noatime"])))

    def test_should_fail_for_an_access_type_the_volume_lacks(self, driver):
        vol = driver.create()
        ctx = driver.publish(vol.volume_id)
        expect(C.FAILED_PRECONDITION, driver.node.NodeStageVolume,
               driver.stage_request(vol.volume_id, driver.path("s"), block_cap(), ctx))

    def test_should_fail_for_a_file_system_the_volume_lacks(self, driver):
        vol = driver.create()
        ctx = driver.publish(vol.volume_id)
        staging = driver.path("s")
        expect(C.FAILED_PRECONDITION, driver.node.NodeStageVolume,
               driver.stage_request(vol.volume_id, staging, mount_cap("xfs"), ctx))
        assert not os.path.exists(staging)

    def test_should_fail_for_a_multi_node_access_mode(self, driver):
        vol = driver.create()
        ctx = driver.publish(vol.volume_id)
        expect(C.INVALID_ARGUMENT, driver.node.NodeStageVolume, driver.stage_request(
            vol.volume_id, driver.path("s"), mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER), ctx))

    def test_should_stage_block_volumes_without_a_file_system(self, driver):
        vid, staging = driver.staged(block_cap())
        assert mount_entry(staging) is None

    @pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
    @pytest.mark.parametrize("persistence", ["local", "object"])
    def test_should_format_only_on_first_use(self, driver, fs_type, persistence):
        cap = mount_cap(fs_type)
        vid, staging, target = driver.published(cap, size=XFS_SIZE, parameters={"persistence": persistence})
        write_file(os.path.join(target, "keep"), b"still here")
        unpublish(driver, vid, target)
        unstage(driver, vid, staging)
        assert mount_entry(staging) is None
        driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))
        driver.node.NodePublishVolume(driver.publish_request(vid, staging, target, cap))
        with open(os.path.join(target, "keep"), "rb") as f:
            assert f.read() == b"still here"


# ----------------------------------------------------------------------------- NodeUnstageVolume

class TestNodeUnstageVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.node.NodeUnstageVolume,
               pb.NodeUnstageVolumeRequest(staging_target_path=driver.path("s")))

    def test_should_fail_when_no_staging_path_is_provided(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.node.NodeUnstageVolume,
               pb.NodeUnstageVolumeRequest(volume_id=GONE, staging_target_path=driver.path("s")))

    def test_should_unstage_and_be_idempotent(self, driver):
        vid, staging = driver.staged()
        for _ in range(2):
            unstage(driver, vid, staging)
            assert mount_entry(staging) is None

    def test_should_succeed_when_the_volume_was_never_staged(self, driver):
        vol = driver.create()
        unstage(driver, vol.volume_id, driver.path("s"))

    def test_should_succeed_for_a_path_the_volume_is_not_staged_at(self, driver):
        # "If the volume ... is not staged to the staging_target_path, the Plugin MUST reply 0 OK."
        vid, staging = driver.staged()
        unstage(driver, vid, driver.path("elsewhere"))
        assert mount_entry(staging) is not None          # the real staging is untouched

    def test_should_unstage_block_volumes(self, driver):
        vid, staging = driver.staged(block_cap())
        unstage(driver, vid, staging)
        unstage(driver, vid, staging)


# ----------------------------------------------------------------------------- NodePublishVolume

class TestNodePublishVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodePublishVolume,
               driver.publish_request("", staging, driver.path("t")))

    def test_should_fail_when_no_target_path_is_provided(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodePublishVolume, driver.publish_request(vid, staging, ""))

    def test_should_fail_when_no_volume_capability_is_provided(self, driver):
        vid, staging = driver.staged()
        req = driver.publish_request(vid, staging, driver.path("t"))
        req.ClearField("volume_capability")
        expect(C.INVALID_ARGUMENT, driver.node.NodePublishVolume, req)

    def test_should_fail_with_failed_precondition_when_no_staging_path_is_provided(self, driver):
        # "Staging target path not set | 9 FAILED_PRECONDITION"
        vid, staging = driver.staged()
        target = driver.path("t")
        expect(C.FAILED_PRECONDITION, driver.node.NodePublishVolume, driver.publish_request(vid, "", target))
        assert not os.path.exists(target)

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        target = driver.path("t")
        expect(C.NOT_FOUND, driver.node.NodePublishVolume, driver.publish_request(GONE, driver.path("s"), target))
        assert not os.path.exists(target)

    def test_should_fail_when_the_volume_is_not_staged(self, driver):
        vol = driver.create()
        driver.publish(vol.volume_id)
        expect(C.FAILED_PRECONDITION, driver.node.NodePublishVolume,
               driver.publish_request(vol.volume_id, driver.path("s"), driver.path("t")))

    def test_should_publish_at_a_target_that_does_not_exist_yet(self, driver):
        vid, staging, target = driver.published()
        write_file(os.path.join(target, "f"), b"data")
        with open(os.path.join(staging, "f"), "rb") as f:
            assert f.read() == b"data"

    def test_should_publish_at_an_existing_directory(self, driver):
        vid, staging = driver.staged()
        target = driver.path("t")
        os.makedirs(target)
        driver.node.NodePublishVolume(driver.publish_request(vid, staging, target))
        assert mount_entry(target) is not None

    def test_should_be_idempotent(self, driver):
        vid, staging, target = driver.published()
        driver.node.NodePublishVolume(driver.publish_request(vid, staging, target))
        assert len(mounts_under(target)) == 1

    def test_read_only_publish_should_be_really_read_only(self, driver):
        vid, staging, target = driver.published(readonly=True)
        assert "ro" in mount_entry(target)[2]
        with pytest.raises(OSError) as e:
            write_file(os.path.join(target, "f"), b"x")
        assert e.value.errno == errno.EROFS
        write_file(os.path.join(staging, "f"), b"x")          # the staged mount stays writable

    def test_reader_only_mode_should_publish_read_only(self, driver):
        cap = mount_cap(mode=AccessMode.SINGLE_NODE_READER_ONLY)
        vid, staging, target = driver.published(cap)
        with pytest.raises(OSError) as e:
            write_file(os.path.join(target, "f"), b"x")
        assert e.value.errno == errno.EROFS

    def test_should_fail_with_already_exists_for_different_options_at_the_same_target(self, driver):
        vid, staging, target = driver.published()
        expect(C.ALREADY_EXISTS, driver.node.NodePublishVolume,
               driver.publish_request(vid, staging, target, readonly=True))

    def test_should_fail_for_an_access_type_the_volume_lacks(self, driver):
        vid, staging = driver.staged()
        expect(C.FAILED_PRECONDITION, driver.node.NodePublishVolume,
               driver.publish_request(vid, staging, driver.path("t"), block_cap()))

    def test_single_writer_should_refuse_a_second_target(self, driver):
        cap = mount_cap(mode=AccessMode.SINGLE_NODE_SINGLE_WRITER)
        vid, staging, target = driver.published(cap)
        expect(C.FAILED_PRECONDITION, driver.node.NodePublishVolume,
               driver.publish_request(vid, staging, driver.path("t"), cap))

    @pytest.mark.parametrize("mode", [AccessMode.SINGLE_NODE_MULTI_WRITER, AccessMode.SINGLE_NODE_WRITER],
                             ids=AccessMode.Mode.Name)
    def test_multi_writer_should_allow_a_second_target(self, driver, mode):
        cap = mount_cap(mode=mode)
        vid, staging, target = driver.published(cap)
        second = driver.path("t")
        driver.node.NodePublishVolume(driver.publish_request(vid, staging, second, cap))
        write_file(os.path.join(target, "a"), b"a")
        assert os.path.exists(os.path.join(second, "a"))

    def test_should_publish_block_volumes_as_a_device_node(self, driver):
        vid, staging, target = driver.published(block_cap(), size=8 * MiB)
        assert stat.S_ISBLK(os.stat(target).st_mode)
        payload = os.urandom(4096)
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, payload, 1 * MiB)
            os.fsync(fd)
            assert os.pread(fd, 4096, 1 * MiB) == payload
            assert os.lseek(fd, 0, os.SEEK_END) >= 8 * MiB
        finally:
            os.close(fd)

    def test_read_only_block_publish_should_refuse_writes(self, driver):
        vid, staging, target = driver.published(block_cap(), readonly=True)
        assert stat.S_ISBLK(os.stat(target).st_mode)
        with pytest.raises(OSError) as e:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)


# ----------------------------------------------------------------------------- NodeUnpublishVolume

class TestNodeUnpublishVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.node.NodeUnpublishVolume,
               pb.NodeUnpublishVolumeRequest(target_path=driver.path("t")))

    def test_should_fail_when_no_target_path_is_provided(self, driver):
        vid, staging, target = driver.published()
        expect(C.INVALID_ARGUMENT, driver.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.node.NodeUnpublishVolume,
               pb.NodeUnpublishVolumeRequest(volume_id=GONE, target_path=driver.path("t")))

    @pytest.mark.parametrize("cap", [mount_cap(), block_cap()], ids=["mount", "block"])
    def test_should_unpublish_remove_the_target_and_be_idempotent(self, driver, cap):
        vid, staging, target = driver.published(cap)
        for _ in range(2):
            unpublish(driver, vid, target)
            assert mount_entry(target) is None
            assert not os.path.exists(target)

    def test_should_succeed_for_a_target_never_published(self, driver):
        vid, staging = driver.staged()
        unpublish(driver, vid, driver.path("t"))


# ----------------------------------------------------------------------------- NodeGetVolumeStats

class TestNodeGetVolumeStats:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.node.NodeGetVolumeStats,
               pb.NodeGetVolumeStatsRequest(volume_path=driver.path("t")))

    def test_should_fail_when_no_volume_path_is_provided(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=vid))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.node.NodeGetVolumeStats,
               pb.NodeGetVolumeStatsRequest(volume_id=GONE, volume_path=driver.path("t")))

    def test_should_fail_for_a_path_that_is_not_the_volumes(self, driver):
        vid, staging = driver.staged()
        for path in (driver.path("t"), "/", "some/path", staging + "/../x"):
            expect(C.NOT_FOUND, driver.node.NodeGetVolumeStats,
                   pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path))

    def test_should_fail_with_not_found_for_an_unknown_volume_and_a_relative_path(self, driver):
        # csi-sanity: "should fail when volume is not found" uses VolumePath "some/path"
        expect(C.NOT_FOUND, driver.node.NodeGetVolumeStats,
               pb.NodeGetVolumeStatsRequest(volume_id=GONE, volume_path="some/path"))
        expect(C.NOT_FOUND, driver.node.NodeExpandVolume,
               pb.NodeExpandVolumeRequest(volume_id=GONE, volume_path="some/path"))

    @pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
    def test_should_report_bytes_and_inodes(self, driver, fs_type):
        vid, staging, target = driver.published(mount_cap(fs_type), size=XFS_SIZE)
        write_file(os.path.join(target, "f"), os.urandom(MiB))
        for path in (staging, target):
            resp = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path,
                                                                               staging_target_path=staging))
            usage = {u.unit: u for u in resp.usage}
            b, i = usage[pb.VolumeUsage.BYTES], usage[pb.VolumeUsage.INODES]
            assert 0 < b.total <= XFS_SIZE and b.used >= MiB and b.available > 0 and b.used + b.available <= b.total
            assert i.total > 0 and i.used >= 1 and i.available > 0
            assert resp.volume_condition.abnormal is False

    def test_should_report_the_size_of_block_volumes(self, driver):
        vid, staging, target = driver.published(block_cap(), size=8 * MiB)
        resp = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
        usage = {u.unit: u for u in resp.usage}
        assert usage[pb.VolumeUsage.BYTES].total == 8 * MiB

    def test_should_report_an_abnormal_condition_when_the_mount_is_gone(self, driver):
        vid, staging, target = driver.published()
        subprocess.run(["umount", target], check=True)
        resp = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
        assert resp.volume_condition.abnormal is True and target in resp.volume_condition.message

    def test_should_report_an_abnormal_condition_when_the_backing_file_is_gone(self, driver):
        vid, staging, target = driver.published()
        disk = [os.path.join(r, f) for r, _, fs in os.walk(driver.proc.rawfile_dir) for f in fs
                if vid in r and not f.startswith(".")]
        assert disk, f"no backing file for {vid} under {driver.proc.rawfile_dir}"
        for d in disk:
            os.unlink(d)
        resp = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target))
        assert resp.volume_condition.abnormal is True
        assert resp.volume_condition.message


# ----------------------------------------------------------------------------- NodeExpandVolume

def expand(driver, vid: str, path: str, size: int, cap: pb.VolumeCapability | None = None, staging: str = ""):
    driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=size)))
    req = pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=path, staging_target_path=staging,
                                     capacity_range=pb.CapacityRange(required_bytes=size))
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    return driver.node.NodeExpandVolume(req)


class TestNodeExpandVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_path="/tmp"))

    def test_should_fail_when_no_volume_path_is_provided(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=vid))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.node.NodeExpandVolume,
               pb.NodeExpandVolumeRequest(volume_id=GONE, volume_path=driver.path("t")))

    def test_should_fail_for_a_path_that_is_not_the_volumes(self, driver):
        vid, staging = driver.staged()
        expect(C.NOT_FOUND, driver.node.NodeExpandVolume,
               pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=driver.path("t")))

    def test_should_fail_with_out_of_range_when_limit_is_below_required(self, driver):
        vid, staging = driver.staged()
        expect(C.OUT_OF_RANGE, driver.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=staging,
            capacity_range=pb.CapacityRange(required_bytes=64 * MiB, limit_bytes=32 * MiB)))

    @pytest.mark.parametrize("fs_type,size", [("ext4", 32 * MiB), ("xfs", XFS_SIZE)])
    def test_should_grow_a_mounted_file_system_online(self, driver, fs_type, size):
        cap = mount_cap(fs_type)
        vid, staging, target = driver.published(cap, size=size)
        write_file(os.path.join(target, "f"), b"before")
        before = statfs_total(target)
        new = size + 64 * MiB
        if fs_type == "ext4" and not fs.can_grow_ext_online():
            # this sandbox drops CAP_SYS_RESOURCE, which online ext4 resize needs: the spec's
            # "Volume in use" FAILED_PRECONDITION, and the file system grows when next staged
            e = expect(C.FAILED_PRECONDITION, expand, driver, vid, target, new, cap, staging)
            assert "CAP_SYS_RESOURCE" in e.details()
            unpublish(driver, vid, target)
            unstage(driver, vid, staging)
            driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))
            driver.node.NodePublishVolume(driver.publish_request(vid, staging, target, cap))
        else:
            for _ in range(2):                       # idempotent
                resp = expand(driver, vid, target, new, cap, staging)
                assert resp.capacity_bytes >= new
        after = statfs_total(target)
        assert after > before + 48 * MiB, (before, after)
        with open(os.path.join(target, "f"), "rb") as f:
            assert f.read() == b"before"

    def test_should_grow_block_volumes(self, driver):
        vid, staging, target = driver.published(block_cap(), size=8 * MiB)
        resp = expand(driver, vid, target, 24 * MiB, block_cap())
        assert resp.capacity_bytes >= 24 * MiB
        fd = os.open(target, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) >= 24 * MiB
        finally:
            os.close(fd)

    def test_should_fail_for_a_capability_the_volume_lacks(self, driver):
        vid, staging = driver.staged()
        expect(C.INVALID_ARGUMENT, driver.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=staging, volume_capability=block_cap(),
            capacity_range=pb.CapacityRange(required_bytes=32 * MiB)))

    def test_should_succeed_when_already_large_enough(self, driver):
        vid, staging = driver.staged(size=32 * MiB)
        resp = driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=staging, capacity_range=pb.CapacityRange(required_bytes=16 * MiB)))
        assert resp.capacity_bytes >= 32 * MiB


# ----------------------------------------------------------------------------- concurrency

class TestPerVolumeLock:
    def test_a_concurrent_call_on_the_same_volume_should_get_aborted(self, driver):
        """A NodeExpandVolume blocked on a frozen file system holds the volume's lock; every other
        call on that volume gets ABORTED until it finishes, calls on other volumes proceed."""
        cap = mount_cap("xfs")          # xfs grows online without CAP_SYS_RESOURCE
        vid, staging, target = driver.published(cap, size=XFS_SIZE)
        other, other_staging = driver.staged()
        new = XFS_SIZE + 64 * MiB
        driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=new)))
        subprocess.run(["fsfreeze", "--freeze", staging], check=True)
        result: dict[str, object] = {}

        def slow() -> None:
            try:
                result["resp"] = driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
                    volume_id=vid, volume_path=target, capacity_range=pb.CapacityRange(required_bytes=new)))
            except grpc.RpcError as e:
                result["error"] = e
        t = threading.Thread(target=slow)
        try:
            t.start()
            driver.wait_for_child("xfs_growfs")
            driver.wait_until_busy(vid)
            expect(C.ABORTED, driver.node.NodeStageVolume, driver.stage_request(vid, staging, cap))
            expect(C.ABORTED, driver.node.NodePublishVolume, driver.publish_request(vid, staging, target, cap))
            expect(C.ABORTED, driver.node.NodeUnstageVolume,
                   pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
            driver.node.NodeStageVolume(driver.stage_request(other, other_staging))     # other volumes: fine
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", staging], check=True)
            t.join(60)
        assert "error" not in result, result.get("error")
        assert result["resp"].capacity_bytes >= new
        driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))       # free again


# ----------------------------------------------------------------------------- hostile input

HOSTILE_IDS = ["../../etc", "..", "a/b", "/etc/passwd", "v" * 300, "vol\x00x", "vol\n"]
HOSTILE_PATHS = ["relative/path", "/tmp/x/../../etc", "/tmp/a\x00b", "/" + "a" * 5000, "./x"]


def snapshot_tree(*roots: str) -> set[str]:
    """Every path under the roots, except the driver's own atomic-write temp files (its heartbeat
    rewrites the node record in the background)."""
    out = set()
    for root in roots:
        for r, dirs, files in os.walk(root):
            out.update(os.path.join(r, n) for n in dirs + files if not n.startswith(".tmp-"))
    return out


class TestNodeHostileInput:
    def _calls(self, driver, vid: str, staging: str, target: str, path: str):
        n = driver.node
        return [
            (n.NodeStageVolume, driver.stage_request(vid, staging)),
            (n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)),
            (n.NodePublishVolume, driver.publish_request(vid, staging, target)),
            (n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)),
            (n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)),
            (n.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=path)),
        ]

    @pytest.mark.parametrize("vid", HOSTILE_IDS, ids=repr)
    def test_hostile_volume_ids_should_be_rejected_without_side_effects(self, driver, vid):
        before = snapshot_tree(str(driver.base), "/etc")
        staging, target = driver.path("s"), driver.path("t")
        for fn, req in self._calls(driver, vid, staging, target, staging):
            expect(C.INVALID_ARGUMENT, fn, req)
        assert snapshot_tree(str(driver.base), "/etc") - before == set()

    @pytest.mark.parametrize("path", HOSTILE_PATHS, ids=lambda p: repr(p[:30]))
    def test_hostile_paths_should_be_rejected_without_side_effects(self, driver, path):
        vid, staging = driver.staged()
        before = snapshot_tree(str(driver.base), "/etc")
        n = driver.node
        expect(C.INVALID_ARGUMENT, n.NodeStageVolume, driver.stage_request(vid, path))
        expect(C.INVALID_ARGUMENT, n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                                                    staging_target_path=path))
        expect(C.INVALID_ARGUMENT, n.NodePublishVolume, driver.publish_request(vid, staging, path))
        expect(C.INVALID_ARGUMENT, n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid,
                                                                                        target_path=path))
        # stats/expand only look a volume_path up among the volume's own paths: a malformed one
        # (NUL, oversize) is INVALID_ARGUMENT, any other that is not the volume's NOT_FOUND
        # (csi-sanity sends the relative "some/path" and expects NOT_FOUND)
        lookup = C.INVALID_ARGUMENT if "\x00" in path or len(path) > 4096 else C.NOT_FOUND
        expect(lookup, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path))
        expect(lookup, n.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=path))
        assert snapshot_tree(str(driver.base), "/etc") - before == set()
        assert mount_entry(staging) is not None
