"""KEKs, lineage data keys, their wrapping and the subkeys derived from them (see __init__)."""
from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import aead
from .errors import KeyMalformed, Tampered, WrongKey

ALG = "aes-256-gcm"
KEY_BYTES = 32
_KID_CONTEXT = b"csi-perssd/kek-id/v1"
_WRAP_AAD = b"csi-perssd/wrap/v1\0"
_WRAP_VERSION = b"\x01"
_LINEAGE_RE = re.compile(r"[0-9a-f]{32}")
_KID_RE = re.compile(r"[0-9a-f]{16}")


def key_id(key: bytes) -> str:
    """A name for a KEK that reveals nothing about it: keyed BLAKE3 of a fixed context."""
    return blake3(_KID_CONTEXT, key=key).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class Kek:
    """A key-encryption key. repr/str show only its key id."""
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise KeyMalformed(f"a KEK is {KEY_BYTES} bytes, not {len(self.key)}")

    @property
    def kid(self) -> str:
        return key_id(self.key)

    def __repr__(self) -> str:
        return f"Kek(kid={self.kid})"

    __str__ = __repr__


def parse_kek(text: str | bytes, where: str) -> Kek:
    """A KEK from its base64 form (whitespace around it ignored). `where` names the source
    (a secret key, a file) in the error message; the value itself is never quoted."""
    raw = text.strip() if isinstance(text, (str, bytes)) else b""
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise KeyMalformed(f"{where}: not base64 (make a KEK with: head -c32 /dev/urandom | base64)") from None
    if len(key) != KEY_BYTES:
        raise KeyMalformed(f"{where}: the KEK must be {KEY_BYTES} random bytes, base64-encoded; "
                           f"this one decodes to {len(key)} bytes (make one with: head -c32 /dev/urandom | base64)")
    return Kek(key)


def check_lineage(lineage: object) -> str:
    if not isinstance(lineage, str) or _LINEAGE_RE.fullmatch(lineage) is None:
        raise Tampered(f"not a lineage id: {str(lineage)[:40]!r}")
    return lineage


def new_lineage() -> str:
    return secrets.token_hex(16)


def _derive(data_key: bytes, purpose: str, lineage: str) -> bytes:
    info = f"csi-perssd/v1/{purpose}/{lineage}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(data_key)


@dataclass(frozen=True, repr=False)
class LineageKeys:
    """The unwrapped data key of one lineage and its subkeys. repr shows the lineage only."""
    lineage: str
    data_key: bytes = field(repr=False)
    name_key: bytes = field(repr=False, default=b"")
    chunk_key: bytes = field(repr=False, default=b"")
    meta_key: bytes = field(repr=False, default=b"")

    @classmethod
    def derive(cls, lineage: str, data_key: bytes) -> LineageKeys:
        check_lineage(lineage)
        if len(data_key) != KEY_BYTES:
            raise Tampered(f"a data key is {KEY_BYTES} bytes, not {len(data_key)}")
        return cls(lineage, data_key, _derive(data_key, "name", lineage),
                   _derive(data_key, "chunk", lineage), _derive(data_key, "meta", lineage))

    @classmethod
    def generate(cls, lineage: str | None = None) -> LineageKeys:
        return cls.derive(lineage or new_lineage(), secrets.token_bytes(KEY_BYTES))

    def chunk_name(self, buf: aead.Buffer) -> str:
        """The object name of a chunk: keyed BLAKE3 of its plaintext (64 hex; releases the GIL)."""
        return blake3(buf, key=self.name_key).hexdigest()

    def __repr__(self) -> str:
        return f"LineageKeys(lineage={self.lineage})"

    __str__ = __repr__


@dataclass(frozen=True)
class WrappedKey:
    """A lineage's data key wrapped by a KEK, as kept in catalog records."""
    lineage: str
    kid: str
    wrapped: str                    # base64 of version | nonce | ciphertext | tag
    alg: str = ALG

    def as_dict(self) -> dict[str, str]:
        return {"alg": self.alg, "lineage": self.lineage, "kid": self.kid, "wrapped": self.wrapped}

    @classmethod
    def from_dict(cls, d: Any) -> WrappedKey:
        if not isinstance(d, dict) or d.get("alg") != ALG:
            raise Tampered(f"encryption record is malformed or names an unknown algorithm "
                           f"{(d.get('alg') if isinstance(d, dict) else None)!r}")
        kid = d.get("kid")
        if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
            raise Tampered("encryption record: malformed key id")
        wrapped = d.get("wrapped")
        if not isinstance(wrapped, str) or len(wrapped) > 256:
            raise Tampered("encryption record: malformed wrapped key")
        return cls(check_lineage(d.get("lineage")), kid, wrapped)


def _aad(lineage: str, kid: str) -> bytes:
    return _WRAP_AAD + lineage.encode() + b"\0" + kid.encode()


def wrap(kek: Kek, keys: LineageKeys) -> WrappedKey:
    sealed = aead.seal(kek.key, _aad(keys.lineage, kek.kid), [keys.data_key], prefix=_WRAP_VERSION)
    return WrappedKey(keys.lineage, kek.kid, base64.b64encode(bytes(sealed)).decode())


def unwrap(kek: Kek, wk: WrappedKey) -> LineageKeys:
    """WrongKey when `kek` is not the KEK it was wrapped with; Tampered when it fails to open."""
    if kek.kid != wk.kid:
        raise WrongKey(f"the data key of lineage {wk.lineage} is wrapped with KEK {wk.kid}, "
                       f"not with the KEK given ({kek.kid})")
    try:
        blob = base64.b64decode(wk.wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise Tampered(f"wrapped data key of lineage {wk.lineage} is not base64") from None
    if blob[:1] != _WRAP_VERSION:
        raise Tampered(f"wrapped data key of lineage {wk.lineage}: unknown format")
    try:
        data_key = bytes(aead.open_(kek.key, _aad(wk.lineage, wk.kid), blob, start=1))
    except Tampered:
        raise Tampered(f"wrapped data key of lineage {wk.lineage} fails authentication "
                       f"(modified in the catalog)") from None
    return LineageKeys.derive(wk.lineage, data_key)


def rewrap(old: Kek, new: Kek, wk: WrappedKey) -> WrappedKey:
    """The same data key wrapped under `new` (chunks and manifests stay as they are)."""
    return wrap(new, unwrap(old, wk))
