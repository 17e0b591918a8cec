"""local/loop.py and local/fs.py on real loop devices, real ext4/xfs and real mounts."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local import fs, loop, proc

pytestmark = pytest.mark.root

MiB = 1 << 20


@contextmanager
def attached(path: str, size: int) -> Iterator[str]:
    """A sparse file of `size` bytes attached to a loop device; unmounted and detached afterwards."""
    with open(path, "wb") as f:
        f.truncate(size)
    dev = loop.attach(path)
    try:
        yield dev
    finally:
        for m in reversed(fs.mounts_of_device(dev)):
            fs.ensure_unmounted(m.mount_point)
        loop.detach(dev)


@contextmanager
def cleanup_mounts(*paths: str) -> Iterator[None]:
    try:
        yield
    finally:
        for p in paths:
            try:
                fs.thaw(p)
            except CsiError:
                pass
            fs.ensure_unmounted(p)


def writable_within(directory: str, seconds: float = 5.0) -> bool:
    """Write and fsync a file in a helper thread (a frozen fs blocks it); True if it finished in time."""
    done = threading.Event()

    def write() -> None:
        with open(os.path.join(directory, f"probe-{time.monotonic_ns()}"), "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    ok = done.wait(seconds)
    if not ok:          # do not leave a writer hanging on a frozen fs
        fs.thaw(directory)
        t.join(10)
    return ok


# ----------------------------------------------------------------------------- loop

def test_loop_attach_find_refresh_detach(tmp_path):
    img = str(tmp_path / "a.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    assert loop.find(img) is None
    dev = loop.attach(img)
    try:
        assert dev.startswith("/dev/loop") and fs.is_block_device(dev)
        assert loop.find(img) == dev
        assert loop.attach(img) == dev                      # idempotent: reuses the attachment
        assert loop.list_attached()[dev] == img
        assert fs.block_size(dev) == 64 * MiB
        os.truncate(img, 96 * MiB)
        assert fs.block_size(dev) == 64 * MiB
        loop.refresh_size(dev)
        assert fs.block_size(dev) == 96 * MiB
        assert not loop.is_busy(dev)
    finally:
        loop.detach(dev)
    assert loop.find(img) is None
    assert dev not in loop.list_attached()
    loop.detach(dev)                                        # idempotent


def test_loop_matches_by_inode_not_path(tmp_path):
    img = str(tmp_path / "b.img")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    dev = loop.attach(img)
    try:
        os.unlink(img)                                      # old inode stays attached
        with open(img, "wb") as f:
            f.truncate(8 * MiB)
        assert loop.find(img) is None                       # the new file is not that device
    finally:
        loop.detach(dev)


def test_loop_listing_agrees_with_losetup_and_runs_no_tool(tmp_path):
    """devices() reads sysfs and LOOP_GET_STATUS64, no process: the same devices, files, inodes
    and modes `losetup --list` reports (a direct-I/O read-write one and a buffered read-only one)."""
    a, b = str(tmp_path / "rw.img"), str(tmp_path / "ro.img")
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(8 * MiB)
    rw, ro = loop.attach(a), loop.attach(b, direct_io=False, read_only=True)
    try:
        with proc.tally() as t:
            mine = {d.name: d for d in loop.devices()}
        assert t.count == 0, t.summary()
        res = subprocess.run(["losetup", "--json", "--list", "--output",
                              "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,DIO,RO"],
                             capture_output=True, text=True, timeout=60, check=True)
        theirs = {r["name"]: r for r in json.loads(res.stdout)["loopdevices"]}
        assert set(mine) == set(theirs)
        for name, r in theirs.items():
            d = mine[name]
            # no inode / device when the kernel cannot stat the backing file (a dead FUSE server's)
            back_dev = tuple(int(x) for x in r["back-maj:min"].split(":")) if r["back-maj:min"] else None
            back_ino = int(r["back-ino"]) if r["back-ino"] is not None else None
            assert (d.back_file, d.back_ino, d.back_dev, d.direct_io, d.read_only) == \
                (r["back-file"], back_ino, back_dev, r["dio"] in (True, "1"), r["ro"] in (True, "1")), name
        assert mine[rw].direct_io and not mine[rw].read_only
        assert mine[ro].read_only and not mine[ro].direct_io
        st = os.stat(a)
        assert (mine[rw].back_ino, mine[rw].back_dev) == (st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev)))
    finally:
        loop.detach(rw)
        loop.detach(ro)
    assert rw not in {d.name for d in loop.devices()}


# ----------------------------------------------------------------------------- attach by ioctl

@pytest.fixture
def tools(monkeypatch) -> list[list[str]]:
    """Every tool loop.py runs during the test (argv)."""
    ran: list[list[str]] = []
    real = loop.run

    def spy(argv, **kw):
        ran.append([str(a) for a in argv])
        return real(argv, **kw)

    monkeypatch.setattr(loop, "run", spy)
    return ran


@pytest.fixture
def own_loops(tmp_path) -> Iterator[None]:
    """Whatever a test leaves attached to a file under its tmp_path is detached (only those)."""
    yield
    base = os.path.realpath(tmp_path) + "/"
    for d in loop.devices():
        if d.back_file.removesuffix(" (deleted)").startswith(base):
            loop.detach(d.name, force=True)


def on_configure(monkeypatch, before=None) -> list[tuple]:
    """Records each LOOP_CONFIGURE (the unpacked struct loop_config); `before(fd, calls)` runs
    first and may raise in the kernel's place."""
    calls: list[tuple] = []
    real = loop._ioctl

    def hook(fd, request, arg=0):
        if request == loop.LOOP_CONFIGURE:
            assert isinstance(arg, bytes) and len(arg) == 304
            calls.append(loop._CONFIG.unpack(arg))
            if before is not None:
                before(fd, calls)
        return real(fd, request, arg)

    monkeypatch.setattr(loop, "_ioctl", hook)
    return calls


