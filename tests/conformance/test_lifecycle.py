"""The driver process: state survives SIGKILL (and a reboot's loss of mounts and loop devices),
SIGTERM is graceful (in-flight RPCs finish, the socket goes away), one log line per RPC."""
from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import threading
import time

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.csi import csi_pb2_grpc as rpc
from tests.harness.blockio import write_file
from tests.plugins.driver import (MiB, NODE_ID, XFS_SIZE, block_cap, cleanup_under, create_request, expect,
                                  mount_cap, mounts_under)

pytestmark = pytest.mark.root
C = grpc.StatusCode


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_ro_mount(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        opts = [line.split()[5] for line in f if line.split()[4] == real]
    assert opts, f"{path} is not mounted"
    return "ro" in opts[-1].split(",")


class Setup:
    """A mount volume (published rw and ro) and a block volume, with data written."""

    def __init__(self, d, persistence: str = "local"):
        self.d = d
        params = {"persistence": persistence}
        self.persistence = persistence
        self.vid, self.staging, self.target = d.published(size=32 * MiB, parameters=params)
        self.ro_target = d.path("ro")
        d.node.NodePublishVolume(d.publish_request(self.vid, self.staging, self.ro_target, readonly=True))
        write_file(os.path.join(self.target, "data"), b"survives" * 1000)
        self.bvid, self.bstaging, self.btarget = d.published(block_cap(), size=8 * MiB, parameters=params)
        self.payload = os.urandom(4096)
        fd = os.open(self.btarget, os.O_RDWR)
        try:
            os.pwrite(fd, self.payload, 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.bro_target = d.path("bro")
        d.node.NodePublishVolume(d.publish_request(self.bvid, self.bstaging, self.bro_target, block_cap(),
                                                   readonly=True))

    def check_intact(self) -> None:
        d = self.d
        for vid in (self.vid, self.bvid):
            got = d.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
            assert list(got.status.published_node_ids) == [NODE_ID]
        assert read_file(os.path.join(self.target, "data")) == b"survives" * 1000
        assert read_file(os.path.join(self.ro_target, "data")) == b"survives" * 1000
        assert is_ro_mount(self.ro_target) and not is_ro_mount(self.target)
        assert stat.S_ISBLK(os.stat(self.btarget).st_mode)
        for t in (self.btarget, self.bro_target):
            fd = os.open(t, os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, 4096) == self.payload
            finally:
                os.close(fd)
        with pytest.raises(OSError) as e:          # the read-only block target stays read-only
            fd = os.open(self.bro_target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
        # every call on the recovered volumes is an idempotent repeat or works as usual
        d.node.NodeStageVolume(d.stage_request(self.vid, self.staging))
        d.node.NodePublishVolume(d.publish_request(self.vid, self.staging, self.target))
        d.node.NodePublishVolume(d.publish_request(self.bvid, self.bstaging, self.btarget, block_cap()))
        stats = d.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=self.vid, volume_path=self.target))
        assert not stats.volume_condition.abnormal
        for vid, staging, targets in ((self.vid, self.staging, [self.target, self.ro_target]),
                                      (self.bvid, self.bstaging, [self.btarget, self.bro_target])):
            for t in targets:
                d.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=t))
                assert not os.path.exists(t)
            d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
            assert not mounts_under(staging)
        if self.persistence == "object":       # written, then unstaged: each committed a generation
            from csi_perssd.remote.catalog import Catalog
            from csi_perssd.remote.filestore import FileStore
            cat = Catalog(FileStore(d.proc.catalog.removeprefix("file://")))
            assert cat.volume(self.vid).generation >= 1 and cat.volume(self.bvid).generation >= 1
        # staged again after all that, the data is still there
        d.node.NodeStageVolume(d.stage_request(self.vid, self.staging))
        assert read_file(os.path.join(self.staging, "data")) == b"survives" * 1000


