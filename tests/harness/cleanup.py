"""Leftover control for tests, the demo and benchmarks: mounts and loop devices under a directory.

The driver keeps volumes attached by design; whoever ran it in a scratch directory removes what
is left there (deepest mount first, then the loop devices whose backing file lives below it)."""
from __future__ import annotations

import json
import os
import subprocess

from csi_perssd.local import fs, loop


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f if line.strip()]


def _loop_devices() -> dict[str, str]:
    res = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    rows = json.loads(res.stdout).get("loopdevices", [])
    return {r["name"]: (r.get("back-file") or "").removesuffix(" (deleted)") for r in rows}


def _loops_on(mount_point: str) -> list[str]:
    """Loop devices whose backing file lives on the scratch file system (itself on a loop
    device) mounted at `mount_point`, by device number: they keep it busy, and once it is lazily
    unmounted their paths no longer show where they live."""
    m = fs.mount_info(mount_point)
    if m is None or not m.source.startswith("/dev/loop"):
        return []
    return [d.name for d in loop.devices() if d.back_dev == (m.major, m.minor)]


def _detach(dev: str) -> None:
    res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, timeout=60)
    if res.returncode != 0 and "No such device or address" not in res.stderr:   # already detached
        raise RuntimeError(f"cannot detach {dev}: {res.stderr.strip()}")


def mounts_under(base: str) -> list[str]:
    base = os.path.realpath(base).rstrip("/")
    return [m for m in _mount_points() if m == base or m.startswith(base + "/")]


def loops_under(base: str) -> list[str]:
    base = os.path.realpath(base).rstrip("/")
    return sorted(dev for dev, back in _loop_devices().items() if back.startswith(base + "/"))


def cleanup_under(base: str) -> list[str]:
    """Unmount everything under `base` (deepest first) and detach its loop devices; return
    what was left behind (for the caller's report). Raises when something cannot be removed."""
    left: list[str] = []
    for _ in range(8):
        mounts = sorted(set(mounts_under(base)), key=lambda m: m.count("/"), reverse=True)
        if not mounts:
            break
        for m in mounts:
            left.append(m)
            for dev in dict.fromkeys(_loops_on(m) + loops_under(m)):   # files on m backing loop devices keep m busy
                left.append(dev)
                _detach(dev)
            subprocess.run(["umount", m], capture_output=True)
    else:
        for m in mounts_under(base):
            subprocess.run(["umount", "-l", m], capture_output=True)
    for dev in loops_under(base):
        left.append(dev)
        _detach(dev)
    if mounts_under(base):
        raise RuntimeError(f"still mounted under {base}: {mounts_under(base)}")
    return left
