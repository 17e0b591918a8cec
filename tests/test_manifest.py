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
