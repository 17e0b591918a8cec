"""File systems and mounts on the node: mkfs, mount/bind/unmount, grow, fsfreeze, statistics.

Every helper is an idempotent "ensure": it looks at the current state (blkid, /proc/self/mountinfo,
stat) and only does what is missing. When the state is wrong in a way it must not repair (another
file system on the device, another volume mounted at the path) it raises a `CsiError` the caller
can translate; `MountConflict` carries what is mounted there, so NodeStage/NodePublish can answer
ALREADY_EXISTS as the CSI spec asks.

System tools run as argv lists through `run()` (local/proc.py, the one runner); a failure raises
INTERNAL with the tool's stderr.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import Code, CsiError, internal, precondition
from .proc import TOOL_TIMEOUT_S, run

__all__ = ["TOOL_TIMEOUT_S", "run"]

log = logging.getLogger(__name__)
MKFS_TYPES = ("ext4", "ext3", "ext2", "xfs")
# Every file system the driver makes has 4 KiB blocks and sectors, whatever the device it is made
# on reports, because a volume moves between nodes and backends: a file system does not mount on
# a device whose logical sectors are larger than its blocks (ext4: "bad block size") or its
# sectors (xfs: "device supports 4096 byte sectors"). A rawfile volume's loop device has 4 KiB
# sectors (loop.SECTOR_SIZE); an LV on a 512 B-formatted NVMe namespace has 512 B ones, where
# mkfs.ext4 picks 1 KiB blocks below 512 MiB and mkfs.xfs 512 B sectors.
PORTABLE_SECTOR = 4096
PORTABLE_MKFS = {"ext": ("-b", str(PORTABLE_SECTOR)), "xfs": ("-s", f"size={PORTABLE_SECTOR}")}
EXT_TYPES = ("ext4", "ext3", "ext2")

_FS_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268


# --------------------------------------------------------------------------- running tools

# --------------------------------------------------------------------------- devices

def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False


def logical_sector_size(device: str) -> int:
    """The logical sector size of a block device (BLKSSZGET): the smallest I/O it takes, so the
    smallest block a file system made on it may use."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
    finally:
        os.close(fd)


