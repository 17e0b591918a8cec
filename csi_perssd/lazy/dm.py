"""The device-mapper path of lazy hydration: the file system sits on a dm-linear device over the
FUSE-served loop device; when hydration completes, the table is reloaded onto the plain local
volume (suspend, reload, resume) so the workload runs at native speed without unmounting.

Used only where the kernel has device-mapper (/dev/mapper/control, `dmsetup`): production nodes,
the LVM VM rig. Without udev (the VM), device nodes are made with `dmsetup mknodes`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil

from ..local import fs

CONTROL = "/dev/mapper/control"


@functools.cache
def available() -> bool:
    """The kernel has device-mapper (its misc device is registered; a /dev/mapper/control node
    alone proves nothing: packages create it on kernels without dm) and dmsetup is installed."""
    if shutil.which("dmsetup") is None or not os.path.exists(CONTROL):
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


def exists(vid: str) -> bool:
    res = fs.run(["dmsetup", "info", "-c", "--noheadings", "-o", "name", name(vid)], ok=(0, 1),
                 what="dmsetup info")
    return res.returncode == 0 and res.stdout.strip() == name(vid)


def linear(device: str) -> str:
    return f"0 {fs.block_size(device) // 512} linear {device} 0"


def create(vid: str, device: str) -> str:
    """A dm-linear device over `device`; its path."""
    fs.run(["dmsetup", "create", name(vid), "--noudevsync", "--table", linear(device)],
           what="dmsetup create")
    fs.run(["dmsetup", "mknodes", name(vid)], what="dmsetup mknodes")
    return path(vid)


def table(vid: str) -> str:
    return fs.run(["dmsetup", "table", name(vid)], what="dmsetup table").stdout.strip()


def retarget(vid: str, device: str) -> None:
    """Point the dm device at `device` (same size) while it stays open and mounted: I/O is held
    during the switch (suspend flushes what is in flight to the old device first)."""
    n = name(vid)
    fs.run(["dmsetup", "suspend", "--noudevsync", n], what="dmsetup suspend")
    try:
        fs.run(["dmsetup", "reload", n, "--table", linear(device)], what="dmsetup reload")
    finally:
        fs.run(["dmsetup", "resume", "--noudevsync", n], what="dmsetup resume")


def remove(vid: str) -> None:
    if exists(vid):
        fs.run(["dmsetup", "remove", "--noudevsync", name(vid)], what="dmsetup remove")
