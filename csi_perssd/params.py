"""StorageClass / VolumeSnapshotClass parameters: parsed and validated in one place."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import invalid
from .remote.chunks import DEFAULT_COMPRESSION

MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20
# keys the external-provisioner adds with --extra-create-metadata, and other CO-reserved keys
_RESERVED_PREFIXES = ("csi.storage.k8s.io/",)
KNOWN = {"mobility", "persistence", "chunkSize", "compression", "fsType", "hydrate", "encryption"}
ENCRYPTION = ("none", "aes-256-gcm")
HYDRATE_MODES = ("full", "lazy")
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PV_OF_CLAIM = re.compile(r"pvc-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@dataclass(frozen=True)
class VolumeParams:
    mobility: str = "pool"
    persistence: str = "object"
    chunk_size: int = 4 << 20
    compression: int = DEFAULT_COMPRESSION       # remote/chunks.py says why level 1
    fs_type: str = ""
    # NodeStage on a node without a current local copy: "full" downloads everything first,
    # "lazy" stages at once and fetches chunks as they are read ("" = the node's --hydrate)
    hydrate: str = ""
    encryption: str = "none"

    def as_dict(self) -> dict[str, str]:
        d = {"mobility": self.mobility, "persistence": self.persistence,
             "chunkSize": str(self.chunk_size), "compression": str(self.compression)}
        if self.hydrate:
            d["hydrate"] = self.hydrate
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


def parse_compression(text: str) -> int:
    try:
        comp = int(text)
    except ValueError:
        raise invalid(f"parameter compression={text!r} must be a zstd level 0..19 (0 = off)") from None
    if not 0 <= comp <= 19:
        raise invalid(f"parameter compression={comp} must be a zstd level 0..19 (0 = off)")
    return comp


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
    comp = parse_compression(params.get("compression", str(DEFAULT_COMPRESSION)))
    fs = params.get("fsType", "")
    if fs and fs not in ("ext4", "xfs"):
        raise invalid(f"parameter fsType={fs!r} must be ext4 or xfs")
    hydrate = params.get("hydrate", "")
    if hydrate and hydrate not in HYDRATE_MODES:
        raise invalid(f"parameter hydrate={hydrate!r} must be 'full' or 'lazy'")
    enc = params.get("encryption", "none")
    if enc not in ENCRYPTION:
        raise invalid(f"parameter encryption={enc!r} must be one of {', '.join(ENCRYPTION)}")
    if enc != "none" and persistence == "local":
        raise invalid("parameter encryption applies to what leaves the node: persistence=local volumes "
                      "never do (encrypt the node's disk instead)")
    return VolumeParams(mobility, persistence, chunk, comp, fs, hydrate, enc)


def claim(params: dict[str, str], volume_name: str) -> dict[str, str]:
    """The PersistentVolumeClaim a volume is for, from the keys the external-provisioner adds with
    --extra-create-metadata: {"namespace", "name", "uid"} ({} without them). The UID (which
    `kubectl describe pvc` matches events on) comes from the PV name `pvc-<uid>` that the
    provisioner gives the volume by default; another naming leaves it empty."""
    name, ns = params.get(PVC_NAME, ""), params.get(PVC_NAMESPACE, "")
    if not name and not ns:
        return {}
    if not name or not ns:
        raise invalid(f"parameters {PVC_NAME} and {PVC_NAMESPACE} come together (got only "
                      f"{PVC_NAME if name else PVC_NAMESPACE})")
    if not _DNS_SUBDOMAIN.fullmatch(name):
        raise invalid(f"parameter {PVC_NAME}={name[:300]!r} is not a Kubernetes object name")
    if not _DNS_LABEL.fullmatch(ns):
        raise invalid(f"parameter {PVC_NAMESPACE}={ns[:100]!r} is not a Kubernetes namespace name")
    m = _PV_OF_CLAIM.fullmatch(params.get(PV_NAME, "") or volume_name)
    return {"namespace": ns, "name": name, "uid": m.group(1) if m else ""}
