"""Controller service, per spec.md "Controller Service RPC": one test per sentence.

The controller only writes the catalog (volumes are created on a node at NodeStage), so these
tests share one server per module; volumes they create are deleted by the fixture."""
from __future__ import annotations

import grpc
import pytest

from csi_perssd import TOPOLOGY_NODE_KEY as NODE_KEY
from csi_perssd import TOPOLOGY_POOL_KEY as POOL_KEY
from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog, NodeRecord
from csi_perssd.remote.filestore import FileStore
from tests.plugins.driver import (GiB, LOCAL, MiB, NODE_ID, POOL, XFS_SIZE, AccessMode, block_cap, code_of,
                                  create_request, expect, mount_cap, unique_name)

pytestmark = pytest.mark.root
C = grpc.StatusCode
Cap = pb.ControllerServiceCapability.RPC
MAX_VOLUME = 64 * GiB
DRIVER_FLAGS = ["--max-volume-bytes", str(MAX_VOLUME)]
OBJECT = {"persistence": "object"}          # mobility=pool (default)
MULTI_NODE = [AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
              AccessMode.MULTI_NODE_MULTI_WRITER]
SINGLE_NODE = [AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY,
               AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER]


def catalog(driver) -> Catalog:
    return Catalog(FileStore(driver.proc.catalog.removeprefix("file://")))


@pytest.fixture(scope="module")
def node_b(driver) -> str:
    """A second registered node in the same pool (only its catalog record: enough for the controller)."""
    catalog(driver).put_node(NodeRecord(id="node-b", pool=POOL, total_bytes=100 * GiB,
                                        available_bytes=50 * GiB, max_volume_bytes=50 * GiB))
    return "node-b"


@pytest.fixture(scope="module")
def small_pool(driver) -> str:
    """A registered node alone in a pool with room for 1 GiB volumes."""
    catalog(driver).put_node(NodeRecord(id="node-small", pool="pool-small", total_bytes=2 * GiB,
                                        available_bytes=GiB, max_volume_bytes=GiB))
    return "pool-small"


def topo(**seg: str) -> pb.Topology:
    keys = {"node": NODE_KEY, "pool": POOL_KEY}
    return pb.Topology(segments={keys.get(k, k): v for k, v in seg.items()})


# ----------------------------------------------------------------------------- capabilities

class TestControllerGetCapabilities:
    def test_should_return_capabilities(self, driver):
        caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()).capabilities}
        assert {Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY,
                Cap.EXPAND_VOLUME, Cap.GET_VOLUME, Cap.VOLUME_CONDITION, Cap.LIST_VOLUMES_PUBLISHED_NODES,
                Cap.SINGLE_NODE_MULTI_WRITER} <= caps
        assert Cap.UNKNOWN not in caps
        assert Cap.GET_SNAPSHOT not in caps                 # alpha: off unless enabled

    def test_advertised_rpcs_should_be_implemented_and_the_others_unimplemented(self, driver):
        caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()).capabilities}
        ctl = driver.controller
        calls = {
            Cap.CREATE_DELETE_VOLUME: lambda: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id="no-such-volume")),
            Cap.PUBLISH_UNPUBLISH_VOLUME: lambda: ctl.ControllerUnpublishVolume(
                pb.ControllerUnpublishVolumeRequest(volume_id="no-such-volume", node_id=NODE_ID)),
            Cap.LIST_VOLUMES: lambda: ctl.ListVolumes(pb.ListVolumesRequest()),
            Cap.GET_CAPACITY: lambda: ctl.GetCapacity(pb.GetCapacityRequest()),
            Cap.EXPAND_VOLUME: lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
                volume_id="no-such-volume", capacity_range=pb.CapacityRange(required_bytes=GiB))),
            Cap.GET_VOLUME: lambda: ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="no-such-volume")),
            Cap.CREATE_DELETE_SNAPSHOT: lambda: ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="no-such-snap")),
            Cap.LIST_SNAPSHOTS: lambda: ctl.ListSnapshots(pb.ListSnapshotsRequest()),
            Cap.GET_SNAPSHOT: lambda: ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id="no-such-snap")),
            Cap.MODIFY_VOLUME: lambda: ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                volume_id="no-such-volume", mutable_parameters={"a": "b"})),
        }
        for cap, call in calls.items():
            code = code_of(call)
            if cap in caps:
                assert code != C.UNIMPLEMENTED, f"{Cap.Type.Name(cap)} is advertised but unimplemented"
            else:
                assert code == C.UNIMPLEMENTED, f"{Cap.Type.Name(cap)} is not advertised but returns {code.name}"