def block_size(device: str) -> int:
    """Size in bytes of a block device (BLKGETSIZE64); for a regular file, its length."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise CsiError(Code.NOT_FOUND, f"{device} does not exist") from None
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    finally:
        os.close(fd)


def _probe(device: str) -> dict[str, str] | None:
    """`blkid -p` of a device or image file: its signature's values ({} when blank), None when
    the probe is ambivalent."""
    res = run(["blkid", "-p", "-o", "export", device], ok=(0, 2, 8), what="blkid")
    if res.returncode == 2:          # nothing found
        return {}
    if res.returncode == 8:          # ambivalent probing result
        return None
    values: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            values[key.strip()] = val.strip()
    return values


def smallest_io(device: str) -> int | None:
    """The smallest I/O the file system on a device or image needs (blkid's BLOCK_SIZE: ext's
    block size, xfs's sector size): a device with larger logical sectors cannot mount it. None
    when there is no file system or blkid does not say."""
    values = _probe(device) or {}
    if values.get("USAGE") != "filesystem" or not values.get("BLOCK_SIZE", "").isdigit():
        return None
    return int(values["BLOCK_SIZE"])


def detect_fs(device: str) -> str | None:
    """The file system (or other signature) on a device; None when it is blank.

    A partition table is reported as `partition-table:<type>`, several conflicting signatures as
    `ambivalent`, so a caller never formats over something it does not understand.
    """
    values = _probe(device)
    if values is None:
        return "ambivalent"
    if values.get("TYPE"):
        return values["TYPE"]
    if values.get("PTTYPE"):
        return f"partition-table:{values['PTTYPE']}"
    if values:                       # some other signature (e.g. USAGE=raid) without TYPE
        return "unknown:" + ",".join(sorted(values))
    return None


def ensure_fs(device: str, fs_type: str, mkfs_options: Sequence[str] = ()) -> bool:
    """Make a file system of `fs_type` on `device` unless it already has one. True when it formatted.
    Its blocks and sectors are 4 KiB whatever the device (PORTABLE_MKFS), so that it mounts on
    every backend's device.

    FAILED_PRECONDITION when the device holds anything else (another fs, a partition table).
    """
    fs_type = check_fs_type(fs_type)
    if fs_type not in MKFS_TYPES:
        raise CsiError(Code.INVALID_ARGUMENT, f"cannot create file system {fs_type!r} "
                       f"(supported: {', '.join(MKFS_TYPES)})")
    found = detect_fs(device)
    if found == fs_type:
        return False
    if found is not None:
        raise precondition(f"{device} already holds {found}, not {fs_type}; refusing to format it")
    for opt in mkfs_options:
        _check_arg(opt, "mkfs option")
    if fs_type in EXT_TYPES:
        argv = [f"mkfs.{fs_type}", "-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                *PORTABLE_MKFS["ext"], *mkfs_options, device]
    else:
        argv = ["mkfs.xfs", "-f", "-q", *PORTABLE_MKFS["xfs"], *mkfs_options, device]
    run(argv, what=f"mkfs.{fs_type}", timeout=600)
    return True


def check_fs_type(fs_type: str) -> str:
    if not fs_type or _FS_TYPE_RE.fullmatch(fs_type) is None:
        raise CsiError(Code.INVALID_ARGUMENT, f"invalid file system type {fs_type!r}")
    return fs_type


def _check_arg(value: str, kind: str) -> str:
    if not isinstance(value, str) or not value:
        raise CsiError(Code.INVALID_ARGUMENT, f"empty {kind}")
    if any(c in value for c in ("\x00", "\n", "\r")):
        raise CsiError(Code.INVALID_ARGUMENT, f"{kind} {value[:64]!r} contains a control character")
    return value


# Options that would turn `mount -o` into a different operation (bind, move, loop setup,
# propagation changes, helper programs) rather than a file-system or per-mount flag.
_OPERATION_OPTS = {"bind", "rbind", "remount", "move", "loop"}
_OPERATION_PREFIXES = ("x-", "X-", "loop=", "offset=", "sizelimit=", "helper=", "make-")


def check_mount_options(options: Sequence[str]) -> list[str]:
    """Mount flags from the CO: plain options without NUL or line breaks and not ones that change
    what `mount` does (bind, remount, move, loop, x-mount.*, ...); empty ones are dropped.
    An element may itself be a comma-separated list; the result has one option per item."""
    out = []
    for opt in options:
        if opt == "":
            continue
        _check_arg(opt, "mount flag")
        for item in opt.split(","):
            if not item:
                continue
            if item.startswith("-"):
                raise CsiError(Code.INVALID_ARGUMENT, f"mount flag {item!r} must not start with '-'")
            if item in _OPERATION_OPTS or item.startswith(_OPERATION_PREFIXES):
                raise CsiError(Code.INVALID_ARGUMENT, f"mount flag {item!r} is not allowed")
            out.append(item)
    return out


# --------------------------------------------------------------------------- mountinfo

@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str                   # path inside the file system that is mounted here ('/' for a whole fs)
    mount_point: str
    options: tuple[str, ...]    # per-mount options (ro/rw, nosuid, ...)
    fs_type: str
    source: str
    super_options: tuple[str, ...] = field(default=())

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)


_OCTAL_RE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo_line(line: str) -> MountInfo:
    parts = line.rstrip("\n").split(" ")
    sep = parts.index("-", 6)
    major, _, minor = parts[2].partition(":")
    return MountInfo(
        mount_id=int(parts[0]), parent_id=int(parts[1]), major=int(major), minor=int(minor),
        root=_unescape(parts[3]), mount_point=_unescape(parts[4]),
        options=tuple(parts[5].split(",")), fs_type=_unescape(parts[sep + 1]),
        source=_unescape(parts[sep + 2]) if len(parts) > sep + 2 else "",
        super_options=tuple(parts[sep + 3].split(",")) if len(parts) > sep + 3 else (),
    )


def all_mounts() -> list[MountInfo]:
    """Every mount of this mount namespace, in mount order (stacked mounts: later = on top)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [parse_mountinfo_line(line) for line in f if line.strip()]


def _real(path: str) -> str:
    return os.path.realpath(path)


def mount_info(path: str) -> MountInfo | None:
    """The topmost mount whose mount point is exactly `path`; None when `path` is not a mount point."""
    target = _real(path)
    found = None
    for m in all_mounts():
        if m.mount_point == target:
            found = m
    return found


def mounts_of_device(device: str) -> list[MountInfo]:
    """All mounts of the file system on block device `device` (bind mounts of it included)."""
    try:
        rdev = os.stat(device).st_rdev
    except FileNotFoundError:
        return []
    return [m for m in all_mounts() if m.dev == rdev]


def mounts_under(prefix: str) -> list[MountInfo]:
    """Mounts at or below directory `prefix` (useful to rebuild state after a restart)."""
    base = _real(prefix).rstrip("/")
    return [m for m in all_mounts() if m.mount_point == base or m.mount_point.startswith(base + "/")]


# --------------------------------------------------------------------------- mounting

class MountConflict(CsiError):
    """Something other than what was asked is already mounted at the target.

    Code FAILED_PRECONDITION; NodeStage/NodePublish re-raise it as ALREADY_EXISTS.
    """

    def __init__(self, target: str, existing: MountInfo, reason: str):
        super().__init__(Code.FAILED_PRECONDITION,
                         f"{target} is already mounted ({existing.source}, {existing.fs_type}, "
                         f"{'ro' if existing.readonly else 'rw'}): {reason}")
        self.target = target
        self.existing = existing
        self.reason = reason


def ensure_mounted(source: str, target: str, fs_type: str, options: Sequence[str] = (),
                   readonly: bool = False) -> bool:
    """Mount the file system on block device `source` at directory `target`. True when it mounted.

    Already mounted from the same device with the same read-only mode: nothing to do.
    Anything else mounted there raises MountConflict. `target` is created when missing.
    """
    fs_type = check_fs_type(fs_type)
    opts = check_mount_options(options)
    if not is_block_device(source):
        raise precondition(f"{source} is not a block device")
    rdev = os.stat(source).st_rdev
    readonly = readonly or "ro" in opts
    existing = mount_info(target)
    if existing is not None:
        if existing.dev != rdev:
            raise MountConflict(target, existing, f"a different device than {source}")
        if existing.readonly != readonly:
            raise MountConflict(target, existing, f"wanted {'ro' if readonly else 'rw'}")
        if existing.fs_type != fs_type:
            raise MountConflict(target, existing, f"wanted file system {fs_type}")
        return False
    _make_dir(target)
    if readonly:
        opts = [o for o in opts if o not in ("ro", "rw")] + ["ro"]
    argv = ["mount", "-t", fs_type]
    if opts:
        argv += ["-o", ",".join(opts)]
    run(argv + [source, target], what="mount")
    return True


def ensure_bind(source: str, target: str, readonly: bool = False, options: Sequence[str] = ()) -> bool:
    """Bind-mount a directory (or a device node onto a file) at `target`. True when it mounted.

    The target is created (a directory for a directory source, an empty file otherwise). Read-only
    and per-mount flags are applied with a bind remount; the mount is undone if that fails.
    """
    opts = check_mount_options(options)
    try:
        src_st = os.stat(source)
    except FileNotFoundError:
        raise precondition(f"bind source {source} does not exist") from None
    readonly = readonly or "ro" in opts
    existing = mount_info(target)
    if existing is not None:
        tgt_st = os.stat(target)
        if (tgt_st.st_dev, tgt_st.st_ino) != (src_st.st_dev, src_st.st_ino):
            raise MountConflict(target, existing, f"not a bind mount of {source}")
        if existing.readonly != readonly:
            raise MountConflict(target, existing, f"wanted {'ro' if readonly else 'rw'}")
        return False
    if stat.S_ISDIR(src_st.st_mode):
        _make_dir(target)
    else:
        _make_file(target)
    run(["mount", "--bind", source, target], what="bind mount")
    remount = (["ro"] if readonly else []) + [o for o in opts if o not in ("ro", "rw", "bind")]
    if remount:
        try:
            run(["mount", "-o", ",".join(["remount", "bind", *remount]), target], what="bind remount")
        except CsiError:
            run(["umount", target], ok=(0, 32), what="umount")
            raise
    return True


BUSY_RETRY_S = 3.0


def ensure_unmounted(target: str) -> int:
    """Unmount everything stacked at `target`; not mounted (or missing) is fine. Returns the count."""
    count = 0
    busy_until = time.monotonic() + BUSY_RETRY_S
    for _ in range(64 + int(BUSY_RETRY_S / 0.1)):
        if mount_info(target) is None:
            return count
        res = run(["umount", target], ok=(0, 32), what="umount")
        if res.returncode == 32:
            still = mount_info(target)
            if still is None:       # a race with another unmount
                return count
            err = (res.stderr or "").strip()
            # "target is busy": a short-lived opener (udev/blkid probe, a closing process)
            if "busy" in err and time.monotonic() < busy_until:
                time.sleep(0.1)
                continue
            raise internal(f"umount {target} failed: {err}")
        count += 1
    raise internal(f"{target} still mounted after {count} unmounts")


def _make_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise precondition(f"{path} exists and is not a directory") from None
    if not os.path.isdir(path):
        raise precondition(f"{path} exists and is not a directory")


def _make_file(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if os.path.isdir(path):
        raise precondition(f"{path} is a directory; a block volume needs a file to bind onto")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


# --------------------------------------------------------------------------- sync, grow, freeze

_libc = ctypes.CDLL(None, use_errno=True)


def sync_fs(path: str) -> None:
    """Flush the file system holding `path` (syncfs); for a block device, flush the device."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            os.fsync(fd)
            return
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise internal(f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


_CAP_SYS_RESOURCE = 24


def can_grow_ext_online() -> bool:
    """Online ext2/3/4 resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; some sandboxes drop it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return True


GROW_SLACK = 4 << 20     # mkfs may leave a tail smaller than one block group unused


def needs_grow(device: str, fs_type: str | None = None) -> bool:
    """True when the device is noticeably larger than its file system (on-disk superblock, so
    reliable for an unmounted device)."""
    size = fs_size(device, fs_type)
    return size is not None and block_size(device) - size >= GROW_SLACK


def grow_fs(device: str, mount_path: str | None, fs_type: str | None = None) -> None:
    """Grow the file system on `device` to the size of the device; a no-op when it already fits.

    ext2/3/4 while mounted: resize2fs online (the kernel wants CAP_SYS_RESOURCE for that; without
    it FAILED_PRECONDITION, unless nothing needs to grow). ext2/3/4 not mounted anywhere: checked
    with e2fsck -f -p and grown offline, only when the device grew, so NodeStage may call this
    before mounting at no cost. xfs: xfs_growfs on the mount point (xfs only grows while mounted).
    """
    fs_type = fs_type or detect_fs(device)
    if fs_type in EXT_TYPES:
        if mounts_of_device(device):
            if can_grow_ext_online():
                run(["resize2fs", device], what="resize2fs", timeout=600)
            elif needs_grow(device, fs_type):
                raise precondition(f"cannot grow {fs_type} on {device} while it is mounted: this "
                                   f"process lacks CAP_SYS_RESOURCE; it grows offline when next staged")
        elif needs_grow(device, fs_type):
            run(["e2fsck", "-f", "-p", device], ok=(0, 1, 2), what="e2fsck", timeout=600)
            run(["resize2fs", device], what="resize2fs", timeout=600)
    elif fs_type == "xfs":
        if not mount_path or mount_info(mount_path) is None:
            raise precondition(f"xfs on {device} must be mounted to grow (not mounted at {mount_path})")
        run(["xfs_growfs", mount_path], what="xfs_growfs", timeout=600)
    else:
        raise CsiError(Code.INVALID_ARGUMENT, f"cannot grow file system {fs_type!r} on {device}")


def grow_unmounted(device: str, fs_type: str | None = None) -> bool:
    """For NodeStage, before mounting: grow ext2/3/4 offline if the device grew (this works without
    CAP_SYS_RESOURCE). Returns True when an online grow is still due after mounting (xfs)."""
    fs_type = fs_type or detect_fs(device)
    if fs_type in EXT_TYPES:
        if not needs_grow(device, fs_type):     # the usual case: one dumpe2fs, nothing to grow
            return False
        if not mounts_of_device(device):
            grow_fs(device, None, fs_type)
        return needs_grow(device, fs_type)
    if fs_type == "xfs":
        return needs_grow(device, fs_type)
    return False


def fs_size(device: str, fs_type: str | None = None) -> int | None:
    """Bytes the file system on `device` spans (from its on-disk superblock), None when unknown.

    Meant for an unmounted device: a mounted file system may not have written its superblock yet.

    Compare with `block_size(device)` to know whether a grow is due (e.g. at NodeStage).
    """
    fs_type = fs_type or detect_fs(device)
    if fs_type in EXT_TYPES:
        res = run(["dumpe2fs", "-h", device], what="dumpe2fs")
        fields = {}
        for line in res.stdout.splitlines():
            key, sep, val = line.partition(":")
            if sep:
                fields[key.strip()] = val.strip()
        try:
            return int(fields["Block count"]) * int(fields["Block size"])
        except (KeyError, ValueError):
            return None
    if fs_type == "xfs":
        res = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize dblocks", device], what="xfs_db")
        vals = dict(line.split(" = ", 1) for line in res.stdout.splitlines() if " = " in line)
        try:
            return int(vals["blocksize"]) * int(vals["dblocks"])
        except (KeyError, ValueError):
            return None
    return None


_FIFREEZE = 0xC0045877      # _IOWR('X', 119, int)
_FITHAW = 0xC0045878        # _IOWR('X', 120, int)


def _freeze_fd(fd: int, path: str) -> None:
    try:
        fcntl.ioctl(fd, _FIFREEZE, 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise precondition(f"{path} is already frozen") from None
        if e.errno == errno.EOPNOTSUPP:
            raise precondition(f"the file system at {path} cannot be frozen") from None
        raise internal(f"freeze {path}: {e.strerror}") from None


def _thaw_fd(fd: int, path: str) -> bool:
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:             # not frozen
            return False
        raise internal(f"thaw {path}: {e.strerror}") from None


def _open_path(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise internal(f"open {path}: {e.strerror}") from None


def freeze(mount_path: str) -> None:
    """Freeze the file system holding `mount_path` (FIFREEZE, as fsfreeze -f)."""
    fd = _open_path(mount_path)
    try:
        _freeze_fd(fd, mount_path)
    finally:
        os.close(fd)


def thaw(mount_path: str) -> bool:
    """Thaw (FITHAW, as fsfreeze -u); True when it was frozen. Not frozen is fine."""
    fd = _open_path(mount_path)
    try:
        return _thaw_fd(fd, mount_path)
    finally:
        os.close(fd)


@dataclass
class FreezeGuard:
    mount_path: str
    timeout_s: float
    timed_out: bool = False


@contextmanager
def frozen(mount_path: str, timeout_s: float = 30.0) -> Iterator[FreezeGuard]:
    """Freeze for the body, and always thaw: on exit, on exception, and from a watchdog after
    `timeout_s`. When the watchdog had to thaw, the body's copy is not point-in-time, so the exit
    raises INTERNAL (unless the body already raised); `guard.timed_out` tells the body early.

    The freeze and every thaw go through one open descriptor of the file system, so it is thawed
    even if its mount point is unmounted (lazily) or replaced meanwhile.
    """
    guard = FreezeGuard(mount_path, timeout_s)
    lock = threading.Lock()
    fd = _open_path(mount_path)
    try:
        _freeze_fd(fd, mount_path)
    except BaseException:
        os.close(fd)
        raise

    def watchdog() -> None:
        with lock:
            guard.timed_out = True
            try:
                _thaw_fd(fd, mount_path)
            except CsiError:
                pass

    timer = threading.Timer(timeout_s, watchdog)
    timer.daemon = True
    timer.start()
    try:
        yield guard
    finally:
        timer.cancel()
        with lock:
            try:
                _thaw_fd(fd, mount_path)
            finally:
                os.close(fd)
    if guard.timed_out:
        raise internal(f"{mount_path} stayed frozen longer than {timeout_s:g}s and was thawed by "
                       f"the watchdog; the copy taken meanwhile is not consistent")


@contextmanager
def frozen_all(mount_paths: list[str], timeout_s: float = 30.0) -> Iterator[FreezeGuard]:
    """`frozen` for a group of file systems (a group snapshot): all are frozen before the body
    runs, all are thawed after it, and ONE watchdog covers the whole group: `timeout_s` after the
    first freeze it thaws every one, and the exit raises INTERNAL (the copies are not a single
    point in time). If one freeze fails, the ones already frozen are thawed and it raises."""
    guard = FreezeGuard(", ".join(mount_paths), timeout_s)
    lock = threading.Lock()
    fds: list[tuple[int, str]] = []

    def thaw_all() -> None:
        for fd, path in fds:
            try:
                _thaw_fd(fd, path)
            except CsiError as e:
                log.error("group freeze: %s", e)

    def close_all() -> None:
        for fd, _ in fds:
            os.close(fd)

    timer = threading.Timer(timeout_s, lambda: _watchdog_all(lock, guard, thaw_all))
    timer.daemon = True
    try:
        for path in mount_paths:
            fds.append((_open_path(path), path))
            if len(fds) == 1:
                timer.start()
            _freeze_fd(fds[-1][0], path)
    except BaseException:
        timer.cancel()
        with lock:
            thaw_all()
            close_all()
        raise
    try:
        yield guard
    finally:
        timer.cancel()
        with lock:
            thaw_all()
            close_all()
    if guard.timed_out:
        raise internal(f"the group {guard.mount_path} stayed frozen longer than {timeout_s:g}s and was "
                       f"thawed by the watchdog; the copies taken meanwhile are not one point in time")


def _watchdog_all(lock: threading.Lock, guard: FreezeGuard, thaw_all: Callable[[], None]) -> None:
    with lock:
        guard.timed_out = True
        thaw_all()


# --------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class VolumeStats:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int = 0
    available_inodes: int = 0
    used_inodes: int = 0
    block: bool = False         # a raw block device: only total_bytes is meaningful


def volume_stats(path: str) -> VolumeStats:
    """Bytes and inodes of the file system mounted at `path`; for a block device its size only."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CsiError(Code.NOT_FOUND, f"{path} does not exist") from None
    if stat.S_ISBLK(st.st_mode):
        return VolumeStats(total_bytes=block_size(path), available_bytes=0, used_bytes=0, block=True)
    try:
        v = os.statvfs(path)
    except OSError as e:
        if e.errno in (errno.EIO, errno.ENOTCONN, errno.ESTALE):
            raise CsiError(Code.FAILED_PRECONDITION, f"statfs {path}: {e.strerror}") from None
        raise internal(f"statfs {path}: {e.strerror}") from None
    return VolumeStats(
        total_bytes=v.f_blocks * v.f_frsize,
        available_bytes=v.f_bavail * v.f_frsize,
        used_bytes=(v.f_blocks - v.f_bfree) * v.f_frsize,
        total_inodes=v.f_files,
        available_inodes=v.f_favail,
        used_inodes=v.f_files - v.f_ffree,
    )