def sparse(path: str, size: int = 8 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def check_device(dev: str, img: str, direct_io: bool, read_only: bool, sector: int) -> None:
    """What losetup and sysfs say of `dev`, and data through it both ways."""
    res = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,DIO,RO,LOG-SEC,AUTOCLEAR", dev],
                         capture_output=True, text=True, timeout=60, check=True)
    (row,) = json.loads(res.stdout)["loopdevices"]
    assert row == {"name": dev, "back-file": os.path.realpath(img), "dio": direct_io, "ro": read_only,
                   "log-sec": sector, "autoclear": False}, row
    sysfs = f"/sys/block/{os.path.basename(dev)}"

    def read(rel: str) -> str:
        with open(os.path.join(sysfs, rel)) as f:
            return f.read().strip()

    assert (read("loop/backing_file"), read("loop/dio"), read("ro"), read("queue/logical_block_size"),
            read("loop/autoclear")) == (os.path.realpath(img), str(int(direct_io)), str(int(read_only)),
                                        str(sector), "0")
    assert fs.block_size(dev) == os.stat(img).st_size
    before = os.urandom(4096)                           # in the file, read through the device
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(before)
        f.flush()
        os.fsync(f.fileno())
    with open(dev, "rb") as f:
        f.seek(MiB)
        assert f.read(4096) == before
    through = os.urandom(4096)
    if read_only:
        with pytest.raises(OSError) as e:
            fd = os.open(dev, os.O_RDWR)
            try:
                os.pwrite(fd, through, 2 * MiB)
            finally:
                os.close(fd)
        assert e.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
        return
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, through, 2 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4096) == through


@pytest.mark.parametrize("direct_io,read_only,sector", [(True, False, 4096), (False, True, 512), (False, False, 512)])
def test_attach_by_ioctl_is_what_losetup_makes_and_runs_no_tool(tmp_path, monkeypatch, tools, own_loops,
                                                                 direct_io, read_only, sector):
    img = sparse(str(tmp_path / "vol.img"))
    calls = on_configure(monkeypatch)
    with proc.tally() as t:
        dev = loop.attach(img, direct_io=direct_io, read_only=read_only, sector_size=sector)
    try:
        assert t.count == 0 and tools == [], (t.summary(), tools)
        assert len(calls) == 1 and calls[0][1] == sector
        check_device(dev, img, direct_io, read_only, sector)
        assert loop.find(img, read_only) == dev
        assert loop.attach(img, direct_io=direct_io, read_only=read_only, sector_size=sector) == dev
        assert len(calls) == 1                          # reused, not configured again
    finally:
        loop.detach(dev)
    assert not loop.is_attached(dev)


