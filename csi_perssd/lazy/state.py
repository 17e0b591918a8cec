"""Hydration state of one lazily staged volume: two bitmaps over its chunks.

present[i]  chunk i is in the local volume (fetched, filled by a write, or a hole from the start)
dirty[i]    chunk i was written on this node (it differs from the manifest's entry)

Invariants kept by volume.py (what makes a crash safe):
- a present bit is persisted only after the chunk's data was fsync'd (data first, then state);
- a dirty bit is persisted *before* the write that sets it reaches the local volume (write-ahead),
  so a flush after any crash reads every chunk that may differ from the manifest.

Stored as JSON (bitmaps base64) with write_atomic: a crash leaves the old or the new state.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

from ..atomic import write_atomic
from ..local.backend import Extent
from ..remote.chunks import chunk_count, chunk_span
from ..remote.manifest import Manifest

VERSION = 1


class StateError(ValueError):
    """The state file is missing, malformed or for another volume layout."""


def _get(bits: bytearray, i: int) -> bool:
    return bool(bits[i >> 3] & (1 << (i & 7)))


def _set(bits: bytearray, i: int) -> None:
    bits[i >> 3] |= 1 << (i & 7)


@dataclass
class HydrationState:
    size: int                       # volume size the bitmaps cover (chunks beyond: present)
    chunk_size: int
    generation: int                 # the manifest's generation the volume was staged from
    present: bytearray
    dirty: bytearray
    on_demand: int = 0              # chunks fetched because a read or write needed them
    background: int = 0             # chunks fetched by the background hydrator

    @classmethod
    def for_manifest(cls, m: Manifest) -> HydrationState:
        """A fresh state: holes are present from the start (the new local volume reads zeros)."""
        n = chunk_count(m.volume_size, m.chunk_size)
        st = cls(m.volume_size, m.chunk_size, m.generation, bytearray((n + 7) // 8), bytearray((n + 7) // 8))
        for first, count in m.hole_spans():
            for i in range(first, first + count):
                _set(st.present, i)
        return st

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def is_present(self, i: int) -> bool:
        return i >= self.chunks or _get(self.present, i)

    def is_dirty(self, i: int) -> bool:
        return i < self.chunks and _get(self.dirty, i)

    def mark_present(self, i: int) -> None:
        if i < self.chunks:
            _set(self.present, i)

    def mark_dirty(self, i: int) -> None:
        if i < self.chunks:
            _set(self.dirty, i)

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if not _get(self.present, i)]

    @property
    def missing_count(self) -> int:
        return self.chunks - int.from_bytes(self.present, "little").bit_count()    # one C call: asked per read

    @property
    def complete(self) -> bool:
        return self.missing_count == 0

    def dirty_extents(self) -> list[Extent]:
        """Byte ranges of the chunks written on this node (merged), for a "changed" flush."""
        out: list[Extent] = []
        for i in range(self.chunks):
            if _get(self.dirty, i):
                off, length = chunk_span(i, self.size, self.chunk_size)
                if out and out[-1].end == off:
                    out[-1] = Extent(out[-1].offset, out[-1].length + length)
                else:
                    out.append(Extent(off, length))
        return out

    # -- persistence ------------------------------------------------------------------------
    def encode(self) -> bytes:
        doc = {"v": VERSION, "size": self.size, "chunk_size": self.chunk_size,
               "generation": self.generation, "on_demand": self.on_demand,
               "background": self.background,
               "present": base64.b64encode(bytes(self.present)).decode(),
               "dirty": base64.b64encode(bytes(self.dirty)).decode()}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> HydrationState:
        try:
            d = json.loads(data)
            if d.get("v") != VERSION:
                raise StateError(f"hydration state version {d.get('v')!r}")
            size, cs = int(d["size"]), int(d["chunk_size"])
            nbytes = (chunk_count(size, cs) + 7) // 8
            present = bytearray(base64.b64decode(d["present"], validate=True))
            dirty = bytearray(base64.b64decode(d["dirty"], validate=True))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"malformed hydration state: {e}") from None
        if len(present) != nbytes or len(dirty) != nbytes or size <= 0 or cs <= 0:
            raise StateError("hydration state bitmaps do not match the volume size")
        return cls(size, cs, int(d.get("generation", 0)), present, dirty,
                   int(d.get("on_demand", 0)), int(d.get("background", 0)))

    def save(self, path: str) -> None:
        write_atomic(path, self.encode())

    @classmethod
    def load(cls, path: str) -> HydrationState:
        try:
            with open(path, "rb") as f:
                return cls.decode(f.read())
        except FileNotFoundError:
            raise StateError(f"no hydration state at {path}") from None

    def copy(self) -> HydrationState:
        return HydrationState(self.size, self.chunk_size, self.generation, bytearray(self.present),
                              bytearray(self.dirty), self.on_demand, self.background)


def exists(path: str) -> bool:
    return os.path.isfile(path)