# ----------------------------------------------------------------------------- CreateVolume

class TestCreateVolume:
    def test_should_fail_when_no_name_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(name=""))

    def test_should_fail_when_the_name_is_too_long_or_has_control_characters(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(name="n" * 300))
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(name="bad\x00name"))

    def test_should_fail_when_no_volume_capabilities_are_provided(self, driver):
        req = create_request()
        del req.volume_capabilities[:]
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, req)

    def test_should_fail_when_a_capability_has_no_access_type(self, driver):
        cap = pb.VolumeCapability(access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=cap))

    def test_should_fail_when_a_capability_has_no_access_mode(self, driver):
        cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=cap))

    @pytest.mark.parametrize("mode", MULTI_NODE, ids=AccessMode.Mode.Name)
    def test_should_fail_for_multi_node_access_modes(self, driver, mode):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=mount_cap(mode=mode)))
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=block_cap(mode=mode)))

    @pytest.mark.parametrize("mode", SINGLE_NODE, ids=AccessMode.Mode.Name)
    def test_should_accept_every_single_node_access_mode(self, driver, mode):
        vol = driver.create(create_request(cap=mount_cap(mode=mode)))
        assert vol.volume_id

    def test_should_fail_for_an_unsupported_fs_type(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=mount_cap("vfat")))

    def test_should_fail_for_both_block_and_mount_access(self, driver):
        req = create_request()
        req.volume_capabilities.append(block_cap())
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, req)

    def test_should_fail_with_out_of_range_when_limit_is_below_required(self, driver):
        req = create_request(size=0, capacity_range=pb.CapacityRange(required_bytes=20 * MiB, limit_bytes=10 * MiB))
        expect(C.OUT_OF_RANGE, driver.controller.CreateVolume, req)

    def test_should_fail_with_out_of_range_above_the_maximum_volume_size(self, driver):
        expect(C.OUT_OF_RANGE, driver.controller.CreateVolume, create_request(size=MAX_VOLUME + GiB))

    def test_should_fail_when_capacity_is_negative(self, driver):
        req = create_request(size=0, capacity_range=pb.CapacityRange(required_bytes=-1))
        assert code_of(driver.controller.CreateVolume, req) in (C.INVALID_ARGUMENT, C.OUT_OF_RANGE)

    def test_should_fail_with_out_of_range_when_no_size_fits_the_range(self, driver):
        # xfs needs 300 MiB: a range entirely below that cannot be satisfied
        req = create_request(cap=mount_cap("xfs"), size=0,
                             capacity_range=pb.CapacityRange(required_bytes=10 * MiB, limit_bytes=20 * MiB))
        expect(C.OUT_OF_RANGE, driver.controller.CreateVolume, req)

    def test_should_return_a_volume_within_the_capacity_range(self, driver):
        for req_b, lim_b in [(10 * MiB, 0), (10 * MiB + 1, 0), (0, 30 * MiB), (12 * MiB, 12 * MiB),
                             (5 * MiB + 4096, 5 * MiB + 4096)]:
            req = create_request(size=0, capacity_range=pb.CapacityRange(required_bytes=req_b, limit_bytes=lim_b))
            vol = driver.create(req)
            assert vol.capacity_bytes >= req_b, (req_b, lim_b, vol.capacity_bytes)
            if lim_b:
                assert vol.capacity_bytes <= lim_b, (req_b, lim_b, vol.capacity_bytes)

    def test_should_use_a_default_size_without_capacity_range(self, driver):
        vol = driver.create(create_request(size=0))
        assert vol.capacity_bytes > 0

    def test_should_return_volume_id_and_context(self, driver):
        vol = driver.create(create_request())
        assert vol.volume_id and len(vol.volume_id.encode()) <= 128
        assert vol.volume_context["persistence"] == "local"

    def test_should_be_idempotent(self, driver):
        req = create_request(size=20 * MiB)
        a = driver.create(req)
        b = driver.create(req)
        assert a.volume_id == b.volume_id
        assert a.capacity_bytes == b.capacity_bytes
        assert a.accessible_topology == b.accessible_topology

    def test_should_be_idempotent_for_a_compatible_range(self, driver):
        name = unique_name()
        a = driver.create(create_request(name=name, size=20 * MiB))
        b = driver.create(create_request(name=name, size=0,
                                         capacity_range=pb.CapacityRange(required_bytes=10 * MiB,
                                                                         limit_bytes=40 * MiB)))
        assert a.volume_id == b.volume_id

    def test_should_fail_with_already_exists_for_an_incompatible_size(self, driver):
        name = unique_name()
        driver.create(create_request(name=name, size=20 * MiB))
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume, create_request(name=name, size=40 * MiB))

    def test_should_fail_with_already_exists_for_incompatible_capabilities(self, driver):
        name = unique_name()
        driver.create(create_request(name=name))
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume, create_request(name=name, cap=block_cap()))
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume,
               create_request(name=name, cap=mount_cap("xfs"), size=XFS_SIZE))

    def test_should_fail_with_already_exists_for_incompatible_parameters(self, driver):
        name = unique_name()
        driver.create(create_request(name=name))
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume, create_request(name=name, parameters=OBJECT))

    def test_should_create_block_volumes(self, driver):
        vol = driver.create(create_request(cap=block_cap()))
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[block_cap()]))
        assert resp.HasField("confirmed")

    @pytest.mark.parametrize("fs_type", ["ext4", "xfs", ""])
    def test_should_create_mount_volumes(self, driver, fs_type):
        vol = driver.create(create_request(cap=mount_cap(fs_type), size=XFS_SIZE))
        assert vol.capacity_bytes >= XFS_SIZE

    def test_should_give_xfs_volumes_at_least_the_xfs_minimum(self, driver):
        vol = driver.create(create_request(cap=mount_cap("xfs"), size=16 * MiB))
        assert vol.capacity_bytes >= 300 * MiB

    def test_should_accept_mount_flags(self, driver):
        vol = driver.create(create_request(cap=mount_cap(flags=["noatime", "nodiratime"])))
        assert vol.volume_id

    def test_should_fail_for_unknown_mutable_parameters(self, driver):
        req = create_request()
        req.mutable_parameters["iops"] = "1000"         # test_modify.py: the mutable ones
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, req)

    def test_should_fail_for_an_invalid_mount_flag(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(cap=mount_cap(flags=["a\x00b"])))