def test_attach_by_ioctl_sets_the_flags_and_file_name_losetup_sets(tmp_path, own_loops):
    """Status of the same file attached both ways: the same lo_flags (no auto-clear) and the same
    file name, truncated to 63 bytes and a NUL (the path here is longer than that)."""
    d = tmp_path / ("a-directory-name-long-enough-to-be-cut-" + "x" * 40)
    d.mkdir()
    img = sparse(str(d / "vol.img"))
    assert len(os.fsencode(os.path.realpath(img))) > 64
    mine = loop.attach(img, direct_io=True, sector_size=4096)
    theirs = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", img],
                            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    try:
        assert mine != theirs

        def status(dev: str) -> tuple:
            fd = os.open(dev, os.O_RDONLY)
            try:
                f = loop._INFO64.unpack(fcntl.ioctl(fd, loop.LOOP_GET_STATUS64, bytes(loop._INFO64.size)))
            finally:
                os.close(fd)
            return f[0], f[1], f[3], f[4], f[8], f[9]   # backing dev, inode, offset, limit, flags, name

        assert status(mine) == status(theirs)
        assert status(mine)[4] == loop.LO_FLAGS_DIRECT_IO
        assert status(mine)[5] == os.fsencode(os.path.realpath(img))[:63] + b"\0"
    finally:
        loop.detach(mine)
        loop.detach(theirs)


def test_struct_layout_matches_linux_loop_h():
    assert loop._INFO64.size == 232 and loop._CONFIG.size == 304
    assert struct.calcsize("=5Q4I") == 56               # lo_file_name at offset 56 of loop_info64
    assert (loop.LOOP_CONFIGURE, loop.LOOP_CTL_GET_FREE, loop.LOOP_GET_STATUS64) == (0x4C0A, 0x4C82, 0x4C05)


@pytest.mark.parametrize("why", ["ENOTTY", "ENOSYS", "EINVAL-buffered", "no-loop-control"])
def test_attach_falls_back_to_losetup_where_the_ioctls_are_unavailable(tmp_path, monkeypatch, tools,
                                                                        own_loops, why):
    img = sparse(str(tmp_path / "vol.img"))
    direct_io = why != "EINVAL-buffered"

    def unsupported(fd, calls):
        raise OSError(getattr(errno, why.split("-")[0]), "simulated")

    calls = on_configure(monkeypatch, unsupported)
    if why == "no-loop-control":
        monkeypatch.setattr(loop, "LOOP_CONTROL", str(tmp_path / "no-loop-control"))
    dev = loop.attach(img, direct_io=direct_io, sector_size=4096)
    try:
        assert [a[:2] for a in tools] == [["losetup", "--find"]], tools
        assert ("--direct-io=on" in tools[0]) == direct_io and tools[0][-1] == img
        assert len(calls) == (0 if why == "no-loop-control" else 1)
        check_device(dev, img, direct_io, False, 4096)
        assert loop.attach(img, direct_io=direct_io) == dev and len(tools) == 1
    finally:
        loop.detach(dev)


def test_attach_takes_another_free_device_when_one_is_taken_first(tmp_path, monkeypatch, tools, own_loops):
    """Between LOOP_CTL_GET_FREE and LOOP_CONFIGURE another process configures the same device
    (here: losetup, for real): the kernel says EBUSY, and attach asks for a new free device."""
    img, other = sparse(str(tmp_path / "vol.img")), sparse(str(tmp_path / "other.img"))
    stolen: list[str] = []

    def steal(fd, calls):
        if not stolen:
            stolen.append(os.readlink(f"/proc/self/fd/{fd}"))
            subprocess.run(["losetup", stolen[0], other], capture_output=True, timeout=60, check=True)

    calls = on_configure(monkeypatch, steal)
    dev = loop.attach(img, sector_size=4096)
    try:
        assert len(calls) == 2 and dev != stolen[0] and tools == []
        assert loop.find(other) == stolen[0] and loop.find(img) == dev     # neither disturbed
        check_device(dev, img, True, False, 4096)
    finally:
        loop.detach(dev)
        loop.detach(stolen[0])


