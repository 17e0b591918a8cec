"""Manifest of one generation of a volume: which chunk holds each chunk-sized slice.

`entries[i]` is the BLAKE3 hex hash of chunk i (bytes [i*chunk_size, (i+1)*chunk_size) clipped to
volume_size), or None for a hole (all zeros, never stored). The list is dense: its length is
always ceil(volume_size / chunk_size). `sizes` maps each referenced hash to the size of its
stored (compressed) object, for accounting.

In memory a decoded or flushed manifest is compact (chunkmap.ChunkMap: run lengths, raw digests,
u32 sizes; 36 bytes per data chunk, three objects): `entries` and `sizes` are built only when
read. The hot paths use the compact views instead (hash_at, data_items, data_spans, hole_spans,
stored_size, chunk_map): a 16 TiB manifest (4 Mi chunks) encodes and decodes in well under 2 s.

Wire format: binary (schema 2, manifest_wire.py: raw digests, run-length holes, 36 bytes per
data chunk) since issue 13; `decode` still reads schema 1, a one-line magic b"PERSSD-MANIFEST\\n"
followed by a zstd frame holding JSON
    {"schema": 1, "volume_size", "chunk_size", "generation", "parent", "created_at",
     "stats": {...}, "chunks": [hash | null, ...], "sizes": {hash: int}}
`decode` validates everything (schema, sizes, hex-only hashes, bounded output) so a hostile
manifest in the bucket can never produce an odd object key or a write outside the volume.

Every generation is a whole manifest, not a delta against its parent: at 36 bytes per data chunk
a flush of a 16 TiB volume writes 144 MiB of manifest (one PUT, ~1 s at the bench's speeds) next
to at least one changed chunk, GC reads each manifest once (its cache is keyed by key and ETag),
and hydrate, snapshot pinning and GC never have to chain generations (no delta whose base GC may
prune). A delta (runs of changed indexes + digests on top of the parent) would pay off only
above ~100 TiB volumes or flushes every few seconds; not built.
"""
from __future__ import annotations

import json
import math
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import zstandard

from . import manifest_wire
from .chunkmap import DIGEST, ChunkMap, u32_all_le, u32_bytes
from .chunks import check_chunk_size, check_hash, chunk_count, chunk_span

SCHEMA = 1                           # the JSON form; the binary form is schema 2 (manifest_wire.py)
MAGIC = b"PERSSD-MANIFEST\n"
MAX_VOLUME_SIZE = 1 << 50            # 1 PiB
# Decoded JSON limit (schema 1, ~67 bytes per chunk: a 1 TiB volume at 4 MiB chunks is ~17 MiB of
# JSON, so this holds ~8 Mi chunks = 32 TiB at 4 MiB). The binary form needs 36 bytes per chunk.
MAX_JSON = 512 << 20
MAX_CHUNKS = 32 << 20                # 32 Mi chunks: 128 TiB at 4 MiB, a 1.2 GiB binary manifest


class ManifestError(ValueError):
    """A manifest is malformed or inconsistent."""


