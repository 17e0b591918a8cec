"""Manifest of one generation of a volume: which chunk holds each chunk-sized slice.

`entries[i]` is the BLAKE3 hex hash of chunk i (bytes [i*chunk_size, (i+1)*chunk_size) clipped to
volume_size), or None for a hole (all zeros, never stored). The list is dense: its length is
always ceil(volume_size / chunk_size). `sizes` maps each referenced hash to the size of its
stored (compressed) object, for accounting.

Wire format: a one-line magic b"PERSSD-MANIFEST\\n" followed by a zstd frame holding JSON
    {"schema": 1, "volume_size", "chunk_size", "generation", "parent", "created_at",
     "stats": {...}, "chunks": [hash | null, ...], "sizes": {hash: int}}
`decode` validates everything (schema, sizes, hex-only hashes, bounded output) so a hostile
manifest in the bucket can never produce an odd object key or a write outside the volume.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .chunks import check_chunk_size, check_hash, chunk_count, chunk_span

SCHEMA = 1
MAGIC = b"PERSSD-MANIFEST\n"
MAX_VOLUME_SIZE = 1 << 50            # 1 PiB
MAX_ENCODED = 512 << 20             # decoded JSON limit (a 1 PiB volume at 4 MiB is ~20 MiB)


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

    def validate(self) -> None:
        if type(self.volume_size) is not int or not 0 < self.volume_size <= MAX_VOLUME_SIZE:
            raise ManifestError(f"bad volume size {self.volume_size!r}")
        try:
            check_chunk_size(self.chunk_size)
        except ValueError as e:
            raise ManifestError(str(e)) from None
        if not isinstance(self.entries, list):
            raise ManifestError("entries must be a list")
        want = chunk_count(self.volume_size, self.chunk_size)
        if len(self.entries) != want:
            raise ManifestError(f"{len(self.entries)} entries for a {self.volume_size}-byte "
                                f"volume with {self.chunk_size}-byte chunks (want {want})")
        for h in self.entries:
            if h is not None:
                try:
                    check_hash(h)
                except ValueError as e:
                    raise ManifestError(str(e)) from None
        if type(self.generation) is not int or self.generation < 0:
            raise ManifestError(f"bad generation {self.generation!r}")
        if self.parent is not None and (type(self.parent) is not int or self.parent < 0):
            raise ManifestError(f"bad parent generation {self.parent!r}")
        if not isinstance(self.created_at, (int, float)) or not math.isfinite(self.created_at):
            raise ManifestError("bad created_at")
        if not isinstance(self.sizes, dict) or not isinstance(self.stats, dict):
            raise ManifestError("sizes and stats must be objects")
        for h, n in self.sizes.items():
            try:
                check_hash(h)
            except ValueError as e:
                raise ManifestError(str(e)) from None
            if type(n) is not int or not 0 < n <= self.chunk_size + (64 << 10):
                raise ManifestError(f"bad stored size {n!r} for chunk {h}")

    # -- views ------------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[int, int, int, str | None]]:
        """(index, offset, length, hash-or-None) for every chunk in order."""
        for i, h in enumerate(self.entries):
            off, length = chunk_span(i, self.volume_size, self.chunk_size)
            yield i, off, length, h

    def referenced_hashes(self) -> set[str]:
        return {h for h in self.entries if h is not None}

    @property
    def data_chunks(self) -> int:
        return sum(1 for h in self.entries if h is not None)

    @property
    def hole_chunks(self) -> int:
        return len(self.entries) - self.data_chunks

    @property
    def logical_bytes(self) -> int:
        """Bytes of the volume covered by data chunks (holes excluded)."""
        return sum(length for _, _, length, h in self.items() if h is not None)

    @property
    def stored_bytes(self) -> int:
        """Bytes this generation's distinct chunks take in the store (0 for unknown sizes)."""
        return sum(self.sizes.get(h, 0) for h in self.referenced_hashes())

    def resize(self, new_size: int) -> Manifest:
        """The same content in a larger volume (restore to a bigger size): new chunks are holes.
        A short last chunk stays as it is; the bytes after it read as zeros."""
        if new_size < self.volume_size:
            raise ManifestError(f"cannot shrink a manifest from {self.volume_size} to {new_size}")
        n = chunk_count(new_size, self.chunk_size)
        return Manifest(new_size, self.chunk_size, self.entries + [None] * (n - len(self.entries)),
                        generation=self.generation, parent=self.parent,
                        created_at=self.created_at, sizes=dict(self.sizes),
                        stats=dict(self.stats))

    # -- wire format ------------------------------------------------------------------------
    def encode(self) -> bytes:
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
        if not data.startswith(MAGIC):
            raise ManifestError("not a csi-perssd manifest")
        body = memoryview(data)[len(MAGIC):]
        try:
            declared = zstandard.get_frame_parameters(body).content_size
            if not 0 < declared <= MAX_ENCODED:
                raise ManifestError(f"manifest declares {declared} bytes")
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_ENCODED)
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
            return cls(volume_size=doc["volume_size"], chunk_size=doc["chunk_size"],
                       entries=doc["chunks"], generation=doc.get("generation", 0),
                       parent=doc.get("parent"), created_at=doc.get("created_at", 0.0),
                       sizes=doc.get("sizes", {}), stats=doc.get("stats", {}))
        except KeyError as e:
            raise ManifestError(f"manifest misses field {e}") from None
        except TypeError as e:
            raise ManifestError(f"malformed manifest: {e}") from None
