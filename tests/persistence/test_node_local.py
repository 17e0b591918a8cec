"""What stays on a node: a cached copy is re-staged without any download; clean cached copies are
evicted least-recently-used first when a new volume needs the space (never a staged or dirty one);
persistence=local volumes never upload; mobility=node volumes refuse every other node."""
from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, mount_cap

from .helpers import MiB, code, image, run, tree_sums, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]
SIZE = 64 * MiB
DOWN = 'perssd_s3_bytes_total{direction="down"}'


def _create_on(cl: Cluster, name: str, node: str, params: dict[str, str]) -> pb.Volume:
    top = pb.Topology(segments={"nvme.perssd.io/node": node})
    return cl.controller.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()], parameters=params,
        capacity_range=pb.CapacityRange(required_bytes=SIZE),
        accessibility_requirements=pb.TopologyRequirement(requisite=[top], preferred=[top]))).volume


def test_cached_copy_restages_without_download(cluster: Cluster):
    cl = cluster
    vid = cl.create("cached", SIZE)
    target = cl.attach("node-a", vid)
    sums = write_tree(target, random_mib=8)
    cl.release("node-a", vid)
    before = cl.scrape("node-a")
    t0 = time.monotonic()
    target = cl.attach("node-a", vid)
    restage_s = time.monotonic() - t0
    after = cl.scrape("node-a")
    hydrated = after.get('perssd_transfer_bytes_total{kind="hydrated"}', 0) - before.get(
        'perssd_transfer_bytes_total{kind="hydrated"}', 0)
    assert hydrated == 0
    if DOWN in after:            # object-store byte counters: only the small catalog records were read
        assert after[DOWN] - before.get(DOWN, 0) < 64 << 10
    assert "reusing the local copy (generation 1)" in cl.nodes["node-a"].log_path.read_text()
    assert tree_sums(target) == sums
    cl.release("node-a", vid)
    cl.delete(vid)
    print(f"\nPERF cached re-stage (ControllerPublish + NodeStage + NodePublish): {restage_s:.2f}s")


def test_lru_eviction_of_clean_cached_copies(cluster: Cluster, tmp_path):
    cl = cluster
    # node-c's rawfile directory is a 160 MiB tmpfs: two 64 MiB volumes fit, a third does not
    rawdir = Path(cl.workdir) / "node-c" / "volumes"
    rawdir.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0700", "perssd-evict", str(rawdir)])
    cl.add_node("node-c")
    v1, v2, v3 = (cl.create(f"evict-{i}", SIZE) for i in (1, 2, 3))
    sums = {}
    for v in (v1, v2):
        target = cl.attach("node-c", v)
        sums[v] = write_tree(target, random_mib=2, seed=len(sums))
        cl.release("node-c", v)
    deadline = time.monotonic() + 10       # the heartbeat reports the cached copies as reclaimable
    while time.monotonic() < deadline:
        rec = cl.catalog().get_node("node-c")
        if rec is not None and rec.reclaimable_bytes > 0:
            break
        time.sleep(0.5)
    assert rec is not None and rec.reclaimable_bytes > 0
    # use v1 again: v2 becomes the least recently used
    target = cl.attach("node-c", v1)
    assert tree_sums(target) == sums[v1]
    cl.release("node-c", v1)

    target = cl.attach("node-c", v3)               # needs room: v2's clean copy goes
    assert not image(cl, "node-c", v2).exists() and image(cl, "node-c", v1).exists()
    log = cl.nodes["node-c"].log_path.read_text()
    assert re.search(f"evicting cached copy of volume {v2}", log)
    assert f"evicting cached copy of volume {v1}" not in log
    # v3 is staged (not evictable) and v1 is clean: staging v2 again evicts v1 and rehydrates v2
    target2 = cl.attach("node-c", v2)
    assert tree_sums(target2) == sums[v2]
    assert not image(cl, "node-c", v1).exists()
    # nothing clean is left to evict: a fourth volume does not fit, and no staged volume suffers
    v4 = cl.create("evict-4", SIZE)
    c, msg = code(cl.attach, "node-c", v4)
    assert c == grpc.StatusCode.RESOURCE_EXHAUSTED, (c, msg)
    assert image(cl, "node-c", v2).exists() and image(cl, "node-c", v3).exists()
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=v4, node_id="node-c"))
    for v in (v2, v3):
        cl.release("node-c", v)
    for v in (v1, v2, v3, v4):
        cl.delete(v)


def test_persistence_local_never_uploads(cluster: Cluster):
    cl = cluster
    vol = _create_on(cl, "local-only", "node-a", {"persistence": "local"})
    vid = vol.volume_id
    assert dict(vol.accessible_topology[0].segments) == {"nvme.perssd.io/node": "node-a"}
    before = cl.chunks()
    target = cl.attach("node-a", vid)
    sums = write_tree(target, random_mib=8)
    cl.release("node-a", vid)
    assert cl.chunks() == before, "a persistence=local volume uploaded chunks"
    assert cl.catalog().list_generations(vid) == []
    target = cl.attach("node-a", vid)          # the local data is the volume
    assert tree_sums(target) == sums
    cl.release("node-a", vid)
    c, msg = code(cl.attach, "node-b", vid)
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "node-a" in msg, (c, msg)
    cl.delete(vid)


def test_mobility_node_refuses_other_nodes(cluster: Cluster):
    cl = cluster
    vid = _create_on(cl, "pinned", "node-a", {"mobility": "node"}).volume_id
    c, msg = code(cl.controller.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id="node-b", volume_capability=mount_cap()))
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "mobility=node" in msg, (c, msg)
    # even when a CO skips ControllerPublish, node-b's NodeStage refuses it
    staging, _ = cl.paths("node-b", vid)
    Path(staging).mkdir(parents=True, exist_ok=True)
    c, msg = code(cl.nodes["node-b"].node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=mount_cap()))
    assert c == grpc.StatusCode.FAILED_PRECONDITION, (c, msg)
    assert not image(cl, "node-b", vid).exists()
    target = cl.attach("node-a", vid)
    Path(target, "hello").write_text("pinned\n")
    cl.release("node-a", vid)
    cl.delete(vid)