class TestCreateVolumeParameters:
    @pytest.mark.parametrize("params", [
        {"mobility": "everywhere"}, {"persistence": "tape"}, {"chunkSize": "3Mi"}, {"chunkSize": "1Ki"},
        {"chunkSize": "1Gi"}, {"chunkSize": "lots"}, {"compression": "99"}, {"compression": "x"},
        {"fsType": "vfat"}, {"unknownKey": "1"}, {"persistence": "local", "mobility": "pool"},
    ], ids=str)
    def test_should_fail_for_invalid_parameters(self, driver, params):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, create_request(parameters=params))

    @pytest.mark.parametrize("params", [
        {}, {"mobility": "node"}, {"mobility": "pool", "persistence": "object", "chunkSize": "1Mi"},
        {"chunkSize": "65536", "compression": "0"}, {"persistence": "local"},
        {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns"},
    ], ids=str)
    def test_should_accept_valid_parameters(self, driver, params):
        vol = driver.create(create_request(parameters=params))
        want = "node" if params.get("persistence") == "local" or params.get("mobility") == "node" else "pool"
        assert vol.volume_context["mobility"] == want

    def test_fs_type_parameter_should_apply_to_mount_capabilities(self, driver):
        vol = driver.create(create_request(cap=mount_cap(""), size=XFS_SIZE,
                                           parameters={"fsType": "xfs", "persistence": "local"}))
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap("xfs")]))
        assert resp.HasField("confirmed"), resp.message

    def test_an_empty_fs_type_should_be_confirmed_for_any_file_system(self, driver):
        vol = driver.create(create_request(cap=mount_cap(""), size=XFS_SIZE,
                                           parameters={"fsType": "xfs", "persistence": "local"}))
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap("")]))
        assert resp.HasField("confirmed"), resp.message

    def test_fs_type_parameter_should_not_contradict_the_capability(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume,
               create_request(cap=mount_cap("xfs"), size=XFS_SIZE, parameters={"fsType": "ext4"}))


