"""Corruption: a chunk altered (or deleted) in the bucket is detected when another node hydrates
the volume — DATA_LOSS naming the chunk — and nothing of the half-hydrated copy is left on that
node as "current": once the chunk is restored, staging works and the data is exact."""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.chunks import compress
from tests.harness.cluster import Cluster, mount_cap

from .helpers import MiB, code, image, tree_sums, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]


def _stage(cl: Cluster, node: str, vid: str) -> tuple[grpc.StatusCode, str]:
    cap = mount_cap()
    ctx = cl.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap)).publish_context
    staging, _ = cl.paths(node, vid)
    Path(staging).mkdir(parents=True, exist_ok=True)
    return code(cl.nodes[node].node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap, publish_context=ctx))


def _assert_nothing_left(cl: Cluster, node: str, vid: str) -> None:
    assert not image(cl, node, vid).exists(), "the half-hydrated local copy was left behind"
    assert not (Path(cl.nodes[node].state_dir) / "volumes" / f"{vid}.json").exists()
    staging, _ = cl.paths(node, vid)
    assert not os.path.ismount(staging)


def test_damaged_chunks_are_detected_on_hydrate(cluster: Cluster):
    cl = cluster
    vid = cl.create("corrupt", 64 * MiB)
    target = cl.attach("node-a", vid)
    sums = write_tree(target, random_mib=8, seed=3)
    before = set(cl.chunks())
    cl.release("node-a", vid)
    new = sorted((set(cl.chunks()) - before) & cl.committed_chunks(vid))
    assert len(new) >= 3
    s3, bucket = cl.seaweed.client(), cl.seaweed.bucket
    for damage, victim in zip(("altered", "garbage", "missing"), new):
        original = s3.get_object(Bucket=bucket, Key=victim)["Body"].read()
        if damage == "altered":     # a well-formed zstd frame of other content: only the hash can tell
            s3.put_object(Bucket=bucket, Key=victim, Body=compress(os.urandom(64 << 10), 3)[0])
        elif damage == "garbage":   # bytes flipped inside the frame
            s3.put_object(Bucket=bucket, Key=victim,
                          Body=original[:7] + bytes(b ^ 0xFF for b in original[7:64]) + original[64:])
        else:
            s3.delete_object(Bucket=bucket, Key=victim)
        for attempt in range(2):     # a retry does not succeed on half a volume either
            c, msg = _stage(cl, "node-b", vid)
            assert c == grpc.StatusCode.DATA_LOSS, (damage, attempt, c, msg)
            assert victim.rsplit("/", 1)[1] in msg, msg
            _assert_nothing_left(cl, "node-b", vid)
        s3.put_object(Bucket=bucket, Key=victim, Body=original)

    target_b = cl.attach("node-b", vid)
    assert tree_sums(target_b) == sums
    cl.release("node-b", vid)
    cl.delete(vid)
