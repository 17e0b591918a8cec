"""Flush (volume -> chunks + manifest) and hydrate (manifest -> volume): parallel, bounded, resumable.

The pipeline: a FlushPlan (size, chunk size, ranges, base, journal, codec) -> `_start` decides
which chunks are read and which entries are already known (base, journal) -> the bounded worker
stage (stages.ChunkUploader: read, hash, compress, [seal], upload) -> the manifest builder
(stages.ManifestBuilder). Hydrate: manifest -> stages.ChunkFetcher (get, [open], decompress,
verify, write). Sources and sinks are objects (ChunkSource / ChunkSink: local/fileio.py's
ChunkReader / ChunkWriter on a node, anything else in a test); this module opens no local file.
Seams: `codec` names chunks (keyed BLAKE3 when encrypted) and encodes them (compress, then
seal); `ChunkFetcher.fetch` gets one verified chunk (lazy hydration fetches on demand).
The path-based entry points are csi_perssd/volume_io.py (flush_path, hydrate_path).

flush_chunks() reads the source (block device or image file) chunk by chunk, in a thread pool: each
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

hydrate_chunks() GETs every data chunk in parallel (each distinct hash once), checks its BLAKE3 hash
before anything is written (ChunkCorrupted otherwise) and pwrites it; holes are left untouched
(a fresh destination reads as zeros) unless zero_holes=True.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..extents import Extent
from .chunkmap import ChunkMap
from .chunks import DEFAULT_COMPRESSION, check_chunk_size, check_hash, chunk_count, chunk_span
from .codec import PLAIN, Codec
from .journal import Journal
from .manifest import Manifest
from .stages import ChunkFetcher, ChunkUploader, KnownChunks, KnownSizes, ManifestBuilder, run_bounded
from .store import ObjectStore

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
RANGES_MODES = ("allocated", "changed")


class ChunkCorrupted(Exception):
    """A chunk read from the store does not match its hash (or cannot be decoded): data loss."""

    def __init__(self, key: str, message: str):
        super().__init__(f"chunk {key}: {message}")
        self.key = key


class ChunkMissing(ChunkCorrupted):
    """A chunk the manifest references is not in the store: data loss as well."""


class ChunkSource(Protocol):
    """What a flush reads from (local/fileio.ChunkReader on a node)."""
    size: int

    def read(self, offset: int, length: int) -> memoryview: ...

    def prefetch(self, offset: int, length: int) -> None: ...


class ChunkSink(Protocol):
    """What a hydrate writes into (local/fileio.ChunkWriter on a node)."""
    size: int

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def sync(self) -> None: ...


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


@dataclass
class FlushPlan:
    """Everything a flush needs to know besides the store and the source (module docstring).
    `known` (name -> stored size, or a chunk table such as a pre-flush manifest's): chunks the caller knows are stored and safe from garbage
    collection until this flush's manifest claims them (e.g. the pre-flush of the same volume a
    moment ago): neither compressed, HEADed nor uploaded again. `generation`/`parent` of the
    new manifest default to base.generation + 1 / base.generation."""
    size: int
    chunk_size: int
    base: Manifest | None = None
    ranges: list[Extent] | None = None
    ranges_mode: str = "allocated"
    compression_level: int = DEFAULT_COMPRESSION
    workers: int = 8
    journal_path: str | None = None
    trust_journal: bool = True
    check_exists: bool | str = "auto"
    generation: int | None = None
    parent: int | None = None
    known: Mapping[str, int] | ChunkMap | None = None
    codec: Codec = field(default=PLAIN)

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.ranges_mode not in RANGES_MODES:
            raise ValueError(f"ranges_mode must be 'allocated' or 'changed', not {self.ranges_mode!r}")
        if self.ranges_mode == "changed" and self.ranges is not None and self.base is None:
            raise ValueError("ranges_mode='changed' needs a base manifest")
        if self.base is not None and self.base.chunk_size != self.chunk_size:
            raise ValueError(f"base manifest has chunk size {self.base.chunk_size}, not {self.chunk_size}")

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def span(self, i: int) -> tuple[int, int]:
        return chunk_span(i, self.size, self.chunk_size)


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


# -- flush ----------------------------------------------------------------------------------
@dataclass
class _Start:
    """The plan applied: what the worker stage reads and what is settled before it starts."""
    builder: ManifestBuilder
    chunks: KnownChunks
    to_read: list[int]
    done_bytes: int
    total_bytes: int


def _known_chunks(plan: FlushPlan, base: ChunkMap | None) -> KnownChunks:
    """The base's chunks and `plan.known` (a pre-flush's chunk table or name -> size), looked up
    in their tables: nothing is expanded per chunk."""
    tables = [t for t in (base, plan.known) if isinstance(t, ChunkMap)]
    known = KnownSizes(tables)
    if plan.known is not None and not isinstance(plan.known, ChunkMap):
        known.index_ahead(len(plan.known))
        for h, sz in plan.known.items():
            known.setdefault(check_hash(h), sz)
    return KnownChunks(known=known, check_exists=plan.check_exists)


def _open_journal(plan: FlushPlan) -> Journal | None:
    if not plan.journal_path:
        return None
    base = plan.base
    return Journal(plan.journal_path, {
        # not the source path: a loop device may get another number after a restart
        "size": plan.size, "chunk_size": plan.chunk_size,
        "base": base.generation if base is not None else None,
        "base_chunks": base.chunk_count if base is not None else 0})


def _start(plan: FlushPlan, stats: FlushStats) -> _Start:
    """Which chunks to read; base entries kept outside the changed ranges; journaled chunks."""
    base = plan.base.chunk_map() if plan.base is not None else None
    chunks = _known_chunks(plan, base)
    journal = _open_journal(plan)
    n = plan.chunk_count
    to_read = list(range(n)) if plan.ranges is None else chunks_in(plan.ranges, plan.size, plan.chunk_size)
    chunks.known.index_ahead(len(to_read))
    keep = base if plan.ranges is not None and plan.ranges_mode == "changed" else None
    builder = ManifestBuilder(plan, chunks, stats, journal, keep=keep)
    if keep is not None:
        # the base's chunks stay as they are in its table; the chunks to read start as holes
        kept = builder.table.data_count()
        for i in to_read:
            kept -= builder.table.has(i)
            builder.table.set(i, None)
        stats.chunks_unchanged += kept
    done_bytes = 0
    if journal is not None:
        for jh, jsz in journal.entries.values():
            if jh is not None:
                chunks.known.setdefault(jh, jsz)
        if plan.trust_journal:
            done = [i for i in to_read if i in journal.entries]
            for i in done:
                builder.record(i, journal.entries[i][0], 0, journal=False)
            stats.chunks_from_journal = len(done)
            skip = set(done)
            to_read = [i for i in to_read if i not in skip]
            done_bytes = sum(plan.span(i)[1] for i in done)
    total = done_bytes + sum(plan.span(i)[1] for i in to_read)
    return _Start(builder, chunks, to_read, done_bytes, total)


def flush_chunks(store: ObjectStore, source: ChunkSource, plan: FlushPlan,
                 progress: Progress | None = None) -> tuple[Manifest, FlushStats]:
    """Upload the chunks of `source` that are not stored yet; return the new manifest and the
    stats. Store errors propagate (StoreError); an exception from `progress` aborts the flush
    (the journal keeps what was done)."""
    t0 = time.monotonic()
    if source.size < plan.size:
        raise ValueError(f"the source holds {source.size} bytes, less than {plan.size}")
    stats = FlushStats()
    st = _start(plan, stats)
    builder, to_read = st.builder, st.to_read
    done = [st.done_bytes]
    if progress is not None:
        progress(st.done_bytes, st.total_bytes)
    width = max(1, plan.workers)
    for j in to_read[:width]:
        source.prefetch(*plan.span(j))

    def submitted(k: int) -> None:
        ahead = k - 1 + width                  # the chunk read after this window
        if ahead < len(to_read):
            source.prefetch(*plan.span(to_read[ahead]))

    def settled(r: Any) -> None:
        done[0] += builder.settle(r)
        if progress is not None:
            progress(done[0], st.total_bytes)
    try:
        run_bounded(to_read, ChunkUploader(store, source, plan, st.chunks), width, settled,
                    submitted=submitted, salvage=builder.salvage, name="flush")
    finally:
        if builder.journal is not None:
            builder.journal.close()
    manifest = builder.build()
    stats.duration_s = time.monotonic() - t0
    manifest.stats = stats.as_dict()
    log.info("flushed %d chunks: %d uploaded (%d bytes), %d known, %d holes, %.1f MB/s", plan.chunk_count,
             stats.chunks_uploaded, stats.bytes_uploaded, stats.chunks_skipped_known, stats.hole_chunks,
             stats.read_mb_s)
    return manifest, stats


# -- hydrate --------------------------------------------------------------------------------
def hydrate_chunks(store: ObjectStore, manifest: Manifest, sink: ChunkSink, *, workers: int = 8,
                   verify: bool = True, zero_holes: bool = False, progress: Progress | None = None,
                   codec: Codec = PLAIN) -> HydrateStats:
    """Write the manifest's data chunks into `sink` (at least volume_size long). Holes are left
    as they are unless zero_holes. ChunkCorrupted/ChunkMissing before anything is written for a
    bad chunk. The sink's sync() ends it."""
    t0 = time.monotonic()
    stats = HydrateStats()
    cs, size = manifest.chunk_size, manifest.volume_size
    if sink.size < size:
        raise ValueError(f"the destination holds {sink.size} bytes, less than {size}")
    first: dict[str, int] = {}              # no list per chunk: only duplicated names get one
    more: dict[str, list[int]] = {}
    for i, h in manifest.data_items():
        if first.setdefault(h, i) != i:
            more.setdefault(h, []).append(i)
    if zero_holes:
        for start, count in manifest.hole_spans():
            sink.zero(start * cs, min(size, (start + count) * cs) - start * cs)
    stats.hole_chunks = manifest.hole_chunks
    total, done = manifest.logical_bytes, [0]

    def fetched(r: tuple[int, int, int]) -> None:
        down, written, logical = r
        stats.requests += 1
        stats.chunks_downloaded += 1
        stats.bytes_downloaded += down
        stats.bytes_written += written
        done[0] += logical
        if progress is not None:
            progress(done[0], total)
    fetcher = ChunkFetcher(store, manifest, sink, (first, more), verify=verify, zero_tails=zero_holes, codec=codec)
    try:
        # ahead: a name per worker queued (its buffers are the worker thread's, not the item's)
        run_bounded(iter(first), fetcher, workers, fetched, name="hydrate", ahead=workers)
    finally:
        fetcher.close()
    sink.sync()
    stats.duration_s = time.monotonic() - t0
    log.info("hydrated %d chunks (%d bytes stored, %d written), %d holes, %.1f MB/s",
             stats.chunks_downloaded, stats.bytes_downloaded, stats.bytes_written,
             stats.hole_chunks, stats.write_mb_s)
    return stats