class TestCreateVolumeTopology:
    def test_node_volume_should_be_accessible_from_its_node(self, driver):
        vol = driver.create(create_request(parameters={"mobility": "node"}))
        assert [dict(t.segments) for t in vol.accessible_topology] == [{NODE_KEY: NODE_ID}]

    def test_pool_volume_should_be_accessible_from_its_pool(self, driver):
        vol = driver.create(create_request(parameters=OBJECT))
        assert [dict(t.segments) for t in vol.accessible_topology] == [{POOL_KEY: POOL}]

    @pytest.mark.parametrize("seg", [{"node": NODE_ID}, {"pool": POOL}, {"node": NODE_ID, "pool": POOL}], ids=str)
    def test_should_honour_requisite_topology(self, driver, seg):
        for params in (LOCAL, OBJECT):
            req = create_request(parameters=params)
            req.accessibility_requirements.requisite.append(topo(**seg))
            vol = driver.create(req)
            top = dict(vol.accessible_topology[0].segments)
            assert top.get(POOL_KEY, POOL) == POOL
            assert top.get(NODE_KEY, NODE_ID) == NODE_ID

    def test_should_honour_preferred_topology(self, driver, node_b):
        req = create_request(parameters={"mobility": "node"})
        req.accessibility_requirements.requisite.extend([topo(node=NODE_ID), topo(node=node_b)])
        req.accessibility_requirements.preferred.append(topo(node=node_b))
        vol = driver.create(req)
        assert dict(vol.accessible_topology[0].segments) == {NODE_KEY: node_b}

    @pytest.mark.parametrize("seg", [{"node": "node-zzz"}, {"pool": "pool-zzz"}, {"node": NODE_ID, "pool": "pool-zzz"},
                                     {"node": "node-zzz", "pool": POOL}, {"example.com/zone": "z1"}], ids=str)
    def test_should_fail_with_resource_exhausted_for_an_unknown_segment(self, driver, seg):
        for params in (LOCAL, OBJECT):
            req = create_request(parameters=params)
            req.accessibility_requirements.requisite.append(topo(**seg))
            req.accessibility_requirements.preferred.append(topo(**seg))
            expect(C.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, req)

    def test_should_fail_with_resource_exhausted_when_no_node_of_the_segment_has_room(self, driver, small_pool):
        for params in ({"mobility": "node"}, OBJECT):
            req = create_request(size=4 * GiB, parameters=params)
            req.accessibility_requirements.requisite.append(topo(pool=small_pool))
            expect(C.RESOURCE_EXHAUSTED, driver.controller.CreateVolume, req)
            req.capacity_range.required_bytes = 512 * MiB
            vol = driver.create(req)
            assert dict(vol.accessible_topology[0].segments).get(POOL_KEY, small_pool) == small_pool

    def test_repeat_with_requisite_topology_the_volume_is_not_in_should_fail_with_already_exists(self, driver, node_b):
        name = unique_name()
        req = create_request(name=name, parameters={"mobility": "node"})
        req.accessibility_requirements.requisite.append(topo(node=NODE_ID))
        driver.create(req)
        del req.accessibility_requirements.requisite[:]
        req.accessibility_requirements.requisite.append(topo(node=node_b))
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume, req)
        req.accessibility_requirements.requisite.append(topo(node=NODE_ID))       # one of them fits: OK
        driver.create(req)

    def test_idempotent_repeat_should_return_the_same_topology(self, driver):
        req = create_request(parameters={"mobility": "node"})
        req.accessibility_requirements.requisite.append(topo(node=NODE_ID))
        assert driver.create(req).accessible_topology == driver.create(req).accessible_topology


# ----------------------------------------------------------------------------- DeleteVolume

HOSTILE_IDS = ["../../etc", "..", "a/b", "/etc/passwd", "v" * 300, "vol\x00x", " vol", "vol\n", "-rf"]


class TestDeleteVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.DeleteVolume, pb.DeleteVolumeRequest())

    def test_should_succeed_when_the_volume_does_not_exist(self, driver):
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="pvol-" + "0" * 32))

    def test_should_delete_a_volume_and_be_idempotent(self, driver):
        vol = driver.controller.CreateVolume(create_request()).volume
        for _ in range(2):
            driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        expect(C.NOT_FOUND, driver.controller.ControllerGetVolume,
               pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))

    def test_name_should_be_reusable_after_delete(self, driver):
        req = create_request()
        a = driver.controller.CreateVolume(req).volume
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=a.volume_id))
        b = driver.create(req)
        assert b.volume_id != a.volume_id

    @pytest.mark.parametrize("vid", HOSTILE_IDS, ids=repr)
    def test_should_reject_hostile_ids(self, driver, vid):
        expect(C.INVALID_ARGUMENT, driver.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))

    def test_should_fail_with_failed_precondition_while_published(self, driver):
        vol = driver.create(create_request())
        driver.publish(vol.volume_id)
        e = expect(C.FAILED_PRECONDITION, driver.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert NODE_ID in e.details()


# ----------------------------------------------------------------------------- ValidateVolumeCapabilities

class TestValidateVolumeCapabilities:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ValidateVolumeCapabilities,
               pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]))

    def test_should_fail_when_no_capabilities_are_provided(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ValidateVolumeCapabilities,
               pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.controller.ValidateVolumeCapabilities,
               pb.ValidateVolumeCapabilitiesRequest(volume_id="pvol-" + "0" * 32, volume_capabilities=[mount_cap()]))

    def test_should_confirm_the_capabilities_the_volume_was_created_with(self, driver):
        vol = driver.create(create_request())
        req = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[mount_cap()],
                                                   volume_context=vol.volume_context)
        resp = driver.controller.ValidateVolumeCapabilities(req)
        assert resp.HasField("confirmed")
        assert list(resp.confirmed.volume_capabilities) == [mount_cap()]
        assert dict(resp.confirmed.volume_context) == dict(vol.volume_context)

    @pytest.mark.parametrize("mode", SINGLE_NODE, ids=AccessMode.Mode.Name)
    def test_should_confirm_other_single_node_modes(self, driver, mode):
        vol = driver.create(create_request())
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap(mode=mode)]))
        assert resp.HasField("confirmed"), resp.message

    @pytest.mark.parametrize("cap", [block_cap(), mount_cap("xfs"), mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER)],
                             ids=["block", "xfs", "multi-node"])
    def test_should_not_confirm_capabilities_the_volume_lacks(self, driver, cap):
        vol = driver.create(create_request())
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[cap]))
        assert not resp.HasField("confirmed")
        assert resp.message

    def test_should_not_confirm_mutable_parameters(self, driver):
        vol = driver.create(create_request())
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()], mutable_parameters={"iops": "1"}))
        assert not resp.HasField("confirmed") and resp.message

    def test_should_not_confirm_different_parameters(self, driver):
        vol = driver.create(create_request())
        resp = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()], parameters=OBJECT))
        assert not resp.HasField("confirmed")


# ----------------------------------------------------------------------------- ListVolumes

class TestListVolumes:
    def test_should_return_created_volumes_with_status(self, driver):
        vol = driver.create(create_request())
        driver.publish(vol.volume_id)
        entries = {e.volume.volume_id: e for e in driver.controller.ListVolumes(pb.ListVolumesRequest()).entries}
        assert entries[vol.volume_id].volume.capacity_bytes == vol.capacity_bytes
        assert list(entries[vol.volume_id].status.published_node_ids) == [NODE_ID]
        assert entries[vol.volume_id].status.volume_condition.abnormal is False

    def test_should_paginate_with_max_entries_and_tokens(self, driver):
        mine = {driver.create(create_request()).volume_id for _ in range(5)}
        total = len(driver.controller.ListVolumes(pb.ListVolumesRequest()).entries)
        assert total >= 5
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            resp = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
            assert len(resp.entries) <= 2
            seen += [e.volume.volume_id for e in resp.entries]
            pages += 1
            token = resp.next_token
            if not token:
                break
            assert pages < 100
        assert len(seen) == len(set(seen)) == total
        assert mine <= set(seen)
        assert pages == (total + 1) // 2

    def test_max_entries_zero_should_return_everything(self, driver):
        driver.create(create_request())
        resp = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=0))
        assert resp.entries and not resp.next_token

    def test_pagination_should_survive_a_deleted_volume(self, driver):
        vols = [driver.controller.CreateVolume(create_request()).volume.volume_id for _ in range(3)]
        first = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=1))
        for v in vols:
            driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
        token, n = first.next_token, 0
        while token:
            resp = driver.controller.ListVolumes(pb.ListVolumesRequest(max_entries=1, starting_token=token))
            token, n = resp.next_token, n + 1
            assert n < 1000

    @pytest.mark.parametrize("token", ["garbage", "v1:../../etc", "v1:\x00", "9999"])
    def test_should_fail_with_aborted_for_an_invalid_starting_token(self, driver, token):
        expect(C.ABORTED, driver.controller.ListVolumes, pb.ListVolumesRequest(starting_token=token))

    def test_should_fail_for_negative_max_entries(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ListVolumes, pb.ListVolumesRequest(max_entries=-1))


