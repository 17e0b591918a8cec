"""Incremental flush of an LVM thin volume to SeaweedFS: only thin_delta's changed chunks are read."""
from __future__ import annotations

import hashlib
import os
import subprocess

from csi_perssd.local.backend import Extent
from csi_perssd.local.lvm import LvmBackend
from csi_perssd.remote.s3 import S3Store
from csi_perssd.volume_io import flush_path as flush
from csi_perssd.volume_io import hydrate

from tests.lvm.util import MiB, device_size, read_at, write_at

FLUSH_CHUNK = 1 * MiB


def _digest(path: str, size: int) -> str:
    h = hashlib.sha256()
    for off in range(0, size, 4 * MiB):
        h.update(read_at(path, off, min(4 * MiB, size - off)))
    return h.hexdigest()


def test_incremental_flush_reads_and_uploads_only_changed_chunks(
        backend: LvmBackend, vid: str, s3_store: S3Store) -> None:
    size = 32 * MiB
    backend.create(vid, size)
    dev = backend.device(vid)
    write_at(dev, 0, os.urandom(MiB + 4096))                 # chunks 0 and 1
    write_at(dev, 12 * MiB + 5000, os.urandom(1000))          # chunk 12
    g1 = backend.snapshot(vid, "gen-1")

    # full flush of generation 1: only the allocated chunks are read
    allocated = backend.allocated_ranges(vid, "gen-1")
    assert allocated == [Extent(0, MiB + 64 * 1024), Extent(12 * MiB, 64 * 1024)]
    assert backend.allocated_ranges(vid) == allocated
    m1, st1 = flush(s3_store, g1, size, FLUSH_CHUNK, ranges=allocated)
    assert st1.bytes_read == 3 * FLUSH_CHUNK
    assert st1.chunks_uploaded == 3
    assert m1.data_chunks == 3

    # write two small regions, snapshot generation 2, flush only what thin_delta reports
    write_at(dev, 5 * MiB + 123, os.urandom(4096))             # chunk 5 (new)
    write_at(dev, 12 * MiB + 70 * 1024, os.urandom(100))       # chunk 12 (changed)
    g2 = backend.snapshot(vid, "gen-2")
    # the volume moves on after gen-2: a discard there must not leak into gen-2's flush
    subprocess.run(["blkdiscard", "-o", str(5 * MiB), "-l", str(MiB), dev], check=True)
    changed = backend.changed_ranges(vid, "gen-1", "gen-2")
    assert changed == [Extent(5 * MiB, 64 * 1024), Extent(12 * MiB + 64 * 1024, 64 * 1024)]
    assert backend.changed_ranges(vid, "gen-1") == [Extent(12 * MiB + 64 * 1024, 64 * 1024)]
    m2, st2 = flush(s3_store, g2, size, FLUSH_CHUNK, base=m1, ranges=changed,
                    ranges_mode="changed")
    assert st2.bytes_read == 2 * FLUSH_CHUNK                   # chunks 5 and 12, nothing else
    assert st2.chunks_uploaded == 2
    assert st2.chunks_unchanged == 2                           # chunks 0 and 1 kept from base
    assert st2.hole_chunks == 32 - 4
    # uploaded: the random bytes of chunks 5 and 12 (zstd squeezes their zero parts away)
    assert 4096 + 1100 < st2.bytes_uploaded < 16 * 1024
    assert m2.entries[0] == m1.entries[0] and m2.entries[1] == m1.entries[1]
    assert m2.entries[12] != m1.entries[12] and m2.entries[5] is not None

    # the uploaded generation is exactly generation 2
    backend.create(vid + "-restore", size)
    try:
        dest = backend.device(vid + "-restore")
        hydrate(s3_store, m2, dest)
        assert device_size(dest) == size
        assert _digest(dest, size) == _digest(g2, size)
    finally:
        backend.delete(vid + "-restore")

    # without the base snapshot the backend cannot tell: the caller hashes everything
    backend.delete_snapshot(vid, "gen-1")
    assert backend.changed_ranges(vid, "gen-1") is None
