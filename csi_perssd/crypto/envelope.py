"""Sealed objects: chunks, and metadata (manifests, allocation maps) with a public header.

Chunk object:  0x10 | nonce (12) | AES-256-GCM(chunk key, inner blob) | tag (16)
               associated data: "csi-perssd/chunk/v1\\0" + lineage + "\\0" + chunk name
               The inner blob is the compressed chunk (remote/chunks.py: a format tag and the
               payload). Binding the name means an object moved to another name, or copied from
               another lineage, fails to open.
Metadata:      b"PERSSD-SEALED\\n" | header length (u32 big-endian) | header (JSON) |
               nonce (12) | AES-256-GCM(meta key, body) | tag (16)
               associated data: the magic, the length and the header, so the header is as
               authentic as the body. The header is public on purpose: {"v", "kind", "lineage",
               "refs": sorted chunk names the body references, plus small numbers such as
               volume_size and chunk_size (also in the catalog record)} — garbage collection
               and snapshot pinning read it without keys; positions and content stay sealed.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import aead
from .errors import Tampered
from .keys import LineageKeys, check_lineage

CHUNK_FORMAT = 0x10
_CHUNK_TAG = bytes((CHUNK_FORMAT,))
_CHUNK_AAD = b"csi-perssd/chunk/v1\0"
META_MAGIC = b"PERSSD-SEALED\n"
META_VERSION = 1
MAX_HEADER = 64 << 20           # 1M chunk names (a 4 PiB volume at 4 MiB chunks)
_NAME_RE = re.compile(r"[0-9a-f]{64}")
_KIND_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


def chunk_aad(lineage: str, name: str) -> bytes:
    return _CHUNK_AAD + lineage.encode() + b"\0" + name.encode()


def seal_chunk(keys: LineageKeys, name: str, parts: Sequence[aead.Buffer]) -> bytes:
    """The stored object of chunk `name` whose inner blob is the concatenation of `parts`
    (`bytes`, like a plain blob: the store client then sends both kinds the same way)."""
    return aead.seal_bytes(keys.chunk_key, chunk_aad(keys.lineage, name), parts, prefix=_CHUNK_TAG)


def chunk_open_size(blob_len: int) -> int:
    """Bytes of the `out` buffer open_chunk() needs for a sealed chunk of `blob_len` bytes."""
    return aead.open_size(blob_len, start=1)


def is_sealed_chunk(blob: aead.Buffer) -> bool:
    return len(blob) > 0 and blob[0] == CHUNK_FORMAT


def open_chunk(keys: LineageKeys, name: str, blob: aead.Buffer,
               out: bytearray | memoryview | None = None) -> memoryview:
    """The inner (compressed) blob of a sealed chunk; Tampered if it is not sealed, truncated,
    modified, stored under another name or sealed by another lineage. `out`: see aead.open_
    (at least chunk_open_size(len(blob)) bytes)."""
    if not is_sealed_chunk(blob):
        raise Tampered("chunk object is not encrypted, but its volume is")
    try:
        return aead.open_(keys.chunk_key, chunk_aad(keys.lineage, name), blob, start=1, out=out)
    except Tampered as e:
        raise Tampered(f"encrypted chunk {e}") from None


@dataclass(frozen=True)
class MetaHeader:
    kind: str                               # "manifest", "allocation-map", ...
    lineage: str
    refs: tuple[str, ...] = ()              # sorted, distinct chunk names
    numbers: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc = {"v": META_VERSION, "kind": self.kind, "lineage": self.lineage,
               "refs": list(self.refs), **{f"n_{k}": v for k, v in sorted(self.numbers.items())}}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> MetaHeader:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Tampered("sealed object header is not JSON") from None
        if not isinstance(doc, dict) or doc.get("v") != META_VERSION:
            raise Tampered("sealed object header: unknown version")
        kind, refs = doc.get("kind"), doc.get("refs")
        if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None:
            raise Tampered("sealed object header: bad kind")
        if not isinstance(refs, list) or not all(isinstance(r, str) and _NAME_RE.fullmatch(r) for r in refs):
            raise Tampered("sealed object header: bad chunk names")
        if refs != sorted(set(refs)):
            raise Tampered("sealed object header: chunk names not sorted and distinct")
        numbers = {}
        for k, v in doc.items():
            if k.startswith("n_"):
                if type(v) is not int or v < 0:
                    raise Tampered(f"sealed object header: bad {k[2:]}")
                numbers[k[2:]] = v
        return cls(kind, check_lineage(doc.get("lineage")), tuple(refs), numbers)


def is_sealed_meta(data: aead.Buffer) -> bool:
    return bytes(memoryview(data)[:len(META_MAGIC)]) == META_MAGIC


def _split(data: aead.Buffer) -> tuple[bytes, MetaHeader, int]:
    mv = memoryview(data).cast("B")
    if not is_sealed_meta(mv):
        raise Tampered("not a sealed csi-perssd object")
    at = len(META_MAGIC)
    if len(mv) < at + 4:
        raise Tampered("sealed object is truncated")
    (n,) = struct.unpack(">I", mv[at:at + 4])
    if n > MAX_HEADER or len(mv) < at + 4 + n + aead.OVERHEAD:
        raise Tampered("sealed object is truncated or its header too large")
    raw = bytes(mv[at + 4:at + 4 + n])
    return bytes(mv[:at + 4 + n]), MetaHeader.parse(raw), at + 4 + n


def read_header(data: aead.Buffer) -> MetaHeader:
    """The public header, without keys. Not authenticated until open_meta succeeds."""
    return _split(data)[1]


def seal_meta(keys: LineageKeys, header: MetaHeader, body: aead.Buffer) -> bytes:
    if header.lineage != keys.lineage:
        raise ValueError("header names another lineage")
    raw = header.encode()
    prefix = META_MAGIC + struct.pack(">I", len(raw)) + raw
    return bytes(aead.seal(keys.meta_key, prefix, [body], prefix=prefix))


def open_meta(keys: LineageKeys, kind: str, data: aead.Buffer) -> tuple[MetaHeader, memoryview]:
    """(header, body) of a sealed object of `kind` sealed by this lineage; Tampered otherwise."""
    aad, header, start = _split(data)
    if header.kind != kind:
        raise Tampered(f"sealed object holds a {header.kind}, not a {kind}")
    if header.lineage != keys.lineage:
        raise Tampered(f"sealed {kind} belongs to lineage {header.lineage}, not {keys.lineage}")
    try:
        return header, aead.open_(keys.meta_key, aad, data, start=start)
    except Tampered as e:
        raise Tampered(f"sealed {kind}: {e}") from None
