"""LazyVolume: reads and writes of a lazily staged volume, and its background hydrator.

The local volume (a sparse file) holds every chunk whose present bit is set. A read of a missing
chunk fetches it (verified) into the local volume first; a write to a missing chunk first fills
the whole chunk, then lands locally. One fetch per chunk at a time: a second reader waits for the
first. The background hydrator fetches every other missing chunk with `workers` threads, chunks
right after recent demand reads first ("hot first"), then in order.

Errors: a chunk that cannot be verified or is missing from the store raises ChunkCorrupted, a
store that stays unreachable past the timeout FetchTimeout; the caller (the FUSE server) turns
both into EIO for that request only. Nothing is written to the local volume before its content
was verified, so a failure never leaves wrong data behind.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..local.fileio import pwrite_full
from ..remote.chunks import chunk_span
from ..remote.manifest import Manifest
from ..remote.transfer import ChunkCorrupted
from .fetch import FetchTimeout
from .state import HydrationState

log = logging.getLogger(__name__)
Fetcher = Callable[[str], "bytes | memoryview"]
READ_AHEAD = 4                  # chunks queued first after a demand read (sequential readers)
PERSIST_EVERY_S = 1.0


@dataclass
class _Fetch:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class LazyVolume:
    def __init__(self, disk_path: str, manifest: Manifest, state: HydrationState, state_path: str,
                 fetcher: Fetcher, workers: int = 8):
        self.manifest, self.state, self.state_path = manifest, state, state_path
        self.fetcher = fetcher
        self.workers = max(0, workers)      # 0: no background hydration, on demand only
        self.fd = os.open(disk_path, os.O_RDWR | os.O_CLOEXEC)
        self._mu = threading.Lock()             # state bits, in-flight table, hot queue
        self._persist_mu = threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        self._hot: collections.deque[int] = collections.deque()
        self._cursor = 0
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

    def _fill(self, i: int) -> None:
        """Fetch chunk i (verified) and write it to the local volume."""
        h = self.manifest.hash_at(i)
        if h is not None:
            raw = self.fetcher(h)
            off, length = chunk_span(i, self.manifest.volume_size, self.manifest.chunk_size)
            if len(raw) > length:
                raise ChunkCorrupted(h, f"{len(raw)} bytes do not fit chunk {i}")
            pwrite_full(self.fd, raw, off)

    def ensure(self, i: int, demand: bool = True) -> bool:
        """Make chunk i local; True when this call fetched it."""
        f = self._claim(i)
        if f is None:
            return False
        try:
            self._fill(i)
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
    def read(self, offset: int, length: int) -> bytes:
        size = self.size
        if offset >= size:
            return b""
        length = min(length, size - offset)
        for i in self._chunks(offset, length):
            if self.ensure(i):
                self._heat(i)
        return os.pread(self.fd, length, offset)

    def _heat(self, i: int) -> None:
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
    def _next(self) -> int | None:
        """The next chunk for the hydrator: hot ones first, then the lowest missing one."""
        with self._mu:
            while self._hot:
                j = self._hot.popleft()
                if not self.state.is_present(j) and j not in self._inflight and j not in self._failed:
                    return j
            n = self.state.chunks
            while self._cursor < n:
                j = self._cursor
                self._cursor += 1
                if not self.state.is_present(j) and j not in self._inflight and j not in self._failed:
                    return j
            return None

    def _hydrate_loop(self) -> None:
        while not self._stop.is_set():
            i = self._next()
            if i is None:
                return
            try:
                self.ensure(i, demand=False)
            except ChunkCorrupted as e:
                with self._mu:
                    self._failed.add(i)
                log.error("background hydration: %s; reads of chunk %d fail with EIO", e, i)
            except FetchTimeout as e:
                log.warning("background hydration paused: %s", e)
                with self._mu:
                    self._cursor = min(self._cursor, i)
                self._stop.wait(1.0)
            except OSError as e:
                log.error("background hydration of chunk %d: %s", i, e)
                self._stop.wait(1.0)

    def _supervise(self) -> None:
        """Start the workers, persist the state about once a second (the resume point after a
        restart), note the completion."""
        for k in range(self.workers):
            t = threading.Thread(target=self._hydrate_loop, name=f"hydrate-{k}", daemon=True)
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

    def start(self) -> None:
        t = threading.Thread(target=self._supervise, name="hydrate-supervisor", daemon=True)
        t.start()
        self._supervisor = t

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
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
                    "seconds": (self.completed_at or time.monotonic()) - self.started_at}

    def close(self) -> None:
        os.close(self.fd)
