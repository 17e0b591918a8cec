"""The rawfile backend: a sparse file per volume, attached as a loop device (dev, CI, nodes without LVM).

Layout under the root directory (one directory per volume, nothing else):

    ROOT/<vid>/disk.img             the volume, a sparse file (truncate; never preallocated)
    ROOT/<vid>/snap-<name>.img      point-in-time copies (reflink where the file system can)
    ROOT/.tmp-* / ROOT/.trash-*     a volume being created / deleted (renamed atomically)

Thin provisioning is honest: `capacity()` subtracts from the free space of ROOT the part of every
volume that is not allocated yet, so every sparse file can always fill up.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import uuid
from contextlib import AbstractContextManager, nullcontext

from .. import ids
from ..errors import Code, CsiError, internal, not_found
from . import fiemap, fs, loop
from .backend import Capacity, Extent, Planned
from .fileio import data_extents

log = logging.getLogger(__name__)
DISK = "disk.img"
SNAP_PREFIX = "snap-"
SNAP_SUFFIX = ".img"
ALIGN = 4096                        # sizes are rounded up to whole 4 KiB blocks
REQUIRED_TOOLS = ("losetup", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "fsfreeze", "blkid")
_FICLONE = 0x40049409
_COPY_CHUNK = 64 << 20


def _round_up(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class RawfileBackend:
    name = "rawfile"

    def __init__(self, root_dir: str, max_volume_bytes: int | None = None, reserve_bytes: int = 0,
                 direct_io: bool = True):
        self.root = os.path.abspath(root_dir)
        self.limit = max_volume_bytes
        self.reserve_bytes = max(0, reserve_bytes)
        self.direct_io = direct_io
        self._space_lock = threading.Lock()     # capacity check + allocation are one step
        self._tracks: bool | None = None
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            self._remove_leftovers()
        except OSError:
            pass                                # check() reports an unusable root

    # ------------------------------------------------------------------ paths

    def _dir(self, vid: str) -> str:
        return os.path.join(self.root, ids.volume_id(vid))

    def _disk(self, vid: str) -> str:
        return os.path.join(self._dir(vid), DISK)

    def _snap(self, vid: str, snap: str) -> str:
        return os.path.join(self._dir(vid), SNAP_PREFIX + ids.snapshot_id(snap) + SNAP_SUFFIX)

    def disk_path(self, vid: str) -> str:
        """The backing file of a volume (the flush reads it; hydration may write it directly)."""
        return self._disk(vid)

    # ------------------------------------------------------------------ health

    def check(self) -> list[str]:
        problems = [f"{tool} not found in PATH" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if not os.path.exists("/dev/loop-control"):
            problems.append("/dev/loop-control is missing (modprobe loop)")
        probe = os.path.join(self.root, f".probe-{uuid.uuid4().hex}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problems.append(f"rawfile root {self.root} is not writable: {e.strerror}")
        return problems

    # ------------------------------------------------------------------ volumes

    def batch(self) -> AbstractContextManager[None]:
        return nullcontext()       # stat() of the backing file is free: nothing to reuse

    def create_unlisted(self, vid: str, size: int) -> bool:
        return False               # exists() is one stat(): nothing to save

    def plan_unlisted(self, vid: str, size: int) -> Planned | None:
        return None                # creating the file costs nothing to overlap with

    def exists(self, vid: str) -> bool:
        return os.path.isfile(self._disk(vid))

    def size(self, vid: str) -> int:
        try:
            return os.stat(self._disk(vid)).st_size
        except FileNotFoundError:
            raise not_found(f"volume {vid} does not exist on this node") from None

    def list_volumes(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.startswith("."):
                continue
            try:
                ids.volume_id(n)
            except CsiError:
                continue
            if os.path.isfile(os.path.join(self.root, n, DISK)):
                out.append(n)
        return sorted(out)

    def create(self, vid: str, size: int) -> None:
        path = self._disk(vid)
        size = self._check_size(size)
        with self._space_lock:
            if os.path.isfile(path):
                current = os.stat(path).st_size
                if current != size:
                    raise CsiError(Code.ALREADY_EXISTS,
                                   f"volume {vid} already exists with {current} bytes, not {size}")
                return
            self._check_space(size)
            tmp = os.path.join(self.root, f".tmp-{vid}-{uuid.uuid4().hex[:8]}")
            try:
                os.mkdir(tmp, 0o700)
                fd = os.open(os.path.join(tmp, DISK), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, self._dir(vid))
                _fsync_dir(self.root)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CsiError(Code.RESOURCE_EXHAUSTED, f"no space for volume {vid}: {e.strerror}") from None
                raise internal(f"creating volume {vid} in {self.root}: {e.strerror}") from None

    def device(self, vid: str, read_only: bool = False) -> str:
        """The volume's loop device (attached on demand). `read_only=True` gives a second,
        read-only device for read-only raw block publishing (a read-only bind mount of a device
        node does not stop writes)."""
        path = self._disk(vid)
        if not os.path.isfile(path):
            raise not_found(f"volume {vid} does not exist on this node")
        dev = loop.attach(path, direct_io=self.direct_io, read_only=read_only,
                          sector_size=lambda: self._sector_size(vid, path))    # probed only for a new device
        if fs.block_size(dev) != os.stat(path).st_size:     # expanded while detached/half-refreshed
            loop.refresh_size(dev)
        return dev

    @staticmethod
    def _sector_size(vid: str, path: str) -> int:
        """The loop device's logical sector size: 4 KiB (loop.SECTOR_SIZE), the block and sector
        size of every file system the driver makes; 512 B for a volume whose file system needs
        smaller I/O (ext4 with 1 KiB blocks, xfs with 512 B sectors: made on an LV with 512 B
        sectors before mkfs was told 4 KiB), which would not mount on 4 KiB sectors."""
        need = fs.smallest_io(path)
        if need is not None and need < loop.SECTOR_SIZE:
            log.info("volume %s: its file system needs %d-byte I/O: loop device with 512-byte sectors", vid, need)
            return 512
        return loop.SECTOR_SIZE

    def hydrate_path(self, vid: str) -> str:
        """Where to write a fresh volume's content before first use: the backing file itself
        while no loop device is attached (buffered writes, the file system allocates large
        extents; no second pass through the loop device), else the device."""
        path = self._disk(vid)
        if not os.path.isfile(path):
            raise not_found(f"volume {vid} does not exist on this node")
        return loop.find(path) or path

    def attached_device(self, vid: str, read_only: bool = False) -> str | None:
        """The loop device of a volume if it is attached now (never attaches)."""
        return loop.find(self._disk(vid), read_only)

    def release(self, vid: str) -> None:
        """Detach the volume's loop devices (read-write and read-only); refused while one is in use."""
        path = self._disk(vid)
        devs = loop.find_all(path)
        busy = [d for d in devs if loop.is_busy(d)]
        if busy:
            raise CsiError(Code.FAILED_PRECONDITION, f"volume {vid}: {', '.join(busy)} still in use (mounted?)")
        for dev in devs:
            loop.detach(dev)

    def delete(self, vid: str) -> None:
        vdir = self._dir(vid)
        if not os.path.isdir(vdir):
            return
        self._detach_all(vdir)
        trash = os.path.join(self.root, f".trash-{vid}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(vdir, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(self.root)

    def expand(self, vid: str, size: int) -> None:
        path = self._disk(vid)
        size = self._check_size(size)
        with self._space_lock:
            try:
                current = os.stat(path).st_size
            except FileNotFoundError:
                raise not_found(f"volume {vid} does not exist on this node") from None
            if size > current:
                self._check_space(size - current)
                os.truncate(path, size)
        for dev in loop.find_all(path):
            if fs.block_size(dev) != os.stat(path).st_size:
                loop.refresh_size(dev)

    def allocated_ranges(self, vid: str, snap: str | None = None) -> list[Extent]:
        path = self._snap(vid, snap) if snap else self._disk(vid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            what = f"snapshot {snap} of volume {vid}" if snap else f"volume {vid}"
            raise not_found(f"{what} does not exist on this node") from None
        try:
            return data_extents(fd)
        finally:
            os.close(fd)

    @property
    def tracks_changes(self) -> bool:
        """True when ROOT can reflink (XFS with reflink=1, btrfs): snapshots are then reflink
        copies and `changed_ranges` compares block mappings (see local/fiemap.py). Probed once."""
        if self._tracks is None:
            self._tracks = _probe_reflink(self.root)
        return self._tracks

    def changed_ranges(self, vid: str, base_snap: str, snap: str | None = None) -> list[Extent] | None:
        """Ranges where the volume (or its snapshot `snap`) differs from the reflink snapshot
        `base_snap`; None when the base is missing or the file system cannot tell (the caller
        then compares chunk hashes)."""
        ids.volume_id(vid)
        base = self._snap(vid, base_snap)
        src = self._snap(vid, snap) if snap else self._disk(vid)
        if not self.tracks_changes or not os.path.isfile(base):
            return None
        if not os.path.isfile(src):
            what = f"snapshot {snap} of volume {vid}" if snap else f"volume {vid}"
            raise not_found(f"{what} does not exist on this node")
        if snap is None:
            dev = loop.find(src)
            if dev is not None:
                fs.sync_fs(dev)             # raw block writers: their page cache reaches the file
        try:
            return fiemap.changed_between(src, base)
        except (OSError, fiemap.Uncomparable):
            return None

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, vid: str, snap: str) -> str:
        dst = self._snap(vid, snap)
        src = self._disk(vid)
        if os.path.isfile(dst):
            return dst
        if not os.path.isfile(src):
            raise not_found(f"volume {vid} does not exist on this node")
        dev = loop.find(src)
        if dev is not None:
            fs.sync_fs(dev)                 # raw block writers: flush the device's page cache
        tmp = os.path.join(self._dir(vid), f".{os.path.basename(dst)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if not try_reflink(src, tmp):
                with self._space_lock:
                    self._check_space(os.stat(src).st_blocks * 512)
                sparse_copy(src, tmp)
            os.rename(tmp, dst)
            _fsync_dir(self._dir(vid))
        except OSError as e:
            _unlink(tmp)
            code = Code.RESOURCE_EXHAUSTED if e.errno in (errno.ENOSPC, errno.EDQUOT) else Code.INTERNAL
            raise CsiError(code, f"snapshot {snap} of volume {vid}: {e.strerror}") from None
        except BaseException:
            _unlink(tmp)
            raise
        return dst

    def delete_snapshot(self, vid: str, snap: str) -> None:
        """Gone at once (renamed aside); the unlink itself runs in the background: dropping the
        shared extents of a reflinked multi-GiB file takes XFS 100+ ms, and NodeUnstage calls
        this after every commit. A crash leaves a `.snap-*.tmp` that startup removes."""
        path = self._snap(vid, snap)
        for dev in loop.find_all(path):
            loop.detach(dev)
        aside = os.path.join(self._dir(vid), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        threading.Thread(target=_unlink, args=(aside,), name="unlink-snapshot", daemon=True).start()

    def snapshot_path(self, vid: str, snap: str) -> str | None:
        path = self._snap(vid, snap)
        return path if os.path.isfile(path) else None

    def list_snapshots(self, vid: str) -> list[str]:
        try:
            names = os.listdir(self._dir(vid))
        except FileNotFoundError:
            return []
        return sorted(n[len(SNAP_PREFIX):-len(SNAP_SUFFIX)] for n in names
                      if n.startswith(SNAP_PREFIX) and n.endswith(SNAP_SUFFIX))

    # ------------------------------------------------------------------ capacity

    def capacity(self) -> Capacity:
        try:
            v = os.statvfs(self.root)
        except OSError as e:
            raise internal(f"statfs {self.root}: {e.strerror}") from None
        total = v.f_blocks * v.f_frsize
        free = v.f_bavail * v.f_frsize
        available = max(0, free - self.reserved_bytes())
        max_volume = available if self.limit is None else min(self.limit, available)
        return Capacity(total_bytes=total, available_bytes=available, max_volume_bytes=max_volume)

    def reserved_bytes(self) -> int:
        """Space promised but not yet taken: the unallocated part of every volume, plus reserve_bytes."""
        reserved = self.reserve_bytes
        for vid in self.list_volumes():
            try:
                st = os.stat(os.path.join(self.root, vid, DISK))
            except FileNotFoundError:
                continue
            reserved += max(0, st.st_size - st.st_blocks * 512)
        return reserved

    # ------------------------------------------------------------------ helpers

    def _check_size(self, size: int) -> int:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise CsiError(Code.INVALID_ARGUMENT, f"volume size must be a positive number of bytes, not {size!r}")
        size = _round_up(size)
        if self.limit is not None and size > self.limit:
            raise CsiError(Code.RESOURCE_EXHAUSTED,
                           f"{size} bytes exceeds this node's volume size limit of {self.limit} bytes")
        return size

    def _check_space(self, needed: int) -> None:
        available = self.capacity().available_bytes
        if needed > available:
            raise CsiError(Code.RESOURCE_EXHAUSTED,
                           f"{needed} bytes needed but only {available} bytes available in {self.root}")

    def _detach_all(self, directory: str) -> None:
        """Detach every loop device backed by a file of this directory (refuses while mounted)."""
        try:
            files = {(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
                     for st in (e.stat(follow_symlinks=False) for e in os.scandir(directory))}
        except FileNotFoundError:
            return
        devs = [d.name for d in loop.devices()
                if d.back_dev is not None and (*d.back_dev, d.back_ino) in files]
        busy = [d for d in devs if loop.is_busy(d)]
        if busy:
            raise CsiError(Code.FAILED_PRECONDITION,
                           f"{', '.join(busy)} backed by {directory} still in use (mounted?)")
        for dev in devs:
            loop.detach(dev)

    def _remove_leftovers(self) -> None:
        """Finish deletes, drop half-created volumes and half-written snapshots left by a crash."""
        for n in os.listdir(self.root):
            path = os.path.join(self.root, n)
            if n.startswith(".reflink-probe-"):
                _unlink(path)
                continue
            if not os.path.isdir(path):
                continue
            if n.startswith((".tmp-", ".trash-")):
                try:
                    self._detach_all(path)
                except CsiError:
                    continue
                shutil.rmtree(path, ignore_errors=True)
            elif not n.startswith("."):
                for f in os.listdir(path):
                    if f.startswith("." + SNAP_PREFIX) and f.endswith(".tmp"):
                        _unlink(os.path.join(path, f))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def try_reflink(src: str, dst: str) -> bool:
    """Make `dst` a reflink (FICLONE) of `src`, fsynced. False (and no `dst`) when the file system
    cannot share extents."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, _FICLONE, sfd)
            os.fsync(dfd)
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                               errno.ENOSYS, errno.EPERM):
                _unlink(dst)
                raise
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    _unlink(dst)
    return False


def _probe_reflink(root: str) -> bool:
    """Can files under `root` be reflinked, and does FIEMAP map them?"""
    base = os.path.join(root, f".reflink-probe-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\xa5" * ALIGN)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not try_reflink(base, base + ".clone"):
            return False
        a, b = fiemap.file_extents(base), fiemap.file_extents(base + ".clone")
        return bool(a) and fiemap.extent_diff(a, b, ALIGN) == []
    except (OSError, fiemap.Uncomparable):
        return False
    finally:
        _unlink(base + ".clone")
        _unlink(base)


def sparse_copy(src: str, dst: str) -> None:
    """Copy only the data extents of `src` into `dst` (holes stay holes); `dst` is fsynced."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _sparse_copy(sfd, dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _sparse_copy(sfd: int, dfd: int) -> None:
    size = os.fstat(sfd).st_size
    for ext in data_extents(sfd):
        pos = ext.offset
        while pos < ext.end:
            n = _copy_range(sfd, dfd, pos, min(_COPY_CHUNK, ext.end - pos))
            if n <= 0:
                raise OSError(errno.EIO, f"short copy at offset {pos}")
            pos += n
    os.ftruncate(dfd, size)


def _copy_range(sfd: int, dfd: int, pos: int, count: int) -> int:
    try:
        return os.copy_file_range(sfd, dfd, count, pos, pos)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(sfd, count, pos)
    written = 0
    while written < len(data):
        written += os.pwrite(dfd, data[written:], pos + written)
    return len(data)