def test_attach_gives_up_after_bounded_ebusy_and_leaves_nothing(tmp_path, monkeypatch, tools, own_loops):
    img = sparse(str(tmp_path / "vol.img"))

    def busy(fd, calls):
        raise OSError(errno.EBUSY, "simulated")

    calls = on_configure(monkeypatch, busy)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CsiError) as e:
        loop.attach(img)
    assert e.value.code == Code.INTERNAL and f"{loop.CONFIGURE_TRIES} tries" in e.value.message
    assert len(calls) == loop.CONFIGURE_TRIES and tools == []
    assert loop.find_all(img) == [] and len(os.listdir("/proc/self/fd")) == fds


def test_attach_buffered_by_ioctl_when_direct_io_is_refused(tmp_path, monkeypatch, tools, own_loops):
    img = sparse(str(tmp_path / "vol.img"))

    def refuse_dio(fd, calls):
        if calls[-1][10] & loop.LO_FLAGS_DIRECT_IO:
            raise OSError(errno.EINVAL, "simulated")

    calls = on_configure(monkeypatch, refuse_dio)
    dev = loop.attach(img, direct_io=True, sector_size=4096)
    try:
        assert [c[10] for c in calls] == [loop.LO_FLAGS_DIRECT_IO, 0] and tools == []
        check_device(dev, img, False, False, 4096)
    finally:
        loop.detach(dev)


def test_attach_error_is_a_csi_error_and_leaves_nothing_attached(tmp_path, monkeypatch, tools, own_loops):
    img = sparse(str(tmp_path / "vol.img"))

    def eio(fd, calls):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_configure(monkeypatch, eio)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CsiError) as e:
        loop.attach(img, direct_io=False)
    assert e.value.code == Code.INTERNAL, e.value
    assert "LOOP_CONFIGURE /dev/loop" in e.value.message and "Input/output error" in e.value.message
    assert tools == [] and loop.find_all(img) == [] and len(os.listdir("/proc/self/fd")) == fds


def test_tally_counts_each_tool_run_of_the_thread(tmp_path):
    with proc.tally() as outer:
        proc.run(["true"])
        with proc.tally() as inner:
            proc.status(["false"])
            seen: list[int] = []
            th = threading.Thread(target=lambda: seen.append(proc.run(["true"]).returncode))
            th.start()
            th.join()                                       # another thread's run: not counted
        with pytest.raises(CsiError):
            proc.run(["sh-does-not-exist-perssd"])
    assert inner.names() == ["false"] and seen == [0]
    assert outer.names() == ["true", "false", "sh-does-not-exist-perssd"]
    assert outer.summary().startswith("3 tool runs in ")


def test_grow_unmounted_reads_the_superblock_once_when_nothing_grows(tmp_path):
    img = str(tmp_path / "g.img")
    with attached(img, 64 * MiB) as dev:
        fs.ensure_fs(dev, "ext4")
        with proc.tally() as t:
            assert fs.grow_unmounted(dev, "ext4") is False
        assert t.names() == ["dumpe2fs"], t.summary()


def test_loop_rejects_bad_input(tmp_path):
    with pytest.raises(CsiError) as e:
        loop.detach("/dev/sda")
    assert e.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(CsiError) as e:
        loop.attach(str(tmp_path / "missing.img"))
    assert e.value.code == Code.NOT_FOUND


# ----------------------------------------------------------------------------- mkfs

def test_ensure_fs_formats_once_and_refuses_another_fs(tmp_path):
    with attached(str(tmp_path / "c.img"), 64 * MiB) as dev:
        assert fs.detect_fs(dev) is None
        assert fs.ensure_fs(dev, "ext4") is True
        assert fs.detect_fs(dev) == "ext4"
        assert fs.ensure_fs(dev, "ext4") is False           # already formatted: untouched
        with pytest.raises(CsiError) as e:
            fs.ensure_fs(dev, "xfs")
        assert e.value.code == Code.FAILED_PRECONDITION
        assert fs.detect_fs(dev) == "ext4"
        with pytest.raises(CsiError) as e:
            fs.ensure_fs(dev, "ntfs")
        assert e.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("fs_type,size", [("ext4", 64 * MiB), ("ext4", 4 * MiB), ("xfs", 320 * MiB)])