@pytest.mark.parametrize("persistence", ["local", "object"])
class TestRestartRecovery:
    def test_sigkill_keeps_staged_and_published_volumes(self, fresh_driver, persistence):
        s = Setup(fresh_driver, persistence)
        fresh_driver.proc.kill()
        fresh_driver.proc.start()
        s.check_intact()

    def test_recovers_mounts_and_loop_devices_lost_with_the_process(self, fresh_driver, persistence):
        """SIGKILL, then everything the kernel held for the driver goes away (as in a reboot):
        the restarted driver reattaches the devices and restores staging and target mounts."""
        s = Setup(fresh_driver, persistence)
        fresh_driver.proc.kill()
        cleanup_under(str(fresh_driver.base))
        assert not mounts_under(s.staging) and not mounts_under(s.target)
        fresh_driver.proc.start()
        s.check_intact()


class TestGracefulShutdown:
    def test_sigterm_waits_for_in_flight_rpcs_and_removes_the_socket(self, fresh_driver):
        d = fresh_driver
        cap = mount_cap("xfs")
        vid, staging, target = d.published(cap, size=XFS_SIZE)
        new = XFS_SIZE + 64 * MiB
        d.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=new)))
        subprocess.run(["fsfreeze", "--freeze", staging], check=True)
        result: dict[str, object] = {}
        node = d.node          # the stub keeps its channel after stop() closes the helper's

        def slow() -> None:
            try:
                result["resp"] = node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
                    volume_id=vid, volume_path=target, capacity_range=pb.CapacityRange(required_bytes=new)))
            except grpc.RpcError as e:
                result["error"] = e
        t = threading.Thread(target=slow)
        thawed = False
        try:
            t.start()
            d.wait_for_child("xfs_growfs")
            d.wait_until_busy(vid)
            d.proc.proc.send_signal(15)
            time.sleep(1.0)
            assert d.proc.proc.poll() is None, "the driver exited with an RPC in flight"
            with grpc.insecure_channel(f"unix://{d.proc.socket}") as ch:       # new calls are refused
                e = expect(C.UNAVAILABLE, rpc.IdentityStub(ch).Probe, pb.ProbeRequest(), timeout=5)
                assert e
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", staging], check=True)
            thawed = True
            t.join(60)
        assert thawed
        assert "error" not in result, result.get("error")
        assert result["resp"].capacity_bytes >= new
        assert d.proc.proc.wait(30) == 0
        assert not os.path.exists(d.proc.socket)
        log = d.log()
        assert re.search(r"NodeExpandVolume volume_id='%s' -> OK" % vid, log)
        # the test's teardown cleans up the volume with a new server
        d.proc.start()


class TestRpcLog:
    def test_one_line_per_rpc_with_method_volume_duration_and_code(self, fresh_driver):
        d = fresh_driver
        vol = d.create(create_request(name="log-test"))
        expect(C.NOT_FOUND, d.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id="pvol-" + "0" * 32))
        expect(C.INVALID_ARGUMENT, d.controller.DeleteVolume, pb.DeleteVolumeRequest())
        time.sleep(0.2)
        lines = d.log().splitlines()
        create = [l for l in lines if re.search(r"\bCreateVolume name='log-test' -> OK in \d+\.\d+s", l)]
        assert len(create) == 1, create
        assert [l for l in lines if re.search(r"\bControllerGetVolume volume_id='pvol-0{32}' -> NOT_FOUND in \d+\.\d+s: ", l)]
        assert [l for l in lines if re.search(r"\bDeleteVolume +-> INVALID_ARGUMENT in \d+\.\d+s: ", l)]
        assert vol.volume_id

    def test_secrets_are_never_logged(self, fresh_driver):
        d = fresh_driver
        secret = "S3CR3T-do-not-log-4242"
        req = create_request()
        req.secrets["secretAccessKey"] = secret
        req.secrets["accessKeyId"] = secret
        vol = d.create(req)
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets={"secretAccessKey": secret}))
        expect(C.INVALID_ARGUMENT, d.controller.CreateVolume, pb.CreateVolumeRequest(secrets={"x": secret}))
        time.sleep(0.2)
        assert secret not in d.log()
