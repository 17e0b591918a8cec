"""Client-side encryption: pure functions, no I/O (the bucket never sees plaintext).

Key hierarchy
  KEK        32 bytes from a CSI secret (`encryptionKey`, base64) or the driver's configuration.
             Its key id (`kid`, 16 hex) is keyed BLAKE3 of a fixed context: it names the KEK
             without revealing it.
  data key   32 random bytes per volume lineage (a volume created empty, with every snapshot and
             clone made from it). Stored only wrapped: AES-256-GCM under the KEK, random 96-bit
             nonce, associated data = "csi-perssd/wrap/v1" + lineage + kid. Copies live in the
             catalog records of the lineage's volumes and snapshots, nowhere else: deleting the
             last of them destroys the key (crypto-shredding).
  subkeys    HKDF-SHA256(data key, info = "csi-perssd/v1/<purpose>/" + lineage):
             `name`  keyed BLAKE3 of a chunk's plaintext = its object name (64 hex),
             `chunk` AES-256-GCM of chunk objects, `meta` AES-256-GCM of manifests and maps.

Formats (see envelope.py): a sealed chunk is 0x10 | nonce(12) | ciphertext | tag(16) with
associated data "csi-perssd/chunk/v1" + lineage + chunk name; the ciphertext holds the
compressed blob (compression happens before encryption). A sealed manifest or allocation map
is a public header (kind, lineage, sizes, the sorted set of chunk names it references — what
garbage collection needs without keys) authenticated as associated data, then nonce,
ciphertext and tag. Nonces are random per object (never derived from content: the same chunk
may be re-uploaded with another compression level).

AES-GCM runs through `cryptography` (OpenSSL, AES-NI/VAES) in slices of SLICE bytes, so no
call holds the GIL for a whole chunk.
"""
from __future__ import annotations

from .errors import CryptoError, KeyMalformed, KeyMissing, Tampered, WrongKey
from .keys import Kek, LineageKeys, WrappedKey, new_lineage, parse_kek, rewrap, unwrap, wrap

__all__ = ["CryptoError", "Kek", "KeyMalformed", "KeyMissing", "LineageKeys", "Tampered",
           "WrappedKey", "WrongKey", "new_lineage", "parse_kek", "rewrap", "unwrap", "wrap"]