def test_a_file_system_made_on_512_byte_sectors_mounts_on_a_rawfile_loop_device(tmp_path, fs_type, size):
    """A volume made on an LVM node (an LV on a 512 B-formatted namespace: 512 B logical sectors,
    stood in for by a loop device with 512 B sectors) moves to a rawfile node, whose loop devices
    have 4 KiB sectors. Left to mkfs, ext4 got 1 KiB blocks there ("bad block size" on the 4 KiB
    device) and xfs 512 B sectors; and the other way round."""
    path, mnt = str(tmp_path / "vol.img"), str(tmp_path / "mnt")
    with open(path, "wb") as f:
        f.truncate(size)
    lvm_like = loop.attach(path, direct_io=False, sector_size=512)
    try:
        assert fs.ensure_fs(lvm_like, fs_type)
        with cleanup_mounts(mnt):
            fs.ensure_mounted(lvm_like, mnt, fs_type)
            with open(os.path.join(mnt, "f"), "wb") as f:
                f.write(b"made on 512 B sectors")
            fs.ensure_unmounted(mnt)
    finally:
        loop.detach(lvm_like)
    rawfile = loop.attach(path)                     # as the rawfile backend attaches it: 4 KiB sectors
    try:
        with cleanup_mounts(mnt):
            fs.ensure_mounted(rawfile, mnt, fs_type)
            with open(os.path.join(mnt, "f"), "rb") as f:
                assert f.read() == b"made on 512 B sectors"
            with open(os.path.join(mnt, "g"), "wb") as f:
                f.write(b"and back")
            fs.ensure_unmounted(mnt)
    finally:
        loop.detach(rawfile)
    back = loop.attach(path, direct_io=False, sector_size=512)
    try:
        with cleanup_mounts(mnt):
            fs.ensure_mounted(back, mnt, fs_type)
            with open(os.path.join(mnt, "g"), "rb") as f:
                assert f.read() == b"and back"
    finally:
        loop.detach(back)


def test_thin_mkfs_allocates_little(tmp_path):
    img = str(tmp_path / "thin.img")
    with attached(img, 1024 * MiB) as dev:
        fs.ensure_fs(dev, "ext4")
        fs.sync_fs(dev)
        assert os.stat(img).st_blocks * 512 < 32 * MiB


# ----------------------------------------------------------------------------- mountinfo

def test_parse_mountinfo_line_with_escapes():
    line = ("36 35 7:3 /sub\\040dir /mnt/with\\040space\\011tab rw,noatime shared:1 master:2 - ext4 "
            "/dev/loop3 rw,errors=continue\n")
    m = fs.parse_mountinfo_line(line)
    assert (m.mount_id, m.parent_id, m.major, m.minor) == (36, 35, 7, 3)
    assert m.root == "/sub dir"
    assert m.mount_point == "/mnt/with space\ttab"
    assert m.options == ("rw", "noatime") and not m.readonly
    assert (m.fs_type, m.source) == ("ext4", "/dev/loop3")
    assert m.super_options == ("rw", "errors=continue")


def test_mount_options_are_validated():
    assert fs.check_mount_options(["noatime", "", "discard"]) == ["noatime", "discard"]
    assert fs.check_mount_options(["noatime,nodiratime", "ro"]) == ["noatime", "nodiratime", "ro"]
    for bad in (["a\nb"], ["x\x00"], ["--bind"], ["bind"], ["ro,remount"], ["X-mount.mkdir"],
                ["loop=/dev/loop0"], ["make-shared"]):
        with pytest.raises(CsiError) as e:
            fs.check_mount_options(bad)
        assert e.value.code == Code.INVALID_ARGUMENT


# ----------------------------------------------------------------------------- mounts

