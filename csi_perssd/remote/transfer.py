"""Flush (volume -> chunks + manifest) and hydrate (manifest -> volume): parallel, bounded, resumable.

flush() reads the source (block device or image file) chunk by chunk, in a thread pool: each
worker preads one chunk, drops it as a hole if it is all zeros, hashes it (BLAKE3), and uploads
it (zstd) unless the hash is already known: same as the base generation, uploaded earlier in
this run, recorded in the journal, or present in the store (HEAD; check_exists="auto" stops
asking when HEADs keep missing, as on a fresh volume). At most `workers` chunks are
in flight, so memory stays near workers * 2 * chunk_size whatever the volume size; BLAKE3, zstd
and the sockets release the GIL, so the workers really run in parallel.

Which chunks are read (`ranges`, `ranges_mode`):
  ranges=None                        every chunk is read.
  ranges_mode="allocated" (default)  `ranges` are the allocated ranges of the source (SEEK_DATA,
                                     LVM mapping): chunks overlapping none of them are holes.
  ranges_mode="changed"              `ranges` are the ranges changed since `base` (thin_delta,
                                     dirty tracking): chunks overlapping none keep base's entry
                                     (a hole beyond base's end). Needs `base`.
A chunk that is read is always stored by content, so a chunk partly inside a range is exact.

Journal (`journal_path`): one line per finished chunk "<index> <hash|-> <stored size>" after
its upload succeeded, fsync'd about once a second. A restarted flush with the same size, chunk
size and base resumes: with trust_journal=True (the source has not changed since, e.g. an
unmounted device or a snapshot) journaled chunks are neither read nor uploaded; with
trust_journal=False they are read and hashed again, but their hashes count as known, so
only new content is uploaded. A journal written for other parameters is discarded.

hydrate() GETs every data chunk in parallel (each distinct hash once), checks its BLAKE3 hash
before anything is written (ChunkCorrupted otherwise) and pwrites it; holes are left untouched
(a fresh destination reads as zeros) unless zero_holes=True.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from ..local.backend import Extent
from .chunks import (
    DEFAULT_COMPRESSION,
    CorruptBlob,
    check_chunk_size,
    check_hash,
    chunk_count,
    chunk_key,
    chunk_span,
    is_zero,
)
from .codec import PLAIN, Codec
from .manifest import Manifest
from .store import NotFound, ObjectStore

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
JOURNAL_VERSION = 1
JOURNAL_SYNC_S = 1.0


class ChunkCorrupted(Exception):
    """A chunk read from the store does not match its hash (or cannot be decoded): data loss."""

    def __init__(self, key: str, message: str):
        super().__init__(f"chunk {key}: {message}")
        self.key = key


class ChunkMissing(ChunkCorrupted):
    """A chunk the manifest references is not in the store: data loss as well."""


@dataclass
class FlushStats:
    bytes_read: int = 0
    bytes_uploaded: int = 0          # stored (compressed) bytes PUT
    chunks_uploaded: int = 0
    chunks_skipped_known: int = 0    # read, but the hash was already stored (base, dedup, HEAD)
    chunks_unchanged: int = 0        # outside the changed ranges: base entry kept, not read
    chunks_from_journal: int = 0     # resumed: taken from the journal, not read
    hole_chunks: int = 0             # holes in the result (zero chunks, unallocated ranges)
    duration_s: float = 0.0
    requests: int = 0                # store calls made (HEAD + PUT)

    @property
    def read_mb_s(self) -> float:
        return self.bytes_read / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HydrateStats:
    bytes_downloaded: int = 0        # stored (compressed) bytes GET
    bytes_written: int = 0
    chunks_downloaded: int = 0
    hole_chunks: int = 0
    duration_s: float = 0.0
    requests: int = 0

    @property
    def write_mb_s(self) -> float:
        return self.bytes_written / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- helpers --------------------------------------------------------------------------------
def chunks_in(ranges: Iterable[Extent], size: int, chunk_size: int) -> list[int]:
    """Sorted indices of the chunks overlapping any of `ranges` (clipped to the volume)."""
    n = chunk_count(size, chunk_size)
    out: set[int] = set()
    for e in ranges:
        if e.length <= 0 or e.offset >= size:
            continue
        first, last = max(0, e.offset) // chunk_size, min(e.end, size) - 1
        out.update(range(first, min(n - 1, last // chunk_size) + 1))
    return sorted(out)


def file_data_extents(path: str) -> list[Extent]:
    """Allocated ranges of a (sparse) regular file via SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        out: list[Extent] = []
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:             # ENXIO: no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append(Extent(data, hole - data))
            pos = hole
        return out
    finally:
        os.close(fd)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class _Reader:
    """Reads chunks of a device or file into one reusable buffer per thread (no 4 MiB
    allocation per chunk). Reads are buffered: the kernel's readahead (and `prefetch`) keep the
    disk busy while the workers hash and upload; O_DIRECT reads measured slower here because
    each worker then waits for its own disk read. A returned view is valid until the same
    thread reads again."""

    def __init__(self, path: str, chunk_size: int):
        self.path, self.chunk_size = path, chunk_size
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = _device_size(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._local = threading.local()
        self._bufs: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def _buffer(self) -> memoryview:
        mv = getattr(self._local, "mv", None)
        if mv is None:
            buf = mmap.mmap(-1, self.chunk_size)
            with self._lock:
                self._bufs.append(buf)
            mv = self._local.mv = memoryview(buf)
        return mv

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading a range the pool will ask for soon (POSIX_FADV_WILLNEED)."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def read(self, offset: int, length: int) -> memoryview:
        mv = self._buffer()[:length]
        got = 0
        while got < length:
            n = os.preadv(self.fd, [mv[got:]], offset + got)
            if n <= 0:
                raise OSError(f"short read at offset {offset + got}: source ended early")
            got += n
        return mv

    def close(self) -> None:
        os.close(self.fd)
        self._local = threading.local()
        with self._lock:
            bufs, self._bufs = self._bufs, []
        for b in bufs:
            try:
                b.close()
            except BufferError:         # a view is still referenced somewhere: GC frees it
                pass


def _pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
SYNC_FILE_RANGE_WRITE = 0x2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing [offset, offset+length) back to the device now (asynchronously), so the
    final fsync has little left to do and dirty pages do not pile up."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: punch a hole (files, thin devices: stays
    sparse), else ZERO_RANGE, else write zeros."""
    if length <= 0:
        return
    for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        _pwrite_full(fd, memoryview(zeros)[:n], offset)
        offset += n


# -- journal --------------------------------------------------------------------------------
class Journal:
    """Append-only record of finished chunks of one flush (see the module docstring)."""

    def __init__(self, path: str, header: dict[str, Any]):
        self.path = path
        self.header = {"v": JOURNAL_VERSION, **header}
        self.entries: dict[int, tuple[str | None, int]] = {}
        self._load()
        fresh = not os.path.exists(path) or not self._loaded_ok
        self._f = open(path, "w" if fresh else "a", encoding="ascii")
        if fresh:
            self.entries.clear()
            self._f.write(json.dumps(self.header, sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def _load(self) -> None:
        self._loaded_ok = False
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        try:
            if json.loads(lines[0]) != json.loads(json.dumps(self.header, sort_keys=True)):
                log.info("flush journal %s is for other parameters: starting over", self.path)
                return
        except ValueError:
            return
        n = chunk_count(self.header["size"], self.header["chunk_size"])
        for line in lines[1:-1]:        # the last piece is "" or a torn line
            try:
                i_s, h, sz_s = line.split(" ")
                i, sz = int(i_s), int(sz_s)
                if not 0 <= i < n or sz < 0:
                    raise ValueError(line)
                self.entries[i] = (None if h == "-" else check_hash(h), sz)
            except ValueError:
                log.warning("flush journal %s: ignoring malformed line %r", self.path, line[:100])
        self._loaded_ok = True
        if lines[-1]:                   # torn last line: rewrite the file cleanly
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(json.dumps(self.header, sort_keys=True) + "\n")
            for i, (h, sz) in sorted(self.entries.items()):
                f.write(f"{i} {h or '-'} {sz}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, index: int, h: str | None, stored: int) -> None:
        self.entries[index] = (h, stored)
        self._f.write(f"{index} {h or '-'} {stored}\n")
        if time.monotonic() - self._last_sync >= JOURNAL_SYNC_S:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


# -- flush ----------------------------------------------------------------------------------
@dataclass
class _Result:
    index: int
    kind: str                   # hole | known | dup | uploaded
    hash: str | None = None
    stored: int = 0             # stored object size (0 = unknown)
    read: int = 0
    uploaded: int = 0
    requests: int = 0


@dataclass
class _FlushState:
    known: dict[str, int]                                   # confirmed stored: hash -> size
    claimed: set[str] = field(default_factory=set)          # being uploaded by a worker
    lock: threading.Lock = field(default_factory=threading.Lock)
    check_exists: bool | str = "auto"
    new: int = 0                # chunks not known in advance
    heads: int = 0
    hits: int = 0

    def should_head(self) -> bool:
        """HEAD before PUT? 'auto': yes for the first 8 new chunks, then only while at least
        1 in 8 HEADs finds the chunk (dedup across volumes pays), else for every 32nd chunk
        (a fresh volume: a HEAD per chunk would only add a round trip; measured 15% of a
        fresh flush's time with one HEAD per chunk)."""
        if self.check_exists != "auto":
            return bool(self.check_exists)
        with self.lock:
            self.new += 1
            return self.heads < 8 or self.hits * 8 >= self.heads or self.new % 32 == 0

    def headed(self, found: bool) -> None:
        with self.lock:
            self.heads += 1
            self.hits += found


def flush(store: ObjectStore, source_path: str, size: int, chunk_size: int, *,
          base: Manifest | None = None, ranges: list[Extent] | None = None,
          ranges_mode: str = "allocated", compression_level: int = DEFAULT_COMPRESSION, workers: int = 8,
          journal_path: str | None = None, trust_journal: bool = True,
          check_exists: bool | str = "auto", progress: Progress | None = None,
          generation: int | None = None, parent: int | None = None,
          known: Mapping[str, int] | None = None, codec: Codec = PLAIN) -> tuple[Manifest, FlushStats]:
    """Upload the chunks of `source_path` that are not stored yet and return the new manifest
    (generation = base.generation + 1 and parent = base's, unless given) and the stats.
    `known` (hash -> stored size) adds chunks the caller knows are stored and safe from garbage
    collection until this flush's manifest claims them (e.g. the pre-flush of the same volume a
    moment ago): they are neither compressed, HEADed nor uploaded again.
    Store errors propagate (StoreError); an exception from `progress` aborts the flush (the
    journal keeps what was done). `codec`: PLAIN, or an encrypted volume's lineage."""
    t0 = time.monotonic()
    check_chunk_size(chunk_size)
    if ranges_mode not in ("allocated", "changed"):
        raise ValueError(f"ranges_mode must be 'allocated' or 'changed', not {ranges_mode!r}")
    if ranges_mode == "changed" and ranges is not None and base is None:
        raise ValueError("ranges_mode='changed' needs a base manifest")
    if base is not None and base.chunk_size != chunk_size:
        raise ValueError(f"base manifest has chunk size {base.chunk_size}, not {chunk_size}")
    n = chunk_count(size, chunk_size)
    base_entries = base.entries if base is not None else []
    stats = FlushStats()
    entries: list[str | None] = [None] * n
    sizes: dict[str, int] = {}
    st = _FlushState(known={h: (base.sizes.get(h, 0) if base else 0)
                            for h in (base.referenced_hashes() if base else ())},
                     check_exists=check_exists)
    for h, sz in (known or {}).items():
        st.known.setdefault(check_hash(h), sz)

    to_read = list(range(n)) if ranges is None else chunks_in(ranges, size, chunk_size)
    if ranges is not None and ranges_mode == "changed":
        wanted = set(to_read)
        for i in range(min(n, len(base_entries))):
            if i not in wanted and base_entries[i] is not None:
                entries[i] = base_entries[i]
                stats.chunks_unchanged += 1

    journal: Journal | None = None
    if journal_path:
        journal = Journal(journal_path, {
            # not the source path: a loop device may get another number after a restart
            "size": size, "chunk_size": chunk_size,
            "base": base.generation if base is not None else None,
            "base_chunks": len(base_entries)})
        for jh, jsz in journal.entries.values():
            if jh is not None:
                st.known.setdefault(jh, jsz)
        if trust_journal:
            done = set()
            for i in to_read:
                if i in journal.entries:
                    entries[i] = journal.entries[i][0]
                    done.add(i)
            stats.chunks_from_journal = len(done)
            to_read = [i for i in to_read if i not in done]
            done_bytes = sum(chunk_span(i, size, chunk_size)[1] for i in done)
        else:
            done_bytes = 0
    else:
        done_bytes = 0
    total_bytes = done_bytes + sum(chunk_span(i, size, chunk_size)[1] for i in to_read)

    if progress is not None:
        progress(done_bytes, total_bytes)
    reader = _Reader(source_path, chunk_size)
    try:
        if reader.size < size:
            raise ValueError(f"{source_path} holds {reader.size} bytes, less than {size}")

        def work(i: int) -> _Result:
            off, length = chunk_span(i, size, chunk_size)
            buf = reader.read(off, length)
            if is_zero(buf):
                return _Result(i, "hole", read=length)
            h = codec.name(buf)
            with st.lock:
                if h in st.known:
                    return _Result(i, "known", h, st.known[h], read=length)
                if h in st.claimed:
                    return _Result(i, "dup", h, read=length)
                st.claimed.add(h)
            key = chunk_key(h)
            reqs = 0
            blob = codec.encode(h, buf, compression_level)
            del buf
            if st.should_head():
                # an object of another size is not trusted (a damaged or foreign upload):
                # it is overwritten with the same plaintext
                reqs += 1
                info = store.head(key)
                st.headed(info is not None and info.size == len(blob))
                if info is not None and info.size == len(blob):
                    return _Result(i, "known", h, info.size, read=length, requests=reqs)
            store.put(key, blob)
            return _Result(i, "uploaded", h, len(blob), read=length, uploaded=len(blob),
                           requests=reqs + 1)

        deferred: dict[str, list[int]] = {}

        def record(i: int, h: str | None, stored: int) -> None:
            entries[i] = h
            if h is not None and stored:
                sizes[h] = stored
            if journal is not None:
                journal.append(i, h, stored)

        def settle(r: _Result) -> int:
            stats.bytes_read += r.read
            stats.requests += r.requests
            if r.kind == "hole" or r.hash is None:
                record(r.index, None, 0)
            elif r.kind == "dup":
                with st.lock:
                    confirmed = r.hash in st.known
                if confirmed:
                    stats.chunks_skipped_known += 1
                    record(r.index, r.hash, st.known[r.hash])
                else:
                    deferred.setdefault(r.hash, []).append(r.index)   # wait for its upload
            else:
                if r.kind == "uploaded":
                    stats.chunks_uploaded += 1
                    stats.bytes_uploaded += r.uploaded
                else:
                    stats.chunks_skipped_known += 1
                with st.lock:
                    st.known[r.hash] = r.stored
                    st.claimed.discard(r.hash)
                record(r.index, r.hash, r.stored)
                for j in deferred.pop(r.hash, []):
                    stats.chunks_skipped_known += 1
                    record(j, r.hash, r.stored)
            return r.read

        inflight: dict[Future[_Result], int] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="flush")
        try:
            todo = iter(to_read)
            exhausted = False
            pos = 0
            for j in to_read[:max(1, workers)]:
                reader.prefetch(*chunk_span(j, size, chunk_size))
            while True:
                while not exhausted and len(inflight) < max(1, workers):
                    nxt = next(todo, None)
                    if nxt is None:
                        exhausted = True
                        break
                    inflight[pool.submit(work, nxt)] = nxt
                    ahead = pos + max(1, workers)       # the chunk read after this window
                    if ahead < len(to_read):
                        reader.prefetch(*chunk_span(to_read[ahead], size, chunk_size))
                    pos += 1
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    del inflight[fut]
                    done_bytes += settle(fut.result())
                    if progress is not None:
                        progress(done_bytes, total_bytes)
        except BaseException:
            # keep what already finished (journal), let running uploads end, then fail
            for fut in list(inflight):
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            for fut in inflight:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    r = fut.result()
                    if r.kind != "dup":
                        settle(r)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if journal is not None:
                journal.close()
        if deferred:
            raise RuntimeError(f"flush: {len(deferred)} chunk hashes never settled")
    finally:
        reader.close()

    for eh in entries:
        if eh is not None and eh not in sizes and st.known.get(eh):
            sizes[eh] = st.known[eh]
    stats.hole_chunks = sum(1 for h in entries if h is None)
    stats.duration_s = time.monotonic() - t0
    manifest = Manifest(
        volume_size=size, chunk_size=chunk_size, entries=entries,
        generation=generation if generation is not None else (base.generation + 1 if base else 1),
        parent=parent if parent is not None else (base.generation if base is not None else None),
        sizes=sizes, stats=stats.as_dict())
    log.info("flushed %s: %d chunks uploaded (%d bytes), %d known, %d holes, %.1f MB/s",
             source_path, stats.chunks_uploaded, stats.bytes_uploaded,
             stats.chunks_skipped_known, stats.hole_chunks, stats.read_mb_s)
    return manifest, stats


