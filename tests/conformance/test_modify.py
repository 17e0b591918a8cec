"""ControllerModifyVolume and CreateVolume's mutable_parameters, per spec.md "CreateVolume" and
"ControllerModifyVolume": one test per sentence, plus the driver's own promise that a change
takes effect at the next flush of a staged volume (docs/kubernetes.md, mutable parameters)."""
from __future__ import annotations

import os

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog
from csi_perssd.remote.filestore import FileStore
from csi_perssd.remote.manifest import Manifest
from tests.plugins.driver import MiB, block_cap, create_request, expect, mount_cap

pytestmark = pytest.mark.root
C = grpc.StatusCode
Cap = pb.ControllerServiceCapability.RPC
OBJECT = {"persistence": "object", "chunkSize": "1Mi"}


def catalog(driver) -> Catalog:
    return Catalog(FileStore(driver.proc.catalog.removeprefix("file://")))


def modify(driver, vid: str, **mutable: str) -> None:
    driver.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters=mutable))


class TestCapability:
    def test_modify_volume_should_be_advertised(self, driver):
        caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()).capabilities}
        assert Cap.MODIFY_VOLUME in caps


class TestCreateVolumeMutableParameters:
    def test_mutable_parameters_should_take_precedence_over_parameters(self, driver):
        vol = driver.create(create_request(parameters=dict(OBJECT, compression="1"),
                                           mutable_parameters={"compression": "7"}))
        rec = catalog(driver).volume(vol.volume_id)
        assert rec.compression == 7
        assert rec.mutable_parameters == {"compression": "7"}

    @pytest.mark.parametrize("mutable", [{"XXX_FakeKey": "x"}, {"persistence": "local"}, {"chunkSize": "1Mi"},
                                         {"compression": "20"}, {"compression": "fast"}])
    def test_should_fail_for_unknown_immutable_or_invalid_mutable_parameters(self, driver, mutable):
        req = create_request(parameters=OBJECT, mutable_parameters=mutable)
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume, req)
        assert catalog(driver).volume_by_name(req.name) is None

    def test_should_be_idempotent_with_the_same_mutable_parameters(self, driver):
        req = create_request(parameters=OBJECT, mutable_parameters={"compression": "2"})
        a = driver.create(req)
        b = driver.controller.CreateVolume(req).volume
        assert a.volume_id == b.volume_id

    def test_should_fail_with_already_exists_for_other_mutable_parameters(self, driver):
        req = create_request(parameters=OBJECT, mutable_parameters={"compression": "2"})
        driver.create(req)
        req.mutable_parameters["compression"] = "4"
        expect(C.ALREADY_EXISTS, driver.controller.CreateVolume, req)

    def test_compression_should_not_apply_to_local_volumes(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.CreateVolume,
               create_request(parameters={"persistence": "local"}, mutable_parameters={"compression": "3"}))


class TestControllerModifyVolume:
    def test_should_fail_when_no_volume_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
               pb.ControllerModifyVolumeRequest(mutable_parameters={"compression": "3"}))

    def test_should_fail_when_no_mutable_parameters_are_provided(self, driver):
        vol = driver.create(create_request(parameters=OBJECT))
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
               pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id))

    def test_should_fail_when_the_volume_does_not_exist(self, driver):
        expect(C.NOT_FOUND, driver.controller.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
            volume_id="pvol-" + "0" * 32, mutable_parameters={"compression": "3"}))

    @pytest.mark.parametrize("mutable", [{"XXX_FakeKey": "x"}, {"mobility": "node"}, {"fsType": "xfs"},
                                         {"compression": "-1"}, {"compression": "9", "persistence": "local"}])
    def test_unsupported_parameters_should_be_invalid_argument_and_change_nothing(self, driver, mutable):
        vol = driver.create(create_request(parameters=dict(OBJECT, compression="1")))
        before = catalog(driver).volume(vol.volume_id)
        e = expect(C.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume,
                   pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=mutable))
        assert e.details()
        after = catalog(driver).volume(vol.volume_id)
        assert after == before and after.etag == before.etag

    def test_should_fail_when_the_volume_cannot_support_them(self, driver):
        vol = driver.create(create_request(parameters={"persistence": "local"}))
        expect(C.INVALID_ARGUMENT, driver.controller.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"compression": "3"}))

    def test_should_modify_and_be_idempotent(self, driver):
        vol = driver.create(create_request(parameters=dict(OBJECT, compression="1")))
        modify(driver, vol.volume_id, compression="9")
        modify(driver, vol.volume_id, compression="9")
        rec = catalog(driver).volume(vol.volume_id)
        assert rec.compression == 9 and rec.mutable_parameters == {"compression": "9"}

    def test_only_the_given_keys_should_change(self, driver):
        vol = driver.create(create_request(parameters=dict(OBJECT, compression="1"), size=32 * MiB))
        before = catalog(driver).volume(vol.volume_id)
        modify(driver, vol.volume_id, compression="0")
        after = catalog(driver).volume(vol.volume_id)
        assert (after.size, after.parameters, after.chunk_size, after.persistence, after.mobility) == \
            (before.size, before.parameters, before.chunk_size, before.persistence, before.mobility)

    def test_validate_volume_capabilities_should_confirm_valid_mutable_parameters_only(self, driver):
        vol = driver.create(create_request(parameters=OBJECT))
        ok = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()], mutable_parameters={"compression": "5"}))
        assert ok.confirmed.mutable_parameters == {"compression": "5"}
        bad = driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()], mutable_parameters={"iops": "1"}))
        assert not bad.HasField("confirmed") and "iops" in bad.message


def _write_flush(driver, vid: str, staging: str, target: str, cap: pb.VolumeCapability, data: bytes) -> Manifest:
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
    driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
    rec = catalog(driver).volume(vid)
    m = Manifest.decode(catalog(driver).get_manifest(vid, rec.generation))
    driver.node.NodeStageVolume(driver.stage_request(vid, staging, cap))
    driver.node.NodePublishVolume(driver.publish_request(vid, staging, target, cap))
    return m


def test_a_modified_compression_takes_effect_at_the_next_flush(driver):
    cap = block_cap()
    vid, staging, target = driver.published(cap, size=4 * MiB, parameters=dict(OBJECT, compression="0"))
    text = b"the same sentence, again and again. " * (MiB // 36 + 1)
    raw = _write_flush(driver, vid, staging, target, cap, text[:MiB])
    assert raw.sizes[raw.entries[0]] == MiB + 1          # compression 0: raw blob (tag + plaintext)
    modify(driver, vid, compression="3")                 # while staged: the next flush compresses
    packed = _write_flush(driver, vid, staging, target, cap, text[1:MiB + 1])
    assert packed.entries[0] != raw.entries[0]
    assert packed.sizes[packed.entries[0]] < MiB // 20
