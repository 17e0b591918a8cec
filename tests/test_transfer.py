"""Flush/hydrate pipelines against a real S3 server (SeaweedFS) on sparse image files (no root)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from typing import Any

import pytest

from csi_perssd.local.backend import Extent
from csi_perssd.remote import transfer
from csi_perssd.remote.chunkmap import SET_AFTER, ChunkMap
from csi_perssd.remote.chunks import chunk_key, compress
from csi_perssd.remote.manifest import Manifest
from csi_perssd.remote.store import StoreError
from csi_perssd.local.fileio import file_data_extents
from csi_perssd.remote.transfer import ChunkCorrupted, ChunkMissing, chunks_in
from csi_perssd.volume_io import flush_path as flush
from csi_perssd.volume_io import hydrate
from tests.plugins.s3 import make_s3_store, seaweed_outage

pytestmark = pytest.mark.s3

MiB = 1 << 20
SIZE = 64 * MiB
CS = 1 * MiB                    # 64 chunks


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


def _pwrite(path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _sparse(path, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def make_image(path) -> dict[str, object]:
    """64 chunks: random data (10 chunks), a partial chunk, written zeros, a compressible chunk,
    a chunk repeated at two offsets, everything else never written (holes)."""
    p = _sparse(path)
    dup = os.urandom(CS)
    for i in (0, 1, 2, 3, 10, 11, 12, 30, 40, 63):
        _pwrite(p, i * CS, os.urandom(CS))
    _pwrite(p, 20 * CS + 300_000, os.urandom(200_000))          # partial chunk 20
    _pwrite(p, 21 * CS, bytes(2 * CS))                          # allocated but zero: 21, 22
    _pwrite(p, 25 * CS, (b"perssd-log-line " * (CS // 16)))     # compressible: 25
    _pwrite(p, 50 * CS, dup)
    _pwrite(p, 51 * CS, dup)                                    # same content: 50, 51
    # data chunks: 10 random + 20 + 25 + 50/51 -> 14 entries, 13 distinct hashes
    return {"path": p, "data_chunks": 14, "distinct": 13, "zero_chunks": 64 - 14}


def _chunk_objects(store) -> set[str]:
    return {o.key for o in store.list("chunks/")}


@pytest.fixture
def store(seaweed):
    return make_s3_store(seaweed)


def test_flush_then_hydrate_is_byte_identical(store, tmp_path):
    img = make_image(tmp_path / "src.img")
    src = img["path"]
    m, st = flush(store, src, SIZE, CS, base=None, ranges=file_data_extents(src), workers=4)
    assert m.data_chunks == img["data_chunks"] and len(m.referenced_hashes()) == img["distinct"]
    assert st.chunks_uploaded == img["distinct"] and st.hole_chunks == 64 - img["data_chunks"]
    assert st.chunks_skipped_known == 1                  # the duplicate chunk 51
    assert m.entries[50] == m.entries[51] and m.entries[21] is None and m.entries[5] is None
    assert len(_chunk_objects(store)) == img["distinct"]
    assert m.sizes[m.entries[25]] < CS // 50             # compressed
    assert m.sizes[m.entries[0]] == CS + 1               # random: stored raw (1-byte tag)
    assert st.bytes_uploaded == sum(m.sizes.values()) == m.stored_bytes
    assert st.bytes_read < 20 * CS                       # only allocated chunks were read
    assert m.generation == 1 and m.parent is None

    m2 = Manifest.decode(m.encode())
    dest = _sparse(tmp_path / "dest.img")
    hs = hydrate(store, m2, dest, workers=4)
    assert _sha(dest) == _sha(src)
    assert hs.chunks_downloaded == img["distinct"] and hs.hole_chunks == 64 - img["data_chunks"]
    assert hs.bytes_written == img["data_chunks"] * CS
    assert os.stat(dest).st_blocks * 512 <= 16 * CS       # holes stayed sparse


def test_flush_of_every_chunk_matches_allocated_ranges(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m1, _ = flush(store, src, SIZE, CS, base=None, ranges=file_data_extents(src))
    m2, st2 = flush(store, src, SIZE, CS, base=None, ranges=None)
    assert m1.entries == m2.entries
    assert st2.bytes_read == SIZE and st2.chunks_uploaded == 0   # all known via HEAD


def test_incremental_flush_uploads_only_changed_chunks(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m1, _ = flush(store, src, SIZE, CS, base=None, ranges=file_data_extents(src))
    _pwrite(src, 3 * CS + 4096, os.urandom(8192))       # change data chunk 3
    _pwrite(src, 45 * CS, os.urandom(100))               # write into hole chunk 45
    before = store.stats.snapshot()
    m2, st = flush(store, src, SIZE, CS, base=m1, ranges=file_data_extents(src))
    after = store.stats.snapshot()
    assert st.chunks_uploaded == 2 and st.bytes_uploaded == after["bytes_up"] - before["bytes_up"]
    assert st.bytes_uploaded <= 2 * (CS + 1)
    assert after["requests"]["put"] - before["requests"].get("put", 0) == 2
    assert [i for i in range(64) if m1.entries[i] != m2.entries[i]] == [3, 45]
    assert m2.generation == 2 and m2.parent == 1

    # the same change described as changed ranges: only those chunks are read
    m3, st3 = flush(store, src, SIZE, CS, base=m1, ranges_mode="changed",
                    ranges=[Extent(3 * CS + 4096, 8192), Extent(45 * CS, 100)])
    assert m3.entries == m2.entries and st3.bytes_read == 2 * CS
    assert st3.chunks_uploaded == 0 and st3.chunks_unchanged == m1.data_chunks - 1

    dest = _sparse(tmp_path / "dest.img")
    hydrate(store, m3, dest)
    assert _sha(dest) == _sha(src)


def test_resume_from_journal_uploads_only_missing_chunks(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    journal = str(tmp_path / "flush.journal")

    class Interrupt(Exception):
        pass

    def stop_midway(done, total):
        if done >= total // 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        flush(store, src, SIZE, CS, base=None, ranges=None, journal_path=journal, workers=2,
              progress=stop_midway)
    present = _chunk_objects(store)
    assert 0 < len(present) < 13
    puts_before = store.stats.snapshot()["requests"]["put"]
    m, st = flush(store, src, SIZE, CS, base=None, ranges=None, journal_path=journal, workers=2)
    assert st.chunks_from_journal >= 32
    assert st.chunks_uploaded == 13 - len(present)
    assert store.stats.snapshot()["requests"]["put"] - puts_before == 13 - len(present)
    assert st.bytes_read == SIZE - st.chunks_from_journal * CS
    ref, _ = flush(store, src, SIZE, CS, base=None, ranges=None)
    assert m.entries == ref.entries
    dest = _sparse(tmp_path / "dest.img")
    hydrate(store, m, dest)
    assert _sha(dest) == _sha(src)


def test_journal_for_other_parameters_is_ignored(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    journal = tmp_path / "j"
    journal.write_text('{"v": 1, "size": 1}\n0 ' + "a" * 64 + " 5\n")
    m, st = flush(store, src, SIZE, CS, ranges=None, journal_path=str(journal))
    assert st.chunks_from_journal == 0 and m.entries[0] != "a" * 64
    # a torn last line is dropped, the rest is used
    with open(journal, "a") as f:
        f.write("17 abc")
    m2, st2 = flush(store, src, SIZE, CS, ranges=None, journal_path=str(journal))
    assert st2.chunks_from_journal == 64 and m2.entries == m.entries and st2.bytes_read == 0


def test_corrupted_chunk_is_detected_before_writing(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    bad_key = chunk_key(m.entries[10])
    blob, _ = compress(os.urandom(CS), 3)               # well-formed, wrong content
    store.put(bad_key, blob)
    dest = _sparse(tmp_path / "dest.img")
    with pytest.raises(ChunkCorrupted) as ei:
        hydrate(store, m, dest, workers=1)
    assert ei.value.key == bad_key
    with open(dest, "rb") as f:
        f.seek(10 * CS)
        assert f.read(CS) == bytes(CS)                    # nothing written for that chunk

    store.put(bad_key, b"\x01garbage")
    with pytest.raises(ChunkCorrupted):
        hydrate(store, m, dest)
    store.delete(bad_key)
    with pytest.raises(ChunkMissing):
        hydrate(store, m, dest)


def test_hydrate_zero_holes_on_dirty_destination(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    dest = tmp_path / "dirty.img"
    dest.write_bytes(os.urandom(SIZE))
    hydrate(store, m, str(dest), zero_holes=True)
    assert _sha(dest) == _sha(src)


def test_restore_into_larger_volume(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    big = m.resize(SIZE + 8 * MiB)
    dest = _sparse(tmp_path / "big.img", SIZE + 8 * MiB)
    hydrate(store, big, dest)
    with open(dest, "rb") as f, open(src, "rb") as g:
        assert f.read(SIZE) == g.read() and f.read() == bytes(8 * MiB)
    with pytest.raises(ValueError):
        hydrate(store, big, _sparse(tmp_path / "small.img"))     # destination too small


def test_flush_argument_checks(store, tmp_path):
    src = _sparse(tmp_path / "s.img", 8 * MiB)
    with pytest.raises(ValueError):
        flush(store, src, 16 * MiB, CS)                  # source smaller than size
    with pytest.raises(ValueError):
        flush(store, src, 8 * MiB, CS, ranges=[], ranges_mode="changed")    # needs base
    with pytest.raises(ValueError):
        flush(store, src, 8 * MiB, CS, base=Manifest.empty(8 * MiB, 2 * MiB))
    m, st = flush(store, src, 8 * MiB, CS, ranges=[])
    assert m.entries == [None] * 8 and st.bytes_read == 0 and st.requests == 0


def test_chunks_in():
    assert chunks_in([Extent(0, 1), Extent(CS - 1, 2), Extent(5 * CS, CS)], 8 * CS, CS) == [0, 1, 5]
    assert chunks_in([Extent(7 * CS, 10 * CS), Extent(100 * CS, 1)], 8 * CS, CS) == [7]


def test_outage_fails_with_store_error_within_budget(seaweed, tmp_path):
    store = make_s3_store(seaweed)
    src = make_image(tmp_path / "src.img")["path"]
    attempts = store.retry.attempts
    with seaweed_outage(seaweed):
        e0 = store.stats.errors
        with pytest.raises(StoreError) as ei:
            flush(store, src, SIZE, CS, ranges=file_data_extents(src), workers=4)
        # the retry budget ended the flush: no call went past `attempts` tries, and no chunk was
        # started after the first failure (at most the 4 in flight tried; 14 chunks hold data)
        assert f"failed after {attempts} attempts" in str(ei.value), ei.value
        assert attempts <= store.stats.errors - e0 <= 4 * attempts, store.stats.errors - e0
    m, st = flush(store, src, SIZE, CS, ranges=file_data_extents(src), workers=4)
    assert m.data_chunks == 14


def test_repeated_content_is_uploaded_once_and_progress_is_monotonic(store, tmp_path):
    src = _sparse(tmp_path / "ff.img", 32 * MiB)
    _pwrite(src, 0, b"\xff" * (32 * MiB))
    seen: list[tuple[int, int]] = []
    m, st = flush(store, src, 32 * MiB, CS, ranges=None, workers=8,
                  progress=lambda d, t: seen.append((d, t)))
    assert st.chunks_uploaded == 1 and st.chunks_skipped_known == 31
    assert len(set(m.entries)) == 1 and m.entries[0] is not None
    assert seen[-1] == (32 * MiB, 32 * MiB) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    dest = _sparse(tmp_path / "d.img", 32 * MiB)
    hseen: list[tuple[int, int]] = []
    hs = hydrate(store, m, dest, progress=lambda d, t: hseen.append((d, t)))
    assert hs.chunks_downloaded == 1 and hs.bytes_written == 32 * MiB
    assert hseen[-1] == (32 * MiB, 32 * MiB) and _sha(dest) == _sha(src)


def test_flush_memory_stays_bounded(store, tmp_path):
    import tracemalloc
    src = _sparse(tmp_path / "r.img", 48 * MiB)
    fd = os.open(src, os.O_WRONLY)
    for i in range(48):
        os.pwrite(fd, os.urandom(CS), i * CS)
    os.close(fd)
    tracemalloc.start()
    try:
        flush(store, src, 48 * MiB, CS, ranges=None, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2 * CS + 2 * MiB, f"peak {peak / MiB:.1f} MiB for 2 workers of 1 MiB chunks"


def test_hydrate_outage_is_store_error(seaweed, tmp_path):
    store = make_s3_store(seaweed)
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    dest = _sparse(tmp_path / "dest.img")
    with seaweed_outage(seaweed):
        with pytest.raises(StoreError) as ei:
            hydrate(store, m, dest)
        assert not isinstance(ei.value, ChunkCorrupted)
    hydrate(store, m, dest)
    assert _sha(dest) == _sha(src)


def test_damaged_existing_chunk_is_uploaded_again(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    key = chunk_key(m.entries[0])
    store.put(key, b"")                                   # an empty leftover object
    m2, st = flush(store, src, SIZE, CS, ranges=file_data_extents(src), check_exists=True)
    assert st.chunks_uploaded == 1 and m2.entries == m.entries
    assert store.head(key).size == CS + 1


@pytest.mark.root
def test_hydrate_into_a_dirty_loop_device_with_zero_holes(store, tmp_path):
    import subprocess
    if os.geteuid() != 0:
        pytest.fail("needs root for losetup: run the suite as root (make test does)")
    src = make_image(tmp_path / "src.img")["path"]
    m, _ = flush(store, src, SIZE, CS, ranges=file_data_extents(src))
    backing = tmp_path / "dev.img"
    backing.write_bytes(os.urandom(SIZE))
    res = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dev = res.stdout.strip()
    try:
        hs = hydrate(store, m, dev, zero_holes=True)
        assert hs.hole_chunks == 64 - 14
        assert _sha(dev) == _sha(src)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_untrusted_journal_rereads_but_uploads_only_new_content(store, tmp_path):
    src = make_image(tmp_path / "src.img")["path"]
    journal = str(tmp_path / "flush.journal")

    def stop_midway(done, total):
        if done >= total // 2:
            raise KeyboardInterrupt()

    with pytest.raises(KeyboardInterrupt):
        flush(store, src, SIZE, CS, ranges=None, journal_path=journal, workers=2,
              progress=stop_midway)
    present = _chunk_objects(store)
    _pwrite(src, 0, os.urandom(CS))                      # changed after the interrupted pass
    m, st = flush(store, src, SIZE, CS, ranges=None, journal_path=journal, trust_journal=False)
    assert st.chunks_from_journal == 0 and st.bytes_read == SIZE
    assert st.chunks_uploaded == len({chunk_key(h) for h in m.referenced_hashes()} - present)
    assert 0 < st.chunks_uploaded < 13
    dest = _sparse(tmp_path / "dest.img")
    hydrate(store, m, dest)
    assert _sha(dest) == _sha(src)


def test_known_chunks_from_an_earlier_pass_are_not_headed_or_uploaded(store, tmp_path):
    img = make_image(tmp_path / "k.img")
    first, st1 = flush(store, img["path"], SIZE, CS, ranges=file_data_extents(img["path"]))
    assert st1.chunks_uploaded == img["distinct"]
    _pwrite(img["path"], 40 * CS, os.urandom(CS))               # one chunk changes after the pass
    before = dict(store.stats.snapshot()["requests"])
    known = {h: first.sizes[h] for h in first.entries if h is not None}
    second, st2 = flush(store, img["path"], SIZE, CS, ranges=file_data_extents(img["path"]), known=known)
    after = store.stats.snapshot()["requests"]
    assert st2.chunks_uploaded == 1                             # only the changed chunk
    assert after.get("put", 0) - before.get("put", 0) == 1
    assert after.get("head", 0) - before.get("head", 0) <= 1    # no HEAD for the known ones
    assert second.entries[40] != first.entries[40]
    assert [e for i, e in enumerate(second.entries) if i != 40] == [e for i, e in enumerate(first.entries) if i != 40]
    with pytest.raises(ValueError):
        flush(store, img["path"], SIZE, CS, known={"not-a-hash": 1})


# -- name lookups in the base tables: never under the uploaders' lock, indexed ahead when many --
class _OwnedLock:
    """The uploaders' lock, knowing which thread holds it."""

    def __init__(self) -> None:
        self._lock, self.owner = threading.Lock(), 0

    def __enter__(self) -> _OwnedLock:
        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = 0
        self._lock.release()