# -- hydrate --------------------------------------------------------------------------------
def hydrate(store: ObjectStore, manifest: Manifest, dest_path: str, *, workers: int = 8,
            verify: bool = True, zero_holes: bool = False, fsync: bool = True,
            progress: Progress | None = None, codec: Codec = PLAIN) -> HydrateStats:
    """Write the manifest's data chunks into dest (a block device or file at least
    volume_size long, opened O_RDWR without truncation). Holes are left as they are unless
    zero_holes. ChunkCorrupted/ChunkMissing before anything is written for a bad chunk."""
    t0 = time.monotonic()
    stats = HydrateStats()
    cs, size = manifest.chunk_size, manifest.volume_size
    by_hash: dict[str, list[int]] = {}
    holes: list[int] = []
    for i, h in enumerate(manifest.entries):
        if h is None:
            holes.append(i)
        else:
            by_hash.setdefault(h, []).append(i)
    total = manifest.logical_bytes
    done = 0

    fd = os.open(dest_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        have = _device_size(fd)
        if have < size:
            raise ValueError(f"{dest_path} holds {have} bytes, less than {size}")

        def work(h: str) -> tuple[int, int, int]:
            key = chunk_key(h)
            try:
                blob, _ = store.get(key)
            except NotFound:
                raise ChunkMissing(key, "missing from the store") from None
            try:
                raw = codec.decode(h, blob, cs)
            except CorruptBlob as e:
                raise ChunkCorrupted(key, str(e)) from None
            if verify and codec.name(raw) != h:
                raise ChunkCorrupted(key, "content does not match its BLAKE3 hash")
            written = slots = 0
            for i in by_hash[h]:
                off, length = chunk_span(i, size, cs)
                if len(raw) > length:
                    raise ChunkCorrupted(key, f"{len(raw)} bytes do not fit chunk {i}")
                _pwrite_full(fd, raw, off)
                if fsync:
                    start_writeback(fd, off, len(raw))
                if zero_holes and len(raw) < length:
                    zero_range(fd, off + len(raw), length - len(raw))
                written += len(raw)
                slots += length
            return len(blob), written, slots

        if zero_holes:
            for off, length in _coalesce(holes, size, cs):
                zero_range(fd, off, length)
        stats.hole_chunks = len(holes)

        inflight: dict[Future[tuple[int, int, int]], str] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hydrate")
        try:
            todo = iter(by_hash)
            exhausted = False
            while True:
                while not exhausted and len(inflight) < max(1, workers):
                    h = next(todo, None)
                    if h is None:
                        exhausted = True
                        break
                    inflight[pool.submit(work, h)] = h
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    del inflight[fut]
                    down, written, slots = fut.result()
                    stats.requests += 1
                    stats.chunks_downloaded += 1
                    stats.bytes_downloaded += down
                    stats.bytes_written += written
                    done += slots
                    if progress is not None:
                        progress(done, total)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    stats.duration_s = time.monotonic() - t0
    log.info("hydrated %s: %d chunks (%d bytes stored, %d written), %d holes, %.1f MB/s",
             dest_path, stats.chunks_downloaded, stats.bytes_downloaded, stats.bytes_written,
             stats.hole_chunks, stats.write_mb_s)
    return stats


def _coalesce(indices: list[int], size: int, cs: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        off, length = chunk_span(i, size, cs)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out
