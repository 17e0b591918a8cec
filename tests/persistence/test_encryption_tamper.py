"""Tampering with an encrypted volume's objects in the bucket: a flipped bit in a chunk, the
manifest or the wrapped key; a chunk of another lineage copied under a valid name; a truncated
chunk. Each makes NodeStage fail with DATA_LOSS and leaves no local copy behind (nothing of
it was written into a volume that stays); once the objects are restored, the same NodeStage
succeeds with the original data."""
from __future__ import annotations

import json

import grpc
import pytest

from csi_perssd.remote.catalog import volume_key
from csi_perssd.remote.codec import manifest_refs
from tests.harness.cluster import Cluster, block_cap

from .enc import (
    ENC,
    SIZE,
    bucket,
    flip,
    new_kek,
    pattern,
    publish,
    put_raw,
    read_chunks,
    secrets,
    stage_request,
    write_chunks,
)
from .helpers import code, image

pytestmark = [pytest.mark.root, pytest.mark.s3]
CAP = block_cap()


def _flushed(cl: Cluster, name: str, sec: dict[str, str], seed: bytes) -> tuple[str, list[bytes]]:
    vid = cl.create(name, SIZE, cap=CAP, params=ENC, secrets=sec)
    data = pattern(seed)
    target = cl.attach("node-a", vid, cap=CAP, secrets=sec)
    write_chunks(target, data)
    cl.release("node-a", vid)
    return vid, data


def _stage_fails(cl: Cluster, vid: str, sec: dict[str, str]) -> str:
    c, msg = code(cl.nodes["node-b"].node.NodeStageVolume, stage_request(cl, "node-b", vid, CAP, sec))
    assert c == grpc.StatusCode.DATA_LOSS, (c, msg)
    assert not image(cl, "node-b", vid).exists(), "a local copy was left behind"
    return msg


def test_tampered_objects_are_data_loss_and_never_reach_the_volume(cluster: Cluster):
    cl = cluster
    sec = secrets(new_kek())
    vid, data = _flushed(cl, "tamper-a", sec, b"SEED-TAMPER-A")
    other, _ = _flushed(cl, "tamper-b", sec, b"SEED-TAMPER-B")
    cat = cl.catalog()
    gen = cat.volume(vid).generation
    publish(cl, "node-b", vid, CAP)
    objs = bucket(cl)                           # the record as published (owner node-b)
    mkey = f"volumes/{vid}/gen/{gen:010d}.manifest"
    refs = sorted(manifest_refs(objs[mkey]))
    victim = f"chunks/{refs[0][:2]}/{refs[0]}"
    foreign = sorted(manifest_refs(objs[f"volumes/{other}/gen/{cat.volume(other).generation:010d}.manifest"]))[0]
    rkey = volume_key(vid)
    rec = json.loads(objs[rkey])
    wrapped = rec["encryption"]["wrapped"]
    bad_wrapped = wrapped[:10] + ("A" if wrapped[10] != "A" else "B") + wrapped[11:]
    cases = {
        "flipped bit in a chunk": (victim, flip(objs[victim], len(objs[victim]) // 2)),
        "chunk of another lineage under a valid name": (victim, objs[f"chunks/{foreign[:2]}/{foreign}"]),
        "truncated chunk": (victim, objs[victim][:len(objs[victim]) - 100]),
        "flipped bit in the manifest": (mkey, flip(objs[mkey], len(objs[mkey]) - 40)),
        "flipped bit in the wrapped key": (rkey, json.dumps({**rec, "encryption": {
            **rec["encryption"], "wrapped": bad_wrapped}}).encode()),
    }
    seen = {}
    for what, (key, bad) in cases.items():
        put_raw(cl, key, bad)
        try:
            seen[what] = _stage_fails(cl, vid, sec)
        finally:
            put_raw(cl, key, objs[key])
    assert "authentication" in seen["flipped bit in the wrapped key"]
    assert refs[0] in seen["flipped bit in a chunk"] and refs[0] in seen["truncated chunk"]
    # restored: the same call succeeds and the data is the original
    target = cl.attach("node-b", vid, cap=CAP, secrets=sec)
    assert read_chunks(target, 4) == data
    cl.release("node-b", vid)
    cl.delete(vid)
    cl.delete(other)