# ----------------------------------------------------------------------------- GetCapacity

class TestGetCapacity:
    def test_should_return_capacity_without_parameters(self, driver):
        assert driver.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity > 0

    @pytest.mark.parametrize("seg", [{"node": NODE_ID}, {"pool": POOL}, {"node": NODE_ID, "pool": POOL}], ids=str)
    def test_should_return_capacity_of_a_known_segment(self, driver, seg):
        resp = driver.controller.GetCapacity(pb.GetCapacityRequest(accessible_topology=topo(**seg),
                                                                   volume_capabilities=[mount_cap()]))
        assert resp.available_capacity > 0
        assert 0 < resp.maximum_volume_size.value <= max(resp.available_capacity, MAX_VOLUME)
        assert resp.maximum_volume_size.value <= MAX_VOLUME

    @pytest.mark.parametrize("seg", [{"node": "node-zzz"}, {"pool": "pool-zzz"}, {"example.com/zone": "z"}], ids=str)
    def test_should_return_zero_for_an_unknown_segment(self, driver, seg):
        resp = driver.controller.GetCapacity(pb.GetCapacityRequest(accessible_topology=topo(**seg)))
        assert resp.available_capacity == 0

    @pytest.mark.parametrize("cap", [block_cap(), mount_cap("xfs")], ids=["block", "xfs"])
    def test_should_return_capacity_for_supported_capabilities(self, driver, cap):
        assert driver.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[cap])).available_capacity > 0

    @pytest.mark.parametrize("cap", [mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER), mount_cap("vfat")],
                             ids=["multi-node", "vfat"])
    def test_should_return_zero_for_unsupported_capabilities(self, driver, cap):
        assert driver.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[cap])).available_capacity == 0

    def test_should_fail_for_invalid_parameters(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.GetCapacity, pb.GetCapacityRequest(parameters={"mobility": "x"}))


# ----------------------------------------------------------------------------- ControllerExpandVolume

class TestControllerExpandVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume,
               pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=GiB)))

    def test_should_fail_when_no_capacity_range_is_provided(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume,
               pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id="pvol-" + "0" * 32, capacity_range=pb.CapacityRange(required_bytes=GiB)))

    @pytest.mark.parametrize("cap", [mount_cap(), block_cap()], ids=["mount", "block"])
    def test_should_grow_the_volume_and_be_idempotent(self, driver, cap):
        vol = driver.create(create_request(cap=cap, size=16 * MiB))
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id, volume_capability=cap,
                                               capacity_range=pb.CapacityRange(required_bytes=40 * MiB))
        for _ in range(2):
            resp = driver.controller.ControllerExpandVolume(req)
            assert resp.capacity_bytes >= 40 * MiB
            assert resp.node_expansion_required
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert got.volume.capacity_bytes == resp.capacity_bytes

    def test_should_not_grow_without_required_bytes(self, driver):
        vol = driver.create(create_request(size=16 * MiB))
        resp = driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(limit_bytes=GiB)))
        assert resp.capacity_bytes == vol.capacity_bytes

    def test_should_fail_with_out_of_range_when_the_limit_is_below_the_current_size(self, driver):
        vol = driver.create(create_request(size=32 * MiB))
        expect(C.OUT_OF_RANGE, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB, limit_bytes=16 * MiB)))

    def test_should_not_shrink(self, driver):
        vol = driver.create(create_request(size=32 * MiB))
        resp = driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB)))
        assert resp.capacity_bytes >= 32 * MiB

    def test_should_fail_with_out_of_range_for_a_bad_range(self, driver):
        vol = driver.create(create_request())
        expect(C.OUT_OF_RANGE, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=40 * MiB, limit_bytes=20 * MiB)))
        expect(C.OUT_OF_RANGE, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=MAX_VOLUME + GiB)))

    def test_should_fail_for_a_capability_the_volume_lacks(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, volume_capability=block_cap(),
            capacity_range=pb.CapacityRange(required_bytes=40 * MiB)))


