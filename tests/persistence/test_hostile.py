"""Hostile input: volume/node IDs and CSI secrets that try to escape the bucket prefix or inject
into object keys, URLs or headers get INVALID_ARGUMENT, and nothing is written outside the prefix;
secrets that point elsewhere never cut the node off from its own object store."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, mount_cap

from .helpers import MiB, code, tree_sums, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_IDS = ["../escape", "..", "a/../../b", "pvol-x/../../../chunks", "/abs", "chunks/ab/cd", "x\ny", "x y",
           "x%2F..%2F", "x\\..\\y", ".hidden", "-flag", "ä", "x" * 200, "x\x00y"]


def _bad_secrets(endpoint: str) -> list[dict[str, str]]:
    return [
        {"endpoint": f"{endpoint}/other-bucket"},
        {"endpoint": f"{endpoint}/perssd/../../x"},
        {"endpoint": f"{endpoint}?prefix=x"},
        {"endpoint": "http://user:secret@127.0.0.1:1"},
        {"endpoint": "file:///etc"},
        {"endpoint": f"{endpoint}\r\nX-Injected: 1"},
        {"region": "us-east-1\nX-Injected: 1"},
        {"region": "../../x"},
        {"accessKeyId": "AKIA\r\nX-Injected: 1", "secretAccessKey": "s"},
        {"accessKeyId": "only-the-id"},
        {"caBundle": "not a certificate"},
    ]


def _calls(cl: Cluster, vid: str, tmp: Path, secrets: dict[str, str] | None = None) -> dict[str, object]:
    """Every RPC that turns a volume ID (or secrets) into paths or keys."""
    c, n = cl.controller.controller, cl.nodes["node-a"].node
    cap, s = mount_cap(), secrets or {}
    staging, target = str(tmp / "staging"), str(tmp / "target")
    return {
        "CreateVolume": lambda: c.CreateVolume(pb.CreateVolumeRequest(
            name=f"hostile-{len(vid)}", volume_capabilities=[cap], secrets=s,
            capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
            volume_content_source=pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid)))),
        "DeleteVolume": lambda: c.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid, secrets=s)),
        "ControllerPublishVolume": lambda: c.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="node-a", volume_capability=cap, secrets=s)),
        "ControllerUnpublishVolume": lambda: c.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id="node-a", secrets=s)),
        "ValidateVolumeCapabilities": lambda: c.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[cap], secrets=s)),
        "ControllerExpandVolume": lambda: c.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MiB), secrets=s)),
        "CreateSnapshot": lambda: c.CreateSnapshot(pb.CreateSnapshotRequest(
            name=f"hostile-snap-{len(vid)}", source_volume_id=vid, secrets=s)),
        "NodeStageVolume": lambda: n.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap, secrets=s)),
        "NodeUnstageVolume": lambda: n.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging)),
        "NodePublishVolume": lambda: n.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap, secrets=s)),
        "NodeUnpublishVolume": lambda: n.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target)),
        "NodeGetVolumeStats": lambda: n.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=staging)),
        "NodeExpandVolume": lambda: n.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=staging, secrets=s)),
    }


def _outside(cl: Cluster, keys: dict[str, int]) -> list[str]:
    return sorted(k for k in keys if not k.startswith(f"{cl.prefix}/"))


def test_hostile_volume_ids_are_rejected(cluster: Cluster, tmp_path):
    cl = cluster
    bucket_before = cl.objects(under=None)
    ours_before = cl.objects()
    wrong = []
    for bad in BAD_IDS:
        for name, call in _calls(cl, bad, tmp_path).items():
            c, msg = code(call)
            if c != INVALID:
                wrong.append(f"{name}({bad!r}) -> {c.name}: {msg}")
    assert not wrong, "\n".join(wrong)
    # node IDs go into keys too (nodes/<id>.json)
    vid = cl.create("hostile-node-ids", 16 * MiB)
    for bad in ("../x", "node-a/../../y", "a b", "x" * 300):
        c, _ = code(cl.controller.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=bad, volume_capability=mount_cap()))
        assert c == INVALID, bad
    cl.delete(vid)
    after = cl.objects(under=None)
    assert set(after) - set(bucket_before) <= set(cl.objects()), "objects appeared outside the prefix"
    assert not [k for k in set(cl.objects()) - set(ours_before) if not k.startswith(f"{cl.prefix}/nodes/")]
    assert not list(Path(cl.nodes["node-a"].rawfile_dir).glob("*")) or all(
        p.name.startswith(("pvol-", ".")) for p in Path(cl.nodes["node-a"].rawfile_dir).iterdir())


def test_hostile_secrets_are_rejected_and_do_not_poison_the_node(cluster: Cluster, tmp_path):
    cl = cluster
    vid = cl.create("hostile-secrets", 16 * MiB)
    bucket_before = cl.objects(under=None)
    wrong = []
    for secrets in _bad_secrets(cl.seaweed.endpoint):
        for name in ("CreateVolume", "DeleteVolume", "ControllerPublishVolume", "NodeStageVolume",
                     "ControllerExpandVolume"):
            c, msg = code(_calls(cl, vid, tmp_path, secrets)[name])
            if c != INVALID:
                wrong.append(f"{name} with {sorted(secrets)} -> {c.name}: {msg}")
            assert "secret" not in msg.lower() or "secretAccessKey" in msg, "a secret value leaked into an error"
    assert not wrong, "\n".join(wrong)

    # well-formed secrets that point elsewhere: the call fails, the node keeps its own store
    c, msg = code(cl.controller.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id="node-a", volume_capability=mount_cap()))
    assert c == grpc.StatusCode.OK, msg
    for secrets in ({"endpoint": "http://127.0.0.1:1"},
                    {"accessKeyId": "AKWRONG", "secretAccessKey": "wrong-secret"}):
        staging = tmp_path / "elsewhere"
        c, msg = code(cl.nodes["node-a"].node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=mount_cap(), secrets=secrets),
            timeout=60)
        assert c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.UNAUTHENTICATED), (c, msg)
        assert "wrong-secret" not in msg
    # ... and the ordinary life of a volume on that node still works (secrets from its config)
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-a"))
    target = cl.attach("node-a", vid)
    sums = write_tree(target, random_mib=1)
    cl.release("node-a", vid)
    target_b = cl.attach("node-b", vid)
    assert tree_sums(target_b) == sums
    cl.release("node-b", vid)
    cl.delete(vid)
    new = set(cl.objects(under=None)) - set(bucket_before)
    assert new and _outside(cl, dict.fromkeys(new, 0)) == []