def test_ensure_mounted_is_idempotent_and_detects_conflicts(tmp_path):
    target = str(tmp_path / "stage dir")                   # a space: \040 in mountinfo
    with attached(str(tmp_path / "d.img"), 64 * MiB) as dev, \
            attached(str(tmp_path / "e.img"), 64 * MiB) as other, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_fs(other, "ext4")
        assert fs.mount_info(target) is None
        assert fs.ensure_mounted(dev, target, "ext4", ["noatime"]) is True
        m = fs.mount_info(target)
        assert m is not None and m.fs_type == "ext4" and m.dev == os.stat(dev).st_rdev
        assert m.mount_point == os.path.realpath(target) and "noatime" in m.options
        assert fs.ensure_mounted(dev, target, "ext4", ["noatime"]) is False
        with pytest.raises(fs.MountConflict) as e:
            fs.ensure_mounted(other, target, "ext4")
        assert e.value.code == Code.FAILED_PRECONDITION and e.value.existing.dev == m.dev
        with pytest.raises(fs.MountConflict):
            fs.ensure_mounted(dev, target, "ext4", readonly=True)
        assert [x.mount_point for x in fs.mounts_of_device(dev)] == [m.mount_point]
        with pytest.raises(CsiError) as e2:                 # mounted: never silently auto-cleared
            loop.detach(dev)
        assert e2.value.code == Code.FAILED_PRECONDITION and loop.is_busy(dev)
        assert fs.ensure_unmounted(target) == 1
        assert fs.ensure_unmounted(target) == 0
        assert fs.mount_info(target) is None
    fs.ensure_unmounted(str(tmp_path / "never-existed"))    # missing path: fine


def test_ensure_unmounted_removes_stacked_mounts(tmp_path):
    src, target = tmp_path / "src", str(tmp_path / "stacked")
    src.mkdir()
    os.mkdir(target)
    with cleanup_mounts(target):
        fs.run(["mount", "--bind", str(src), target])
        fs.run(["mount", "--bind", str(src), target])
        assert fs.ensure_unmounted(target) == 2
        assert fs.mount_info(target) is None


def test_bind_read_only_is_really_read_only(tmp_path):
    stage, pub, pub_rw = str(tmp_path / "stage"), str(tmp_path / "pub" / "ro"), str(tmp_path / "pub" / "rw")
    with attached(str(tmp_path / "f.img"), 64 * MiB) as dev, cleanup_mounts(pub, pub_rw, stage):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, stage, "ext4", [])
        with open(os.path.join(stage, "hello"), "w") as f:
            f.write("hi")
        assert fs.ensure_bind(stage, pub, readonly=True) is True   # creates the target directory
        assert fs.ensure_bind(stage, pub, readonly=True) is False
        assert fs.mount_info(pub).readonly
        with open(os.path.join(pub, "hello")) as f:
            assert f.read() == "hi"
        with pytest.raises(OSError) as e:
            open(os.path.join(pub, "new"), "w")
        assert e.value.errno == errno.EROFS
        with pytest.raises(fs.MountConflict):
            fs.ensure_bind(stage, pub, readonly=False)
        assert fs.ensure_bind(stage, pub_rw, options=["nosuid"]) is True
        with open(os.path.join(pub_rw, "new"), "w") as f:
            f.write("rw")
        assert "nosuid" in fs.mount_info(pub_rw).options
        assert not fs.mount_info(stage).readonly            # the staging mount stays writable
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(fs.MountConflict):
            fs.ensure_bind(str(other), pub_rw)


def test_bind_block_device_onto_file(tmp_path):
    target = str(tmp_path / "pub" / "block")
    with attached(str(tmp_path / "g.img"), 16 * MiB) as dev, cleanup_mounts(target):
        assert fs.ensure_bind(dev, target) is True           # creates an empty file to bind onto
        assert fs.is_block_device(target)
        assert os.stat(target).st_rdev == os.stat(dev).st_rdev
        assert fs.ensure_bind(dev, target) is False
        assert fs.block_size(target) == 16 * MiB
        assert fs.volume_stats(target).block and fs.volume_stats(target).total_bytes == 16 * MiB
        fs.ensure_unmounted(target)
        assert not fs.is_block_device(target)