@dataclass
class Manifest:
    volume_size: int
    chunk_size: int
    entries: list[str | None]
    generation: int = 0
    parent: int | None = None
    created_at: float = field(default_factory=time.time)
    sizes: dict[str, int] = field(default_factory=dict)     # hash -> stored object size
    stats: dict[str, Any] = field(default_factory=dict)     # free-form numbers (FlushStats)

    @classmethod
    def empty(cls, volume_size: int, chunk_size: int, **kw: Any) -> Manifest:
        """An all-hole manifest (a new volume that was never written)."""
        return cls(volume_size, chunk_size, [None] * chunk_count(volume_size, chunk_size), **kw)

    def __post_init__(self) -> None:
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A compact manifest (decoded, or built by a flush) builds `entries` and `sizes` (4 Mi
        strings for 16 TiB) only when something reads them; from then on the lists are the
        manifest (a caller may change them), so encode() and the views use them."""
        cm = self.__dict__.get("_map")
        if name not in ("entries", "sizes") or cm is None:
            raise AttributeError(name)
        self.__dict__["entries"], self.__dict__["sizes"] = cm.entries(), cm.sizes()
        return self.__dict__[name]

    @classmethod
    def from_map(cls, volume_size: int, chunk_size: int, cmap: ChunkMap, *, generation: int = 0,
                 parent: int | None = None, created_at: float | None = None,
                 stats: dict[str, Any] | None = None) -> Manifest:
        """A manifest over a compact chunk table (no per-chunk objects); validated like any."""
        m = cls.__new__(cls)
        m.volume_size, m.chunk_size, m.generation, m.parent = volume_size, chunk_size, generation, parent
        m.created_at = time.time() if created_at is None else created_at
        m.stats = {} if stats is None else stats
        m._validate_scalars()
        want = chunk_count(volume_size, chunk_size)
        if cmap.n != want or sum(cmap.runs) != want or sum(cmap.runs[0::2]) != cmap.data_count \
                or len(cmap.stored) != cmap.data_count or len(cmap.digests) % DIGEST:
            raise ManifestError(f"chunk table of {cmap.n} chunks for a {volume_size}-byte volume with "
                                f"{chunk_size}-byte chunks (want {want})")
        if not u32_all_le(cmap.stored, chunk_size + (64 << 10)):
            raise ManifestError(f"bad stored size {max(cmap.stored)}")
        m.__dict__["_map"] = cmap
        return m

    def _compact(self) -> ChunkMap | None:
        """The chunk table of a compact manifest whose entry list nobody has built."""
        return self.__dict__.get("_map") if "entries" not in self.__dict__ else None

    def chunk_map(self) -> ChunkMap:
        """The compact chunk table (built from the lists of a manifest that holds lists)."""
        cm = self._compact()
        if cm is not None:
            return cm
        raw = self.validate()
        data = [h for h in self.entries if h is not None]
        stored = array("I", map(self.sizes.get, data, repeat(0)) if self.sizes else bytes(4 * len(data)))
        return ChunkMap(len(self.entries), array("I", manifest_wire.runs_of(self.entries)), raw, stored)

    def validate(self) -> bytes:
        """Check every field; return the data entries' raw digests (what the binary form stores).
        Whole-list checks, not a regex per entry: 4 Mi entries take well under a second."""
        self._validate_scalars()
        if not isinstance(self.entries, list):
            raise ManifestError("entries must be a list")
        want = chunk_count(self.volume_size, self.chunk_size)
        if len(self.entries) != want:
            raise ManifestError(f"{len(self.entries)} entries for a {self.volume_size}-byte "
                                f"volume with {self.chunk_size}-byte chunks (want {want})")
        raw = hex_digests([h for h in self.entries if h is not None])
        if not isinstance(self.sizes, dict):
            raise ManifestError("sizes and stats must be objects")
        hex_digests(list(self.sizes))
        values = list(self.sizes.values())
        if values and (set(map(type, values)) != {int} or min(values) <= 0
                       or max(values) > self.chunk_size + (64 << 10)):
            bad = next((n for n in values if type(n) is not int or not 0 < n <= self.chunk_size + (64 << 10)), None)
            raise ManifestError(f"bad stored size {bad!r}")
        return raw

    def _validate_scalars(self) -> None:
        if type(self.volume_size) is not int or not 0 < self.volume_size <= MAX_VOLUME_SIZE:
            raise ManifestError(f"bad volume size {self.volume_size!r}")
        try:
            check_chunk_size(self.chunk_size)
        except ValueError as e:
            raise ManifestError(str(e)) from None
        if chunk_count(self.volume_size, self.chunk_size) > MAX_CHUNKS:
            raise ManifestError(f"{self.volume_size}-byte volume in {self.chunk_size}-byte chunks: more than "
                                f"{MAX_CHUNKS} chunks (use larger chunks)")
        if type(self.generation) is not int or self.generation < 0:
            raise ManifestError(f"bad generation {self.generation!r}")
        if self.parent is not None and (type(self.parent) is not int or self.parent < 0):
            raise ManifestError(f"bad parent generation {self.parent!r}")
        if not isinstance(self.created_at, (int, float)) or not math.isfinite(self.created_at):
            raise ManifestError("bad created_at")
        if not isinstance(self.stats, dict):
            raise ManifestError("sizes and stats must be objects")

    # -- views ------------------------------------------------------------------------------
    @property
    def chunk_count(self) -> int:
        return chunk_count(self.volume_size, self.chunk_size)

    def items(self) -> Iterator[tuple[int, int, int, str | None]]:
        """(index, offset, length, hash-or-None) for every chunk in order."""
        for i, h in enumerate(self.entries):
            off, length = chunk_span(i, self.volume_size, self.chunk_size)
            yield i, off, length, h

    def hash_at(self, i: int) -> str | None:
        """The hash of chunk i, None for a hole or past the end (no entry list is built)."""
        cm = self._compact()
        if cm is None:
            return self.entries[i] if 0 <= i < len(self.entries) else None
        d = cm.digest_at(i)
        return None if d is None else d.hex()

    def data_items(self) -> Iterator[tuple[int, str]]:
        """(index, hash) of every data chunk in order (one str per data chunk, no list)."""
        cm = self._compact()
        if cm is None:
            yield from ((i, h) for i, h in enumerate(self.entries) if h is not None)
            return
        for idx, count, pos in cm.data_spans():
            hexed, w = cm.digests[DIGEST * pos:DIGEST * (pos + count)].hex(), 2 * DIGEST
            yield from zip(range(idx, idx + count), map(hexed.__getitem__, map(slice, range(0, w * count, w),
                                                                                  range(w, w * (count + 1), w))))

    def data_spans(self) -> list[tuple[int, int]]:
        """(first index, count) of every run of data chunks."""
        return [(idx, count) for idx, count, _ in self.chunk_map().data_spans()]

    def hole_spans(self) -> list[tuple[int, int]]:
        """(first index, count) of every run of holes."""
        return list(self.chunk_map().hole_spans())

    def referenced_hashes(self) -> set[str]:
        cm = self._compact()
        if cm is not None:
            return cm.names()
        return {h for h in self.entries if h is not None}

    def stored_size(self, h: str) -> int | None:
        """Stored size of chunk h if this manifest references it (0: unknown), else None."""
        cm = self._compact()
        if cm is not None:
            return cm.stored_of(h)
        return self.sizes.get(h, 0) if h in self.referenced_hashes() else None

    @property
    def data_chunks(self) -> int:
        cm = self._compact()
        if cm is not None:
            return cm.data_count
        return len(self.entries) - self.entries.count(None)

    @property
    def hole_chunks(self) -> int:
        return self.chunk_count - self.data_chunks

    @property
    def logical_bytes(self) -> int:
        """Bytes of the volume covered by data chunks (holes excluded)."""
        n = self.chunk_count
        short = self.chunk_size - chunk_span(n - 1, self.volume_size, self.chunk_size)[1]
        return self.data_chunks * self.chunk_size - (short if self.hash_at(n - 1) is not None else 0)

    @property
    def stored_bytes(self) -> int:
        """Bytes this generation's distinct chunks take in the store (0 for unknown sizes)."""
        cm = self._compact()
        if cm is not None:
            return sum(cm.sizes().values())
        return sum(self.sizes.get(h, 0) for h in self.referenced_hashes())

    def resize(self, new_size: int) -> Manifest:
        """The same content in a larger volume (restore to a bigger size): new chunks are holes.
        A short last chunk stays as it is; the bytes after it read as zeros."""
        if new_size < self.volume_size:
            raise ManifestError(f"cannot shrink a manifest from {self.volume_size} to {new_size}")
        n = chunk_count(new_size, self.chunk_size)
        cm = self._compact()
        if cm is not None:
            return Manifest.from_map(new_size, self.chunk_size, cm.resized(n), generation=self.generation,
                                     parent=self.parent, created_at=self.created_at, stats=dict(self.stats))
        return Manifest(new_size, self.chunk_size, self.entries + [None] * (n - len(self.entries)),
                        generation=self.generation, parent=self.parent,
                        created_at=self.created_at, sizes=dict(self.sizes),
                        stats=dict(self.stats))

    # -- wire format ------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The binary form (manifest_wire.py): 36 bytes per data chunk, 4 per run of holes."""
        header = {"volume_size": self.volume_size, "chunk_size": self.chunk_size, "generation": self.generation,
                  "parent": self.parent, "created_at": self.created_at, "stats": self.stats}
        cm = self._compact()
        if cm is not None:                      # the chunk table as it is: nothing per chunk
            self._validate_scalars()
            return manifest_wire.encode_raw(header, cm.runs, cm.digests, u32_bytes(cm.stored))
        raw = self.validate()
        return manifest_wire.encode(header, self.entries, raw, self.sizes)

    def encode_json(self) -> bytes:
        """The schema-1 form (zstd JSON, hex hashes): what drivers before the binary form read."""
        self.validate()
        refs = self.referenced_hashes()
        doc = {
            "schema": SCHEMA,
            "volume_size": self.volume_size,
            "chunk_size": self.chunk_size,
            "generation": self.generation,
            "parent": self.parent,
            "created_at": self.created_at,
            "stats": self.stats,
            "chunks": self.entries,
            "sizes": {h: n for h, n in sorted(self.sizes.items()) if h in refs},
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return MAGIC + zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        if data.startswith(manifest_wire.MAGIC2):
            return cls._decode_binary(data)
        if not data.startswith(MAGIC):
            raise ManifestError("not a csi-perssd manifest")
        return cls._decode_json(data)

    @classmethod
    def _decode_binary(cls, data: bytes) -> Manifest:
        def n_chunks(doc: dict[str, Any]) -> int:
            probe = cls.__new__(cls)
            probe.volume_size, probe.chunk_size = doc.get("volume_size", 0), doc.get("chunk_size", 0)
            probe.generation, probe.parent = doc.get("generation", 0), doc.get("parent")
            probe.created_at, probe.stats = doc.get("created_at", 0.0), doc.get("stats", {})
            probe._validate_scalars()
            return chunk_count(probe.volume_size, probe.chunk_size)
        try:
            doc, wire = manifest_wire.decode(
                data, n_chunks, lambda d: d["chunk_size"] + (64 << 10))
        except manifest_wire.WireError as e:
            raise ManifestError(str(e)) from None
        m = cls.__new__(cls)       # hashes come from raw digests: valid by construction
        m.volume_size, m.chunk_size = doc["volume_size"], doc["chunk_size"]
        m.generation, m.parent = doc.get("generation", 0), doc.get("parent")
        m.created_at, m.stats = doc.get("created_at", 0.0), doc.get("stats", {})
        m.__dict__["_map"] = ChunkMap(chunk_count(m.volume_size, m.chunk_size), *wire)
        return m

    @classmethod
    def _decode_json(cls, data: bytes) -> Manifest:
        body = memoryview(data)[len(MAGIC):]
        try:
            declared = zstandard.get_frame_parameters(body).content_size
            if not 0 < declared <= MAX_JSON:
                raise ManifestError(f"manifest declares {declared} bytes")
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_JSON)
            doc = json.loads(raw)
        except (zstandard.ZstdError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"undecodable manifest: {e}") from None
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not an object")
        if doc.get("schema") != SCHEMA:
            raise ManifestError(f"unsupported manifest schema {doc.get('schema')!r}")
        try:
            m = cls(volume_size=doc["volume_size"], chunk_size=doc["chunk_size"],
                    entries=doc["chunks"], generation=doc.get("generation", 0),
                    parent=doc.get("parent"), created_at=doc.get("created_at", 0.0),
                    sizes=doc.get("sizes", {}), stats=doc.get("stats", {}))
            # held compact like a binary one (its users look chunks up by index and by name)
            return cls.from_map(m.volume_size, m.chunk_size, m.chunk_map(), generation=m.generation,
                                parent=m.parent, created_at=m.created_at, stats=m.stats)
        except KeyError as e:
            raise ManifestError(f"manifest misses field {e}") from None
        except TypeError as e:
            raise ManifestError(f"malformed manifest: {e}") from None


def hex_digests(hashes: list[Any]) -> bytes:
    """The raw digests of a list of lowercase hex BLAKE3 hashes; ManifestError on anything else."""
    if not hashes:
        return b""
    if set(map(type, hashes)) != {str} or set(map(len, hashes)) != {64}:
        bad = next(h for h in hashes if not isinstance(h, str) or len(h) != 64)
        raise ManifestError(f"not a chunk hash: {str(bad)[:80]!r}")
    joined = "".join(hashes)
    try:
        if any(c in joined for c in "ABCDEF"):
            raise ValueError("upper case")
        raw = bytes.fromhex(joined)
        if len(raw) != 32 * len(hashes):
            raise ValueError("whitespace")
    except ValueError:
        bad = next((h for h in hashes if not _is_hash(h)), hashes[0])
        raise ManifestError(f"not a chunk hash: {str(bad)[:80]!r}") from None
    return raw


def _is_hash(h: str) -> bool:
    try:
        check_hash(h)
        return True
    except ValueError:
        return False
