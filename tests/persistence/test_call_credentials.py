"""Which S3 credentials a call uses (stores.py): its own CSI secrets, else the driver's own
configured credentials, never the secrets an earlier call left. Over gRPC, with driver processes
on the session's SeaweedFS.

- A driver with credentials of its own: Controller calls without secrets go to its own store,
  not to the store (endpoint) of the secrets an earlier call gave; counted at a proxy in front of
  SeaweedFS that only those secrets name.
- A secrets-only deployment (the driver has no credentials of its own): the RPCs whose requests
  carry no secrets (ListVolumes, ControllerGetVolume, GetCapacity) are not advertised (nor
  LIST_VOLUMES_PUBLISHED_NODES and VOLUME_CONDITION, reported only through them) and answer
  UNIMPLEMENTED; other Controller calls that come without secrets fail with UNAVAILABLE
  "no S3 credentials"; NodeUnstage and NodeUnpublish (which carry no
  secrets) of a volume the node holds nothing of answer OK, as the spec says for a volume that is
  not staged or published there, and NodePublish FAILED_PRECONDITION ("not staged"), never a
  store error.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog
from csi_perssd.remote.s3 import S3Store
from tests.harness.cluster import mount_cap
from tests.harness.procs import DriverProcess
from tests.harness.s3proxy import CountingProxy
from tests.harness.seaweed import Seaweed

from .helpers import MiB, code

pytestmark = [pytest.mark.root, pytest.mark.s3]
Cap = pb.ControllerServiceCapability.RPC
WITHOUT_SECRETS = {Cap.LIST_VOLUMES, Cap.GET_VOLUME, Cap.GET_CAPACITY, Cap.LIST_VOLUMES_PUBLISHED_NODES,
                   Cap.VOLUME_CONDITION}
OWN_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _create(d: DriverProcess, name: str, secrets: dict[str, str]) -> str:
    return d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()], capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        secrets=secrets)).volume.volume_id


def _caps(d: DriverProcess) -> set[int]:
    return {c.rpc.type for c in d.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities}


def _store_args(sw: Seaweed) -> list[str]:
    return ["--s3-endpoint", sw.endpoint, "--s3-region", "us-east-1"]


def _start(d: DriverProcess, stack: list[DriverProcess]) -> DriverProcess:
    stack.append(d)
    return d.start()


@pytest.fixture
def drivers() -> Iterator[list[DriverProcess]]:
    started: list[DriverProcess] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


@dataclass
class SecretsOnly:
    driver: DriverProcess
    url: str
    secrets: dict[str, str]         # the only credentials: what the CO's calls carry
    vid: str                        # a volume that exists, created with those secrets


@pytest.fixture(scope="module")
def secrets_only(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretsOnly]:
    """One driver (controller and node) with no credentials of its own: none in the environment,
    no profile, no instance role."""
    if not seaweed.running:
        seaweed.start()
    tmp = tmp_path_factory.mktemp("secrets-only")
    url = seaweed.url(f"cred-{secrets.token_hex(4)}")
    d = DriverProcess(tmp, mode="all", node_id="node-a", catalog=url, extra=_store_args(seaweed))
    for k in OWN_CREDENTIALS:
        d.env.pop(k, None)
    d.env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"),
                 AWS_CONFIG_FILE=str(tmp / "none"))
    d.start()
    try:
        given = {"accessKeyId": seaweed.access_key, "secretAccessKey": seaweed.secret_key}
        yield SecretsOnly(d, url, given, _create(d, "secrets-only", given))
    finally:
        d.stop()


def test_secrets_only_node_calls_on_volumes_it_does_not_hold_are_no_store_errors(secrets_only: SecretsOnly,
                                                                                 tmp_path: Path) -> None:
    d, given = secrets_only.driver, secrets_only.secrets
    missing = "pvol-" + "0" * 32
    for v in (secrets_only.vid, missing):           # one that exists, one that does not
        staging, target = str(tmp_path / v / "staging"), str(tmp_path / v / "target")
        os.makedirs(target)
        c, msg = code(d.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=v, target_path=target))
        assert c == grpc.StatusCode.OK, f"NodeUnpublish of {v}, not published here -> {c}: {msg}"
        assert not os.path.exists(target), "NodeUnpublish left its target"
        c, msg = code(d.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=v, staging_target_path=staging))
        assert c == grpc.StatusCode.OK, f"NodeUnstage of {v}, not staged here -> {c}: {msg}"
        c, msg = code(d.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=v, staging_target_path=staging, target_path=target, volume_capability=mount_cap()))
        assert c == grpc.StatusCode.FAILED_PRECONDITION and "not staged" in msg, f"NodePublish of {v} -> {c}: {msg}"
    # with the call's own secrets, whether the volume exists is known again
    c, msg = code(d.node.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id=missing, staging_target_path=str(tmp_path / "s"), target_path=str(tmp_path / "t"),
        volume_capability=mount_cap(), secrets=given))
    assert c == grpc.StatusCode.NOT_FOUND, f"{c}: {msg}"


def test_controller_calls_without_secrets_use_the_drivers_own_store(seaweed: Seaweed, tmp_path: Path,
                                                                    drivers: list[DriverProcess]) -> None:
    if not seaweed.running:
        seaweed.start()
    url = seaweed.url(f"cred-{secrets.token_hex(4)}")
    own = {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    ctl = _start(DriverProcess(tmp_path, mode="controller", catalog=url, env=own, extra=_store_args(seaweed)), drivers)
    assert WITHOUT_SECRETS <= _caps(ctl), "a driver with its own credentials serves the calls without secrets"
    with CountingProxy(seaweed.endpoint) as proxy:
        theirs = {"endpoint": proxy.endpoint, "accessKeyId": seaweed.access_key,
                  "secretAccessKey": seaweed.secret_key}
        vid = _create(ctl, "through-their-endpoint", theirs)
        assert sum(proxy.counts().values()) > 0, "the call with secrets did not use them"
        before = proxy.counts()
        listed = ctl.controller.ListVolumes(pb.ListVolumesRequest())
        assert vid in {e.volume.volume_id for e in listed.entries}
        assert ctl.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid)).volume.volume_id == vid
        ctl.controller.GetCapacity(pb.GetCapacityRequest())
        ctl.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
        assert proxy.counts() == before, \
            f"calls without secrets used another call's store: {before} -> {proxy.counts()}"
    c, _ = code(ctl.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=vid))
    assert c == grpc.StatusCode.NOT_FOUND, "DeleteVolume without secrets did not delete through the driver's store"


def test_secrets_only_controller_does_not_advertise_what_it_cannot_serve(secrets_only: SecretsOnly,
                                                                         seaweed: Seaweed) -> None:
    d, vid, given = secrets_only.driver, secrets_only.vid, secrets_only.secrets
    caps = _caps(d)
    assert not caps & WITHOUT_SECRETS, \
        f"advertised without credentials to serve them: {sorted(Cap.Type.Name(c) for c in caps & WITHOUT_SECRETS)}"
    assert {Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.EXPAND_VOLUME} <= caps
    for name, call in {
        "ListVolumes": lambda: d.controller.ListVolumes(pb.ListVolumesRequest()),
        "ControllerGetVolume": lambda: d.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid)),
        "GetCapacity": lambda: d.controller.GetCapacity(pb.GetCapacityRequest()),
    }.items():
        c, msg = code(call)
        assert c == grpc.StatusCode.UNIMPLEMENTED and "secrets-only" in msg, \
            f"{name} (not advertised) in a secrets-only deployment -> {c}: {msg}"
    # a call that can carry secrets but came without: the store cannot be reached
    c, msg = code(d.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
    assert c == grpc.StatusCode.UNAVAILABLE and "no S3 credentials" in msg, \
        f"DeleteVolume without secrets in a secrets-only deployment -> {c}: {msg}"
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid, secrets=given))
    cat = Catalog(S3Store(secrets_only.url, endpoint_url=seaweed.endpoint, access_key=seaweed.access_key,
                          secret_key=seaweed.secret_key))
    assert cat.get_volume(vid) is None
