"""GroupController service, per spec.md "Group Controller Service RPCs": one test per sentence,
plus the driver's crash-consistency promise (groupsnap.py): members staged on one node are
frozen together, unstaged members are pinned at their committed generation, members in use on
two nodes are refused."""
from __future__ import annotations

import os
import time

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog, NodeRecord
from csi_perssd.remote.filestore import FileStore
from tests.harness.counters import counting, read_counter
from tests.plugins.driver import NODE_ID, POOL, block_cap, create_request, expect, mount_cap, unique_name

pytestmark = pytest.mark.root
C = grpc.StatusCode
Svc = pb.PluginCapability.Service
GCap = pb.GroupControllerServiceCapability.RPC
OBJECT = {"persistence": "object", "chunkSize": "1Mi"}


def catalog(driver) -> Catalog:
    return Catalog(FileStore(driver.proc.catalog.removeprefix("file://")))


def group_request(name: str, vids: list[str], **params: str) -> pb.CreateVolumeGroupSnapshotRequest:
    return pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=vids, parameters=params)


def group_snapshot(driver, name: str, vids: list[str], timeout: float = 60.0) -> pb.VolumeGroupSnapshot:
    """CreateVolumeGroupSnapshot until ready_to_use, as the CO does."""
    deadline = time.monotonic() + timeout
    while True:
        g = driver.group.CreateVolumeGroupSnapshot(group_request(name, vids)).group_snapshot
        if g.ready_to_use:
            return g
        assert time.monotonic() < deadline, f"group snapshot {g.group_snapshot_id} not ready after {timeout}s"
        time.sleep(0.1)


def volumes(driver, n: int = 2, **kw) -> list[str]:
    return [driver.create(create_request(parameters=OBJECT, **kw)).volume_id for _ in range(n)]


def restore(driver, sid: str, cap: pb.VolumeCapability | None = None) -> tuple[str, str]:
    req = create_request(parameters=OBJECT, cap=cap)
    req.volume_content_source.snapshot.snapshot_id = sid
    vid = driver.create(req).volume_id
    ctx = driver.publish(vid, cap or mount_cap())
    staging = driver.path("restored")
    driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap or mount_cap(), ctx))
    return vid, staging


class TestCapabilities:
    def test_the_plugin_should_offer_the_group_controller_service(self, driver):
        caps = {c.service.type for c in driver.identity.GetPluginCapabilities(
            pb.GetPluginCapabilitiesRequest()).capabilities if c.HasField("service")}
        assert Svc.GROUP_CONTROLLER_SERVICE in caps

    def test_group_controller_get_capabilities(self, driver):
        caps = [c.rpc.type for c in driver.group.GroupControllerGetCapabilities(
            pb.GroupControllerGetCapabilitiesRequest()).capabilities]
        assert caps == [GCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]