class _CountingMap(ChunkMap):
    """A chunk table counting its name lookups: all, those made under an uploaders' lock, and
    those made before its name index existed (each a search of the whole digest buffer, or the
    one that builds the index)."""

    def __init__(self, cm: ChunkMap, locks: list[_OwnedLock]) -> None:
        super().__init__(cm.n, cm.runs, cm.digests, cm.stored)
        self.locks, self.finds, self.finds_locked, self.unindexed = locks, 0, 0, 0

    def find(self, digest: bytes) -> int:
        self.finds += 1
        self.finds_locked += any(lk.owner == threading.get_ident() for lk in self.locks)
        self.unindexed += self._names is None
        return super().find(digest)

    @property
    def indexed(self) -> bool:
        return self._names is not None


@pytest.fixture
def uploader_locks(monkeypatch) -> list[_OwnedLock]:
    locks: list[_OwnedLock] = []

    def owned() -> _OwnedLock:
        locks.append(_OwnedLock())
        return locks[-1]

    @dataclasses.dataclass
    class Watched(transfer.KnownChunks):
        lock: Any = dataclasses.field(default_factory=owned)
    monkeypatch.setattr(transfer, "KnownChunks", Watched)
    return locks


def test_base_table_lookups_run_outside_the_uploaders_lock(store, tmp_path, uploader_locks):
    cs, n = 64 * 1024, 16
    p = _sparse(tmp_path / "few.img", n * cs)
    for i in range(n):
        _pwrite(p, i * cs, os.urandom(cs))
    first, _ = flush(store, p, n * cs, cs)
    changed = (2, 7, 11)
    for i in changed:
        _pwrite(p, i * cs, os.urandom(cs))
    table = _CountingMap(first.chunk_map(), uploader_locks)
    ranges = [Extent(i * cs, cs) for i in changed]
    second, st = flush(store, p, n * cs, cs, base=first, ranges=ranges, ranges_mode="changed", known=table)
    assert st.chunks_uploaded == len(changed)
    # few lookups: one buffer search each, no index built, none under the uploaders' lock
    assert (table.finds, table.unindexed, table.indexed) == (len(changed), len(changed), False)
    assert table.finds_locked == 0, f"{table.finds_locked} of {table.finds} lookups held the uploaders' lock"
    assert [i for i in range(n) if second.entries[i] != first.entries[i]] == list(changed)


