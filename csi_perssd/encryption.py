"""Encrypted volumes at the driver's edges: where the KEK comes from, a record's lineage keys,
and crypto failures as CSI status codes. The pure parts live in csi_perssd/crypto/.

The KEK is the `encryptionKey` of the call's CSI secret (the provisioner secret at
CreateVolume, the node-stage secret at NodeStageVolume, the snapshotter secret at
CreateSnapshot), else the file named by --encryption-key-file (PERSSD_ENCRYPTION_KEY_FILE).
"""
from __future__ import annotations

from .config import Config
from .crypto import keys as ck
from .crypto.errors import CryptoError, KeyMalformed, KeyMissing, Tampered, WrongKey
from .errors import Code, CsiError
from .remote.codec import PLAIN, Codec

SECRET_KEY = "encryptionKey"
NONE = "none"
AES_256_GCM = ck.ALG
MODES = (NONE, AES_256_GCM)


def to_csi(e: CryptoError, what: str) -> CsiError:
    """Missing or malformed KEK: INVALID_ARGUMENT; another KEK than the data key's:
    FAILED_PRECONDITION; anything failing authentication: DATA_LOSS."""
    if isinstance(e, (KeyMissing, KeyMalformed)):
        code = Code.INVALID_ARGUMENT
    elif isinstance(e, WrongKey):
        code = Code.FAILED_PRECONDITION
    elif isinstance(e, Tampered):
        code = Code.DATA_LOSS
    else:
        code = Code.INTERNAL
    return CsiError(code, f"{what}: {e}")


def kek_from(secrets: dict[str, str] | None, cfg: Config) -> ck.Kek | None:
    """The KEK of the call's secret, else the configured one, else None. KeyMalformed when the
    one found is not 32 bytes of base64 (never quoted)."""
    text = (secrets or {}).get(SECRET_KEY)
    if text is not None:
        return ck.parse_kek(text, f"secret key {SECRET_KEY}")
    if cfg.encryption_key_file:
        try:
            with open(cfg.encryption_key_file, "rb") as f:
                data = f.read(4096)
        except OSError as e:
            raise KeyMissing(f"--encryption-key-file {cfg.encryption_key_file}: {e.strerror}") from None
        return ck.parse_kek(data, f"--encryption-key-file {cfg.encryption_key_file}")
    return None


def require_kek(secrets: dict[str, str] | None, cfg: Config, what: str, secret_kind: str) -> ck.Kek:
    try:
        kek = kek_from(secrets, cfg)
        if kek is None:
            raise KeyMissing(f"the volume is encrypted ({AES_256_GCM}) and no KEK was given: put it "
                             f"under the key {SECRET_KEY!r} of the {secret_kind} secret "
                             f"(csi.storage.k8s.io/{secret_kind}-secret-name) or configure "
                             f"--encryption-key-file")
        return kek
    except CryptoError as e:
        raise to_csi(e, what) from None


def new_lineage(kek: ck.Kek) -> tuple[ck.LineageKeys, dict[str, str]]:
    """A fresh lineage: its keys and the record field holding its wrapped data key."""
    keys = ck.LineageKeys.generate()
    return keys, ck.wrap(kek, keys).as_dict()


def open_lineage(encryption: dict[str, str], kek: ck.Kek, what: str) -> ck.LineageKeys:
    try:
        return ck.unwrap(kek, ck.WrappedKey.from_dict(encryption))
    except CryptoError as e:
        raise to_csi(e, what) from None


def codec_for(encryption: dict[str, str], secrets: dict[str, str] | None, cfg: Config, what: str,
              secret_kind: str) -> Codec:
    """PLAIN for an unencrypted record, else the codec of its lineage (KEK required)."""
    if not encryption:
        return PLAIN
    return Codec(open_lineage(encryption, require_kek(secrets, cfg, what, secret_kind), what))


def public_view(encryption: dict[str, str]) -> dict[str, str]:
    """What `inspect`/`ls` may show of a record's encryption field: never the wrapped key."""
    if not encryption:
        return {}
    return {"alg": encryption.get("alg", ""), "lineage": encryption.get("lineage", ""),
            "kid": encryption.get("kid", "")}
