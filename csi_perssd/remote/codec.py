"""How a volume's chunks and manifests become stored objects: plain, or sealed by its lineage.

`Codec(None)` (PLAIN) is the unencrypted format: chunk names are BLAKE3 of the plaintext, blobs
are chunks.compress(), manifests Manifest.encode(). `Codec(keys)` (an encrypted lineage): names
are keyed BLAKE3, blobs are compressed then sealed (crypto/envelope.py), manifests sealed with a
public header listing the chunk names they reference. Both kinds live in one bucket under the
same keys (chunks/<h0h1>/<name>, volumes/<vid>/gen/<n>.manifest), so garbage collection treats
them alike: `manifest_refs` reads the names either kind references without any key.

Each decoder refuses the other kind: an encrypted volume never accepts a plaintext object (an
attacker with write access cannot downgrade it), a plain volume never sees sealed bytes as data.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..crypto import envelope
from ..crypto.errors import Tampered
from ..crypto.keys import LineageKeys
from ..errors import Code, CsiError
from .chunks import CorruptBlob, chunk_hash, compress, compress_parts, decompress
from .manifest import Manifest, ManifestError, hex_digests

Buffer = bytes | bytearray | memoryview
MANIFEST_KIND = "manifest"


@dataclass(frozen=True, repr=False)
class Codec:
    keys: LineageKeys | None = None

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    @property
    def lineage(self) -> str:
        return self.keys.lineage if self.keys is not None else ""

    def __repr__(self) -> str:
        return f"Codec(lineage={self.lineage or 'plain'})"

    # -- chunks ----------------------------------------------------------------------------
    def name(self, buf: Buffer) -> str:
        """The chunk's object name (64 hex): BLAKE3, keyed by the lineage when encrypted."""
        return chunk_hash(buf) if self.keys is None else self.keys.chunk_name(buf)

    def encode(self, name: str, buf: Buffer, level: int) -> bytes | bytearray:
        """The stored object of a chunk: compressed, then sealed when encrypted."""
        if self.keys is None:
            return compress(buf, level)[0]
        parts, _ = compress_parts(buf, level)
        return envelope.seal_chunk(self.keys, name, parts)

    def decode(self, name: str, blob: Buffer, max_size: int,
               out: bytearray | memoryview | None = None) -> bytes | memoryview:
        """The plaintext of a stored chunk; CorruptBlob when it cannot be opened or decoded.
        The caller checks the plaintext against `name` (name()). `out`: a reusable buffer an
        encrypted chunk is opened into (unused when too small, and by plain chunks); the result
        may then be a view of it, valid until `out` is reused."""
        if self.keys is None:
            if envelope.is_sealed_chunk(blob):
                raise CorruptBlob("chunk object is encrypted, but its volume is not")
            return decompress(blob, max_size=max_size)
        if out is not None and len(out) < envelope.chunk_open_size(len(blob)):
            out = None
        try:
            inner = envelope.open_chunk(self.keys, name, blob, out=out)
        except Tampered as e:
            raise CorruptBlob(str(e)) from None
        return decompress(inner, max_size=max_size)

    # -- manifests -------------------------------------------------------------------------
    def encode_manifest(self, m: Manifest, kind: str = MANIFEST_KIND) -> bytes:
        raw = m.encode()
        if self.keys is None:
            return raw
        header = envelope.MetaHeader(kind, self.keys.lineage, tuple(sorted(m.referenced_hashes())),
                                     {"volume_size": m.volume_size, "chunk_size": m.chunk_size})
        return envelope.seal_meta(self.keys, header, raw)

    def decode_manifest(self, data: Buffer, kind: str = MANIFEST_KIND) -> Manifest:
        """ManifestError when malformed, of the other kind, or failing authentication."""
        sealed = envelope.is_sealed_meta(data)
        if self.keys is None:
            if sealed:
                raise ManifestError("manifest is encrypted, but its volume is not")
            return Manifest.decode(bytes(data))
        if not sealed:
            raise ManifestError("manifest is not encrypted, but its volume is")
        try:
            header, body = envelope.open_meta(self.keys, kind, data)
        except Tampered as e:
            raise ManifestError(str(e)) from None
        m = Manifest.decode(bytes(body))
        if set(header.refs) != m.referenced_hashes():
            raise ManifestError("sealed manifest: public chunk list differs from its content")
        return m

    def open_manifest(self, data: Buffer, what: str, kind: str = MANIFEST_KIND) -> Manifest:
        """decode_manifest with a bad manifest as DATA_LOSS (what: which manifest, for the message)."""
        try:
            return self.decode_manifest(data, kind)
        except ManifestError as e:
            raise CsiError(Code.DATA_LOSS, f"{what}: {e}") from None


PLAIN = Codec()


def manifest_refs(data: Buffer) -> set[str]:
    """Chunk names a stored manifest references, plain or sealed, without keys (gc)."""
    if envelope.is_sealed_meta(data):
        try:
            return set(envelope.read_header(data).refs)
        except Tampered as e:
            raise ManifestError(str(e)) from None
    return Manifest.decode(bytes(data)).referenced_hashes()


def manifest_ref_digests(data: Buffer) -> bytes:
    """The raw 32-byte digests of the chunk names a stored manifest references (duplicates
    possible), plain or sealed, without keys: what gc's cache holds (32 bytes per chunk instead
    of a str each). ManifestError for a malformed one."""
    if envelope.is_sealed_meta(data):
        try:
            refs = envelope.read_header(data).refs
        except Tampered as e:
            raise ManifestError(str(e)) from None
        return hex_digests(list(refs))
    return Manifest.decode(bytes(data)).chunk_map().digests


def manifest_summary(data: Buffer, what: str) -> tuple[set[str], int]:
    """(referenced chunk names, volume size) of a stored manifest without keys (pinning);
    DATA_LOSS when it is malformed."""
    try:
        if envelope.is_sealed_meta(data):
            h = envelope.read_header(data)
            if "volume_size" not in h.numbers:
                raise ManifestError("sealed manifest header has no volume size")
            return set(h.refs), h.numbers["volume_size"]
        m = Manifest.decode(bytes(data))
        return m.referenced_hashes(), m.volume_size
    except (ManifestError, Tampered) as e:
        raise CsiError(Code.DATA_LOSS, f"{what}: {e}") from None


def manifest_lineage(data: Buffer) -> str:
    """The lineage a stored manifest is sealed for ("" when plain), without keys."""
    if not envelope.is_sealed_meta(data):
        return ""
    try:
        return envelope.read_header(data).lineage
    except Tampered as e:
        raise ManifestError(str(e)) from None
