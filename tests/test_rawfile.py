"""local/rawfile.py: sparse files attached as real loop devices under pytest's tmp_path."""
from __future__ import annotations

import os

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local import fs, loop
from csi_perssd.local.backend import Backend, Extent
from csi_perssd.local.rawfile import RawfileBackend
from tests.harness.blockio import write_at

pytestmark = pytest.mark.root

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def backend(tmp_path):
    b = RawfileBackend(str(tmp_path / "perssd-root"))
    try:
        yield b
    finally:
        for vid in b.list_volumes():
            dev = b.attached_device(vid)
            if dev:
                for m in reversed(fs.mounts_of_device(dev)):
                    fs.ensure_unmounted(m.mount_point)
            b.delete(vid)


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_implements_backend_protocol_and_is_healthy(backend):
    assert isinstance(backend, Backend) and backend.name == "rawfile"
    assert backend.check() == []


def test_volume_lifecycle_is_idempotent(backend, tmp_path):
    vid = "pvol-lifecycle"
    assert not backend.exists(vid)
    backend.create(vid, 64 * MiB)
    backend.create(vid, 64 * MiB)                           # same again: fine
    assert backend.exists(vid) and backend.size(vid) == 64 * MiB
    assert backend.list_volumes() == [vid]
    disk = backend.disk_path(vid)
    assert os.stat(disk).st_blocks == 0                     # sparse, nothing preallocated
    with pytest.raises(CsiError) as e:
        backend.create(vid, 128 * MiB)
    assert e.value.code == Code.ALREADY_EXISTS

    dev = backend.device(vid)
    assert fs.is_block_device(dev) and fs.block_size(dev) == 64 * MiB
    assert backend.device(vid) == dev
    assert RawfileBackend(backend.root).device(vid) == dev  # a restarted driver finds it again
    assert loop.find(disk) == dev

    target = str(tmp_path / "mnt")
    try:
        fs.ensure_fs(dev, "ext4")
        fs.ensure_mounted(dev, target, "ext4", [])
        for call in (backend.release, backend.delete):      # in use: refused, nothing changes
            with pytest.raises(CsiError) as e:
                call(vid)
            assert e.value.code == Code.FAILED_PRECONDITION
        assert backend.exists(vid) and loop.find(disk) == dev
    finally:
        fs.ensure_unmounted(target)

    backend.release(vid)
    assert loop.find(disk) is None
    backend.release(vid)                                    # idempotent
    dev2 = backend.device(vid)                              # attach again: the data is still there
    assert fs.detect_fs(dev2) == "ext4"
    backend.delete(vid)                                     # detaches, removes everything
    assert not backend.exists(vid) and loop.find(disk) is None
    assert dev2 not in loop.list_attached() or not loop.list_attached()[dev2].startswith(backend.root)
    backend.delete(vid)
    backend.release(vid)
    assert os.listdir(backend.root) == []
    for call in (backend.size, backend.device, backend.allocated_ranges):
        with pytest.raises(CsiError) as e:
            call(vid)
        assert e.value.code == Code.NOT_FOUND
    with pytest.raises(CsiError) as e:
        backend.expand(vid, 128 * MiB)
    assert e.value.code == Code.NOT_FOUND


def test_sizes_round_up_to_4k(backend):
    backend.create("pvol-odd", 10 * MiB + 1)
    assert backend.size("pvol-odd") == 10 * MiB + 4096
    backend.create("pvol-odd", 10 * MiB + 1)                # same request: same volume


def test_expand_grows_file_and_attached_device(backend):
    vid = "pvol-expand"
    backend.create(vid, 64 * MiB)
    dev = backend.device(vid)
    backend.expand(vid, 96 * MiB)
    assert backend.size(vid) == 96 * MiB and fs.block_size(dev) == 96 * MiB
    backend.expand(vid, 32 * MiB)                           # never shrinks
    backend.expand(vid, 96 * MiB)
    assert backend.size(vid) == 96 * MiB
    backend.release(vid)
    backend.expand(vid, 128 * MiB)                          # detached: the next attach sees it
    assert fs.block_size(backend.device(vid)) == 128 * MiB


