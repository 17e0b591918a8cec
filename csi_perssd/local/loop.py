"""Loop devices: attached with the ioctls `losetup --find` makes (LOOP_CTL_GET_FREE, then
LOOP_CONFIGURE), `losetup` (argv lists) where the kernel or /dev cannot do that here, and for
detach and resize; the list of attached devices is read from sysfs (/sys/block/loopN/loop) and
LOOP_GET_STATUS64, the same sources `losetup --list` reads. No process on the attach or list path:
each tool run costs 2-7 ms on a host and 0.3-1 s under emulation (NodeStage must fit in 2 s there).

A backing file is matched to its loop device by inode (device + inode number of the file), not by
path string, so a file that was deleted and re-created is never confused with the old attachment,
and a restarted driver finds the device it attached before.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import Code, CsiError, internal, precondition
from .fs import PORTABLE_SECTOR, run

log = logging.getLogger(__name__)

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


LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A                 # Linux 5.8
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONTROL = "/dev/loop-control"
LOOP_MAJOR = 7
# struct loop_info64 (linux/loop.h, 232 bytes): lo_device, lo_inode, lo_rdevice, lo_offset,
# lo_sizelimit (u64), lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32),
# lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32] (u8), lo_init[2] (u64)
_INFO64_FIELDS = "5Q4I64s64s32s2Q"
_INFO64 = struct.Struct("=" + _INFO64_FIELDS)
# struct loop_config (304 bytes): fd, block_size (u32), struct loop_info64 info, __reserved[8] (u64)
_CONFIG = struct.Struct("=2I" + _INFO64_FIELDS + "8Q")
LO_NAME_SIZE = 64
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16
# another process may configure the free device first (EBUSY): ask for a new one this many times
CONFIGURE_TRIES = 20


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read().rstrip("\n")


class _Unreadable(Exception):
    """LOOP_GET_STATUS64 failed on an attached device: the kernel stats its backing file for it,
    which fails when that file is gone with its server (ENOTCONN: a dead FUSE server's file)."""


def _status(device: str) -> tuple[int, int, int] | None:
    """(backing file's st_dev, its inode, lo_flags) of an attached loop device; None if it is gone."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None                     # detached meanwhile
        raise _Unreadable(str(e)) from e
    finally:
        os.close(fd)
    f = _INFO64.unpack(raw)
    return f[0], f[1], f[8]


def _flag(path: str) -> bool:
    try:
        return _read(path) == "1"
    except OSError:
        return False


def devices() -> list[LoopDevice]:
    """All attached loop devices (sysfs lists them: loopN/loop exists while one is bound)."""
    out = []
    for sysdir in glob.glob("/sys/block/loop*/loop"):
        name = "/dev/" + os.path.basename(os.path.dirname(sysdir))
        try:
            back = _read(os.path.join(sysdir, "backing_file"))
        except OSError:
            continue                        # detached meanwhile
        try:
            st = _status(name)
        except _Unreadable:
            # listed all the same (by its path and sysfs' flags), so the ones a dead server
            # left can be found and detached, as `losetup --list` shows them with no inode
            block = os.path.dirname(sysdir)
            out.append(LoopDevice(name=name, back_file=back, back_ino=None, back_dev=None,
                                  direct_io=_flag(os.path.join(sysdir, "dio")),
                                  read_only=_flag(os.path.join(block, "ro"))))
            continue
        if st is None:
            continue
        dev, ino, flags = st
        out.append(LoopDevice(name=name, back_file=back, back_ino=ino,
                              back_dev=(os.major(dev), os.minor(dev)),
                              direct_io=bool(flags & LO_FLAGS_DIRECT_IO),
                              read_only=bool(flags & LO_FLAGS_READ_ONLY)))
    return sorted(out, key=lambda d: int(d.name[len("/dev/loop"):]))


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
    The device is attached as `losetup --find --show` attaches it (same ioctls, flags and file
    name; no auto-clear), without running it; with it where the ioctls are not available.
    """
    if not os.path.isfile(backing_file):
        raise CsiError(Code.NOT_FOUND, f"backing file {backing_file} does not exist")
    with _attach_lock:
        existing = find(backing_file, read_only)
        if existing is not None:
            return existing
        size = sector_size() if callable(sector_size) else sector_size
        try:
            return _attach_ioctl(backing_file, direct_io, read_only, size)
        except _Unsupported as e:
            log.debug("attach %s with losetup: %s", backing_file, e)
        return _attach_losetup(backing_file, direct_io, read_only, size)


def _attach_losetup(backing_file: str, direct_io: bool, read_only: bool, size: int) -> str:
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


class _Unsupported(Exception):
    """The ioctls cannot attach here (no /dev/loop-control, a kernel without LOOP_CONFIGURE, an
    open refused with EROFS/EACCES): losetup, which has its own ways round those, attaches."""


class _Busy(Exception):
    """The free device was taken (EBUSY) or removed (ENXIO) meanwhile: ask for another."""


class _DirectRefused(Exception):
    """The backing file system or the kernel refused direct I/O (EINVAL): attach buffered."""


def _ioctl(fd: int, request: int, arg: int | bytes = 0) -> int:
    """ioctl(2): an int `arg` is passed as is and the call's result returned; bytes are passed
    by pointer to a copy (a struct in) and 0 returned. The one place attach makes ioctls."""
    if isinstance(arg, bytes):
        fcntl.ioctl(fd, request, arg)
        return 0
    return fcntl.ioctl(fd, request, arg)


_NO_IOCTL = (errno.ENOTTY, errno.ENOSYS, errno.EROFS, errno.EACCES)


def _failed(backing_file: str, step: str, e: OSError) -> CsiError:
    code = Code.NOT_FOUND if e.errno == errno.ENOENT else Code.INTERNAL
    return CsiError(code, f"attach {backing_file} to a loop device: {step}: {e.strerror or e}")


def _attach_ioctl(backing_file: str, direct_io: bool, read_only: bool, size: int) -> str:
    """LOOP_CTL_GET_FREE and LOOP_CONFIGURE, as losetup does them; a new free device when another
    process configured this one first. Raises _Unsupported when losetup has to do it."""
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.EPERM) + _NO_IOCTL:
            raise _Unsupported(f"{LOOP_CONTROL}: {e.strerror}") from None
        raise _failed(backing_file, f"open {LOOP_CONTROL}", e) from None
    path = os.path.realpath(backing_file)
    try:
        for _ in range(CONFIGURE_TRIES):
            try:
                number = _ioctl(ctl, LOOP_CTL_GET_FREE)
            except OSError as e:
                raise _failed(backing_file, "LOOP_CTL_GET_FREE", e) from None
            device = f"/dev/loop{number}"
            try:
                _configure(device, number, path, direct_io, read_only, size)
                return device
            except _Busy:
                continue
    finally:
        os.close(ctl)
    raise internal(f"attach {backing_file} to a loop device: another process took each free device "
                   f"before it was configured ({CONFIGURE_TRIES} tries)")