class TestCreateVolumeGroupSnapshot:
    def test_should_fail_when_no_name_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, group_request("", volumes(driver, 1)))

    def test_should_fail_when_no_source_volume_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, group_request(unique_name(), []))

    def test_should_fail_for_a_volume_named_twice_or_a_bad_id(self, driver):
        vid = volumes(driver, 1)[0]
        expect(C.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, group_request(unique_name(), [vid, vid]))
        expect(C.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot, group_request(unique_name(), ["../x"]))

    def test_should_fail_for_unknown_parameters(self, driver):
        expect(C.INVALID_ARGUMENT, driver.group.CreateVolumeGroupSnapshot,
               group_request(unique_name(), volumes(driver, 1), speed="fast"))

    def test_should_fail_when_a_volume_does_not_exist_and_leak_nothing(self, driver):
        name, before = unique_name(), len(catalog(driver).list_snapshots())
        expect(C.NOT_FOUND, driver.group.CreateVolumeGroupSnapshot,
               group_request(name, [volumes(driver, 1)[0], "pvol-" + "0" * 32]))
        assert len(catalog(driver).list_snapshots()) == before

    def test_volumes_that_cannot_be_snapshotted_together_should_fail_with_failed_precondition(self, driver):
        name, before = unique_name(), len(catalog(driver).list_snapshots())
        local = driver.create(create_request(parameters={"persistence": "local"})).volume_id
        e = expect(C.FAILED_PRECONDITION, driver.group.CreateVolumeGroupSnapshot,
                   group_request(name, [volumes(driver, 1)[0], local]))
        assert local in e.details()
        assert len(catalog(driver).list_snapshots()) == before         # spec: no snapshot is leaked

    def test_members_in_use_on_two_nodes_should_be_refused(self, driver):
        catalog(driver).put_node(NodeRecord(id="node-g2", pool=POOL))
        a, b = volumes(driver)
        driver.publish(a)
        driver.publish(b, node_id="node-g2")
        e = expect(C.FAILED_PRECONDITION, driver.group.CreateVolumeGroupSnapshot, group_request(unique_name(), [a, b]))
        assert NODE_ID in e.details() and "node-g2" in e.details()
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=b))

    def test_unstaged_members_should_be_ready_at_once_with_one_normal_snapshot_each(self, driver):
        vids = volumes(driver, 3)
        g = driver.group.CreateVolumeGroupSnapshot(group_request(unique_name(), vids)).group_snapshot
        assert g.ready_to_use and g.group_snapshot_id and g.creation_time.seconds > 0
        assert [s.source_volume_id for s in g.snapshots] == vids
        listed = {e.snapshot.snapshot_id: e.snapshot for e in driver.controller.ListSnapshots(
            pb.ListSnapshotsRequest()).entries}
        for s in g.snapshots:
            assert s.ready_to_use and s.group_snapshot_id == g.group_snapshot_id
            assert listed[s.snapshot_id].group_snapshot_id == g.group_snapshot_id

    def test_should_be_idempotent_by_name(self, driver):
        name, vids = unique_name(), volumes(driver)
        a = driver.group.CreateVolumeGroupSnapshot(group_request(name, vids)).group_snapshot
        b = driver.group.CreateVolumeGroupSnapshot(group_request(name, list(reversed(vids)))).group_snapshot
        assert a.group_snapshot_id == b.group_snapshot_id
        assert [s.snapshot_id for s in a.snapshots] == [s.snapshot_id for s in b.snapshots]

    def test_same_name_other_volumes_or_parameters_should_fail_with_already_exists(self, driver):
        name, vids = unique_name(), volumes(driver, 3)
        driver.group.CreateVolumeGroupSnapshot(group_request(name, vids[:2]))
        expect(C.ALREADY_EXISTS, driver.group.CreateVolumeGroupSnapshot, group_request(name, vids[1:]))
        expect(C.ALREADY_EXISTS, driver.group.CreateVolumeGroupSnapshot,
               group_request(name, vids[:2], **{"csi.storage.k8s.io/x": "y"}))

    def test_any_member_snapshot_should_be_usable_as_a_volume_source(self, driver):
        vid, staging = driver.staged(parameters=OBJECT)
        with open(os.path.join(staging, "f"), "wb") as f:
            f.write(b"member data")
        g = group_snapshot(driver, unique_name(), [vid, volumes(driver, 1)[0]])
        _, rstaging = restore(driver, g.snapshots[0].snapshot_id)
        with open(os.path.join(rstaging, "f"), "rb") as f:
            assert f.read() == b"member data"

    def test_a_member_cannot_be_deleted_on_its_own(self, driver):
        g = driver.group.CreateVolumeGroupSnapshot(group_request(unique_name(), volumes(driver))).group_snapshot
        expect(C.FAILED_PRECONDITION, driver.controller.DeleteSnapshot,
               pb.DeleteSnapshotRequest(snapshot_id=g.snapshots[0].snapshot_id))


class TestGetVolumeGroupSnapshot:
    def test_should_fail_when_no_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.group.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest())

    def test_should_fail_with_not_found_for_an_unknown_group(self, driver):
        expect(C.NOT_FOUND, driver.group.GetVolumeGroupSnapshot,
               pb.GetVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id"))

    def test_should_return_the_group_and_check_the_snapshot_list(self, driver):
        g = driver.group.CreateVolumeGroupSnapshot(group_request(unique_name(), volumes(driver))).group_snapshot
        sids = [s.snapshot_id for s in g.snapshots]
        got = driver.group.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=list(reversed(sids)))).group_snapshot
        assert got == g
        expect(C.INVALID_ARGUMENT, driver.group.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=sids[:1]))


