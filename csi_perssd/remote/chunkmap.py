"""The compact in-memory chunk table of a manifest (issue 13): no Python object per chunk.

`ChunkMap` is the binary wire form's own layout (manifest_wire.py), held as it is:
    runs     array('I')  alternating run lengths, data first (possibly 0): data, holes, data, ...
    digests  bytes       the raw 32-byte BLAKE3 digest of each data chunk, in index order
    stored   array('I')  each data chunk's stored object size (0: unknown)
A fully written 16 TiB volume at 4 MiB chunks is 144 MiB in three objects instead of 4 Mi hex
strings and a 4 Mi-entry dict; encode and decode are a few buffer copies. Lookups by index
bisect the run starts (built on first use, one entry per run); lookups by name search the digest
buffer (C speed) until enough of them were made that a digest -> position dict pays for itself.

`ChunkMapBuilder` is the dense, mutable form a flush fills in completion order (32 + 1 + 4 bytes
per chunk): base generation copied run by run, changed chunks set one by one, `build()` finds the
data runs with one regular-expression scan of the presence bytes.
"""
from __future__ import annotations

import re
import sys
import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate, repeat

DIGEST = 32
SET_AFTER = 100           # name lookups by buffer search before a digest -> position dict is built
_DATA_RUNS = re.compile(rb"\x01+")
_SLOTS = re.compile(rb".{32}", re.S)
_ONES = b"\1" * 65536


def u32_array(data: bytes | bytearray | memoryview = b"") -> array[int]:
    """A little-endian u32 buffer as an array('I')."""
    a = array("I")
    if a.itemsize != 4:                 # pragma: no cover (every supported platform has 4)
        a = array("L")
    a.frombytes(data)
    if sys.byteorder != "little":       # pragma: no cover
        a.byteswap()
    return a


def u32_bytes(a: array[int]) -> bytes:
    if sys.byteorder != "little":       # pragma: no cover
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def u32_all_le(values: array[int], limit: int) -> bool:
    """Whether every value of a u32 array is <= limit, a byte plane at a time (C speed: max()
    of a 4 Mi-entry array takes half a second here). Values equal to the limit's top bytes so
    far are compared one by one only where the planes leave some but not all of them."""
    if not len(values):
        return True
    if limit >= 1 << 32:
        return True
    raw = memoryview(u32_bytes(values) if sys.byteorder != "little" else values).cast("B")
    candidates: list[int] | None = None            # None: every value is still tied with the limit
    for k in (3, 2, 1, 0):
        plane, top = raw[k::4].tobytes(), (limit >> (8 * k)) & 0xFF
        if candidates is not None:
            return all(values[i] <= limit for i in candidates)
        if plane.translate(None, bytes(range(top + 1))):
            return False                            # some byte above the limit's: that value is larger
        tied = plane.count(top)
        if tied == 0:
            return True
        if tied != len(plane):
            candidates = [m.start() for m in re.finditer(re.escape(bytes([top])), plane)]
    return True


def hex_slots(digests: bytes | bytearray) -> list[str]:
    """The hex names of a buffer of 32-byte digests (one str per digest)."""
    hexed = digests.hex()
    return [hexed[i:i + 2 * DIGEST] for i in range(0, len(hexed), 2 * DIGEST)]


def _merged(spans: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, count) spans with the adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for start, count in spans:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((start, count))
    return out


