"""The device-mapper path of lazy hydration: the file system sits on a dm-linear device over the
FUSE-served loop device; when hydration completes, the table is reloaded onto the plain local
volume (suspend, reload, resume) so the workload runs at native speed without unmounting.

Used only where the kernel has device-mapper (/dev/mapper/control) and libdevmapper loads:
production nodes, the LVM VM rig. The ioctls go through libdevmapper in process
(local/devmapper.py), not `dmsetup`: under emulation a dmsetup run costs 0.1-0.3 s, the ioctl
~15 ms. Whether a device exists and its device number are read from sysfs
(/sys/block/dm-N/dm/name). Without udev (the VM) the /dev/mapper node is made here.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import stat
from collections.abc import Callable

from ..errors import internal
from ..local import devmapper, fs

CONTROL = "/dev/mapper/control"


@functools.cache
def available() -> bool:
    """The kernel has device-mapper (its misc device is registered; a /dev/mapper/control node
    alone proves nothing: packages create it on kernels without dm) and libdevmapper loads."""
    if not devmapper.available() or not os.path.exists(CONTROL):
        return False
    try:
        with open("/proc/misc", encoding="ascii", errors="replace") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def name(vid: str) -> str:
    return f"perssd-lazy-{hashlib.sha256(vid.encode()).hexdigest()[:16]}"


def path(vid: str) -> str:
    return f"/dev/mapper/{name(vid)}"


def devno(vid: str) -> tuple[int, int] | None:
    """(major, minor) of the volume's dm device, None when there is none (sysfs)."""
    want = name(vid)
    for d in glob.glob("/sys/block/dm-*"):
        try:
            with open(os.path.join(d, "dm", "name"), encoding="utf-8", errors="replace") as f:
                if f.read().strip() != want:
                    continue
            with open(os.path.join(d, "dev"), encoding="ascii") as f:
                major, minor = f.read().strip().split(":")
            return int(major), int(minor)
        except (OSError, ValueError):
            continue                        # removed meanwhile, or not a dm device
    return None


def exists(vid: str) -> bool:
    return devno(vid) is not None


def linear(device: str) -> list[devmapper.Target]:
    return [devmapper.Target(0, fs.block_size(device) // 512, "linear", f"{device} 0")]


def create(vid: str, device: str) -> str:
    """A dm-linear device over `device`; its path."""
    devmapper.create(name(vid), linear(device))
    _ensure_node(vid)
    return path(vid)


def _ensure_node(vid: str) -> None:
    """/dev/mapper/<name> as a block node of the device (what `dmsetup mknodes` does) when
    neither libdevmapper nor udev made it."""
    num = devno(vid)
    if num is None:
        raise internal(f"dm device {name(vid)} is not in /sys/block after its creation")
    want = os.makedev(*num)
    p = path(vid)
    try:
        st = os.stat(p)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == want:
            return
        os.unlink(p)                        # a stale node of an earlier device of this name
    except FileNotFoundError:
        pass
    try:
        os.mknod(p, stat.S_IFBLK | 0o600, want)
    except FileExistsError:                 # udev made it meanwhile
        pass


def table(vid: str) -> str:
    """The device's table as `dmsetup table` prints it (devices as major:minor)."""
    return "\n".join(t.line() for t in devmapper.table(name(vid)))


def retarget(vid: str, device: str, while_suspended: Callable[[], object] | None = None) -> None:
    """Point the dm device at `device` (same size) while it stays open and mounted: I/O is held
    during the switch (suspend flushes what is in flight to the old device first);
    `while_suspended` runs after the suspend, before the new table is loaded."""
    n = name(vid)
    devmapper.suspend(n)
    try:
        if while_suspended is not None:
            while_suspended()
        devmapper.reload(n, linear(device))
    finally:
        devmapper.resume(n)


def remove(vid: str) -> None:
    if exists(vid):
        devmapper.remove(name(vid))
