"""Client-side encryption through the real gRPC API, a real SeaweedFS bucket and two nodes:
the bucket never sees plaintext, lineages never share chunks, bad KEKs change nothing, clones
and restores stay in their lineage for free, deletion shreds, GC handles both kinds, rekey
rewraps without touching chunks, and no key reaches a log or `inspect`."""
from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import grpc
import pytest
from blake3 import blake3

from csi_perssd.crypto import envelope
from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.codec import manifest_refs
from tests.harness.cluster import Cluster, block_cap

from .enc import ENC, SIZE, bucket, logs, new_kek, pattern, publish, read_chunks, secrets, stage_request, write_chunks
from .helpers import code, image

pytestmark = [pytest.mark.root, pytest.mark.s3]
CAP = block_cap()


def _committed_refs(cl: Cluster, vid: str) -> set[str]:
    cat = cl.catalog()
    return manifest_refs(cat.get_manifest(vid, cat.volume(vid).generation))


def _fill(cl: Cluster, vid: str, chunks: list[bytes], sec: dict[str, str] | None) -> None:
    target = cl.attach("node-a", vid, cap=CAP, secrets=sec)
    write_chunks(target, chunks)
    cl.release("node-a", vid)                  # NodeUnstage carries no secrets


def test_create_without_or_with_a_malformed_kek_writes_nothing(cluster: Cluster):
    cl = cluster
    before = set(cl.objects(""))
    c, msg = code(cl.create, "enc-nokey", SIZE, cap=CAP, params=ENC)
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "encryptionKey" in msg and "provisioner" in msg
    bad = base64.b64encode(b"short").decode()
    c, msg = code(cl.create, "enc-badkey", SIZE, cap=CAP, params=ENC, secrets={"encryptionKey": bad})
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "32 random bytes" in msg and bad not in msg
    c, msg = code(cl.create, "enc-badmode", SIZE, cap=CAP, params={"encryption": "rot13"})
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "aes-256-gcm" in msg
    assert set(cl.objects("")) == before


def test_encrypted_volume_roundtrips_and_the_bucket_sees_no_plaintext(cluster: Cluster):
    cl = cluster
    kek = new_kek()
    sec = secrets(kek)
    data = pattern(b"SEED-ENCRYPTED-1")
    enc_vid = cl.create("enc-a", SIZE, cap=CAP, params=ENC, secrets=sec)
    plain_vid = cl.create("plain-a", SIZE, cap=CAP)
    enc2_vid = cl.create("enc-b", SIZE, cap=CAP, params=ENC, secrets=sec)     # another lineage
    for vid, s in ((enc_vid, sec), (plain_vid, None), (enc2_vid, sec)):
        _fill(cl, vid, data, s)

    cat = cl.catalog()
    enc_rec, enc2_rec = cat.volume(enc_vid), cat.volume(enc2_vid)
    assert enc_rec.encryption["lineage"] != enc2_rec.encryption["lineage"]
    enc_refs, plain_refs, enc2_refs = (_committed_refs(cl, v) for v in (enc_vid, plain_vid, enc2_vid))
    assert len(enc_refs) == len(plain_refs) == 3                  # R1 stored once: dedup within a lineage
    assert plain_refs == {blake3(c).hexdigest() for c in data}
    assert not enc_refs & enc2_refs and not enc_refs & plain_refs  # lineages never share chunks
    objs = bucket(cl)
    enc_manifest = objs[f"volumes/{enc_vid}/gen/{enc_rec.generation:010d}.manifest"]
    assert envelope.is_sealed_meta(enc_manifest)
    for h in enc_refs | enc2_refs:
        blob = objs[f"chunks/{h[:2]}/{h}"]
        assert blob[0] == envelope.CHUNK_FORMAT
        for c in data:
            assert c[16:4096] not in blob
    assert any(data[0][16:4096] in objs[f"chunks/{h[:2]}/{h}"] for h in plain_refs)   # the control
    text_blobs = [objs[f"chunks/{h[:2]}/{h}"] for h in enc_refs]
    assert min(len(b) for b in text_blobs) < len(data[2]) // 4    # compressed before encryption
    raw_kek = base64.b64decode(kek)
    for key, body in objs.items():
        assert raw_kek not in body and kek.encode() not in body, key

    # another node: without the secret, or with another KEK, nothing is created or mounted
    publish(cl, "node-b", enc_vid, CAP)
    stage = cl.nodes["node-b"].node.NodeStageVolume
    c, msg = code(stage, stage_request(cl, "node-b", enc_vid, CAP, None))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "node-stage" in msg
    c, msg = code(stage, stage_request(cl, "node-b", enc_vid, CAP, secrets(new_kek())))
    assert c == grpc.StatusCode.FAILED_PRECONDITION and enc_rec.encryption["kid"] in msg
    assert not image(cl, "node-b", enc_vid).exists()
    assert not (Path(cl.nodes["node-b"].state_dir) / "keys" / f"{enc_vid}.key").exists()
    target = cl.attach("node-b", enc_vid, cap=CAP, secrets=sec)
    assert read_chunks(target, 4) == data
    cl.release("node-b", enc_vid)

    # keys never in logs, metrics or inspect output
    for port in cl.metrics_ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            exposed = r.read().decode()
        assert "perssd_" in exposed and kek not in exposed and raw_kek.hex() not in exposed
    text = logs(cl)
    assert kek not in text and raw_kek.hex() not in text
    out = cl.cli("inspect", enc_vid)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["encryption"] == {k: enc_rec.encryption[k] for k in ("alg", "lineage", "kid")}
    assert enc_rec.encryption["wrapped"] not in out.stdout and kek not in out.stdout
    assert shown["manifest"]["encrypted"] is True and shown["manifest"]["distinct_chunks"] == 3
    for vid in (enc_vid, plain_vid, enc2_vid):
        cl.delete(vid)