# ----------------------------------------------------------------------------- ControllerGetVolume

class TestControllerGetVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest())

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.controller.ControllerGetVolume,
               pb.ControllerGetVolumeRequest(volume_id="pvol-" + "0" * 32))

    def test_should_return_the_volume_with_status_and_condition(self, driver):
        vol = driver.create(create_request())
        resp = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert resp.volume == vol
        assert list(resp.status.published_node_ids) == []
        assert resp.status.HasField("volume_condition") and not resp.status.volume_condition.abnormal
        driver.publish(vol.volume_id)
        resp = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert list(resp.status.published_node_ids) == [NODE_ID]


# ----------------------------------------------------------------------------- ControllerPublish/Unpublish

class TestControllerPublishVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
               pb.ControllerPublishVolumeRequest(node_id=NODE_ID, volume_capability=mount_cap()))

    def test_should_fail_when_no_node_id_is_provided(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
               pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, volume_capability=mount_cap()))

    def test_should_fail_when_no_volume_capability_is_provided(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume,
               pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_ID))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id="pvol-" + "0" * 32, node_id=NODE_ID, volume_capability=mount_cap()))

    def test_should_fail_when_the_node_does_not_exist(self, driver):
        vol = driver.create(create_request())
        expect(C.NOT_FOUND, driver.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="node-zzz", volume_capability=mount_cap()))

    def test_should_fail_for_multi_node_modes(self, driver):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID,
            volume_capability=mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER)))

    def test_should_return_a_publish_context_and_be_idempotent(self, driver):
        vol = driver.create(create_request())
        a = driver.publish(vol.volume_id)
        b = driver.publish(vol.volume_id)
        assert a == b and "epoch" in a

    def test_should_fail_with_failed_precondition_when_another_node_owns_it(self, driver, node_b):
        vol = driver.create(create_request(parameters=OBJECT))
        driver.publish(vol.volume_id, node_id=node_b)
        e = expect(C.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume,
                   pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_ID,
                                                     volume_capability=mount_cap()))
        assert node_b in e.details()
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node_b))
        driver.publish(vol.volume_id)       # released: another node may take it

    def test_should_fail_for_a_node_volume_on_another_node(self, driver, node_b):
        vol = driver.create(create_request(parameters={"mobility": "node"}))
        expect(C.FAILED_PRECONDITION, driver.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node_b, volume_capability=mount_cap()))


class TestControllerUnpublishVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerUnpublishVolume,
               pb.ControllerUnpublishVolumeRequest(node_id=NODE_ID))

    def test_should_succeed_for_an_unknown_volume_or_node(self, driver):
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id="pvol-" + "0" * 32, node_id=NODE_ID))
        vol = driver.create(create_request())
        driver.publish(vol.volume_id)
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id="node-zzz"))
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert list(got.status.published_node_ids) == [NODE_ID]      # still published where it was

    def test_should_unpublish_and_be_idempotent(self, driver):
        vol = driver.create(create_request())
        driver.publish(vol.volume_id)
        for _ in range(2):
            driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
                volume_id=vol.volume_id, node_id=NODE_ID))
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert list(got.status.published_node_ids) == []

    def test_without_node_id_should_unpublish_from_all_nodes(self, driver):
        vol = driver.create(create_request())
        driver.publish(vol.volume_id)
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id))
        got = driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert list(got.status.published_node_ids) == []


