"""Loop devices: a typed wrapper around `losetup` (argv lists, `--json` output).

A backing file is matched to its loop device by inode (device + inode number of the file), not by
path string, so a file that was deleted and re-created is never confused with the old attachment,
and a restarted driver finds the device it attached before.
"""
from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import Code, CsiError, internal, precondition
from .fs import PORTABLE_SECTOR, run

_DEVICE_RE = re.compile(r"/dev/loop[0-9]{1,6}")
_attach_lock = threading.Lock()
# Every loop device gets 4 KiB logical sectors. Left to the kernel, a direct-I/O loop device takes
# the backing file's DIO alignment, which XFS raises from 512 B to 4 KiB once the file is
# reflinked (a generation's change-tracking copy): a volume made with 1 KiB ext4 blocks on a
# 512 B device would then no longer mount. Fixed at 4 KiB, it looks the same at every attach;
# the file systems the driver makes have blocks and sectors of that size (fs.PORTABLE_MKFS), so
# one made on another backend's device (an LV with 512 B sectors) mounts here too.
SECTOR_SIZE = PORTABLE_SECTOR


@dataclass(frozen=True)
class LoopDevice:
    name: str                   # /dev/loopN
    back_file: str              # as the kernel reports it (may end in " (deleted)")
    back_ino: int | None
    back_dev: tuple[int, int] | None
    direct_io: bool = False
    read_only: bool = False


def _check_device(device: str) -> str:
    if not isinstance(device, str) or _DEVICE_RE.fullmatch(device) is None:
        raise CsiError(Code.INVALID_ARGUMENT, f"{device!r} is not a loop device path")
    return device


def _parse_majmin(text: object) -> tuple[int, int] | None:
    if not isinstance(text, str):
        return None
    major, sep, minor = text.strip().partition(":")
    try:
        return (int(major), int(minor)) if sep else None
    except ValueError:
        return None


def devices() -> list[LoopDevice]:
    """All attached loop devices (`losetup --json --list`)."""
    res = run(["losetup", "--json", "--list", "--output",
               "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,DIO,RO"], what="losetup --list")
    if not res.stdout.strip():
        return []
    try:
        rows = json.loads(res.stdout).get("loopdevices", [])
    except (ValueError, AttributeError) as e:
        raise internal(f"losetup --json printed something unexpected: {e}") from None
    out = []
    for row in rows:
        ino = row.get("back-ino")
        out.append(LoopDevice(
            name=row.get("name", ""),
            back_file=row.get("back-file") or "",
            back_ino=int(ino) if isinstance(ino, (int, str)) and str(ino).strip().isdigit() else None,
            back_dev=_parse_majmin(row.get("back-maj:min")),
            direct_io=_flag(row.get("dio")),
            read_only=_flag(row.get("ro")),
        ))
    return out


def _flag(value: object) -> bool:
    return value is True or value in ("1", 1, "true")


def list_attached() -> dict[str, str]:
    """{"/dev/loopN": backing file} for every attached loop device."""
    return {d.name: d.back_file for d in devices()}


def find_all(backing_file: str, read_only: bool | None = None) -> list[str]:
    """Every loop device attached to this file, sorted by name; `read_only` filters by mode
    (normally there is one read-write device, plus one read-only device for read-only block use)."""
    try:
        st = os.stat(backing_file)
    except FileNotFoundError:
        return []
    real = os.path.realpath(backing_file)
    found = []
    for d in devices():
        if d.back_ino is not None and d.back_dev is not None:
            same = d.back_ino == st.st_ino and d.back_dev == (os.major(st.st_dev), os.minor(st.st_dev))
        else:
            same = d.back_file == real
        if same and (read_only is None or d.read_only == read_only):
            found.append(d.name)
    return sorted(found, key=lambda n: int(n[len("/dev/loop"):]))


def find(backing_file: str, read_only: bool | None = False) -> str | None:
    """The (read-write, by default) loop device attached to `backing_file`, None when there is none."""
    found = find_all(backing_file, read_only)
    return found[0] if found else None


def attach(backing_file: str, direct_io: bool = True, read_only: bool = False,
           sector_size: int | Callable[[], int] = SECTOR_SIZE) -> str:
    """Ensure `backing_file` is attached to a loop device and return the device (reuses an existing
    one of the same mode). A read-only device refuses writes (EPERM), which a read-only bind mount
    of a device node does not do: use one for read-only block publishing.

    Direct I/O keeps the data out of the page cache twice (once for the file system on the loop
    device, once for the backing file); when the kernel or the backing file system refuses it,
    the device is attached with buffered I/O instead. `sector_size` may be a function: called
    only when a new device is made (e.g. to probe the file's file system), not on reuse.
    """
    if not os.path.isfile(backing_file):
        raise CsiError(Code.NOT_FOUND, f"backing file {backing_file} does not exist")
    with _attach_lock:
        existing = find(backing_file, read_only)
        if existing is not None:
            return existing
        size = sector_size() if callable(sector_size) else sector_size
        base = (["losetup", "--find", "--show", "--sector-size", str(size)]
                + (["--read-only"] if read_only else []))
        if direct_io:
            try:
                res = run(base + ["--direct-io=on", backing_file], what="losetup --find")
                return _shown_device(res.stdout)
            except CsiError:
                existing = find(backing_file, read_only)    # attached although losetup complained
                if existing is not None:
                    return existing
        res = run(base + [backing_file], what="losetup --find")
        return _shown_device(res.stdout)


def _shown_device(stdout: str) -> str:
    device = stdout.strip()
    if _DEVICE_RE.fullmatch(device) is None:
        raise internal(f"losetup --show printed {device!r}, not a loop device")
    return device


def is_attached(device: str) -> bool:
    name = os.path.basename(_check_device(device))
    return os.path.exists(f"/sys/block/{name}/loop/backing_file")


def is_busy(device: str) -> bool:
    """True when something holds the device exclusively (a mounted file system, a device mapper)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        if e.errno in (errno.ENOENT, errno.ENXIO):
            return False
        raise internal(f"open {device}: {e.strerror}") from None
    os.close(fd)
    return False


def detach(device: str, force: bool = False) -> None:
    """Detach a loop device; not attached is fine.

    A device in use (e.g. still mounted) is refused with FAILED_PRECONDITION, because `losetup -d`
    would only mark it for auto-clear and leave the backing file open. `force` skips that check.
    """
    _check_device(device)
    if not is_attached(device):
        return
    if not force and is_busy(device):
        raise precondition(f"{device} is in use (mounted or held by another device); not detaching")
    res = run(["losetup", "--detach", device], ok=(0, 1), what="losetup --detach")
    if res.returncode != 0 and is_attached(device) and "No such device" not in res.stderr:
        raise internal(f"losetup --detach {device} failed: {res.stderr.strip()}")


def refresh_size(device: str) -> None:
    """Make the loop device see the current size of its backing file (`losetup --set-capacity`)."""
    _check_device(device)
    run(["losetup", "--set-capacity", device], what="losetup --set-capacity")
