"""The driver's edges of encryption (no root): where the KEK comes from, crypto failures as CSI
codes, the node's key files, the `encryption` parameter, rekey's bookkeeping."""
from __future__ import annotations

import base64
import os
import stat

import grpc
import pytest

from csi_perssd import encryption, params
from csi_perssd.config import Config
from csi_perssd.crypto import keys as ck
from csi_perssd.errors import CsiError
from csi_perssd.local.keyfiles import NodeKeys
from csi_perssd.remote.catalog import Catalog, SnapshotRecord, VolumeRecord
from csi_perssd.remote.filestore import FileStore


def _kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_secret_wins_over_the_configured_file_which_is_the_fallback(tmp_path):
    f = tmp_path / "kek"
    f.write_text(_kek() + "\n")
    cfg = Config(encryption_key_file=str(f))
    mine = _kek()
    assert encryption.kek_from({"encryptionKey": mine}, cfg).key == base64.b64decode(mine)
    assert encryption.kek_from({}, cfg).key == base64.b64decode(f.read_text())
    assert encryption.kek_from({}, Config()) is None


@pytest.mark.parametrize("case,code", [("missing", grpc.StatusCode.INVALID_ARGUMENT),
                                       ("malformed", grpc.StatusCode.INVALID_ARGUMENT),
                                       ("no-file", grpc.StatusCode.INVALID_ARGUMENT)])
def test_require_kek_errors(tmp_path, case, code):
    cfg = Config(encryption_key_file=str(tmp_path / "absent") if case == "no-file" else "")
    secrets = {"encryptionKey": "c2hvcnQ="} if case == "malformed" else {}
    with pytest.raises(CsiError) as e:
        encryption.require_kek(secrets, cfg, "NodeStageVolume", "node-stage")
    assert e.value.code == code and "NodeStageVolume" in e.value.message
    assert "c2hvcnQ=" not in e.value.message


def test_wrong_and_tampered_keys_map_to_failed_precondition_and_data_loss():
    kek, other = ck.Kek(os.urandom(32)), ck.Kek(os.urandom(32))
    _, wrapped = encryption.new_lineage(kek)
    with pytest.raises(CsiError) as e:
        encryption.open_lineage(wrapped, other, "x")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    bad = dict(wrapped, wrapped=wrapped["wrapped"][:-4] + ("AAAA" if not wrapped["wrapped"].endswith("AAAA") else "BBBB"))
    with pytest.raises(CsiError) as e:
        encryption.open_lineage(bad, kek, "x")
    assert e.value.code == grpc.StatusCode.DATA_LOSS
    assert encryption.public_view(wrapped) == {k: wrapped[k] for k in ("alg", "lineage", "kid")}
    assert encryption.codec_for({}, None, Config(), "x", "y").encrypted is False


def test_node_key_files_are_private_and_go_away(tmp_path):
    nk = NodeKeys(str(tmp_path))
    lk = ck.LineageKeys.generate()
    vid = "pvol-" + "0" * 32
    nk.put(vid, lk)
    p = nk.path(vid)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    fresh = NodeKeys(str(tmp_path))            # a restarted node reads it back
    got = fresh.get(vid)
    assert got is not None and got.data_key == lk.data_key and got.chunk_key == lk.chunk_key
    p.write_text("{not json")
    assert NodeKeys(str(tmp_path)).get(vid) is None
    fresh.drop(vid)
    assert not p.exists() and fresh.get(vid) is None


def test_encryption_parameter():
    assert params.parse({}).encryption == "none" and "encryption" not in params.parse({}).as_dict()
    vp = params.parse({"encryption": "aes-256-gcm"})
    assert vp.encryption == "aes-256-gcm" and vp.as_dict()["encryption"] == "aes-256-gcm"
    for bad in ({"encryption": "aes"}, {"encryption": "aes-256-gcm", "persistence": "local"}):
        with pytest.raises(CsiError) as e:
            params.parse(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_rekey_rewraps_what_it_can_and_reports_the_rest(tmp_path):
    cat = Catalog(FileStore(str(tmp_path)))
    old, new, stranger = (ck.Kek(os.urandom(32)) for _ in range(3))
    recs = {}
    for name, kek in (("a", old), ("b", stranger), ("c", new)):
        keys, wrapped = encryption.new_lineage(kek)
        rec = VolumeRecord(id="pvol-" + name * 32, name=name, size=1 << 20, capabilities=[], encryption=wrapped)
        cat.create_volume(rec)
        recs[name] = (rec.id, keys)
    plain = VolumeRecord(id="pvol-" + "d" * 32, name="d", size=1 << 20, capabilities=[])
    cat.create_volume(plain)
    snap = SnapshotRecord(id="snap-" + "e" * 32, name="e", source_volume=recs["a"][0], size=1 << 20,
                          encryption=cat.volume(recs["a"][0]).encryption)
    cat.create_snapshot(snap)
    rep = encryption.rekey(cat, [old], new)
    assert sorted(rep.rewrapped) == sorted([recs["a"][0], snap.id])
    assert rep.current == 1 and len(rep.failed) == 1 and recs["b"][0] in rep.failed[0]
    a = cat.volume(recs["a"][0])
    assert a.encryption["kid"] == new.kid
    assert encryption.open_lineage(a.encryption, new, "x").data_key == recs["a"][1].data_key
    assert cat.volume(plain.id).encryption == {}
