"""Chunks: split, zero detection, hashes, blob encoding (compression skip, hostile blobs)."""
from __future__ import annotations

import os

import pytest
import zstandard
from blake3 import blake3

from csi_perssd.remote import chunks as c


def test_split_covers_the_volume_exactly():
    assert list(c.split(10 << 20, 4 << 20)) == [(0, 0, 4 << 20), (1, 4 << 20, 4 << 20),
                                                 (2, 8 << 20, 2 << 20)]
    assert c.chunk_count(8 << 20, 4 << 20) == 2 and c.chunk_count(1, 4 << 20) == 1
    with pytest.raises(IndexError):
        c.chunk_span(2, 8 << 20, 4 << 20)


@pytest.mark.parametrize("bad", [0, 4096, 3 << 20, 128 << 20, -1, "4M", 1.5])
def test_chunk_size_validation(bad):
    with pytest.raises(ValueError):
        c.check_chunk_size(bad)
    assert c.check_chunk_size(64 << 10) == 64 << 10


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_is_zero(kind):
    n = 1 << 20
    assert c.is_zero(kind(bytes(n)))
    for pos in (0, 1, n // 2, n - 1):
        b = bytearray(n)
        b[pos] = 1
        assert not c.is_zero(kind(bytes(b))), pos
    assert c.is_zero(kind(b""))
    assert c.is_zero(kind(bytes(12345)))       # odd sizes (short last chunk)


def test_hash_is_blake3_hex_and_key_is_sharded():
    h = c.chunk_hash(b"hello")
    assert h == blake3(b"hello").hexdigest() and len(h) == 64
    assert c.chunk_key(h) == f"chunks/{h[:2]}/{h}"
    for bad in ["../x", h.upper(), h[:63], h + "0", "g" * 64, None]:
        with pytest.raises(ValueError):
            c.chunk_key(bad)


def test_compressible_chunk_is_compressed_and_roundtrips():
    data = b"abcd" * (1 << 18)
    blob, compressed = c.compress(data, 3)
    assert compressed and blob[0] == c.FORMAT_ZSTD and len(blob) < len(data) // 10
    assert c.decompress(blob) == data


def test_random_chunk_is_stored_raw():
    data = os.urandom(1 << 20)
    blob, compressed = c.compress(data, 3)
    assert not compressed and blob[0] == c.FORMAT_RAW and blob[1:] == data
    assert c.decompress(blob) == data


def test_level_zero_disables_compression():
    data = bytes(1000) + b"x"
    blob, compressed = c.compress(data, 0)
    assert not compressed and c.decompress(blob) == data


def test_raw_chunk_that_looks_like_zstd_is_not_misread():
    fake = zstandard.ZstdCompressor().compress(b"other") + os.urandom(64)
    blob, compressed = c.compress(fake, 0)
    assert c.decompress(blob) == fake


def test_hostile_blobs_rejected():
    with pytest.raises(c.CorruptBlob):
        c.decompress(b"")
    with pytest.raises(c.CorruptBlob):
        c.decompress(b"\x07abc")
    with pytest.raises(c.CorruptBlob):
        c.decompress(b"\x01not zstd at all")
    bomb = b"\x01" + zstandard.ZstdCompressor().compress(bytes(8 << 20))
    with pytest.raises(c.CorruptBlob):
        c.decompress(bomb, max_size=4 << 20)
    with pytest.raises(c.CorruptBlob):
        c.decompress(b"\x00" + bytes(5), max_size=4)
    good, _ = c.compress(b"xy" * 5000, 3)
    with pytest.raises(c.CorruptBlob):
        c.decompress(good[:-5])


def test_probe_skips_random_but_not_mixed_chunks():
    rnd = os.urandom(4 << 20)
    assert c._incompressible(rnd, 3)
    assert not c.compress(rnd, 3)[1]
    text = b"some log line that repeats\n" * ((4 << 20) // 27)
    assert not c._incompressible(text, 3) and c.compress(text, 3)[1]
    # mostly compressible with a random head: still compressed
    mixed = os.urandom(64 << 10) + text[: (4 << 20) - (64 << 10)]
    blob, compressed = c.compress(mixed, 3)
    assert compressed and c.decompress(blob) == mixed
