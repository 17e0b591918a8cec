"""The node on LVM end to end (inside the VM): a real `csi-perssd serve --backend lvm` process
flushes the second generation of a volume by thin_delta — only the changed blocks are read, once."""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.local.lvm import LvmBackend
from csi_perssd.local.lvmcli import NO_UDEV_CONFIG
from tests.harness.cluster import block_cap
from tests.harness.procs import DriverProcess

from tests.lvm.util import MiB, POOL, read_at, write_at

CHUNK = 1 * MiB


def _driver(tmp: Path, vg: str) -> DriverProcess:
    endpoint = os.environ["PERSSD_VM_S3_ENDPOINT"]
    cat = f"s3://{os.environ['PERSSD_VM_S3_BUCKET']}/node-lvm-{uuid.uuid4().hex[:10]}"
    env = {"AWS_ACCESS_KEY_ID": os.environ["PERSSD_VM_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": os.environ["PERSSD_VM_S3_SECRET_KEY"]}
    # later flags win: the LVM backend replaces DriverProcess's rawfile default
    return DriverProcess(tmp, mode="all", catalog=cat, env=env, extra=[
        "--backend", "lvm", "--volume-group", vg, "--thin-pool", POOL, "--lvm-config", NO_UDEV_CONFIG,
        "--s3-endpoint", endpoint, "--s3-region", "us-east-1", "--unstage-wait-seconds", "60"])


def _committed(log: str, gen: int) -> tuple[int, int]:
    m = re.search(rf"committed generation {gen}: read (\d+) bytes, uploaded (\d+) bytes", log)
    assert m, f"generation {gen} was not committed:\n{log[-3000:]}"
    return int(m.group(1)), int(m.group(2))


# Under TCG every lvm command takes seconds, and on a loaded 2-core host the node's start alone
# has taken minutes: the suite-wide 300 s per test is too short for this one.
@pytest.mark.timeout(900)
def test_second_flush_reads_only_thin_delta_changes(tmp_path: Path, backend: LvmBackend) -> None:
    d = _driver(tmp_path, backend.vg).start(timeout=300)
    vid = ""
    try:
        c, n = d.controller, d.node
        cap = block_cap()
        vid = c.CreateVolume(pb.CreateVolumeRequest(
            name="lvm-e2e", volume_capabilities=[cap], capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
            parameters={"chunkSize": "1Mi"})).volume.volume_id
        staging, target = str(tmp_path / "staging"), str(tmp_path / "target")
        os.makedirs(staging)

        def attach() -> None:
            ctx = c.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="node-a", volume_capability=cap)).publish_context
            n.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                        volume_capability=cap, publish_context=ctx))
            n.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                            target_path=target, volume_capability=cap))

        def release() -> None:
            n.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
            n.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
            c.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-a"))

        attach()
        first = os.urandom(8 * MiB)
        write_at(target, 0, first)
        release()
        log = d.log_path.read_text()
        read1, _ = _committed(log, 1)
        # first flush: the pre-flush uploads everything allocated from a thin snapshot; the
        # final pass (nothing was written after that snapshot) reads nothing
        pre1 = [int(x) for x in re.findall(r"background flush uploaded (\d+) bytes", log)]
        assert pre1 and pre1[-1] >= 8 * MiB and read1 == 0, (pre1, read1)

        attach()                                          # the local copy is current: reused
        patch = os.urandom(MiB)
        write_at(target, 32 * MiB, patch)                 # one new 1 MiB chunk
        release()
        log = d.log_path.read_text()
        # the pre-flush (NodeUnpublish) flushes a thin snapshot by thin_delta against generation
        # 1's snapshot; the final pass asks thin_delta what changed after that snapshot: nothing
        changed = [int(x) for x in re.findall(r"(\d+) bytes changed since generation 1", log)]
        assert len(changed) == 1 and 0 < changed[0] <= CHUNK, log[-3000:]
        assert log.count("0 bytes changed since the pre-flush") == 2, log[-3000:]
        read2, up2 = _committed(log, 2)
        assert read2 == 0, f"the final pass read {read2} bytes although nothing changed after the pre-flush"
        pre = [int(x) for x in re.findall(r"background flush uploaded (\d+) bytes", log)][-1]
        assert MiB <= pre + up2 <= MiB + 4096, (pre, up2)  # the changed chunk, uploaded once

        attach()
        assert read_at(target, 0, 8 * MiB) == first and read_at(target, 32 * MiB, MiB) == patch
        release()
    except BaseException:
        # the guest's files vanish with the VM: the driver's log is the only trace of what it was doing
        print(f"driver log tail:\n{d.tail(200)}")
        raise
    finally:
        if vid:
            try:
                d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
            except Exception:
                pass
        d.stop()
        if vid and backend.exists(vid):
            backend.delete(vid)
