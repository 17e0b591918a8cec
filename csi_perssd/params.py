"""StorageClass / VolumeSnapshotClass parameters: parsed and validated in one place."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import invalid

MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20
# keys the external-provisioner adds with --extra-create-metadata, and other CO-reserved keys
_RESERVED_PREFIXES = ("csi.storage.k8s.io/",)
KNOWN = {"mobility", "persistence", "chunkSize", "compression", "fsType", "encryption"}
ENCRYPTION = ("none", "aes-256-gcm")


@dataclass(frozen=True)
class VolumeParams:
    mobility: str = "pool"
    persistence: str = "object"
    chunk_size: int = 4 << 20
    # zstd level 1: measured on the benchmark's file mix 387 MB/s per core at 0.48 of the size,
    # level 3 238 MB/s at 0.45: 7% more bytes for 60% more speed (flush time is the point)
    compression: int = 1
    fs_type: str = ""
    encryption: str = "none"

    def as_dict(self) -> dict[str, str]:
        d = {"mobility": self.mobility, "persistence": self.persistence,
             "chunkSize": str(self.chunk_size), "compression": str(self.compression)}
        if self.encryption != "none":          # records of unencrypted volumes stay as they were
            d["encryption"] = self.encryption
        return d


def parse_size(text: str, what: str) -> int:
    units = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgi")
    unit = t[len(num):]
    if not num.isdigit() or unit not in units:
        raise invalid(f"{what} {text!r} is not a size (examples: 4Mi, 1048576)")
    return int(num) * units[unit]


def parse(params: dict[str, str]) -> VolumeParams:
    unknown = sorted(k for k in params if k not in KNOWN and not k.startswith(_RESERVED_PREFIXES))
    if unknown:
        raise invalid(f"unknown parameter(s) {', '.join(unknown)}; supported: {', '.join(sorted(KNOWN))}")
    mobility = params.get("mobility", "pool")
    if mobility not in ("pool", "node"):
        raise invalid(f"parameter mobility={mobility!r} must be 'pool' or 'node'")
    persistence = params.get("persistence", "object")
    if persistence not in ("object", "local"):
        raise invalid(f"parameter persistence={persistence!r} must be 'object' or 'local'")
    if persistence == "local":
        if "mobility" in params and mobility != "node":
            raise invalid("persistence=local volumes never leave their node: use mobility=node (or leave it out)")
        mobility = "node"
    chunk = parse_size(params.get("chunkSize", "4Mi"), "parameter chunkSize")
    if chunk < MIN_CHUNK or chunk > MAX_CHUNK or chunk & (chunk - 1):
        raise invalid(f"parameter chunkSize={chunk} must be a power of two between 64Ki and 64Mi")
    comp_s = params.get("compression", "1")
    try:
        comp = int(comp_s)
    except ValueError:
        raise invalid(f"parameter compression={comp_s!r} must be a zstd level 0..19 (0 = off)") from None
    if not 0 <= comp <= 19:
        raise invalid(f"parameter compression={comp} must be a zstd level 0..19 (0 = off)")
    fs = params.get("fsType", "")
    if fs and fs not in ("ext4", "xfs"):
        raise invalid(f"parameter fsType={fs!r} must be ext4 or xfs")
    enc = params.get("encryption", "none")
    if enc not in ENCRYPTION:
        raise invalid(f"parameter encryption={enc!r} must be one of {', '.join(ENCRYPTION)}")
    if enc != "none" and persistence == "local":
        raise invalid("parameter encryption applies to what leaves the node: persistence=local volumes "
                      "never do (encrypt the node's disk instead)")
    return VolumeParams(mobility, persistence, chunk, comp, fs, enc)
