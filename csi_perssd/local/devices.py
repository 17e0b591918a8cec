"""Discovery of the node's NVMe namespaces (pyudev) and whether each one is safe to take.

A device is *empty* when it has no partitions, no signature (file system, partition table, LVM
PV, RAID member... as `blkid -p` or udev's ID_FS_TYPE / ID_PART_TABLE_TYPE report), no holders
in /sys/block/X/holders, no mounts and no swap on it or its partitions, and is writable. Model
and serial come from the NVMe controller (sysfs), falling back to udev properties.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import pyudev

from ..errors import invalid, not_found
from . import fs, proc

NVME_NAMESPACE = re.compile(r"nvme\d+n\d+")       # not nvme0c0n1 (a hidden multipath path)


@dataclass
class BlockDevice:
    path: str                   # /dev/nvme0n1
    name: str                   # nvme0n1
    kind: str                   # nvme | disk | partition | loop | ...
    model: str = ""
    serial: str = ""
    size: int = 0               # bytes
    read_only: bool = False
    partitions: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    signature: str = ""         # blkid TYPE or PTTYPE (ext4, xfs, LVM2_member, gpt, ...)

    def in_use(self) -> list[str]:
        """Why the device is not empty (empty list: nothing found on it)."""
        why = []
        if self.read_only:
            why.append("read-only")
        if self.partitions:
            why.append(f"has partitions {', '.join(self.partitions)}")
        if self.signature:
            why.append(f"holds a {self.signature} signature")
        if self.holders:
            why.append(f"is held by {', '.join(self.holders)}")
        if self.mounts:
            why.append(f"is mounted at {', '.join(self.mounts)}")
        return why

    @property
    def empty(self) -> bool:
        return not self.in_use()

    @property
    def busy(self) -> bool:
        """In active use by the kernel (mounted, held, swap): even --force must not take it."""
        return bool(self.holders or self.mounts)


def _attr(dev: pyudev.Device, name: str) -> str:
    try:
        return dev.attributes.asstring(name).strip()
    except (KeyError, UnicodeDecodeError, OSError):
        return ""


def _mounts_by_devno() -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for m in fs.all_mounts():
        out.setdefault((m.major, m.minor), []).append(m.mount_point)
    return out


def _swaps() -> set[str]:
    try:
        with open("/proc/swaps") as f:
            return {line.split()[0] for line in f.readlines()[1:] if line.strip()}
    except OSError:
        return set()


def _holders(sys_path: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(sys_path, "holders")))
    except OSError:
        return []


def probe_signature(path: str) -> str:
    """`blkid -p` low-level probe (no cache): TYPE or PTTYPE, '' when nothing is found."""
    res = proc.run(["blkid", "-p", "-o", "export", path], ok=(0, 2), what=f"blkid -p {path}")
    if res.returncode == 2:          # nothing found
        return ""
    return parse_blkid_export(res.stdout)


def parse_blkid_export(text: str) -> str:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return values.get("TYPE") or values.get("PTTYPE") or ""


def _kind(dev: pyudev.Device) -> str:
    if dev.device_type == "partition":
        return "partition"
    if NVME_NAMESPACE.fullmatch(dev.sys_name):
        return "nvme"
    if dev.sys_name.startswith("loop"):
        return "loop"
    return "disk"


def describe(dev: pyudev.Device, mounts: dict[tuple[int, int], list[str]] | None = None,
             swaps: set[str] | None = None) -> BlockDevice:
    mounts = _mounts_by_devno() if mounts is None else mounts
    swaps = _swaps() if swaps is None else swaps
    path = dev.device_node or f"/dev/{dev.sys_name}"
    parts = [c for c in dev.children if c.device_type == "partition"]
    ctrl = dev.find_parent("nvme")
    model = _attr(ctrl, "model") if ctrl is not None else ""
    serial = _attr(ctrl, "serial") if ctrl is not None else _attr(dev, "serial")
    model = model or dev.properties.get("ID_MODEL", "").replace("_", " ")
    serial = serial or dev.properties.get("ID_SERIAL_SHORT", "")
    holders = _holders(dev.sys_path)
    where: list[str] = []
    for d in [dev, *parts]:
        where += mounts.get((os.major(d.device_number), os.minor(d.device_number)), [])
        if d.device_node in swaps:
            where.append(f"[swap {d.device_node}]")
        if d is not dev:
            holders += [f"{d.sys_name}:{h}" for h in _holders(d.sys_path)]
    signature = probe_signature(path) if os.path.exists(path) else ""
    signature = (signature or dev.properties.get("ID_FS_TYPE", "")
                 or dev.properties.get("ID_PART_TABLE_TYPE", ""))
    size = int(_attr(dev, "size") or 0) * 512
    return BlockDevice(path=path, name=dev.sys_name, kind=_kind(dev), model=model, serial=serial,
                       size=size, read_only=_attr(dev, "ro") == "1",
                       partitions=sorted(p.sys_name for p in parts), holders=holders,
                       mounts=where, signature=signature)


def nvme_namespaces(context: pyudev.Context | None = None) -> list[BlockDevice]:
    """Every NVMe namespace on the node, sorted by name."""
    ctx = context or pyudev.Context()
    mounts, swaps = _mounts_by_devno(), _swaps()
    devs = [d for d in ctx.list_devices(subsystem="block", DEVTYPE="disk")
            if NVME_NAMESPACE.fullmatch(d.sys_name)]
    return [describe(d, mounts, swaps) for d in sorted(devs, key=lambda d: d.sys_name)]


def lookup(path: str, context: pyudev.Context | None = None) -> BlockDevice:
    """The block device at `path` (any disk, partition or loop device given explicitly)."""
    ctx = context or pyudev.Context()
    real = os.path.realpath(path)
    try:
        dev = pyudev.Devices.from_device_file(ctx, real)
    except (pyudev.DeviceNotFoundError, ValueError, OSError) as e:
        raise not_found(f"{path} is not a block device: {e}") from None
    if dev.subsystem != "block":
        raise invalid(f"{path} is a {dev.subsystem} device, not a block device")
    return describe(dev)


def resolve(spec: str, context: pyudev.Context | None = None) -> list[BlockDevice]:
    """`auto` (all NVMe namespaces) or a comma-separated list of device paths."""
    if spec.strip() == "auto":
        return nvme_namespaces(context)
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise invalid("no devices given (use auto or /dev/nvme0n1,...)")
    for p in paths:
        if not p.startswith("/dev/"):
            raise invalid(f"device {p!r} must be a path under /dev/")
    return [lookup(p, context) for p in paths]
