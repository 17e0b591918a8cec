"""Constants and small I/O helpers shared by the LVM suite (see conftest.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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


def keep_logs(name: str, logs: list[Path]) -> str:
    """Copy `logs` and the kernel log to tests/vm/.work/logs/<name>/ on the host (the guest's
    files vanish with the VM; the console drops output under load); returns that directory."""
    out = Path(os.environ.get("PERSSD_VM_WORK", "/tmp")) / "logs" / name
    out.mkdir(parents=True, exist_ok=True)
    for i, log in enumerate(logs):
        if log.exists():
            shutil.copyfile(log, out / f"{i:02d}-{log.parent.name}-{log.name}")
    res = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=60)
    (out / "dmesg.txt").write_text(res.stdout + res.stderr)
    return str(out)
