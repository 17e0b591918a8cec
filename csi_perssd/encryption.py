"""Encrypted volumes at the driver's edges: where the KEK comes from, a record's lineage keys,
and crypto failures as CSI status codes. The pure parts live in csi_perssd/crypto/.

The KEK is the `encryptionKey` of the call's CSI secret (the provisioner secret at
CreateVolume, the node-stage secret at NodeStageVolume, the snapshotter secret at
CreateSnapshot), else the file named by --encryption-key-file (PERSSD_ENCRYPTION_KEY_FILE).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .crypto import keys as ck
from .crypto.errors import CryptoError, KeyMalformed, KeyMissing, Tampered, WrongKey
from .errors import Code, CsiError
from .remote.catalog import Catalog
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


@dataclass
class RekeyReport:
    rewrapped: list[str] = field(default_factory=list)       # record ids whose key was rewrapped
    current: int = 0                                        # already wrapped with the new KEK
    failed: list[str] = field(default_factory=list)         # "<id>: <reason>" (no KEK matched, damaged)


def _rewrap_field(enc: dict[str, str], olds: dict[str, ck.Kek], new: ck.Kek) -> dict[str, str] | None:
    """The field rewrapped under `new`; None when it already is. CryptoError when no old KEK
    opens it."""
    wk = ck.WrappedKey.from_dict(enc)
    if wk.kid == new.kid:
        return None
    old = olds.get(wk.kid)
    if old is None:
        raise WrongKey(f"wrapped with KEK {wk.kid}, which is not among the old KEKs given")
    return ck.rewrap(old, new, wk).as_dict()


def _rekey_record(update: Callable[[str, Callable[[Any], None]], Any], rid: str,
                  olds: dict[str, ck.Kek], new: ck.Kek) -> bool:
    changed = False

    def apply(rec: Any) -> None:
        nonlocal changed
        got = _rewrap_field(rec.encryption, olds, new) if rec.encryption else None
        changed = got is not None
        if got is not None:
            rec.encryption = got
    update(rid, apply)
    return changed


def rekey(cat: Catalog, olds: list[ck.Kek], new: ck.Kek) -> RekeyReport:
    """Rewrap every lineage key in the catalog (volume and snapshot records) under `new`.
    Chunks and manifests are not touched: they are sealed with the data keys, which stay the
    same. Each record is updated with a conditional write; running it again is harmless."""
    rep = RekeyReport()
    by_kid = {k.kid: k for k in olds}
    updates: list[tuple[str, Callable[[str, Callable[[Any], None]], Any]]] = []
    updates += [(v.id, cat.update_volume) for v in cat.list_volumes() if v.encryption]
    updates += [(s.id, cat.update_snapshot) for s in cat.list_snapshots() if s.encryption]
    for rid, update in updates:
        try:
            changed = _rekey_record(update, rid, by_kid, new)
        except CryptoError as e:
            rep.failed.append(f"{rid}: {e}")
            continue
        except CsiError as e:
            if e.code != Code.NOT_FOUND:        # deleted meanwhile: nothing to rewrap
                rep.failed.append(f"{rid}: {e.message}")
            continue
        if changed:
            rep.rewrapped.append(rid)
        else:
            rep.current += 1
    return rep
