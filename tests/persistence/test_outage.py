"""S3 outage: SeaweedFS stops while a volume is being unstaged. NodeUnstage answers UNAVAILABLE
or ABORTED (never OK, never a lost generation), the local data stays, and once SeaweedFS is back
the unstage completes and the volume hydrates elsewhere with every file intact."""
from __future__ import annotations

import time

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, mount_cap
from tests.plugins.s3 import seaweed_outage

from .helpers import MiB, code, image, loop_of, mounted, tree_sums, unstage_once, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = {"env": {"PERSSD_UNSTAGE_WAIT_SECONDS": "1"}}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


def test_unstage_during_s3_outage_keeps_data_and_completes_later(cluster: Cluster, seaweed, tmp_path):
    cl = cluster
    vid = cl.create("outage", 64 * MiB, cap=mount_cap())
    target = cl.attach("node-a", vid)
    sums = write_tree(target, random_mib=16)
    with seaweed_outage(seaweed):
        cl.unpublish("node-a", vid)
        # the driver's S3 retry budget is ~20 s before a flush counts as failed (UNAVAILABLE);
        # until then NodeUnstage answers ABORTED: both tell kubelet to retry
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            c, last = unstage_once(cl, "node-a", vid)
            assert c in RETRYABLE, f"NodeUnstage during an S3 outage answered {c}: {last}"
            assert "local data kept" in last
        # the local copy is intact (unmounted, still attached)
        dev = loop_of(image(cl, "node-a", vid))
        assert dev, "the local volume was released during the outage"
        with mounted(dev, tmp_path / "check", readonly=True) as m:
            assert tree_sums(m) == sums
        # a stage elsewhere cannot hydrate now either: UNAVAILABLE, nothing left behind on node-b
        c, msg = code(cl.controller.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="node-b", volume_capability=mount_cap()), timeout=60)
        assert c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), msg
    # SeaweedFS is back: the unstage completes, nothing lost
    cl.unstage("node-a", vid, timeout=120)
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-a"))
    assert not loop_of(image(cl, "node-a", vid))
    target_b = cl.attach("node-b", vid)
    assert tree_sums(target_b) == sums
    cl.release("node-b", vid)
    cl.delete(vid)
