"""Manifest: roundtrip, helpers, and hostile manifests rejected on decode."""
from __future__ import annotations

import itertools
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


# -- the compact in-memory form (issue 13: no object per chunk on the hot paths) ----------------
def _hashes(n: int, seed: int = 0) -> list[str]:
    import hashlib
    return [hashlib.blake2s(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


def _pattern(n: int) -> list[str | None]:
    hs = _hashes(n)
    return [None if i % 7 in (2, 3) or i >= n - 2 else hs[i % 11] for i in range(n)]   # dups, holes, hole tail


def test_decoded_manifest_stays_compact_through_views_and_encode():
    entries = _pattern(60)
    m = Manifest(60 * MiB - 5, MiB, entries, sizes={h: 10 + i for i, h in enumerate(sorted(set(entries) - {None}))})
    d = Manifest.decode(m.encode())
    assert [d.hash_at(i) for i in range(62)] == entries + [None, None]
    assert list(d.data_items()) == [(i, h) for i, h in enumerate(entries) if h is not None]
    runs = [(k, len(list(g))) for k, g in itertools.groupby(entries, key=lambda h: h is None)]
    starts = list(itertools.accumulate([n for _, n in runs], initial=0))
    assert d.data_spans() == [(s, n) for s, (hole, n) in zip(starts, runs) if not hole]
    assert d.hole_spans() == [(s, n) for s, (hole, n) in zip(starts, runs) if hole]
    assert d.hole_spans()[-1] == (58, 2) and sum(c for _, c in d.hole_spans()) == d.hole_chunks
    assert d.referenced_hashes() == m.referenced_hashes()
    assert d.stored_size(entries[0]) == m.sizes[entries[0]] and d.stored_size("f" * 64) is None
    assert d.stored_size("not hex") is None
    assert d.data_chunks == m.data_chunks and d.logical_bytes == m.logical_bytes == 42 * MiB
    assert d.stored_bytes == m.stored_bytes and d.chunk_count == 60
    assert d.encode() == m.encode()
    assert "entries" not in d.__dict__ and "sizes" not in d.__dict__     # nothing expanded
    assert d.entries == entries and d.sizes == m.sizes                   # on demand, equal


def test_short_last_data_chunk_counts_its_length():
    m = Manifest(10 * MiB, 4 * MiB, [H1, None, H2])
    assert m.logical_bytes == Manifest.decode(m.encode()).logical_bytes == 6 * MiB


def test_expanded_lists_are_the_manifest_from_then_on():
    m = Manifest(16 * MiB, 4 * MiB, [H1, None, H2, H1], sizes={H1: 100, H2: 200})
    d = Manifest.decode(m.encode())
    d.entries[1] = H2                       # a caller changing the list changes the manifest
    again = Manifest.decode(d.encode())
    assert again.entries == [H1, H2, H2, H1] and again.hash_at(1) == H2 and again.sizes == {H1: 100, H2: 200}


def test_resize_of_a_compact_manifest():
    d = Manifest.decode(Manifest(8 * MiB, 4 * MiB, [None, H1], sizes={H1: 5}).encode())
    r = d.resize(20 * MiB)
    assert "entries" not in r.__dict__ and r.entries == [None, H1, None, None, None] and r.sizes == {H1: 5}
    r2 = Manifest.decode(Manifest(8 * MiB, 4 * MiB, [H1, H1]).encode()).resize(12 * MiB)
    assert r2.entries == [H1, H1, None] and r2.hole_spans() == [(2, 1)]


def test_schema_1_decodes_into_the_compact_form():
    d = Manifest.decode(_encode_doc(_doc()))
    assert "entries" not in d.__dict__ and d.hash_at(2) == H2 and d.stored_size(H1) == 100
    assert d.entries == [H1, None, H2, H1]


def test_from_map_validates_the_table():
    from array import array

    from csi_perssd.remote.chunkmap import ChunkMap
    good = Manifest(8 * MiB, 4 * MiB, [H1, None]).chunk_map()
    assert Manifest.from_map(8 * MiB, 4 * MiB, good).entries == [H1, None]
    with pytest.raises(ManifestError):
        Manifest.from_map(12 * MiB, 4 * MiB, good)                      # 2 chunks for 3
    with pytest.raises(ManifestError):
        Manifest.from_map(8 * MiB, 4 * MiB, ChunkMap(2, array("I", [2]), good.digests, good.stored))
    with pytest.raises(ManifestError):
        Manifest.from_map(8 * MiB, 4 * MiB, ChunkMap(2, good.runs, good.digests, array("I", [9 * MiB])))


@pytest.mark.parametrize("dense_after", [1 << 16, 7])
def test_chunk_map_builder_and_lookup_by_name(dense_after):
    from csi_perssd.remote.chunkmap import SET_AFTER, ChunkMapBuilder
    hs = _hashes(300)
    b = ChunkMapBuilder(310, dense_after=dense_after)
    for i, h in enumerate(hs):
        b.set(i, bytes.fromhex(h), i + 1)
    b.set(5, None)
    b.set(0, None)
    assert b.data_count() == 298 and b.get(5) == (None, 0) and b.get(7) == (bytes.fromhex(hs[7]), 8)
    cm = b.build()
    m = Manifest.from_map(310 * MiB, MiB, cm)
    assert m.entries == [None] + hs[1:5] + [None] + hs[6:] + [None] * 10
    assert cm.runs.tolist() == [0, 1, 4, 1, 294, 10]
    for k in range(SET_AFTER + 50):                     # past the point where a dict is built
        h = hs[k % 300]
        assert cm.stored_of(h) == (None if k % 300 in (0, 5) else k % 300 + 1)
    assert cm.stored_of("0" * 64) is None
    empty = ChunkMapBuilder(3).build()
    assert empty.runs.tolist() == [0, 3] and Manifest.from_map(3 * MiB, MiB, empty).entries == [None] * 3


def test_changed_chunks_between_compact_manifests():
    from csi_perssd.remote.chunkmap import changed_chunks
    hs = _hashes(5000)
    base: list[str | None] = [None if i % 9 == 0 else hs[i] for i in range(5000)]
    target = list(base) + [hs[1], None]
    target[3], target[9], target[2048], target[4999] = hs[7], hs[9], None, None   # new, hole->data, data->hole x2
    a = Manifest(5000 * MiB, MiB, base).chunk_map()
    b = Manifest(5002 * MiB, MiB, target).chunk_map()
    assert list(changed_chunks(a, b, block=64)) == [3, 9, 2048, 4999, 5000]
    assert list(changed_chunks(a, a)) == []


@pytest.mark.parametrize("dense_after", [1 << 16, 2])
def test_chunk_map_builder_over_a_base_keeps_what_is_not_set(dense_after):
    from csi_perssd.remote.chunkmap import ChunkMapBuilder
    hs = _hashes(20, seed=1)
    base_entries: list[str | None] = [None if i in (4, 5, 6, 15) else hs[i] for i in range(16)]
    base = Manifest(16 * MiB, MiB, base_entries, sizes={h: 3 for h in hs}).chunk_map()
    b = ChunkMapBuilder(20, base=base, dense_after=dense_after)     # grown by 4 chunks
    assert b.data_count() == 12 and b.has(3) and not b.has(4) and not b.has(17)
    b.set(0, None)
    b.set(5, bytes.fromhex(hs[19]), 9)
    b.set(18, bytes.fromhex(hs[18]), 8)
    want = list(base_entries) + [None] * 4
    want[0], want[5], want[18] = None, hs[19], hs[18]
    m = Manifest.from_map(20 * MiB, MiB, b.build(), created_at=1.0)
    assert m.entries == want and b.data_count() == 13
    assert m.sizes == {**{h: 3 for h in want[:16] if h is not None}, hs[19]: 9, hs[18]: 8}
    assert m.encode() == Manifest(20 * MiB, MiB, want, sizes=m.sizes, created_at=1.0).encode()  # canonical runs


def test_u32_bound_check_by_byte_planes():
    import random
    from array import array

    from csi_perssd.remote.chunkmap import u32_all_le
    rnd = random.Random(5)
    for limit in (0, 1, 255, 256, 0x410000, 0x41FFFF, 0x01000000, 0xFFFFFFFF):
        for _ in range(60):
            vals = array("I", [rnd.choice([limit, max(0, limit - 1), min(0xFFFFFFFF, limit + 1),
                                           rnd.randrange(0, limit + 1), limit & 0xFF00FF00, limit | 0xFF])
                               for _ in range(rnd.randrange(0, 12))])
            assert u32_all_le(vals, limit) == all(v <= limit for v in vals), (limit, vals)
    assert u32_all_le(array("I", [7] * 1000), 7) and not u32_all_le(array("I", [7] * 999 + [8]), 7)


def test_same_chunks_compares_chunks_and_holes_not_how_the_runs_are_split():
    from array import array

    from csi_perssd.remote.chunkmap import DIGEST, ChunkMap
    d = bytes(range(3 * DIGEST))
    a = ChunkMap(4, array("I", [3, 1]), d, array("I", [5, 6, 7]))
    assert a.same_chunks(ChunkMap(4, array("I", [2, 0, 1, 1]), d, array("I", [5, 6, 7])))
    assert not a.same_chunks(ChunkMap(4, array("I", [2, 1, 1]), d, array("I", [5, 6, 7])))      # a hole moved
    assert not a.same_chunks(ChunkMap(4, array("I", [3, 1]), d[::-1], array("I", [5, 6, 7])))  # other chunks
    assert not a.same_chunks(ChunkMap(4, array("I", [3, 1]), d, array("I", [5, 6, 8])))        # stored otherwise
    assert not a.same_chunks(ChunkMap(5, array("I", [3, 2]), d, array("I", [5, 6, 7])))        # longer