class ChunkMap:
    """Immutable compact chunk table of `n` chunks (see the module docstring)."""

    __slots__ = ("n", "runs", "digests", "stored", "_starts", "_dpos", "_names", "_finds", "_mu")

    def __init__(self, n: int, runs: array[int], digests: bytes, stored: array[int]):
        self.n, self.runs, self.digests, self.stored = n, runs, digests, stored
        self._starts: list[int] | None = None
        self._dpos: list[int] | None = None
        self._names: dict[bytes, int] | None = None
        self._finds = 0
        self._mu = threading.Lock()

    @classmethod
    def holes(cls, n: int) -> ChunkMap:
        return cls(n, array("I", [0, n]), b"", array("I"))

    @property
    def data_count(self) -> int:
        return len(self.digests) // DIGEST

    # -- by index ---------------------------------------------------------------------------
    def _index(self) -> tuple[list[int], list[int]]:
        if self._starts is None or self._dpos is None:
            dpos = list(accumulate(self.runs[0::2], initial=0))
            self._dpos = [dpos[r // 2] for r in range(len(self.runs))]
            self._starts = list(accumulate(self.runs, initial=0))
        return self._starts, self._dpos

    def position(self, i: int) -> int:
        """Data position (into digests/stored) of chunk i, or -1 for a hole or past the end."""
        if not 0 <= i < self.n:
            return -1
        starts, dpos = self._index()
        r = bisect_right(starts, i) - 1          # the run holding i (never an empty one)
        if r % 2:
            return -1
        return dpos[r] + i - starts[r]

    def digest_at(self, i: int) -> bytes | None:
        p = self.position(i)
        return None if p < 0 else self.digests[DIGEST * p:DIGEST * (p + 1)]

    def data_spans(self) -> Iterator[tuple[int, int, int]]:
        """(first chunk index, count, first data position) of every non-empty data run."""
        idx = pos = 0
        for r, length in enumerate(self.runs):
            if length and not r % 2:
                yield idx, length, pos
            idx += length
            pos += 0 if r % 2 else length

    def same_chunks(self, other: ChunkMap) -> bool:
        """The same chunk (digest and stored size) or hole at every index, however the runs
        are split (an empty run between two of one kind)."""
        return (self.n == other.n and self.digests == other.digests and self.stored == other.stored
                and _merged(self.hole_spans()) == _merged(other.hole_spans()))

    def hole_spans(self) -> Iterator[tuple[int, int]]:
        """(first chunk index, count) of every non-empty run of holes."""
        idx = 0
        for r, length in enumerate(self.runs):
            if length and r % 2:
                yield idx, length
            idx += length

    # -- by name ----------------------------------------------------------------------------
    def find(self, digest: bytes) -> int:
        """Data position of some chunk with this digest, or -1: by buffer search for the first
        SET_AFTER lookups, then from a digest -> position dict (`index_names`)."""
        names = self._names
        if names is None:
            with self._mu:
                self._finds += 1
                build = self._finds > SET_AFTER
            if build:
                names = self.index_names()
        if names is not None:
            return names.get(digest, -1)
        return self._scan(digest)

    def index_names(self) -> dict[bytes, int]:
        """The digest -> position dict, built once (a caller that will look up many names builds
        it ahead: at 4 Mi chunks a build costs as much as ~45 buffer searches)."""
        with self._mu:
            if self._names is None:
                self._names = dict(zip(_SLOTS.findall(self.digests), range(self.data_count)))
            return self._names

    def _scan(self, digest: bytes) -> int:
        """One linear search of the digest buffer."""
        start = 0
        while True:
            j = self.digests.find(digest, start)
            if j < 0 or j % DIGEST == 0:
                return j // DIGEST if j >= 0 else -1
            start = j + 1

    def stored_of(self, h: str) -> int | None:
        """Stored size of the chunk named h (0: unknown), None when the table does not hold it."""
        try:
            p = self.find(bytes.fromhex(h))
        except ValueError:
            return None
        return None if p < 0 else self.stored[p]

    # -- expansions (one object per chunk: cli, tests, small volumes) ----------------------
    def names(self) -> set[str]:
        return set(hex_slots(self.digests))

    def entries(self) -> list[str | None]:
        hashes = hex_slots(self.digests)
        if len(self.runs) == 1:
            return list[str | None](hashes)
        out: list[str | None] = []
        pos = 0
        for r, length in enumerate(self.runs):
            if r % 2:
                out.extend(repeat(None, length))
            else:
                out.extend(hashes[pos:pos + length])
                pos += length
        return out

    def sizes(self) -> dict[str, int]:
        """hash -> stored size, the known (non-zero) ones."""
        hashes = hex_slots(self.digests)
        if 0 in self.stored:
            return {h: s for h, s in zip(hashes, self.stored) if s}
        return dict(zip(hashes, self.stored))

    def resized(self, n: int) -> ChunkMap:
        """The same chunks followed by holes up to n chunks."""
        if n == self.n:
            return self
        runs = array(self.runs.typecode, self.runs)
        if len(runs) % 2:
            runs.append(n - self.n)
        else:
            runs[-1] += n - self.n
        return ChunkMap(n, runs, self.digests, self.stored)


class _Packer:
    """Appends runs of data (digests + stored sizes) and holes into a ChunkMap's parts."""

    def __init__(self) -> None:
        self.runs, self.digests, self.stored = [0], list[bytes | memoryview](), array("I")

    def data(self, digests: bytes | memoryview, stored: array[int] | list[int]) -> None:
        if not len(stored):
            return
        if not len(self.runs) % 2:          # the last run is one of holes
            self.runs.append(0)
        self.runs[-1] += len(stored)
        self.digests.append(digests)
        self.stored.extend(stored)

    def holes(self, count: int) -> None:
        if count <= 0:
            return
        if len(self.runs) % 2:
            self.runs.append(0)
        self.runs[-1] += count

    def table(self, n: int) -> ChunkMap:
        return ChunkMap(n, array("I", self.runs), b"".join(self.digests), self.stored)


class _Dense:
    """37 bytes per chunk: digest slots, presence bytes, stored sizes."""

    def __init__(self, n: int):
        self.digests = bytearray(DIGEST * n)
        self.present = bytearray(n)
        self.stored = array("I", bytes(4 * n)) if n else array("I")

    def copy_from(self, m: ChunkMap, n: int) -> None:
        src = memoryview(m.digests)
        for idx, count, pos in m.data_spans():
            count = min(count, n - idx)
            if count <= 0:
                break
            self.digests[DIGEST * idx:DIGEST * (idx + count)] = src[DIGEST * pos:DIGEST * (pos + count)]
            self.present[idx:idx + count] = _ONES[:count] if count <= len(_ONES) else b"\1" * count
            self.stored[idx:idx + count] = m.stored[pos:pos + count]


class ChunkMapBuilder:
    """Mutable chunk table of n chunks that `build()` packs into a ChunkMap. It starts as a base
    table (or all holes) plus the chunks set since, by index; past `dense_after` of those (a
    flush that reads much of the volume) it turns dense (37 bytes per chunk)."""

    def __init__(self, n: int, base: ChunkMap | None = None, dense_after: int = 1 << 16):
        self.n, self.base, self.dense_after = n, base, dense_after
        self.over: dict[int, tuple[bytes | None, int]] = {}
        self._dense: _Dense | None = None

    def _densify(self) -> _Dense:
        if self._dense is None:
            d = self._dense = _Dense(self.n)
            if self.base is not None:
                d.copy_from(self.base, self.n)
            for i, (digest, stored) in self.over.items():
                d.present[i] = digest is not None
                if digest is not None:
                    d.digests[DIGEST * i:DIGEST * (i + 1)], d.stored[i] = digest, stored
            self.base, self.over = None, {}
        return self._dense

    def set(self, i: int, digest: bytes | None, stored: int = 0) -> None:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._dense is None and len(self.over) < self.dense_after:
            self.over[i] = (digest, stored)
            return
        d = self._densify()
        d.present[i] = digest is not None
        if digest is not None:
            d.digests[DIGEST * i:DIGEST * (i + 1)], d.stored[i] = digest, stored

    def _base_at(self, i: int) -> tuple[bytes | None, int]:
        base = self.base
        p = base.position(i) if base is not None else -1
        if base is None or p < 0:
            return None, 0
        return base.digests[DIGEST * p:DIGEST * (p + 1)], base.stored[p]

    def get(self, i: int) -> tuple[bytes | None, int]:
        """(digest or None, stored size) of chunk i."""
        if self._dense is not None:
            d = self._dense
            return (bytes(d.digests[DIGEST * i:DIGEST * (i + 1)]), d.stored[i]) if d.present[i] else (None, 0)
        return self.over[i] if i in self.over else self._base_at(i)

    def has(self, i: int) -> bool:
        return self.get(i)[0] is not None

    def data_count(self) -> int:
        if self._dense is not None:
            return self._dense.present.count(1)
        count = 0
        if self.base is not None:
            count = sum(c for idx, c, _ in self._base_spans(0, self.n))
        for i, (digest, _) in self.over.items():
            count += (digest is not None) - (self._base_at(i)[0] is not None)
        return count

    def _base_spans(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(index, count, data position) of the base's data runs clipped to [a, b)."""
        base = self.base
        if base is None or a >= min(b, base.n):
            return
        end = min(b, base.n)
        starts, dpos = base._index()
        r = bisect_right(starts, a) - 1
        while r < len(base.runs) and starts[r] < end:
            lo, hi = max(a, starts[r]), min(end, starts[r + 1])
            if hi > lo and not r % 2:
                yield lo, hi - lo, dpos[r] + lo - starts[r]
            r += 1

    def _copy_base(self, out: _Packer, a: int, b: int) -> None:
        """Chunks [a, b) as the base has them (holes past its end)."""
        at = a
        if self.base is not None:
            src, stored = memoryview(self.base.digests), self.base.stored
            for idx, count, pos in self._base_spans(a, b):
                out.holes(idx - at)
                out.data(src[DIGEST * pos:DIGEST * (pos + count)], stored[pos:pos + count])
                at = idx + count
        out.holes(b - at)

    def build(self) -> ChunkMap:
        out = _Packer()
        if self._dense is not None:
            d, end = self._dense, 0
            src = memoryview(d.digests)
            for m in _DATA_RUNS.finditer(d.present):
                a, b = m.span()
                out.holes(a - end)
                out.data(src[DIGEST * a:DIGEST * b], d.stored[a:b])
                end = b
            out.holes(self.n - end)
            return out.table(self.n)
        at = 0
        for i in sorted(self.over):
            self._copy_base(out, at, i)
            digest, stored = self.over[i]
            if digest is None:
                out.holes(1)
            else:
                out.data(digest, [stored])
            at = i + 1
        self._copy_base(out, at, self.n)
        return out.table(self.n)


def changed_chunks(base: ChunkMap, target: ChunkMap, block: int = 1024) -> Iterator[int]:
    """Ascending indexes of `target`'s chunks that differ from `base`'s (a hole counts; past the
    base's end, the data chunks). Both are laid out dense and compared a block of chunks at a
    time (C memcmp); only differing blocks are looked at chunk by chunk."""
    n = target.n
    a, b = _Dense(n), _Dense(n)
    a.copy_from(base, n)
    b.copy_from(target, n)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        if a.present[lo:hi] == b.present[lo:hi] and a.digests[DIGEST * lo:DIGEST * hi] == b.digests[DIGEST * lo:DIGEST * hi]:
            continue
        for i in range(lo, hi):
            if a.present[i] != b.present[i] or (
                    b.present[i] and a.digests[DIGEST * i:DIGEST * (i + 1)] != b.digests[DIGEST * i:DIGEST * (i + 1)]):
                yield i