def _open_device(device: str, number: int, path: str, read_only: bool) -> int:
    """The loop device opened as losetup opens it (read-only for a read-only device); its node is
    made (block 7:N) when udev has not made it yet."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    for made in (False, True):
        try:
            return os.open(device, flags)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise _Busy() from None                 # removed meanwhile (LOOP_CTL_REMOVE)
            if e.errno in _NO_IOCTL:
                raise _Unsupported(f"open {device}: {e.strerror}") from None
            if e.errno != errno.ENOENT or made:
                raise _failed(path, f"open {device}", e) from None
        try:
            os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
        except FileExistsError:
            pass                                        # udev made it meanwhile
        except OSError as e:
            raise _Unsupported(f"mknod {device}: {e.strerror}") from None
    raise AssertionError("unreachable")


def _configure(device: str, number: int, path: str, direct_io: bool, read_only: bool, size: int) -> None:
    dev_fd = _open_device(device, number, path, read_only)
    try:
        if direct_io:
            try:
                _bind(dev_fd, device, path, True, read_only, size)
                return
            except _DirectRefused:
                pass
        _bind(dev_fd, device, path, False, read_only, size)
    finally:
        os.close(dev_fd)


def _bind(dev_fd: int, device: str, path: str, direct_io: bool, read_only: bool, size: int) -> None:
    """LOOP_CONFIGURE `device` onto the file, opened as losetup opens it (O_DIRECT for direct I/O).
    The kernel keeps its own reference to the file; ours is closed either way."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct_io else 0)
    try:
        file_fd = os.open(path, flags)
    except OSError as e:
        if direct_io and e.errno == errno.EINVAL:
            raise _DirectRefused() from None
        if e.errno in _NO_IOCTL:
            raise _Unsupported(f"open {path}: {e.strerror}") from None
        raise _failed(path, "open", e) from None
    lo_flags = (LO_FLAGS_DIRECT_IO if direct_io else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
    name = os.fsencode(path)[:LO_NAME_SIZE - 1]        # NUL-terminated, as losetup truncates it
    config = _CONFIG.pack(file_fd, size, 0, 0, 0, 0, 0, 0, 0, 0, lo_flags, name, b"", b"", 0, 0, *[0] * 8)
    try:
        _ioctl(dev_fd, LOOP_CONFIGURE, config)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise _Busy() from None
        if e.errno == errno.EINVAL and direct_io:
            raise _DirectRefused() from None
        if e.errno == errno.EINVAL or e.errno in _NO_IOCTL:
            raise _Unsupported(f"LOOP_CONFIGURE {device}: {e.strerror}") from None
        raise _failed(path, f"LOOP_CONFIGURE {device} (sector size {size})", e) from None
    finally:
        os.close(file_fd)


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
