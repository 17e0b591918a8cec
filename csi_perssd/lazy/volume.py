"""LazyVolume: reads and writes of a lazily staged volume, and its background hydrator.

The local volume (a sparse file) holds every chunk whose present bit is set. A read of a missing
chunk fetches it (verified) into the local volume first; a write to a missing chunk first fills
the whole chunk, then lands locally. One fetch per chunk at a time: a second reader waits for the
first. The background hydrator fetches every other missing chunk, `workers` at a time: hot ones
first (the READ_AHEAD chunks after a read that waited), then, while a reader reads, the missing
chunks of its window (the next `slots` chunks), nothing while a read has just waited for a fetch
and the window's fetches run (HOLD_S: they get the bandwidth), then from the volume's end backwards (away from
the reader); with no reader, in order.

Until hydration completes, reads are answered from memory (lazy/recent.py): a chunk filled near
the reader is kept in one of a few reused slots, and a local chunk that is not kept is loaded
into a slot with O_DIRECT for its reads; measured, serving them from the page cache right after
stage cost half the server's CPU in copies from cold pages and read the volume from disk twice.
A write drops the chunk's copy. Once hydrated (and the reader idle for IDLE_RELEASE_S) the slots
go and reads use the local volume's page cache. Without slots (keep_slots=0), a fill near a
reader is read back into the page cache instead (_ReadAheadSink).

A chunk goes the full hydrate's way (remote/stages.py): the fetcher is its GET -> decode -> verify
(`fetch_verified`, lazy/fetch.py adds the retries), the chunk is written by `write_chunk` into a
local/fileio.ChunkWriter (aligned chunks with O_DIRECT from the thread's reused page-aligned
buffer: no page-cache copy and no dirty pages for the state's fsync to write back), and the
background fetches run on `run_bounded`, the hydrate's bounded pool. Near a reader, a filled
chunk is then read back into the page cache (asynchronous readahead), so the reads that follow
are served from memory; without it every one of them went back to the disk (measured: most of a
reader's time right after stage, the hydrator long done).

Errors: a chunk that cannot be verified or is missing from the store raises ChunkCorrupted, a
store that stays unreachable past the timeout FetchTimeout; the caller (the FUSE server) turns
both into EIO for that request only. Nothing is written to the local volume before its content
was verified, so a failure never leaves wrong data behind.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..local.fileio import ChunkWriter, pwrite_full
from ..remote.chunks import chunk_span
from ..remote.manifest import Manifest
from ..remote.stages import run_bounded, write_chunk
from ..remote.transfer import ChunkCorrupted
from .fetch import FetchTimeout
from .recent import SLOTS, RecentChunks
from .state import HydrationState

log = logging.getLogger(__name__)
Fetcher = Callable[[str], "bytes | memoryview"]
READ_AHEAD = 8                  # chunks queued first after a read that found its chunk missing
NEAR_READ = 64                  # chunks from the latest read's on read back into the page cache after their fill
HOT_MAX = 1024                  # hot queue bound (oldest hints dropped first)
PERSIST_EVERY_S = 1.0
POOL = "lazy-hydrate"           # the background pool's thread names start with it
STOP_JOIN_S = 10.0              # stop() waits this long in all for the hydrator (manager kills at 20 s)
RETRY_PAUSE_S = 1.0             # before the hydrator retries chunks that timed out or failed locally
READER_ACTIVE_S = 1.0           # a read this recent makes the hydrator work for the reader first
HOLD_S = 0.25                   # a read that waited for a fetch this recently holds far fetches back
HOLD_POLL_S = 0.005
HOLD = -1                       # _next: nothing to start now, ask again in HOLD_POLL_S
IDLE_RELEASE_S = 5.0            # hydrated and no read this long: the kept chunks' memory goes


@dataclass
class _Fetch:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _ReadAheadSink:
    """The hydrate's O_DIRECT sink, then the kernel is asked to read the chunk back into the
    page cache (POSIX_FADV_WILLNEED: asynchronous readahead, off the reader's path), where the
    reader about to read it finds it, instead of waiting for the disk in each of its reads.
    Not a buffered write: measured, buffered fills of one file are serialized (~15 ms per 4 MiB
    chunk here) and a 256 MiB hydration took 1.0-1.6 s instead of 0.55-0.65 s."""

    def __init__(self, sink: ChunkWriter):
        self.sink = sink
        self.size = sink.size
        self.advise = _willneed

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.sink.write(offset, data)
        self.advise(self.sink.fd, offset, len(data))

    def zero(self, offset: int, length: int) -> None:
        self.sink.zero(offset, length)

    def sync(self) -> None:
        self.sink.sync()


def _willneed(fd: int, offset: int, length: int) -> None:
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class LazyVolume:
    def __init__(self, disk_path: str, manifest: Manifest, state: HydrationState, state_path: str,
                 fetcher: Fetcher, workers: int = 8, keep_slots: int = SLOTS):
        self.manifest, self.state, self.state_path = manifest, state, state_path
        self.fetcher = fetcher
        self.workers = max(0, workers)      # 0: no background hydration, on demand only
        # fills go through the hydrate's sink; reads and the workload's writes use its buffered
        # descriptor (the kernel keeps the two coherent: an O_DIRECT write drops cached pages)
        self.sink = ChunkWriter(disk_path, writeback=True, chunk_size=manifest.chunk_size)
        self.fd = self.sink.fd
        self.readahead = _ReadAheadSink(self.sink)
        self._read_at = -1                      # chunk of the latest read (-1: none yet)
        self._read_t = -1e9                     # monotonic time of the latest read
        self._waited_t = -1e9                   # ... of the latest read that waited for a fetch
        self.recent = RecentChunks(keep_slots, manifest.chunk_size)
        self._loading: dict[int, threading.Event] = {}
        self._unread: set[int] = set()          # background fills read back into the page cache, not read since
        self._advised = (-1, -1)                # chunks [lo, hi) asked into the page cache by reads (_advise_window)
        self._mu = threading.Lock()             # state bits, in-flight table, hot queue
        self._persist_mu = threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        self._handed: set[int] = set()          # chunks _next gave the pool, until their fetch ends
        self._hot: collections.deque[int] = collections.deque(maxlen=HOT_MAX)
        self._cursor = 0
        self._far = state.chunks - 1           # the hydrator's cursor from the end, while a reader reads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failed: set[int] = set()          # chunks the hydrator gave up on (corrupt)
        self.completed_at: float | None = None
        self.started_at = time.monotonic()

    @property
    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)        # a block device's fstat size is 0

    # -- chunks -----------------------------------------------------------------------------
    def _chunks(self, offset: int, length: int) -> range:
        cs = self.manifest.chunk_size
        return range(offset // cs, (offset + max(length, 1) - 1) // cs + 1)

    def _claim(self, i: int) -> _Fetch | None:
        """None: chunk i is present. Else wait for another thread's fetch, or return our claim."""
        while True:
            with self._mu:
                if self.state.is_present(i):
                    return None
                f = self._inflight.get(i)
                if f is None:
                    f = self._inflight[i] = _Fetch()
                    return f
            f.done.wait()
            if f.error is not None:
                raise f.error

    def _release(self, i: int, f: _Fetch, error: BaseException | None) -> None:
        f.error = error
        with self._mu:
            self._inflight.pop(i, None)
        f.done.set()

    def _fill(self, i: int, demand: bool) -> None:
        """Fetch chunk i (verified) and write it to the local volume (O_DIRECT, as the full
        hydrate writes: no page-cache copy, no dirty pages), then, for a chunk a reader is about
        to read, have it read back into the page cache (`_sink_for`)."""
        h = self.manifest.hash_at(i)
        if h is None:
            return
        raw = self.fetcher(h)
        keep = self._keep(i, demand)
        write_chunk(self.sink if keep else self._sink_for(i, demand), self.manifest, i, h, raw)
        if keep and not self.recent.put(i, raw, self._read_at):     # no slot for it: the page cache
            self.readahead.advise(self.fd, i * self.manifest.chunk_size, len(raw))

    def _keep(self, i: int, demand: bool) -> bool:
        """Keep chunk i's content for the reader (RecentChunks): a chunk a read waits for, one
        at most NEAR_READ after the latest read, or, before any read, one of the first chunks
        (where a reader of a fresh stage starts). Which of them stay is the slots' business."""
        if not self.recent.active:
            return False
        if demand:
            return True
        r = self._read_at
        if r < 0:
            return i < self.recent.slots
        return 0 <= i - r < NEAR_READ

    def _sink_for(self, i: int, demand: bool) -> ChunkWriter | _ReadAheadSink:
        """Read back: a chunk a read waits for; a chunk at or up to NEAR_READ after the latest
        read, while fewer than NEAR_READ chunks read back are unread (what the page cache holds
        for readers is bounded: with no reader, the rest of a long hydration is not read back).
        Before any read nothing is read back at its fill: the first read asks for the chunks
        already local in its window (`_advise_window`). Measured without read-back: right after
        stage, a reader's time went to pread of the local volume going back to the disk for
        chunks the hydrator had just written; measured with read-back of every fill before the
        first read: a volume nobody read paid a second pass over its first NEAR_READ chunks."""
        if demand:
            return self.readahead
        with self._mu:
            r = self._read_at
            if r < 0 or len(self._unread) >= NEAR_READ or not 0 <= i - r < NEAR_READ:
                return self.sink
            self._unread.add(i)
            return self.readahead

    def ensure(self, i: int, demand: bool = True) -> bool:
        """Make chunk i local; True when this call fetched it."""
        f = self._claim(i)
        if f is None:
            return False
        try:
            self._fill(i, demand)
        except BaseException as e:
            self._release(i, f, e)
            raise
        with self._mu:
            self.state.mark_present(i)
            if demand:
                self.state.on_demand += 1
            else:
                self.state.background += 1
        self._release(i, f, None)
        return True

    # -- I/O --------------------------------------------------------------------------------
    def prepare_read(self, offset: int, length: int) -> int:
        """Make [offset, offset+length) local for a read; the bytes to read there (0 past the
        end). The caller then reads them from `fd` (the FUSE server has libfuse do it)."""
        size = self.size
        if offset >= size:
            return 0
        length = min(length, size - offset)
        self._read_at = offset // self.manifest.chunk_size
        self._read_t = time.monotonic()
        chunks = self._chunks(offset, length)
        if not self._keeping():
            self._advise_window(chunks)
        for i in chunks:
            missing = not self.state.is_present(i)      # a hint only: ensure() decides
            self.ensure(i)
            if missing:
                self._waited_t = time.monotonic()
                self._heat(i)
        if self._unread:            # read now, or out of the window (passed, or far ahead)
            with self._mu:
                r = self._read_at
                self._unread = {j for j in self._unread if j not in chunks and 0 <= j - r < NEAR_READ}
        return length

    def read(self, offset: int, length: int) -> bytes:
        n = self.prepare_read(offset, length)
        if not n:
            return b""
        buf = bytearray(n)
        addr = ctypes.addressof((ctypes.c_char * n).from_buffer(buf))
        if self.read_kept(offset, n, addr):
            return bytes(buf)
        return os.pread(self.fd, n, offset)

    def _keeping(self) -> bool:
        """Are reads answered from kept chunks, loading the others (until hydration completes:
        then re-reads go through the page cache, which holds them across reads for free)?"""
        return self.recent.active and not self.state.complete

    def read_kept(self, offset: int, n: int, dst: int) -> bool:
        """Copy [offset, offset+n), made local by prepare_read, to the address dst from the kept
        chunks, loading a local chunk that is not kept into a slot first (O_DIRECT, one load
        per chunk at a time) until hydration completes. False: read it from `fd` instead
        (a hole, no slot free for it, hydrated; what was copied already is overwritten then)."""
        if not self.recent.active:
            return False
        cs = self.manifest.chunk_size
        pos = 0
        while pos < n:
            i, at = divmod(offset + pos, cs)
            k = min(n - pos, cs - at)
            if not self.recent.copy_out(i, at, k, dst + pos):
                if not self._keeping() or not self._load(i) or not self.recent.copy_out(i, at, k, dst + pos):
                    return False
            pos += k
        return True

    def _load(self, i: int) -> bool:
        """Chunk i, local, into a slot (RecentChunks.load); concurrent readers of it wait for
        one load (the kernel's readahead sends several reads of one chunk at once)."""
        if self.manifest.hash_at(i) is None:
            return False                            # a hole: the local volume's zeros, as fast
        with self._mu:
            ev = self._loading.get(i)
            mine = ev is None
            if mine:
                ev = self._loading[i] = threading.Event()
        assert ev is not None
        if not mine:
            ev.wait(1.0)
            return self.recent.holds(i)
        try:
            off, length = chunk_span(i, self.manifest.volume_size, self.manifest.chunk_size)
            fd = self.sink.direct_fd if self.sink.direct else -1
            return self.recent.load(i, fd, off, length, self._read_at)
        finally:
            with self._mu:
                self._loading.pop(i, None)
            ev.set()

    def _advise_window(self, chunks: range) -> None:
        """The chunks after this read, up to NEAR_READ from its first, that are local but were
        filled before a read came near them (so not read back at their fill), are asked into
        the page cache now (one WILLNEED per run of them), each once while the reader moves
        forward through the window; counted in the read-back bound."""
        r, end = chunks.start, min(chunks.start + NEAR_READ, self.state.chunks)
        lo, hi = self._advised
        if lo <= r and end <= hi:
            return                                  # this window was asked for already
        if lo <= r <= hi:                          # moving forward: only the new part
            start, self._advised = max(chunks.stop, hi), (lo, end)
        else:                                       # the first read, or a jump
            start, self._advised = chunks.stop, (r, end)
        runs: list[list[int]] = []
        with self._mu:
            self._unread = {j for j in self._unread if 0 <= j - r < NEAR_READ}    # passed or far ahead
            for j in range(start, end):
                if (self.state.is_present(j) and j not in self._unread and j not in self._inflight
                        and len(self._unread) < NEAR_READ):
                    self._unread.add(j)
                    if runs and runs[-1][1] == j:
                        runs[-1][1] = j + 1
                    else:
                        runs.append([j, j + 1])
        cs = self.manifest.chunk_size
        for a, b in runs:
            self.readahead.advise(self.fd, a * cs, (b - a) * cs)

    def _heat(self, i: int) -> None:
        """Read-ahead: the next READ_AHEAD chunks after a read that found chunk i missing go to
        the front of the background queue (fetched in parallel, before the reader asks)."""
        if not self.workers:
            return                              # on demand only: exactly what is read is fetched
        with self._mu:
            for j in range(i + READ_AHEAD, i, -1):
                if j < self.state.chunks and not self.state.is_present(j):
                    self._hot.appendleft(j)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        new_dirty = False
        for i in self._chunks(offset, len(data)):
            self.ensure(i)
            with self._mu:
                if not self.state.is_dirty(i):
                    self.state.mark_dirty(i)
                    new_dirty = True
        if new_dirty:
            self.persist()                      # write-ahead: the dirty bit before the data
        pwrite_full(self.fd, data, offset)
        for i in self._chunks(offset, len(data)):
            self.recent.drop(i)                 # and any load of it that read the disk before
        return len(data)

    def fsync(self) -> None:
        self.persist()

    def persist(self) -> None:
        """fsync the local volume, then store the state: a persisted present bit is durable."""
        with self._persist_mu:
            with self._mu:
                snap = self.state.copy()
            os.fsync(self.fd)
            snap.save(self.state_path)

    # -- background hydration ---------------------------------------------------------------
    def _wanted(self, j: int) -> bool:
        return (not self.state.is_present(j) and j not in self._inflight and j not in self._handed
                and j not in self._failed)

    def _next(self) -> int | None:
        """The next chunk for the hydrator (None: none left this round; HOLD: none to start now).
        Hot ones first; while a reader reads, the missing chunks of its window (the next
        `slots` chunks from its latest read: fetched ahead of it and kept for it), then none
        while a read has just waited for a fetch and the window's fetches run (they get the
        bandwidth; a lone read, such as a probe of the device's last block, holds nothing), then the
        highest missing chunk (far from where the reader goes next); with no reader the lowest.
        A chunk is handed out once until its fetch ends (the window is looked at again each time)."""
        with self._mu:
            j = self._pick()
            if j is not None and j != HOLD:
                self._handed.add(j)
            return j

    def _pick(self) -> int | None:
        """Under _mu: _next's choice."""
        while self._hot:
            j = self._hot.popleft()
            if self._wanted(j):
                return j
        n = self.state.chunks
        now = time.monotonic()
        r = self._read_at
        if r >= 0 and now - self._read_t < READER_ACTIVE_S:
            coming = False                  # a fetch of the window's is running
            for j in range(r, min(n, r + max(self.recent.slots, READ_AHEAD))):
                if self._wanted(j):
                    return j
                coming = coming or j in self._inflight or j in self._handed
            if coming and now - self._waited_t < HOLD_S:
                return HOLD
            while self._far >= 0:
                j = self._far
                self._far -= 1
                if self._wanted(j):
                    return j
        while self._cursor < n:
            j = self._cursor
            self._cursor += 1
            if self._wanted(j):
                return j
        return None

    def _todo(self) -> Iterator[int]:
        while not self._stop.is_set():
            i = self._next()
            if i is None:
                return
            if i == HOLD:
                self._stop.wait(HOLD_POLL_S)
                continue
            yield i

    def _background(self, i: int) -> None:
        """One background fetch (on the pool): its failure is logged, never raised."""
        try:
            self._ensure_handed(i)
        except ChunkCorrupted as e:
            with self._mu:
                self._failed.add(i)
            log.error("background hydration: %s; reads of chunk %d fail with EIO", e, i)
        except FetchTimeout as e:
            log.warning("background hydration paused: %s", e)
            self._stop.wait(RETRY_PAUSE_S)
        except Exception as e:      # noqa: BLE001 - a local I/O error: retried in the next round
            log.error("background hydration of chunk %d: %s", i, e)
            self._stop.wait(RETRY_PAUSE_S)

    def _ensure_handed(self, i: int) -> None:
        try:
            self.ensure(i, demand=False)
        finally:
            with self._mu:
                self._handed.discard(i)

    def _hydrate(self) -> None:
        """Rounds of the bounded pool over the missing chunks (hot first, then in order) until
        none is left but the ones that failed verification; a chunk that timed out or failed on
        the local volume is tried again in the next round."""
        while not self._stop.is_set():
            run_bounded(self._todo(), self._background, self.workers, lambda _: None, name=POOL)
            with self._mu:
                failed = sum(1 for i in self._failed if not self.state.is_present(i))
                left = self.state.missing_count > failed
                self._cursor, self._far = 0, self.state.chunks - 1
            if not left:
                return
            self._stop.wait(RETRY_PAUSE_S)

    def _supervise(self) -> None:
        """Start the hydrator, persist the state about once a second (the resume point after a
        restart), note the completion."""
        if self.workers:
            t = threading.Thread(target=self._hydrate, name="hydrate", daemon=True)
            t.start()
            self._threads.append(t)
        seen = -1
        while not self._stop.wait(PERSIST_EVERY_S):
            fetched = self.state.on_demand + self.state.background
            if fetched != seen:
                self.persist()
                seen = fetched
            if self.state.complete and self.completed_at is None:
                self.completed_at = time.monotonic()
                log.info("hydration complete: %d chunks on demand, %d in the background, %.2fs",
                         self.state.on_demand, self.state.background, self.completed_at - self.started_at)
            if (self.completed_at is not None and self.recent.active
                    and time.monotonic() - self._read_t > IDLE_RELEASE_S):
                self.recent.close()         # hydrated, and the reader has gone: reads use the page cache

    def start(self) -> None:
        t = threading.Thread(target=self._supervise, name="hydrate-supervisor", daemon=True)
        t.start()
        self._supervisor = t

    def stop(self) -> None:
        """End the hydrator and persist the state, within STOP_JOIN_S in all (under the plugin's
        kill deadline, manager.STOP_TIMEOUT_S, so the final save runs even while the store is
        unreachable; the fetcher stops retrying when the server sets its own stop event)."""
        self._stop.set()
        deadline = time.monotonic() + STOP_JOIN_S
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.persist()

    def wait_complete(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.complete:
                return True
            time.sleep(0.05)
        return self.state.complete

    def status(self) -> dict[str, object]:
        with self._mu:
            st = self.state
            return {"chunks": st.chunks, "missing": st.missing_count, "on_demand": st.on_demand,
                    "background": st.background, "complete": st.complete,
                    "failed": sorted(self._failed), "generation": st.generation,
                    "kept_chunks": self.recent.kept, "loaded_chunks": self.recent.loaded,
                    "kept_read_bytes": self.recent.read_bytes,
                    "seconds": (self.completed_at or time.monotonic()) - self.started_at}

    def close(self) -> None:
        """Close the local volume's descriptors, unless a hydrator thread is still running (it
        could write through a closed or reused descriptor): the process is ending then anyway."""
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("not closing %s: %s still running", self.sink.path, ", ".join(alive))
            return
        self.recent.close()
        self.sink.close()