# ----------------------------------------------------------------------------- grow

@pytest.mark.parametrize("fs_type,size,grown", [("ext4", 64 * MiB, 128 * MiB), ("xfs", 320 * MiB, 512 * MiB)])
def test_grow_fs_online(tmp_path, fs_type, size, grown):
    img, target = str(tmp_path / "h.img"), str(tmp_path / "mnt")
    with attached(img, size) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, fs_type)
        fs.ensure_mounted(dev, target, fs_type, [])
        before = fs.volume_stats(target).total_bytes
        fs.grow_fs(dev, target, fs_type)                    # nothing to grow: a quiet no-op
        assert fs.volume_stats(target).total_bytes == before
        os.truncate(img, grown)
        loop.refresh_size(dev)
        assert fs.fs_size(dev, fs_type) == size
        if fs_type == "ext4" and not fs.can_grow_ext_online():
            with pytest.raises(CsiError) as e:          # a clear error, and nothing changes
                fs.grow_fs(dev, target, fs_type)
            assert e.value.code == Code.FAILED_PRECONDITION and "CAP_SYS_RESOURCE" in e.value.message
            pytest.skip("no CAP_SYS_RESOURCE here: online ext4 resize impossible (offline grow is tested)")
        fs.grow_fs(dev, target, fs_type)
        after = fs.volume_stats(target).total_bytes
        assert after > before + (grown - size) * 0.8, (before, after)
        fs.grow_fs(dev, target, fs_type)                    # already full size: still fine
        assert fs.volume_stats(target).total_bytes == after
        fs.ensure_unmounted(target)
        assert fs.fs_size(dev, fs_type) == grown            # the on-disk superblock agrees
        assert fs.grow_unmounted(dev) is False


def test_grow_unmounted_xfs_defers_to_online(tmp_path):
    img, target = str(tmp_path / "x.img"), str(tmp_path / "mnt")
    with attached(img, 320 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "xfs")
        assert fs.grow_unmounted(dev) is False
        os.truncate(img, 400 * MiB)
        loop.refresh_size(dev)
        assert fs.grow_unmounted(dev) is True               # xfs grows only when mounted
        with pytest.raises(CsiError) as e:
            fs.grow_fs(dev, None, "xfs")
        assert e.value.code == Code.FAILED_PRECONDITION
        fs.ensure_mounted(dev, target, "xfs", [])
        fs.grow_fs(dev, target, "xfs")
        fs.ensure_unmounted(target)
        assert fs.grow_unmounted(dev) is False


