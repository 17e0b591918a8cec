"""Mutable volume parameters (VolumeAttributesClass): CreateVolume's `mutable_parameters` and
ControllerModifyVolume.

Only what the driver can change on a live volume without moving its data is mutable:
- `compression`: zstd level 0..19 of the chunks a flush uploads (0 = off). The flush reads the
  volume record at its start, so a change takes effect at the next flush of a staged volume;
  chunks already uploaded keep their encoding (a manifest records each chunk's own).
Everything else is fixed at creation: `persistence` (object <-> local would have to move the
volume's placement: a persistence=local volume is pinned to its node, an object one is not),
`mobility` (the same), `chunkSize` (every manifest of the volume shares one chunk size) and
`fsType` (the file system on the device). Those keys, and unknown ones, are INVALID_ARGUMENT
and nothing changes.
"""
from __future__ import annotations

from collections.abc import Callable

from .errors import invalid
from .params import KNOWN, parse_compression
from .remote.catalog import VolumeRecord

# key -> (validator returning the normalised value, what the value means)
MUTABLE: dict[str, tuple[Callable[[str], str], str]] = {
    "compression": (lambda v: str(parse_compression(v)), "zstd level 0..19 of uploaded chunks (0 = off)"),
}


def parse(mutable: dict[str, str]) -> dict[str, str]:
    """Validate mutable parameters; return them normalised. Unknown or immutable keys:
    INVALID_ARGUMENT naming them (nothing has been changed yet)."""
    out: dict[str, str] = {}
    fixed = sorted(k for k in mutable if k in KNOWN and k not in MUTABLE)
    if fixed:
        raise invalid(f"parameter(s) {', '.join(fixed)} cannot be changed after creation; "
                      f"mutable parameters: {', '.join(sorted(MUTABLE))}")
    unknown = sorted(k for k in mutable if k not in MUTABLE)
    if unknown:
        raise invalid(f"unknown mutable parameter(s) {', '.join(unknown)}; mutable parameters: "
                      f"{', '.join(sorted(MUTABLE))}")
    for key, value in mutable.items():
        out[key] = MUTABLE[key][0](value)
    return out


def check_supported(rec: VolumeRecord, mutable: dict[str, str]) -> None:
    """The volume itself must be able to use them (spec: "the specified volume cannot support
    the specified parameters" -> INVALID_ARGUMENT)."""
    if "compression" in mutable and rec.persistence != "object":
        raise invalid(f"volume {rec.id} has persistence=local: nothing of it is uploaded, so "
                      "compression does not apply to it")


def apply(rec: VolumeRecord, mutable: dict[str, str]) -> None:
    """Apply validated mutable parameters to a record (in a catalog update)."""
    if "compression" in mutable:
        rec.compression = int(mutable["compression"])
    rec.mutable_parameters = dict(rec.mutable_parameters, **mutable)