def test_allocated_ranges_after_writes_at_known_offsets(backend):
    vid = "pvol-ranges"
    backend.create(vid, 64 * MiB)
    assert backend.allocated_ranges(vid) == []
    disk = backend.disk_path(vid)
    write_at(disk, 0, b"a" * 4096)
    write_at(disk, 10 * MiB, b"b" * MiB)
    write_at(disk, 11 * MiB, b"c" * MiB)                    # adjacent: merged with the previous
    write_at(disk, 40 * MiB, b"d" * 8192)
    dev = backend.device(vid)                               # and through the loop device
    write_at(dev, 20 * MiB, b"e" * 65536)
    fs.sync_fs(dev)
    assert backend.allocated_ranges(vid) == [
        Extent(0, 4096), Extent(10 * MiB, 2 * MiB), Extent(20 * MiB, 65536), Extent(40 * MiB, 8192)]
    assert backend.changed_ranges(vid, "any") is None


def test_snapshot_is_point_in_time(backend):
    vid = "pvol-snap"
    backend.create(vid, 64 * MiB)
    dev = backend.device(vid)
    write_at(dev, 1 * MiB, b"A" * 4096)
    assert backend.snapshot_path(vid, "s1") is None
    snap = backend.snapshot(vid, "s1")
    write_at(dev, 1 * MiB, b"B" * 4096)
    write_at(dev, 2 * MiB, b"C" * 4096)
    fs.sync_fs(dev)
    assert read_at(snap, 1 * MiB, 4096) == b"A" * 4096
    assert read_at(snap, 2 * MiB, 4096) == b"\0" * 4096
    assert read_at(backend.disk_path(vid), 1 * MiB, 4096) == b"B" * 4096
    assert os.path.getsize(snap) == 64 * MiB
    assert os.stat(snap).st_blocks * 512 <= 1 * MiB          # the copy stays sparse
    assert backend.snapshot(vid, "s1") == snap               # idempotent: not retaken
    assert read_at(snap, 1 * MiB, 4096) == b"A" * 4096
    assert backend.snapshot_path(vid, "s1") == snap
    assert backend.list_snapshots(vid) == ["s1"]
    assert backend.list_volumes() == [vid]
    backend.delete_snapshot(vid, "s1")
    backend.delete_snapshot(vid, "s1")
    assert backend.snapshot_path(vid, "s1") is None and not os.path.exists(snap)
    backend.snapshot(vid, "s2")
    backend.delete(vid)                                      # takes its snapshots along
    assert not os.path.exists(os.path.dirname(snap))


def test_capacity_subtracts_thin_reservations(tmp_path):
    b = RawfileBackend(str(tmp_path / "perssd-cap"))
    try:
        c0 = b.capacity()
        assert 0 < c0.available_bytes <= c0.total_bytes and c0.max_volume_bytes == c0.available_bytes
        b.create("pvol-a", 1 * GiB)
        c1 = b.capacity()
        assert abs((c0.available_bytes - c1.available_bytes) - GiB) < 32 * MiB
        assert b.reserved_bytes() == GiB
        write_at(b.disk_path("pvol-a"), 0, os.urandom(8 * MiB))
        assert b.reserved_bytes() == GiB - 8 * MiB           # the written part is no longer reserved
        assert abs(b.capacity().available_bytes - c1.available_bytes) < 32 * MiB

        too_big = c1.available_bytes + GiB
        with pytest.raises(CsiError) as e:
            b.create("pvol-huge", too_big)
        assert e.value.code == Code.RESOURCE_EXHAUSTED and not b.exists("pvol-huge")
        with pytest.raises(CsiError) as e:
            b.expand("pvol-a", GiB + too_big)
        assert e.value.code == Code.RESOURCE_EXHAUSTED and b.size("pvol-a") == GiB

        reserved = RawfileBackend(b.root, reserve_bytes=10 * GiB)
        assert abs(c1.available_bytes - reserved.capacity().available_bytes - 10 * GiB) < 32 * MiB

        limited = RawfileBackend(b.root, max_volume_bytes=128 * MiB)
        assert limited.capacity().max_volume_bytes == 128 * MiB
        with pytest.raises(CsiError) as e:
            limited.create("pvol-big", 256 * MiB)
        assert e.value.code == Code.RESOURCE_EXHAUSTED and not limited.exists("pvol-big")
        limited.create("pvol-fits", 128 * MiB)
        with pytest.raises(CsiError) as e:
            limited.expand("pvol-fits", 129 * MiB)
        assert e.value.code == Code.RESOURCE_EXHAUSTED
    finally:
        for vid in b.list_volumes():
            b.delete(vid)