class TestControllerHostileInput:
    @pytest.mark.parametrize("vid", HOSTILE_IDS, ids=repr)
    def test_every_rpc_should_reject_hostile_volume_ids(self, driver, vid):
        ctl = driver.controller
        calls = [
            (ctl.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=NODE_ID,
                                                                           volume_capability=mount_cap())),
            (ctl.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID)),
            (ctl.ValidateVolumeCapabilities, pb.ValidateVolumeCapabilitiesRequest(volume_id=vid,
                                                                                 volume_capabilities=[mount_cap()])),
            (ctl.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=vid)),
            (ctl.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=GiB))),
        ]
        for fn, req in calls:
            expect(C.INVALID_ARGUMENT, fn, req)

    @pytest.mark.parametrize("node", ["../../etc", "n" * 300, "node\x00a", "a/b"], ids=repr)
    def test_should_reject_hostile_node_ids(self, driver, node):
        vol = driver.create(create_request())
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node, volume_capability=mount_cap()))

    def test_hostile_name_should_be_stored_safely(self, driver):
        vol = driver.create(create_request(name="../../etc/passwd"))
        again = driver.create(create_request(name="../../etc/passwd"))
        assert vol.volume_id == again.volume_id


# ----------------------------------------------------------------------------- concurrency

class TestControllerPerVolumeLock:
    """The file:// store serialises conditional writes with an flock on its directory: holding that
    lock from the test makes the first call on a volume wait inside its critical section, so a
    second call on the same volume (or name) must be ABORTED, deterministically."""

    def _holding_store_lock(self, driver):
        import fcntl
        import os
        from contextlib import contextmanager

        @contextmanager
        def held():
            fd = os.open(os.path.join(driver.proc.catalog.removeprefix("file://"), ".lock"), os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)
        return held()

    def _in_thread(self, fn, req):
        import threading
        out: dict[str, object] = {}

        def run() -> None:
            try:
                out["resp"] = fn(req, timeout=60)
            except grpc.RpcError as e:
                out["error"] = e
        t = threading.Thread(target=run)
        t.start()
        return t, out

    def _wait_blocked(self, driver, timeout: float = 10.0) -> None:
        """Wait until the driver process waits for the store's flock (a "->" line in /proc/locks)."""
        import os
        import time
        ino = os.stat(os.path.join(driver.proc.catalog.removeprefix("file://"), ".lock")).st_ino
        pid = str(driver.proc.proc.pid)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open("/proc/locks") as f:
                for line in f:
                    parts = line.split()
                    if "->" in parts and pid in parts and any(p.endswith(f":{ino}") for p in parts):
                        return
            time.sleep(0.02)
        raise AssertionError("the first call never reached the store")

    def _wait_aborted(self, fn, req, timeout: float = 10.0) -> None:
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if code_of(fn, req, timeout=2) == C.ABORTED:      # a blocked call would time out instead
                return
            time.sleep(0.02)
        raise AssertionError("the second call was never ABORTED")

    def test_a_concurrent_call_on_the_same_volume_should_get_aborted(self, driver):
        vol = driver.create(create_request())
        other = driver.create(create_request())
        ctl = driver.controller
        pub = pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=mount_cap())
        with self._holding_store_lock(driver):
            t, out = self._in_thread(ctl.ControllerPublishVolume, pub)
            self._wait_blocked(driver)
            self._wait_aborted(ctl.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id))
            expect(C.ABORTED, ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=5)
            expect(C.ABORTED, ctl.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=64 * MiB)), timeout=5)
            # reads and other volumes are not blocked by the volume's lock
            ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=other.volume_id), timeout=10)
        t.join(60)
        assert "error" not in out, out.get("error")
        got = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert list(got.status.published_node_ids) == [NODE_ID]

    def test_a_concurrent_create_of_the_same_name_should_get_aborted(self, driver):
        req = create_request()
        ctl = driver.controller
        with self._holding_store_lock(driver):
            t, out = self._in_thread(ctl.CreateVolume, req)
            self._wait_blocked(driver)
            self._wait_aborted(ctl.CreateVolume, req)
        t.join(60)
        assert "error" not in out, out.get("error")
        driver.created.append(out["resp"].volume.volume_id)
        assert driver.create(req).volume_id == out["resp"].volume.volume_id