def test_snapshots_and_clones_share_the_lineage_and_deleting_it_shreds(cluster: Cluster):
    cl = cluster
    sec = secrets(new_kek())
    data = pattern(b"SEED-LINEAGE")
    vid = cl.create("lin-src", SIZE, cap=CAP, params=ENC, secrets=sec)
    plain = cl.create("lin-plain", SIZE, cap=CAP)
    _fill(cl, vid, data, sec)
    _fill(cl, plain, pattern(b"SEED-PLAIN"), None)
    wrapped = cl.catalog().volume(vid).encryption["wrapped"]
    assert cl.controller is not None
    ctl = cl.controller.controller
    snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name="lin-snap")).snapshot
    assert snap.ready_to_use                                        # pinned without any key
    chunks_before = cl.chunks()
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    c, msg = code(cl.create, "lin-restore-plain", SIZE, cap=CAP, source=src)
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "encrypted" in msg
    restored = cl.create("lin-restore", SIZE, cap=CAP, params=ENC, source=src, secrets=sec)
    vsrc = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))
    clone = cl.create("lin-clone", SIZE, cap=CAP, params=ENC, source=vsrc, secrets=sec)
    cat = cl.catalog()
    assert cat.volume(restored).encryption == cat.volume(clone).encryption == cat.volume(vid).encryption
    for v in (restored, clone):
        target = cl.attach("node-b", v, cap=CAP, secrets=sec)
        assert read_chunks(target, 4) == data
        cl.release("node-b", v)
    assert cl.chunks() == chunks_before                             # clones and restores are free

    for v in (vid, restored, clone):
        cl.delete(v)
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    objs = bucket(cl)
    assert not any(wrapped.encode() in body for body in objs.values())      # the key is gone
    lineage_chunks = set(_chunk_names(objs)) - _committed_refs(cl, plain)
    assert lineage_chunks
    res = cl.cli("gc", "--grace-seconds", "0", "--keep-generations", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    left = set(_chunk_names(bucket(cl)))
    assert not left & lineage_chunks and _committed_refs(cl, plain) <= left  # gc handled both kinds
    target = cl.attach("node-b", plain, cap=CAP)
    assert read_chunks(target, 1)[0].startswith(b"SEED-PLAIN")
    cl.release("node-b", plain)
    cl.delete(plain)


def _chunk_names(objs: dict[str, bytes]) -> list[str]:
    return [k.rsplit("/", 1)[-1] for k in objs if k.startswith("chunks/")]


def test_rekey_rewraps_every_data_key_and_leaves_chunks_alone(cluster: Cluster, tmp_path: Path):
    cl = cluster
    old, new = new_kek(), new_kek()
    vid = cl.create("rekey-src", SIZE, cap=CAP, params=ENC, secrets=secrets(old))
    _fill(cl, vid, pattern(b"SEED-REKEY"), secrets(old))
    assert cl.controller is not None
    snap = cl.controller.controller.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid,
                                                                            name="rekey-snap")).snapshot
    chunks = {k: v for k, v in bucket(cl).items() if k.startswith("chunks/")}
    (tmp_path / "old").write_text(old + "\n")
    (tmp_path / "new").write_text(new + "\n")
    res = cl.cli("rekey", "--kek-from", str(tmp_path / "old"), "--new-kek-from", str(tmp_path / "new"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"rewrapped {vid}" in res.stdout and f"rewrapped {snap.snapshot_id}" in res.stdout
    assert old not in res.stdout + res.stderr and new not in res.stdout + res.stderr
    again = cl.cli("rekey", "--kek-from", str(tmp_path / "old"), "--new-kek-from", str(tmp_path / "new"))
    assert again.returncode == 0 and "0 data keys rewrapped" in again.stdout
    assert {k: v for k, v in bucket(cl).items() if k.startswith("chunks/")} == chunks
    cat = cl.catalog()
    assert cat.volume(vid).encryption["kid"] == cat.get_snapshot(snap.snapshot_id).encryption["kid"]
    publish(cl, "node-b", vid, CAP)
    c, _ = code(cl.nodes["node-b"].node.NodeStageVolume, stage_request(cl, "node-b", vid, CAP, secrets(old)))
    assert c == grpc.StatusCode.FAILED_PRECONDITION
    target = cl.attach("node-b", vid, cap=CAP, secrets=secrets(new))
    assert read_chunks(target, 1)[0].startswith(b"SEED-REKEY")
    cl.release("node-b", vid)
    cl.controller.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    cl.delete(vid)
