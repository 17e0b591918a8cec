"""RecentChunks: the content of the chunks a reader is about to read, kept in memory.

Right after a lazy stage the reader streams chunks the node has just fetched. Served from the
local volume, each of its reads copied out of page-cache pages the kernel had only just read
from the disk (or read back after an O_DIRECT fill): measured with perf on the 2-core VM (2 GiB
read right after stage), half the server's CPU was filemap_read -> copy_page_to_iter on those
cold pages, and the disk read the volume a second time (2.15 GB read for 2 GiB). A fill near
the reader therefore keeps the verified chunk in one of a few reused slots (memory already
faulted in), and the FUSE server answers the reads of that chunk from the slot.

A fixed set of chunk-sized slots in one anonymous mmap (SLOTS x chunk size: 64 MiB for 4 MiB
chunks), reused; never a new buffer per chunk. Which slot a new chunk takes (`_victim`): a free
one, else the lowest chunk the reader has passed, else the chunk farthest ahead of the reader
if it is farther than the new one; else the new chunk is not kept. A slot being copied out of is
pinned. A write to a chunk drops its slot and bumps the chunk's version, so a load that read the
disk before the write landed is not kept (`load`). One lock for the table; copies run outside it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Callable

SLOTS = 16

_FREE, _BUSY = -1, -2           # slot states besides "holds chunk i >= 0"


class RecentChunks:
    def __init__(self, slots: int, chunk_size: int):
        self.chunk_size = chunk_size
        self.slots = max(0, slots)
        self._mu = threading.Lock()
        self._chunk = [_FREE] * self.slots       # what each slot holds
        self._len = [0] * self.slots
        self._pins = [0] * self.slots
        self._dead = [False] * self.slots        # dropped while pinned: freed at the last unpin
        self._where: dict[int, int] = {}
        self._version: dict[int, int] = {}       # chunk -> writes seen (only chunks written)
        self.kept = 0                            # chunks put in a slot
        self.loaded = 0                          # of them, read from the local volume
        self.read_bytes = 0                      # bytes answered from slots
        self._map: mmap.mmap | None = None
        self._base = 0
        if self.slots:
            self._map = mmap.mmap(-1, self.slots * chunk_size,
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._anchor = ctypes.c_char.from_buffer(self._map)
            self._base = ctypes.addressof(self._anchor)

    @property
    def active(self) -> bool:
        return self._map is not None

    def holds(self, i: int) -> bool:
        with self._mu:
            return i in self._where

    def held(self) -> list[int]:
        with self._mu:
            return sorted(self._where)

    # -- slots ------------------------------------------------------------------------------
    def _victim(self, i: int, reader: int) -> int | None:
        """Under _mu: the slot chunk i may take, given the reader's chunk (-1: no read yet)."""
        behind: tuple[int, int] | None = None       # (chunk, slot) lowest behind the reader
        ahead: tuple[int, int] | None = None        # (distance, slot) farthest ahead
        for s, c in enumerate(self._chunk):
            if self._pins[s]:
                continue
            if c == _FREE:
                return s
            if c < 0:
                continue
            if reader >= 0 and c < reader:
                if behind is None or c < behind[0]:
                    behind = (c, s)
            elif ahead is None or c - reader > ahead[0]:
                ahead = (c - reader, s)
        if behind is not None:
            return behind[1]
        if ahead is not None and ahead[0] > i - reader:
            return ahead[1]
        return None

    def _reserve(self, i: int, reader: int) -> tuple[int, int] | None:
        """Under _mu: (slot, version) for a new copy of chunk i, or None."""
        if self._map is None or i in self._where:
            return None
        s = self._victim(i, reader)
        if s is None:
            return None
        old = self._chunk[s]
        if old >= 0:
            del self._where[old]
        self._chunk[s], self._len[s] = _BUSY, 0
        return s, self._version.get(i, 0)

    def _commit(self, s: int, i: int, n: int, version: int, loaded: bool) -> bool:
        """Under _mu: the reserved slot s now holds n bytes of chunk i, unless written since."""
        if self._map is None:
            return False
        if self._version.get(i, 0) != version or i in self._where:
            self._chunk[s] = _FREE
            return False
        self._chunk[s], self._len[s] = i, n
        self._where[i] = s
        self.kept += 1
        self.loaded += loaded
        return True

    def _view(self, s: int, n: int) -> memoryview:
        assert self._map is not None
        start = s * self.chunk_size
        return memoryview(self._map)[start:start + n]

    def _into_slot(self, i: int, n: int, reader: int, fill: Callable[[memoryview], int],
                   loaded: bool = False) -> bool:
        """Chunk i's n bytes into a slot by `fill(view)` (the bytes it wrote), outside the lock;
        False when no slot may take it, the fill came short or failed (OSError), or a write to
        the chunk came in meanwhile. The view is taken with the slot: a close() meanwhile
        leaves the map to it until the fill ends; the slot is freed whatever the fill raised."""
        with self._mu:
            got = self._reserve(i, reader)
            if got is None:
                return False
            s, version = got
            view = self._view(s, n)
        done = -1
        try:
            with view:
                done = fill(view)
        except OSError:
            pass
        finally:
            with self._mu:
                ok = done == n and self._commit(s, i, n, version, loaded)
                if not ok and self._chunk[s] == _BUSY:
                    self._chunk[s] = _FREE
        return ok

    def put(self, i: int, data: bytes | bytearray | memoryview, reader: int) -> bool:
        """Keep a copy of chunk i's content (a fill): False when no slot may take it."""
        src = memoryview(data).cast("B")
        n = src.nbytes
        if not 0 < n <= self.chunk_size:        # (ctypes cannot address an empty buffer)
            return False

        def copy(v: memoryview) -> int:
            if src.readonly:            # an on-demand fill's new bytes object
                v[:] = src
                return n
            # the background pool's landing buffer: ctypes.memmove, a foreign call, copies
            # without the GIL (a slice assignment holds it for the whole chunk, while the FUSE
            # threads wait for it to answer the reader)
            dst, frm = ctypes.c_char.from_buffer(v), ctypes.c_char.from_buffer(src)
            try:
                ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(frm), n)
            finally:
                del dst, frm
            return n
        return self._into_slot(i, n, reader, copy)

    def load(self, i: int, direct_fd: int, offset: int, length: int, reader: int) -> bool:
        """Read chunk i ([offset, offset+length) of the local volume) into a slot with O_DIRECT
        (the disk to this memory: no page-cache copy). False when no slot may take it, the
        read is not aligned for O_DIRECT, or a write to the chunk came in meanwhile."""
        if direct_fd < 0 or offset % 4096 or length % 4096 or length > self.chunk_size:
            return False
        return self._into_slot(i, length, reader, lambda v: os.preadv(direct_fd, [v], offset), loaded=True)

    def copy_out(self, i: int, at: int, n: int, dst: int) -> bool:
        """Copy n bytes of chunk i from its byte `at` to the address dst; False when the chunk
        is not kept (whole: the slot must hold the range)."""
        with self._mu:
            s = self._where.get(i)
            if s is None or at + n > self._len[s]:
                return False
            self._pins[s] += 1
            src = self._base + s * self.chunk_size + at
        try:
            ctypes.memmove(dst, src, n)     # a foreign call: without the GIL
        finally:
            with self._mu:
                self._pins[s] -= 1
                if not self._pins[s] and self._dead[s]:
                    self._dead[s] = False
                    self._chunk[s] = _FREE
                self.read_bytes += n
        return True

    def drop(self, i: int) -> None:
        """A write to chunk i: forget its copy, and any load of it in progress."""
        with self._mu:
            self._version[i] = self._version.get(i, 0) + 1
            s = self._where.pop(i, None)
            if s is None:
                return
            if self._pins[s]:
                self._chunk[s], self._dead[s] = _BUSY, True
            else:
                self._chunk[s] = _FREE

    def close(self) -> None:
        """Let go of the slots' memory (reads then go to the local volume): at once, after the
        copies out of it that are running (microseconds); a load still reading into it keeps
        the map until it ends."""
        with self._mu:
            m, self._map = self._map, None
            self._where.clear()
        if m is None:
            return
        for _ in range(1000):
            with self._mu:
                if not any(self._pins):
                    break
            time.sleep(0.001)
        del self._anchor
        try:
            m.close()
        except BufferError:
            pass                # a load's view of it: unmapped when that view goes
