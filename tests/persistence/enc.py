"""Helpers of the encryption tests: KEKs, secrets, the bucket's raw objects, volume contents."""
from __future__ import annotations

import base64
import os
from pathlib import Path

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster

from .helpers import CHUNK, MiB

ENC = {"encryption": "aes-256-gcm"}
SIZE = 32 * MiB
TEXT = b"".join(b"log line %06d: the quick brown fox PLAINTEXT-MARKER\n" % i for i in range(80_000))[:CHUNK]


def new_kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def secrets(kek: str) -> dict[str, str]:
    return {"encryptionKey": kek}


def pattern(seed: bytes) -> list[bytes]:
    """Chunks: random R1, R1 again (dedup within the volume), compressible text, random R2."""
    r1 = seed + os.urandom(CHUNK - len(seed))
    return [r1, r1, TEXT, os.urandom(CHUNK)]


def write_chunks(path: str, chunks: list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, c in enumerate(chunks):
            os.pwrite(fd, c, i * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_chunks(path: str, n: int) -> list[bytes]:
    with open(path, "rb") as f:
        return [f.read(CHUNK) for _ in range(n)]


def bucket(cl: Cluster) -> dict[str, bytes]:
    """Every object under the cluster's prefix: key (relative to the prefix) -> content."""
    client = cl.seaweed.client()
    out = {}
    for key in cl.objects(""):
        body = client.get_object(Bucket=cl.seaweed.bucket, Key=key)["Body"].read()
        out[key[len(cl.prefix) + 1:]] = body
    return out


def put_raw(cl: Cluster, key: str, data: bytes) -> None:
    cl.seaweed.client().put_object(Bucket=cl.seaweed.bucket, Key=f"{cl.prefix}/{key}", Body=data)


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x04
    return bytes(b)


def logs(cl: Cluster) -> str:
    procs = [cl.controller, *cl.nodes.values()]
    return "\n".join(Path(p.log_path).read_text(errors="replace") for p in procs if p is not None)


def stage_request(cl: Cluster, node: str, vid: str, cap: pb.VolumeCapability,
                  sec: dict[str, str] | None) -> pb.NodeStageVolumeRequest:
    staging, _ = cl.paths(node, vid)
    Path(staging).mkdir(parents=True, exist_ok=True)
    return pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=cap,
                                     secrets=sec or {})


def publish(cl: Cluster, node: str, vid: str, cap: pb.VolumeCapability) -> None:
    assert cl.controller is not None
    cl.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap))


def unpublish_controller(cl: Cluster, node: str, vid: str) -> None:
    assert cl.controller is not None
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vid, node_id=node))