def test_a_flush_of_many_chunks_indexes_the_base_table_ahead(store, tmp_path, uploader_locks):
    cs, n = 64 * 1024, SET_AFTER + 28
    p = _sparse(tmp_path / "many.img", n * cs)
    for i in range(n):
        _pwrite(p, i * cs, os.urandom(cs))
    first, _ = flush(store, p, n * cs, cs)
    table = _CountingMap(first.chunk_map(), uploader_locks)
    before = dict(store.stats.snapshot()["requests"])
    second, st = flush(store, p, n * cs, cs, known=table)
    # every chunk is known: the index is built before the workers start, no buffer search at
    # all (the table used to be searched SET_AFTER times first, under the uploaders' lock)
    assert table.indexed and (table.finds, table.unindexed, table.finds_locked) == (n, 0, 0)
    assert st.chunks_uploaded == 0 and store.stats.snapshot()["requests"].get("put", 0) == before.get("put", 0)
    assert second.entries == first.entries


def test_hydrate_writes_raw_chunks_from_the_get_buffers_without_a_copy(store):
    """Random chunks are stored raw (a 1-byte tag): each worker GETs into its page-aligned
    buffer with the payload on a page boundary, so the O_DIRECT write goes from it and the
    writer never fills a buffer of its own."""
    from csi_perssd.local.fileio import ChunkWriter
    from csi_perssd.remote.transfer import hydrate_chunks
    path = os.path.join("/var/tmp", f"perssd-hydrate-aligned-{os.getpid()}.img")
    size = 8 * CS
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        m, _ = flush(store, path, size, CS, base=None, ranges=None, workers=4)
        assert set(m.sizes.values()) == {CS + 1}
        want = _sha(path)
        with open(path, "wb") as f:
            f.truncate(size)
        with ChunkWriter(path, writeback=True, chunk_size=CS) as w:
            hs = hydrate_chunks(store, m, w, workers=4)
            assert w.direct and w._bufs == [] and w._copies.kept == 0
        assert hs.chunks_downloaded == 8 and hs.requests == 8 and hs.bytes_downloaded == 8 * (CS + 1)
        assert _sha(path) == want
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_hydrate_opens_sealed_raw_chunks_into_pooled_aligned_buffers_and_writes_them_without_a_copy(store):
    """Encrypted: each worker opens its sealed chunks into a page-aligned buffer from
    aead.OPENED (the plaintext payload on a page boundary), so the O_DIRECT write goes from it
    and the writer fills no buffer of its own; close() gives the buffers back to the pool, and
    the next hydrate takes them again instead of new memory."""
    from csi_perssd.crypto import aead
    from csi_perssd.crypto.keys import LineageKeys
    from csi_perssd.local.fileio import ChunkWriter
    from csi_perssd.remote.codec import Codec
    from csi_perssd.remote.stages import LANDING_ALIGN, LANDING_SLACK
    from csi_perssd.remote.transfer import hydrate_chunks
    codec = Codec(LineageKeys.generate())
    path = os.path.join("/var/tmp", f"perssd-hydrate-sealed-{os.getpid()}.img")
    size, want_len = 8 * CS, LANDING_ALIGN + CS + LANDING_SLACK
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        m, _ = flush(store, path, size, CS, base=None, ranges=None, workers=4, codec=codec)
        want = _sha(path)
        pooled = set()
        for _ in range(2):
            with open(path, "wb") as f:
                f.truncate(size)
            with ChunkWriter(path, writeback=True, chunk_size=CS) as w:
                hs = hydrate_chunks(store, m, w, workers=4, codec=codec)
                assert w.direct and w._bufs == [] and w._copies.kept == 0
            assert hs.chunks_downloaded == 8 and _sha(path) == want
            mine = [b for b in aead.OPENED._free if len(b) == want_len]
            assert 1 <= len(mine) <= 4                       # given back: one per worker that ran
            pooled.update(id(b) for b in mine)
        assert len(pooled) <= 4                              # the second hydrate reused them
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_run_bounded_queues_ahead_but_runs_at_most_workers_and_cancels_the_queue_on_failure():
    from csi_perssd.remote.stages import run_bounded
    gate, mu = threading.Event(), threading.Lock()
    running, peak, done, at_fifth = [0], [0], [], []

    def work(i: int) -> int:
        with mu:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(5)
        with mu:
            running[0] -= 1
        return i

    def submitted(n: int) -> None:
        if n == 5:                      # 2 running + 3 queued, none ended yet
            at_fifth.append(len(done))
            gate.set()
    run_bounded(range(20), work, 2, done.append, submitted=submitted, ahead=3)
    assert at_fifth == [0] and peak[0] == 2 and sorted(done) == list(range(20))

    started: list[int] = []

    def fail_first(i: int) -> int:
        started.append(i)
        if i == 0:
            raise RuntimeError("boom")
        return i
    with pytest.raises(RuntimeError):   # one worker: item 0 ends first, 1-3 are queued behind it
        run_bounded(range(20), fail_first, 1, lambda r: None, ahead=3)
    assert started[0] == 0 and set(started) <= {0, 1, 2, 3}     # nothing submitted after the failure
