"""Group snapshots across processes: the controller (--mode controller) asks the node that has
the members staged to cut the group through the object store (SeaweedFS); the restored members
show one point in time on another node; members in use on two nodes are refused."""
from __future__ import annotations

import time

import grpc

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.counters import counting, read_counter
from tests.snapshots.conftest import MiB, expect_code


def _group(cluster, name: str, vids: list[str], timeout: float = 120.0) -> pb.VolumeGroupSnapshot:
    req = pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vids)
    deadline = time.monotonic() + timeout
    while True:
        g = cluster.controller.group.CreateVolumeGroupSnapshot(req).group_snapshot
        if g.ready_to_use:
            return g
        assert time.monotonic() < deadline, f"group {g.group_snapshot_id} not ready after {timeout}s"
        time.sleep(0.2)


def test_group_cut_by_the_node_and_restored_on_another(cluster) -> None:
    vids = [cluster.create(f"grp-{i}", 32 * MiB) for i in range(2)]
    targets = [cluster.attach("node-a", v) for v in vids]
    with counting(targets, at_least=10):
        g = _group(cluster, "grp-live", vids)
    restored = []
    try:
        counters = []
        for i, s in enumerate(g.snapshots):
            rid = cluster.restore(f"grp-restored-{i}", 32 * MiB, snapshot=s.snapshot_id)
            restored.append(rid)
            counters.append(read_counter(cluster.attach("node-b", rid)))
        assert counters[0] >= 10 and counters[0] - counters[1] in (0, 1), counters
        assert "2 file systems frozen together" in cluster.nodes["node-a"].tail(400)
    finally:
        for rid in restored:
            cluster.release("node-b", rid)
        for v in vids:
            cluster.release("node-a", v)
        cluster.controller.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id))
    left = {e.snapshot.snapshot_id for e in cluster.ctl.ListSnapshots(pb.ListSnapshotsRequest()).entries}
    assert not left & {s.snapshot_id for s in g.snapshots}


def test_members_in_use_on_two_nodes_are_refused(cluster) -> None:
    a, b = cluster.create("grp-a", 16 * MiB), cluster.create("grp-b", 16 * MiB)
    cluster.attach("node-a", a)
    cluster.attach("node-b", b)
    try:
        details = expect_code(grpc.StatusCode.FAILED_PRECONDITION, cluster.controller.group.CreateVolumeGroupSnapshot,
                              pb.CreateVolumeGroupSnapshotRequest(name="grp-split", source_volume_ids=[a, b]))
        assert "node-a" in details and "node-b" in details
    finally:
        cluster.release("node-a", a)
        cluster.release("node-b", b)
