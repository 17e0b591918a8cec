"""Volume capabilities: protobuf <-> plain dicts, and what this driver supports."""
from __future__ import annotations

from typing import Any

from .csi import csi_pb2 as pb
from .errors import invalid

AccessMode = pb.VolumeCapability.AccessMode
SINGLE_NODE_MODES = {
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
}
READ_ONLY_MODES = {AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY}
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS = "ext4"


def to_dict(cap: pb.VolumeCapability) -> dict[str, Any]:
    """Validate one capability and return it as a plain dict."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise invalid("volume_capability.access_type (mount or block) is required")
    if not cap.HasField("access_mode") or cap.access_mode.mode == AccessMode.UNKNOWN:
        raise invalid("volume_capability.access_mode is required")
    d: dict[str, Any] = {"access_type": kind, "mode": AccessMode.Mode.Name(cap.access_mode.mode),
                         "fs_type": "", "mount_flags": []}
    if kind == "mount":
        fs = cap.mount.fs_type or DEFAULT_FS
        flags = list(cap.mount.mount_flags)
        for fl in flags:
            if not fl or any(c in fl for c in "\x00\n"):
                raise invalid(f"mount flag {fl!r} is not valid")
        d["fs_type"] = fs
        d["mount_flags"] = flags
    return d


def unsupported_reason(d: dict[str, Any]) -> str | None:
    """Why this driver cannot provide the capability, or None if it can."""
    if AccessMode.Mode.Value(d["mode"]) not in SINGLE_NODE_MODES:
        return f"access mode {d['mode']} is not supported (local volumes are single-node)"
    if d["access_type"] == "mount" and d["fs_type"] not in FS_TYPES:
        return f"fs_type {d['fs_type']!r} is not supported (use one of {', '.join(FS_TYPES)})"
    return None


def from_list(caps: Any, required: bool = True) -> list[dict[str, Any]]:
    if required and not caps:
        raise invalid("volume_capabilities is required")
    return [to_dict(c) for c in caps]


def is_read_only_mode(d: dict[str, Any]) -> bool:
    return AccessMode.Mode.Value(d["mode"]) in READ_ONLY_MODES


def to_proto(d: dict[str, Any]) -> pb.VolumeCapability:
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=AccessMode.Mode.Value(d["mode"])))
    if d["access_type"] == "block":
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = d["fs_type"]
        cap.mount.mount_flags.extend(d["mount_flags"])
    return cap
