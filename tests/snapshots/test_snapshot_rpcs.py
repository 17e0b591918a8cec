"""Snapshot RPCs as the spec words them: idempotency, ALREADY_EXISTS, NOT_FOUND, OUT_OF_RANGE,
ListSnapshots filters and pagination (ABORTED on a token this driver did not issue), refusal of
persistence=local sources, size_bytes / creation_time."""
from __future__ import annotations

import time

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb

from .conftest import MiB, expect_code

pytestmark = [pytest.mark.root, pytest.mark.s3]

C = grpc.StatusCode


@pytest.fixture(scope="module")
def vols(cluster):  # type: ignore[no-untyped-def]
    return [cluster.create(f"rpc-src-{i}", 16 * MiB) for i in range(2)]


def _list(cl, **kw) -> pb.ListSnapshotsResponse:  # type: ignore[no-untyped-def]
    return cl.ctl.ListSnapshots(pb.ListSnapshotsRequest(**kw))


def test_create_snapshot_is_idempotent_and_spec_fields(cluster, vols) -> None:
    t0 = time.time()
    a = cluster.snapshot(vols[0], "rpc-snap-a", wait=False)
    assert a.ready_to_use, "a never-staged volume is snapshotted at once"
    assert a.size_bytes == 16 * MiB and a.source_volume_id == vols[0]
    assert t0 - 5 <= a.creation_time.seconds <= time.time() + 5
    again = cluster.snapshot(vols[0], "rpc-snap-a", wait=False)
    assert again == a, "CreateSnapshot repeated must return the same snapshot"


def test_same_name_other_source_is_already_exists(cluster, vols) -> None:
    cluster.snapshot(vols[0], "rpc-snap-dup", wait=False)
    expect_code(C.ALREADY_EXISTS, cluster.ctl.CreateSnapshot,
                pb.CreateSnapshotRequest(source_volume_id=vols[1], name="rpc-snap-dup"))


def test_create_snapshot_bad_input(cluster, vols) -> None:
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.CreateSnapshot, pb.CreateSnapshotRequest(source_volume_id=vols[0]))
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.CreateSnapshot, pb.CreateSnapshotRequest(name="x"))
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.CreateSnapshot,
                pb.CreateSnapshotRequest(source_volume_id="../../etc", name="rpc-bad"))
    expect_code(C.NOT_FOUND, cluster.ctl.CreateSnapshot,
                pb.CreateSnapshotRequest(source_volume_id="pvol-" + "0" * 32, name="rpc-missing-src"))
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.CreateSnapshot,
                pb.CreateSnapshotRequest(source_volume_id=vols[0], name="rpc-params", parameters={"bogus": "1"}))


def test_snapshot_of_local_volume_is_refused_clearly(cluster) -> None:
    vid = cluster.create("rpc-local", 16 * MiB, params={"persistence": "local"})
    msg = expect_code(C.FAILED_PRECONDITION, cluster.ctl.CreateSnapshot,
                      pb.CreateSnapshotRequest(source_volume_id=vid, name="rpc-local-snap"))
    assert "persistence=local" in msg
    assert not [e for e in _list(cluster, source_volume_id=vid).entries], "nothing may be recorded"
    # the name stays free for a valid source
    other = cluster.create("rpc-obj-for-local-name", 16 * MiB)
    assert cluster.snapshot(other, "rpc-local-snap", wait=False).ready_to_use


def test_delete_snapshot_is_idempotent(cluster, vols) -> None:
    s = cluster.snapshot(vols[1], "rpc-snap-del", wait=False)
    cluster.delete_snapshot(s.snapshot_id)
    cluster.delete_snapshot(s.snapshot_id)
    cluster.delete_snapshot("snap-" + "0" * 32)                     # never existed: OK as well
    assert not _list(cluster, snapshot_id=s.snapshot_id).entries
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.DeleteSnapshot, pb.DeleteSnapshotRequest())


def test_list_snapshots_filters_and_pagination(cluster, vols) -> None:
    made = {cluster.snapshot(vols[1], f"rpc-page-{i}", wait=False).snapshot_id for i in range(5)}
    by_src = {e.snapshot.snapshot_id for e in _list(cluster, source_volume_id=vols[1]).entries}
    assert made <= by_src and all(e.snapshot.source_volume_id == vols[1]
                                  for e in _list(cluster, source_volume_id=vols[1]).entries)
    one = sorted(made)[2]
    got = _list(cluster, snapshot_id=one).entries
    assert [e.snapshot.snapshot_id for e in got] == [one]
    assert not _list(cluster, snapshot_id="snap-" + "f" * 32).entries
    assert not _list(cluster, snapshot_id="not a valid id").entries
    assert not _list(cluster, snapshot_id=one, source_volume_id=vols[0]).entries
    # pagination: pages of 2 cover everything exactly once
    everything = [e.snapshot.snapshot_id for e in _list(cluster).entries]
    seen: list[str] = []
    token = ""
    while True:
        page = _list(cluster, max_entries=2, starting_token=token)
        assert len(page.entries) <= 2
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    # repeated: the same answer
    assert _list(cluster, max_entries=2) == _list(cluster, max_entries=2)
    expect_code(C.ABORTED, cluster.ctl.ListSnapshots, pb.ListSnapshotsRequest(starting_token="garbage"))
    expect_code(C.ABORTED, cluster.ctl.ListSnapshots, pb.ListSnapshotsRequest(starting_token="s1:../x"))
    expect_code(C.INVALID_ARGUMENT, cluster.ctl.ListSnapshots, pb.ListSnapshotsRequest(max_entries=-1))


def test_create_volume_from_snapshot_errors(cluster, vols) -> None:
    src = pb.VolumeContentSource()
    src.snapshot.snapshot_id = "snap-" + "1" * 32
    expect_code(C.NOT_FOUND, cluster.create, "rpc-from-missing", 16 * MiB, source=src)
    vsrc = pb.VolumeContentSource()
    vsrc.volume.volume_id = "pvol-" + "1" * 32
    expect_code(C.NOT_FOUND, cluster.create, "rpc-clone-missing", 16 * MiB, source=vsrc)
    s = cluster.snapshot(vols[0], "rpc-snap-size", wait=False)
    src.snapshot.snapshot_id = s.snapshot_id
    expect_code(C.OUT_OF_RANGE, cluster.create, "rpc-too-small", 8 * MiB, source=src)
    vsrc.volume.volume_id = vols[0]
    expect_code(C.OUT_OF_RANGE, cluster.create, "rpc-clone-too-small", 8 * MiB, source=vsrc)
    # the right size works and is idempotent
    a = cluster.create("rpc-restore", 16 * MiB, source=src)
    assert cluster.create("rpc-restore", 16 * MiB, source=src) == a
    b = cluster.create("rpc-clone", 32 * MiB, source=vsrc)
    assert cluster.create("rpc-clone", 32 * MiB, source=vsrc) == b
    got = cluster.ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=b)).volume
    assert got.capacity_bytes == 32 * MiB and got.content_source.volume.volume_id == vols[0]
    # the same name with another source is ALREADY_EXISTS
    expect_code(C.ALREADY_EXISTS, cluster.create, "rpc-restore", 16 * MiB, source=vsrc)


def test_capabilities_advertised(cluster) -> None:
    caps = {c.rpc.type for c in cluster.ctl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities}
    R = pb.ControllerServiceCapability.RPC
    assert {R.CREATE_DELETE_SNAPSHOT, R.LIST_SNAPSHOTS, R.CLONE_VOLUME} <= caps