def test_grow_ext4_offline(tmp_path):
    img, target = str(tmp_path / "o.img"), str(tmp_path / "mnt")
    with attached(img, 64 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        with open(os.path.join(target, "keep"), "w") as f:
            f.write("data")
        before = fs.volume_stats(target).total_bytes
        fs.ensure_unmounted(target)
        os.truncate(img, 128 * MiB)
        loop.refresh_size(dev)
        assert fs.needs_grow(dev)
        assert fs.grow_unmounted(dev, "ext4") is False      # grown offline: nothing left to do
        fs.grow_fs(dev, None, "ext4")
        assert fs.fs_size(dev) == 128 * MiB and not fs.needs_grow(dev)
        fs.grow_fs(dev, None)                               # fits already: no e2fsck, no resize
        fs.ensure_mounted(dev, target, "ext4", [])
        assert fs.volume_stats(target).total_bytes > before + 50 * MiB
        with open(os.path.join(target, "keep")) as f:
            assert f.read() == "data"


# ----------------------------------------------------------------------------- freeze

def test_frozen_thaws_when_body_raises(tmp_path):
    target = str(tmp_path / "frz")
    with attached(str(tmp_path / "i.img"), 64 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        with pytest.raises(RuntimeError):
            with fs.frozen(target, timeout_s=30):
                assert not writable_within(target, 0.5) or pytest.fail("not frozen")
                raise RuntimeError("body failed")
        assert writable_within(target)
        assert fs.thaw(target) is False                     # thaw of a thawed fs is fine


def test_frozen_watchdog_thaws_after_timeout(tmp_path):
    target = str(tmp_path / "frz2")
    with attached(str(tmp_path / "j.img"), 64 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        with pytest.raises(CsiError) as e:
            with fs.frozen(target, timeout_s=0.5) as guard:
                time.sleep(1.0)
                assert guard.timed_out
                assert writable_within(target)              # thawed while the body still runs
        assert e.value.code == Code.INTERNAL and "watchdog" in e.value.message
        with fs.frozen(target, timeout_s=30) as guard:      # a quick body: no error
            pass
        assert not guard.timed_out and writable_within(target)


def test_frozen_thaws_even_if_the_mount_point_goes_away(tmp_path):
    target = str(tmp_path / "frz3")
    with attached(str(tmp_path / "l.img"), 64 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        with fs.frozen(target, timeout_s=30):
            fs.run(["umount", "--lazy", target])           # e.g. a cleanup racing with a snapshot
            assert fs.mount_info(target) is None
        for _ in range(50):                                 # thawed through the held descriptor:
            if not loop.is_busy(dev):                       # the file system can go away now
                break
            time.sleep(0.1)
        assert not loop.is_busy(dev)


# ----------------------------------------------------------------------------- stats

def test_volume_stats_numbers_are_sane(tmp_path):
    target = str(tmp_path / "st")
    with attached(str(tmp_path / "k.img"), 64 * MiB) as dev, cleanup_mounts(target):
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        s0 = fs.volume_stats(target)
        assert 40 * MiB < s0.total_bytes <= 64 * MiB
        assert 0 < s0.available_bytes <= s0.total_bytes - s0.used_bytes
        assert s0.total_inodes > 1000 and 0 < s0.used_inodes < 100
        with open(os.path.join(target, "data"), "wb") as f:
            f.write(os.urandom(8 * MiB))
        fs.sync_fs(target)
        s1 = fs.volume_stats(target)
        assert s1.used_bytes - s0.used_bytes >= 8 * MiB
        assert s1.used_inodes == s0.used_inodes + 1
        assert not s1.block
        dstats = fs.volume_stats(dev)
        assert dstats.block and dstats.total_bytes == 64 * MiB
    with pytest.raises(CsiError) as e:
        fs.volume_stats(str(tmp_path / "gone"))
    assert e.value.code == Code.NOT_FOUND


def test_frozen_all_freezes_the_whole_group_and_thaws_it(tmp_path):
    targets = [str(tmp_path / f"grp{i}") for i in range(2)]
    with attached(str(tmp_path / "g0.img"), 64 * MiB) as d0, attached(str(tmp_path / "g1.img"), 64 * MiB) as d1, \
            cleanup_mounts(*targets):
        for dev, target in zip((d0, d1), targets):
            fs.ensure_fs(dev, "ext4")
            fs.ensure_mounted(dev, target, "ext4", [])
        with fs.frozen_all(targets, timeout_s=30) as guard:
            assert not any(writable_within(t, 0.3) for t in targets)
        assert not guard.timed_out and all(writable_within(t) for t in targets)
        fs.freeze(targets[1])                               # a failing freeze thaws the ones before it
        try:
            with pytest.raises(CsiError) as e, fs.frozen_all(targets, timeout_s=30):
                pytest.fail("the body must not run")
            assert e.value.code == Code.FAILED_PRECONDITION
            assert writable_within(targets[0])
        finally:
            fs.thaw(targets[1])


def test_frozen_all_one_watchdog_for_the_group(tmp_path):
    targets = [str(tmp_path / f"wd{i}") for i in range(2)]
    with attached(str(tmp_path / "w0.img"), 64 * MiB) as d0, attached(str(tmp_path / "w1.img"), 64 * MiB) as d1, \
            cleanup_mounts(*targets):
        for dev, target in zip((d0, d1), targets):
            fs.ensure_fs(dev, "ext4")
            fs.ensure_mounted(dev, target, "ext4", [])
        with pytest.raises(CsiError) as e, fs.frozen_all(targets, timeout_s=0.5) as guard:
            time.sleep(1.0)
            assert guard.timed_out
            assert all(writable_within(t) for t in targets)  # every member thawed while the body runs
        assert e.value.code == Code.INTERNAL and "watchdog" in e.value.message
