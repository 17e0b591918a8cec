"""Constants and small I/O helpers shared by the LVM suite (see conftest.py)."""
from __future__ import annotations

import os

from csi_perssd.local.lvmcli import NO_UDEV_CONFIG, LvmCli
from tests.harness.blockio import write_at

__all__ = ["write_at"]   # the lvm tests import it from here with the rest of the VM helpers

IN_VM = os.environ.get("PERSSD_VM") == "1"
VG = "perssd-test"
POOL = "perssd-pool"
POOL_DEVICE = os.environ.get("PERSSD_VM_POOL_DEVICE", "/dev/nvme0n1")
SCRATCH_DEVICE = os.environ.get("PERSSD_VM_SCRATCH_DEVICE", "/dev/nvme1n1")
CHUNK = 64 * 1024               # thin pool chunk size of the session pool
MiB = 1 << 20


def lvm(*args: str) -> str:
    return LvmCli(NO_UDEV_CONFIG).run(*args)


def read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