class TestDeleteVolumeGroupSnapshot:
    def test_should_fail_when_no_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.group.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest())

    def test_should_succeed_for_an_unknown_group(self, driver):
        driver.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id"))

    def test_a_snapshot_list_mismatch_should_be_invalid_argument_and_delete_nothing(self, driver):
        g = driver.group.CreateVolumeGroupSnapshot(group_request(unique_name(), volumes(driver))).group_snapshot
        expect(C.INVALID_ARGUMENT, driver.group.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=["psnap-" + "1" * 32]))
        assert catalog(driver).get_group(g.group_snapshot_id) is not None

    def test_should_delete_the_group_and_all_its_snapshots_and_be_idempotent(self, driver):
        name, vids = unique_name(), volumes(driver)
        g = driver.group.CreateVolumeGroupSnapshot(group_request(name, vids)).group_snapshot
        req = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id,
                                                  snapshot_ids=[s.snapshot_id for s in g.snapshots])
        driver.group.DeleteVolumeGroupSnapshot(req)
        driver.group.DeleteVolumeGroupSnapshot(req)
        left = {e.snapshot.snapshot_id for e in driver.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries}
        assert not left & {s.snapshot_id for s in g.snapshots}
        store = catalog(driver).store
        assert not [s for s in g.snapshots if store.head(f"snapshots/{s.snapshot_id}.manifest") is not None]
        expect(C.NOT_FOUND, driver.group.GetVolumeGroupSnapshot,
               pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id))
        again = driver.group.CreateVolumeGroupSnapshot(group_request(name, vids)).group_snapshot
        assert again.group_snapshot_id != g.group_snapshot_id          # the name is free again


class TestCrashConsistency:
    def test_members_staged_on_one_node_are_cut_at_one_point_in_time(self, driver):
        staged = [driver.staged(parameters=OBJECT) for _ in range(3)]
        with counting([s for _, s in staged], at_least=20) as written:
            g = group_snapshot(driver, unique_name(), [v for v, _ in staged])
            at_ready = written[0]
            time.sleep(0.2)
        assert written[0] > at_ready, "the writer was not running across the cut"
        counters = [read_counter(restore(driver, s.snapshot_id)[1]) for s in g.snapshots]
        assert 20 <= counters[0] <= at_ready
        assert counters[0] - counters[-1] in (0, 1) and sorted(counters, reverse=True) == counters, counters
        assert len({s.creation_time.ToNanoseconds() for s in g.snapshots}) == 1
        assert "3 file systems frozen together" in driver.log()

    def test_a_staged_member_and_an_unstaged_member(self, driver):
        vid, staging = driver.staged(parameters=OBJECT)
        with open(os.path.join(staging, "counter"), "w") as f:
            f.write(f"{7:012d}")
        cold, cold_staging, cold_target = driver.published(parameters=OBJECT)
        with open(os.path.join(cold_target, "counter"), "w") as f:
            f.write(f"{5:012d}")
        driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=cold, target_path=cold_target))
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=cold, staging_target_path=cold_staging))
        gen = catalog(driver).volume(cold).generation
        g = group_snapshot(driver, unique_name(), [vid, cold])
        assert catalog(driver).get_snapshot(g.snapshots[1].snapshot_id).generation == gen   # pinned, not copied
        assert [read_counter(restore(driver, s.snapshot_id)[1]) for s in g.snapshots] == [7, 5]

    def test_two_writable_staged_block_members_are_refused(self, driver):
        vids = [driver.staged(cap=block_cap(), parameters=OBJECT)[0] for _ in range(2)]
        name = unique_name()
        first = driver.group.CreateVolumeGroupSnapshot(group_request(name, vids)).group_snapshot
        assert not first.ready_to_use
        deadline = time.monotonic() + 30
        while True:
            code = None
            try:
                driver.group.CreateVolumeGroupSnapshot(group_request(name, vids))
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            if code is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == C.FAILED_PRECONDITION and "block" in details
        driver.group.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=first.group_snapshot_id))
