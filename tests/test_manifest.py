"""Manifest: roundtrip, helpers, and hostile manifests rejected on decode."""
from __future__ import annotations

import json

import pytest
import zstandard

from csi_perssd.remote.manifest import MAGIC, Manifest, ManifestError

H1, H2 = "a" * 64, "0123456789abcdef" * 4
MiB = 1 << 20


def _encode_doc(doc) -> bytes:
    return MAGIC + zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def _doc(**over):
    d = {"schema": 1, "volume_size": 16 * MiB, "chunk_size": 4 * MiB, "generation": 2,
         "parent": 1, "created_at": 1.0, "stats": {}, "chunks": [H1, None, H2, H1],
         "sizes": {H1: 100, H2: 200}}
    d.update(over)
    return d


def test_roundtrip_and_helpers():
    m = Manifest(16 * MiB, 4 * MiB, [H1, None, H2, H1], generation=2, parent=1,
                 sizes={H1: 100, H2: 200}, stats={"bytes_uploaded": 300})
    d = Manifest.decode(m.encode())
    assert d == m
    assert d.referenced_hashes() == {H1, H2}
    assert d.stored_bytes == 300 and d.data_chunks == 3 and d.hole_chunks == 1
    assert d.logical_bytes == 12 * MiB
    assert [(i, off, ln, h) for i, off, ln, h in d.items()][1] == (1, 4 * MiB, 4 * MiB, None)


def test_empty_and_short_last_chunk():
    m = Manifest.empty(10 * MiB, 4 * MiB)
    assert m.entries == [None, None, None] and m.stored_bytes == 0
    assert list(m.items())[-1][2] == 2 * MiB


def test_resize_adds_holes_and_never_shrinks():
    m = Manifest(8 * MiB, 4 * MiB, [H1, H2], generation=3)
    r = m.resize(20 * MiB)
    assert r.entries == [H1, H2, None, None, None] and r.volume_size == 20 * MiB
    assert r.generation == 3 and m.entries == [H1, H2]
    with pytest.raises(ManifestError):
        m.resize(4 * MiB)


def test_large_manifest_stays_small():
    import os
    n = 4096
    hashes = [os.urandom(32).hex() if i % 3 else None for i in range(n)]
    m = Manifest(n * 4 * MiB, 4 * MiB, hashes)
    data = m.encode()
    assert len(data) < n * 50 and Manifest.decode(data).entries == hashes


@pytest.mark.parametrize("doc", [
    _doc(chunks=["../../etc/passwd", None, H2, H1]),
    _doc(chunks=[H1.upper(), None, H2, H1]),
    _doc(chunks=[H1 + "/x", None, H2, H1]),
    _doc(chunks=[1, None, H2, H1]),
    _doc(chunks=[H1, None, H2]),                    # too few entries for the size
    _doc(chunks=[H1, None, H2, H1, None]),          # too many
    _doc(chunk_size=3 * MiB),
    _doc(chunk_size=0),
    _doc(volume_size=-1),
    _doc(volume_size="16M"),
    _doc(volume_size=1 << 60, chunks=[]),
    _doc(schema=99),
    _doc(generation=-1),
    _doc(parent="x"),
    _doc(sizes={"../x": 1}),
    _doc(sizes={H1: -5}),
    _doc(chunks="abc"),
    {k: v for k, v in _doc().items() if k != "chunks"},
    [1, 2, 3],
])
def test_hostile_manifest_rejected(doc):
    with pytest.raises(ManifestError):
        Manifest.decode(_encode_doc(doc))


def test_garbage_rejected():
    for data in [b"", b"garbage", MAGIC + b"not zstd", MAGIC + zstandard.ZstdCompressor().compress(b"{bad json"),
                 MAGIC + zstandard.ZstdCompressor().compress(b"\xff\xfe")]:
        with pytest.raises(ManifestError):
            Manifest.decode(data)


def test_constructor_validates():
    with pytest.raises(ManifestError):
        Manifest(8 * MiB, 4 * MiB, ["nothex" * 8, None])


# -- the binary form (schema 2) -------------------------------------------------------------------
def _big(n: int, hole_every: int = 0) -> Manifest:
    import os
    hexes = os.urandom(32 * n).hex()
    entries: list[str | None] = [hexes[i:i + 64] for i in range(0, 64 * n, 64)]
    if hole_every:
        for i in range(0, n, hole_every):
            entries[i] = None
    sizes = {h: 1000 + i for i, h in enumerate(entries) if h is not None}
    return Manifest(n * 4 * MiB, 4 * MiB, entries, generation=5, parent=4, sizes=sizes, stats={"x": 1})


@pytest.mark.parametrize("hole_every", [0, 2, 3, 1])
def test_binary_form_is_at_most_40_bytes_per_chunk_and_round_trips(hole_every):
    m = _big(20_000, hole_every)
    data = m.encode()
    assert data.startswith(b"PERSSD-MANIFEST2\n")
    assert len(data) <= 40 * 20_000 and len(data) <= 36 * m.data_chunks + 8 * 20_000 + 512
    d = Manifest.decode(data)
    assert d.data_chunks == m.data_chunks           # counted from the raw form
    assert d == m and d.sizes == m.sizes and d.stats == {"x": 1}
    assert Manifest.decode(d.encode()) == m         # re-encoding a decoded manifest


def test_binary_form_of_a_decoded_untouched_manifest_keeps_the_chunks():
    m = _big(300, 4)
    d = Manifest.decode(m.encode())
    d.generation, d.parent = 9, None                # as a clone's first generation does
    again = Manifest.decode(d.encode())
    assert again.generation == 9 and again.parent is None and again.entries == m.entries


def test_schema_1_json_manifests_still_decode():
    m = _big(50, 3)
    old = m.encode_json()
    assert old.startswith(MAGIC) and Manifest.decode(old) == m


def test_hostile_binary_manifests_rejected():
    import struct
    import zlib
    good = _big(64, 5).encode()
    body = good[:-4]
    cases = [good[:-1], good + b"x", body[:-40] + good[-4:],
             body[:30] + bytes([body[30] ^ 1]) + body[31:] + good[-4:]]       # a flipped bit: CRC
    head_len = struct.unpack_from("<I", good, 17)[0]
    head = json.loads(good[21:21 + head_len])
    for over in ({"volume_size": 64 * 4 * MiB + 4 * MiB}, {"chunk_size": 3 * MiB}, {"runs": 0},
                 {"data": head["data"] + 1}, {"schema": 3}):
        h = json.dumps({**head, **over}).encode()
        b = good[:17] + struct.pack("<I", len(h)) + h + body[21 + head_len:]
        cases.append(b + struct.pack("<I", zlib.crc32(b)))
    for data in cases:
        with pytest.raises(ManifestError):
            Manifest.decode(data)