def _loops_under(tmp_path) -> dict[str, str]:
    """Loop devices whose backing file lies under tmp_path (others' tests attach their own)."""
    top = str(tmp_path) + os.sep
    return {dev: f for dev, f in loop.list_attached().items() if f.startswith(top)}


HOSTILE = ["../../etc", "..", ".", "a/b", "/abs", "x" * 200, "a\x00b", "", " lead", ".hidden",
           "a\nb", "vol$(id)", "\u00e9t\u00e9"]


@pytest.mark.parametrize("bad", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_ids_are_rejected_without_side_effects(tmp_path, bad):
    root = tmp_path / "perssd-hostile"
    b = RawfileBackend(str(root))
    assert _loops_under(tmp_path) == {}
    calls = [
        lambda: b.create(bad, MiB), lambda: b.exists(bad), lambda: b.size(bad), lambda: b.device(bad),
        lambda: b.release(bad), lambda: b.delete(bad), lambda: b.expand(bad, 2 * MiB),
        lambda: b.allocated_ranges(bad), lambda: b.snapshot(bad, "s"), lambda: b.snapshot_path(bad, "s"),
        lambda: b.delete_snapshot(bad, "s"), lambda: b.changed_ranges(bad, "s"),
    ]
    for call in calls:
        with pytest.raises(CsiError) as e:
            call()
        assert e.value.code == Code.INVALID_ARGUMENT
    b.create("pvol-ok", MiB)
    try:
        for call in (lambda: b.snapshot("pvol-ok", bad), lambda: b.snapshot_path("pvol-ok", bad),
                     lambda: b.delete_snapshot("pvol-ok", bad)):
            with pytest.raises(CsiError) as e:
                call()
            assert e.value.code == Code.INVALID_ARGUMENT
        assert sorted(os.listdir(root)) == ["pvol-ok"]
        assert os.listdir(root / "pvol-ok") == ["disk.img"]
    finally:
        b.delete("pvol-ok")
    assert os.listdir(root) == [] and _loops_under(tmp_path) == {}, "no loop device left behind"
    assert sorted(os.listdir(tmp_path)) == ["perssd-hostile"]


def test_check_reports_problems(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    problems = RawfileBackend(str(blocker / "root")).check()
    assert any("not writable" in p for p in problems)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    problems = RawfileBackend(str(tmp_path / "ok")).check()
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "fsfreeze", "blkid"):
        assert any(p.startswith(tool + " ") for p in problems), tool


def test_interrupted_create_and_delete_are_cleaned_up(tmp_path):
    root = tmp_path / "perssd-left"
    root.mkdir()
    (root / ".tmp-pvol-x-1234").mkdir()
    (root / ".tmp-pvol-x-1234" / "disk.img").write_bytes(b"")
    (root / ".trash-pvol-y-5678").mkdir()
    (root / "pvol-incomplete").mkdir()                      # a directory without disk.img
    (root / "pvol-z").mkdir()
    (root / "pvol-z" / "disk.img").write_bytes(b"")
    (root / "pvol-z" / ".snap-s1.img.0badc0de.tmp").write_bytes(b"half")
    b = RawfileBackend(str(root))
    assert sorted(os.listdir(root)) == ["pvol-incomplete", "pvol-z"]
    assert os.listdir(root / "pvol-z") == ["disk.img"]
    b.delete("pvol-z")
    assert b.list_volumes() == [] and not b.exists("pvol-incomplete")
    b.create("pvol-incomplete", MiB)                         # an empty directory is taken over
    assert b.list_volumes() == ["pvol-incomplete"]
    b.delete("pvol-incomplete")
    assert os.listdir(root) == []


def test_read_only_block_device_refuses_writes(backend, tmp_path):
    vid = "pvol-ro"
    backend.create(vid, 16 * MiB)
    rw = backend.device(vid)
    write_at(rw, 0, b"R" * 4096)
    ro = backend.device(vid, read_only=True)
    assert ro != rw and backend.device(vid, read_only=True) == ro and backend.device(vid) == rw
    target = str(tmp_path / "pub" / "block")
    try:
        fs.ensure_bind(ro, target, readonly=True)
        assert read_at(target, 0, 4096) == b"R" * 4096
        with pytest.raises(OSError):                        # EPERM/EROFS from the read-only device
            write_at(target, 0, b"W" * 4096)
    finally:
        fs.ensure_unmounted(target)
    backend.expand(vid, 32 * MiB)
    assert fs.block_size(ro) == fs.block_size(rw) == 32 * MiB
    backend.release(vid)
    assert loop.find_all(backend.disk_path(vid)) == []
    assert read_at(backend.disk_path(vid), 0, 4096) == b"R" * 4096


def test_snapshot_of_a_frozen_mounted_volume(backend, tmp_path):
    vid = "pvol-frozen"
    backend.create(vid, 64 * MiB)
    dev = backend.device(vid)
    target = str(tmp_path / "mnt")
    fs.ensure_fs(dev, "ext4")
    try:
        fs.ensure_mounted(dev, target, "ext4", [])
        with open(os.path.join(target, "before"), "w") as f:
            f.write("in the snapshot")
        with fs.frozen(target, timeout_s=20) as guard:      # freeze syncs; the copy must not block
            snap = backend.snapshot(vid, "s1")
        assert not guard.timed_out
        with open(os.path.join(target, "after"), "w") as f:
            f.write("not in the snapshot")
    finally:
        fs.ensure_unmounted(target)
    snapdev = loop.attach(snap, read_only=True)
    snapmnt = str(tmp_path / "snapmnt")
    try:
        fs.ensure_mounted(snapdev, snapmnt, "ext4", ["noload"], readonly=True)
        assert sorted(n for n in os.listdir(snapmnt) if n != "lost+found") == ["before"]
    finally:
        fs.ensure_unmounted(snapmnt)
        loop.detach(snapdev)


def test_sector_size_stays_4k_after_a_reflink_and_the_file_system_still_mounts(tmp_path):
    """On XFS a reflinked file needs 4 KiB-aligned direct I/O; a loop device left to pick its own
    sector size would come back with 4 KiB after the first generation snapshot and refuse a
    file system made with smaller blocks. Every attach uses 4 KiB sectors."""
    from tests.harness.xfsdir import xfs_dir
    with xfs_dir(str(tmp_path / "x"), 320 * MiB) as d:
        b = RawfileBackend(os.path.join(d, "pool"))
        assert b.tracks_changes
        vid = "pvol-sector"
        b.create(vid, 64 * MiB)
        dev = b.device(vid)
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/queue/logical_block_size") as f:
            assert f.read().strip() == "4096"
        fs.ensure_fs(dev, "ext4")
        b.release(vid)
        b.snapshot(vid, "gen-1")                    # the file is now reflinked
        dev = b.device(vid)
        with open(f"/sys/block/{os.path.basename(dev)}/queue/logical_block_size") as f:
            assert f.read().strip() == "4096"
        target = str(tmp_path / "mnt")
        fs.ensure_mounted(dev, target, "ext4", [])
        fs.ensure_unmounted(target)
        b.delete(vid)


@pytest.mark.parametrize("fs_type,mkfs,size", [("ext4", ["mkfs.ext4", "-q", "-F", "-b", "1024"], 64 * MiB),
                                               ("xfs", ["mkfs.xfs", "-q", "-f", "-s", "size=512"], 320 * MiB)])
def test_a_volume_whose_file_system_needs_512_byte_io_gets_a_loop_device_it_mounts_on(backend, tmp_path, fs_type,
                                                                                      mkfs, size):
    """Volumes formatted on an LV with 512 B sectors before mkfs was told 4 KiB (ext4 with 1 KiB
    blocks, xfs with 512 B sectors) still stage on a rawfile node: their loop device gets 512 B
    sectors; every other volume 4 KiB."""
    import subprocess
    backend.create("pvol-legacy", size)
    subprocess.run([*mkfs, backend.disk_path("pvol-legacy")], check=True, timeout=120, capture_output=True)
    dev = backend.device("pvol-legacy")
    assert fs.logical_sector_size(dev) == 512
    mnt = str(tmp_path / "mnt")
    try:
        fs.ensure_mounted(dev, mnt, fs_type)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"still mounts")
    finally:
        fs.ensure_unmounted(mnt)
    assert backend.device("pvol-legacy") == dev                # attached once
    backend.create("pvol-fresh", size)
    fresh = backend.device("pvol-fresh")
    assert fs.logical_sector_size(fresh) == loop.SECTOR_SIZE
    assert fs.ensure_fs(fresh, fs_type)
    backend.release("pvol-fresh")
    assert fs.logical_sector_size(backend.device("pvol-fresh")) == loop.SECTOR_SIZE    # 4 KiB fs: 4 KiB again
