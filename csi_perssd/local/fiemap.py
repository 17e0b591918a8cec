"""FIEMAP: where a file's data lives on disk, and which ranges of two reflinked files differ.

The rawfile backend tracks changes with reflinks: at each committed generation it keeps a reflink
copy of the volume file (it shares every block with the volume, costs no space). A later write to
the volume is copy-on-write (XFS reflink, btrfs): the written range gets new disk blocks, so the
ranges whose physical mapping differs between the volume and its copy are exactly the ones written
(or discarded) since, the way `thin_delta` answers for LVM thin snapshots.

`extent_diff` is a pure function on the mappings (unit-tested without root); `extents` runs the
ioctl (FIEMAP_FLAG_SYNC: dirty pages are written first, so nothing is still delayed-allocated).
"""
from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from .backend import Extent

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
# physical addresses that do not identify the data (compressed, inline, not yet allocated):
# such a file cannot be compared by mapping
UNCOMPARABLE = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED
                | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL)
_HEAD = struct.Struct("=QQIIII")                # fm_start, fm_length, flags, mapped, count, reserved
_EXT = struct.Struct("=QQQ16xI12x")             # logical, physical, length, (reserved), flags
BATCH = 256


@dataclass(frozen=True)
class Mapping:
    logical: int
    physical: int
    length: int
    unwritten: bool = False

    @property
    def end(self) -> int:
        return self.logical + self.length


class Uncomparable(Exception):
    """The file system does not give stable physical addresses for this file."""


def extents(fd: int) -> list[Mapping]:
    """The file's mapped extents (FIEMAP_FLAG_SYNC), sorted by logical offset.
    OSError when the file system has no FIEMAP; Uncomparable for compressed/inline/delalloc data."""
    out: list[Mapping] = []
    start = 0
    while True:
        req = bytearray(_HEAD.size + BATCH * _EXT.size)
        _HEAD.pack_into(req, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, req, True)
        mapped = _HEAD.unpack_from(req, 0)[3]
        last = False
        for i in range(mapped):
            logical, physical, length, flags = _EXT.unpack_from(req, _HEAD.size + i * _EXT.size)
            if flags & UNCOMPARABLE:
                raise Uncomparable(f"extent at {logical} has flags {flags:#x}")
            out.append(Mapping(logical, physical, length, bool(flags & FIEMAP_EXTENT_UNWRITTEN)))
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if mapped == 0 or last:
            return out
        start = out[-1].end


def file_extents(path: str) -> list[Mapping]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return extents(fd)
    finally:
        os.close(fd)


def _at(maps: list[Mapping], i: int, pos: int) -> tuple[int, Mapping | None]:
    """Advance index i so maps[i] is the first extent ending after pos; the extent covering
    pos (or None: a hole)."""
    while i < len(maps) and maps[i].end <= pos:
        i += 1
    if i < len(maps) and maps[i].logical <= pos:
        return i, maps[i]
    return i, None


def extent_diff(a: list[Mapping], b: list[Mapping], size: int) -> list[Extent]:
    """Byte ranges of [0, size) where mappings `a` and `b` differ: data in only one of them, or
    data at different physical addresses, or written in one and preallocated (unwritten) in the
    other. Sorted and merged. Unwritten in both reads as zeros in both: the same."""
    cuts = {0, size}
    for m in (*a, *b):
        for p in (m.logical, m.end):
            if 0 < p < size:
                cuts.add(p)
    points = sorted(cuts)
    out: list[Extent] = []
    ia = ib = 0
    for lo, hi in zip(points, points[1:]):
        ia, ma = _at(a, ia, lo)
        ib, mb = _at(b, ib, lo)
        if _same(ma, mb, lo):
            continue
        if out and out[-1].end == lo:
            out[-1] = Extent(out[-1].offset, hi - out[-1].offset)
        else:
            out.append(Extent(lo, hi - lo))
    return out


def _same(ma: Mapping | None, mb: Mapping | None, pos: int) -> bool:
    zero_a = ma is None or ma.unwritten
    zero_b = mb is None or mb.unwritten
    if zero_a and zero_b:
        return True
    if ma is None or mb is None or ma.unwritten != mb.unwritten:
        return False
    return ma.physical + (pos - ma.logical) == mb.physical + (pos - mb.logical)


def changed_between(path: str, base_path: str) -> list[Extent]:
    """Ranges of `path` that differ from its reflink copy `base_path` (see the module docstring).
    Raises OSError/Uncomparable when the file system cannot answer."""
    size = max(os.stat(path).st_size, os.stat(base_path).st_size)
    return extent_diff(file_extents(path), file_extents(base_path), size)
