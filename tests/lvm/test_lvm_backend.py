"""LvmBackend on a real thin pool: lifecycle, tags, snapshots, capacity, block maps."""
from __future__ import annotations

import os
import subprocess

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local.backend import Backend, Extent
from csi_perssd.local.lvm import LvmBackend
from csi_perssd.local import fs, proc
from csi_perssd.local.lvmcli import NO_UDEV_CONFIG, dm_name

from tests.lvm.util import CHUNK, POOL, MiB, device_size, lvm, read_at, write_at


def test_is_a_backend(backend: LvmBackend) -> None:
    assert isinstance(backend, Backend)


def test_check_is_clean_on_a_healthy_pool(backend: LvmBackend) -> None:
    assert backend.check() == []


def test_check_names_a_missing_volume_group() -> None:
    problems = LvmBackend("no-such-vg", lvm_config=NO_UDEV_CONFIG).check()
    assert len(problems) == 1 and "volume group 'no-such-vg' not found" in problems[0]


def test_check_names_a_missing_thin_pool(backend: LvmBackend) -> None:
    problems = LvmBackend(backend.vg, "no-such-pool", lvm_config=NO_UDEV_CONFIG).check()
    assert len(problems) == 1 and "thin pool" in problems[0] and "no-such-pool" in problems[0]


def test_create_is_zero_filled_thin_and_idempotent(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 64 * MiB)
    backend.create(vid, 64 * MiB)                       # same size again: quiet
    assert backend.exists(vid)
    assert backend.size(vid) == 64 * MiB
    assert vid in backend.list_volumes()
    assert backend.allocated_ranges(vid) == []           # nothing provisioned yet
    dev = backend.device(vid)
    assert device_size(dev) == 64 * MiB
    assert read_at(dev, 0, MiB) == bytes(MiB)
    with pytest.raises(CsiError) as e:
        backend.create(vid, 128 * MiB)
    assert e.value.code == Code.ALREADY_EXISTS


def test_odd_sizes_round_up(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 10 * MiB + 1)
    assert backend.size(vid) >= 10 * MiB + 1
    backend.create(vid, 10 * MiB + 1)


def test_missing_volume_is_not_found(backend: LvmBackend) -> None:
    for call in (lambda: backend.size("pvol-missing"), lambda: backend.device("pvol-missing"),
                 lambda: backend.expand("pvol-missing", MiB),
                 lambda: backend.allocated_ranges("pvol-missing")):
        with pytest.raises(CsiError) as e:
            call()
        assert e.value.code == Code.NOT_FOUND
    assert not backend.exists("pvol-missing")
    backend.delete("pvol-missing")                       # idempotent
    backend.release("pvol-missing")


def test_a_batch_stages_with_one_lvs_and_lists_what_lvcreate_made(backend: LvmBackend, vid: str) -> None:
    """What a NodeStage asks of the backend (exists, create, device, size) inside one batch runs
    lvs once and lvcreate once; the LV it reports as made (size rounded up to whole extents, its
    path, active) is what a fresh lvs lists afterwards. Outside a batch every call reads afresh."""
    size = 5 * MiB + 512                                # not a whole 4 MiB extent
    with proc.tally() as t, backend.batch():
        assert not backend.exists(vid)
        backend.create(vid, size)
        dev = backend.device(vid)
        got = backend.size(vid)
        assert backend.exists(vid)
    assert t.names() == ["lvm lvs", "lvm lvcreate"], t.summary()
    fresh = next(lv for lv in backend.lvm.lvs(backend.vg) if lv.name == backend.volume_lv(vid))
    assert got == fresh.size and got >= size and got % fresh.extent_size == 0, (got, fresh)
    assert fresh.active and os.path.samefile(dev, fresh.path)
    assert device_size(dev) == got
    with proc.tally() as t:
        backend.size(vid)
        backend.device(vid)
    assert t.names() == ["lvm lvs", "lvm lvs"], t.summary()
    with proc.tally() as t, backend.batch():           # any other change drops the listing
        backend.expand(vid, got + 8 * MiB)
        assert backend.size(vid) == fresh.size + 8 * MiB
    assert t.names() == ["lvm lvs", "lvm lvextend", "lvm lvs"], t.summary()


def test_create_unlisted_runs_lvcreate_alone_and_knows_what_it_made(backend: LvmBackend, vid: str) -> None:
    """A volume the caller holds no record of: one lvcreate and no lvs (the pool's room from its
    dm status, its fields from the last listing); exists, size and device come from what it
    made, equal to what a fresh lvs lists. Without a listing seen yet it declines (nothing run)."""
    fresh_backend = LvmBackend(backend.vg, POOL, lvm_config=NO_UDEV_CONFIG)
    with proc.tally() as t, fresh_backend.batch():
        assert not fresh_backend.create_unlisted(vid, 8 * MiB)       # the pool never listed
        assert fresh_backend.plan_unlisted(vid, 8 * MiB) is None
    assert t.names() == [] and not backend.exists(vid)
    size = 5 * MiB + 512
    backend.capacity()                                  # a listing: the pool is known
    with proc.tally() as t, backend.batch():
        assert not backend.create_unlisted(vid, 0)
        assert backend.plan_unlisted(vid, 0) is None
        planned = backend.plan_unlisted(vid, size)      # what it would make, before it exists
        assert planned is not None and not os.path.exists(planned.disk)
        assert backend.create_unlisted(vid, size)
        assert backend.exists(vid)
        got, dev = backend.size(vid), backend.device(vid)
    assert t.names() == ["lvm lvcreate"], t.summary()
    listed = next(lv for lv in backend.lvm.lvs(backend.vg) if lv.name == backend.volume_lv(vid))
    assert got == listed.size and got >= size and listed.active, (got, listed)
    assert backend._volume([listed], vid) is not None, "tagged as a volume of this vid"
    assert os.path.samefile(dev, listed.path) and device_size(dev) == got
    assert planned.size == got and os.path.samefile(planned.disk, dev), (planned, got, dev)
    assert planned.sector_size == fs.logical_sector_size(dev)


def test_create_unlisted_declines_an_existing_lv_and_a_full_pool(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 8 * MiB)
    write_at(backend.device(vid), 0, b"kept" * 1024)
    with proc.tally() as t, backend.batch():
        assert not backend.create_unlisted(vid, 8 * MiB)            # lvcreate refuses the name
        assert backend.exists(vid)                                  # the listed way, afresh
    assert t.names() == ["lvm lvcreate", "lvm lvs"], t.summary()
    assert read_at(backend.device(vid), 0, 4096) == b"kept" * 1024, "the LV was left alone"
    other = vid + "-b"
    ratio = backend.capacity().metadata_used_ratio
    tight = LvmBackend(backend.vg, POOL, lvm_config=NO_UDEV_CONFIG, metadata_full_ratio=ratio / 2)
    tight.capacity()
    with proc.tally() as t, tight.batch():
        assert not tight.create_unlisted(other, 8 * MiB)           # room read from the dm status
    assert t.names() == [] and not backend.exists(other)


def test_expand_grows_the_device_and_never_shrinks(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 32 * MiB)
    dev = backend.device(vid)
    backend.expand(vid, 80 * MiB)
    assert backend.size(vid) == 80 * MiB
    assert device_size(dev) == 80 * MiB
    backend.expand(vid, 16 * MiB)
    assert backend.size(vid) == 80 * MiB


def test_release_deactivates_and_device_reactivates(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 16 * MiB)
    dev = backend.device(vid)
    write_at(dev, 0, b"x" * 4096)
    backend.release(vid)
    backend.release(vid)
    assert not os.path.exists("/dev/mapper/" + dm_name(backend.vg, backend.volume_lv(vid)))
    dev = backend.device(vid)
    assert read_at(dev, 0, 4096) == b"x" * 4096


def test_long_ids_map_to_hashed_lv_names(backend: LvmBackend) -> None:
    vid = "v" * 128
    try:
        backend.create(vid, 8 * MiB)
        assert backend.volume_lv(vid).startswith("ph-")
        assert backend.list_volumes().count(vid) == 1
        assert backend.size(vid) == 8 * MiB
    finally:
        backend.delete(vid)
    assert not backend.exists(vid)


def test_untagged_lvs_are_never_touched(backend: LvmBackend, vid: str) -> None:
    name = backend.volume_lv(vid)
    lvm("lvcreate", "--type", "thin", "-V", "8m", "--thinpool", POOL, "-n", name, backend.vg)
    lvm("lvcreate", "--type", "thin", "-V", "8m", "--thinpool", POOL, "-n", "foreign", backend.vg)
    try:
        for call in (lambda: backend.create(vid, 8 * MiB), lambda: backend.delete(vid),
                     lambda: backend.size(vid)):
            with pytest.raises(CsiError) as e:
                call()
            assert e.value.code == Code.FAILED_PRECONDITION
            assert "not tagged" in e.value.message
        assert vid not in backend.list_volumes()
        for v in backend.list_volumes():
            backend.delete(v)
        names = {lv.name for lv in backend.lvm.lvs(backend.vg)}
        assert {name, "foreign"} <= names
    finally:
        lvm("lvremove", "-y", f"{backend.vg}/{name}", f"{backend.vg}/foreign")


def test_delete_of_an_open_volume_fails_and_keeps_it(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 8 * MiB)
    fd = os.open(backend.device(vid), os.O_RDONLY)
    try:
        with pytest.raises(CsiError) as e:
            backend.delete(vid)
        assert e.value.code == Code.FAILED_PRECONDITION and "in use" in e.value.message
        assert backend.exists(vid)
        backend.release(vid)                                # open: stays active, no error
    finally:
        os.close(fd)
    backend.delete(vid)
    assert not backend.exists(vid)


def test_snapshot_is_a_point_in_time_copy(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 16 * MiB)
    dev = backend.device(vid)
    write_at(dev, 0, b"A" * CHUNK)
    snap = backend.snapshot(vid, "gen-1")
    assert backend.snapshot(vid, "gen-1") == snap          # idempotent
    assert backend.snapshot_path(vid, "gen-1") == snap
    assert backend.snapshot_path(vid, "gen-2") is None
    write_at(dev, 0, b"B" * CHUNK)
    assert read_at(snap, 0, CHUNK) == b"A" * CHUNK
    assert read_at(dev, 0, CHUNK) == b"B" * CHUNK
    assert backend.snapshots(vid) == ["gen-1"]
    assert vid in backend.list_volumes() and len(backend.list_volumes()) >= 1
    assert all(not v.startswith("gen-") for v in backend.list_volumes())
    with pytest.raises(OSError):
        write_at(snap, 0, b"C" * 512)                    # read-only snapshot
    backend.delete_snapshot(vid, "gen-1")
    backend.delete_snapshot(vid, "gen-1")
    assert backend.snapshot_path(vid, "gen-1") is None


def test_delete_removes_the_volumes_snapshots(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 16 * MiB)
    backend.snapshot(vid, "s1")
    backend.snapshot(vid, "s2")
    assert backend.snapshots(vid) == ["s1", "s2"]
    backend.delete(vid)
    assert not backend.exists(vid)
    tagged = [lv.name for lv in backend.lvm.lvs(backend.vg) if f"perssd.of={vid}" in lv.tags]
    assert tagged == []
    assert backend.snapshot_path(vid, "s1") is None
    backend.delete(vid)


def test_capacity_reports_data_and_metadata(backend: LvmBackend, vid: str) -> None:
    generous = LvmBackend(backend.vg, POOL, lvm_config=NO_UDEV_CONFIG, overprovision_ratio=100)
    before = generous.capacity()
    pool = next(lv for lv in backend.lvm.lvs(backend.vg) if lv.name == POOL)
    assert before.total_bytes == pool.size > 7 * 2**30
    assert 0 < before.metadata_used_ratio < 0.5
    backend.create(vid, 64 * MiB)
    write_at(backend.device(vid), 0, os.urandom(16 * MiB))
    after = generous.capacity()
    assert after.total_bytes == before.total_bytes
    used = before.available_bytes - after.available_bytes
    assert 15 * MiB <= used <= 18 * MiB, used            # data_percent has 0.01 % resolution
    strict = backend.capacity()                            # no overcommit: promised sizes count
    assert strict.available_bytes <= before.total_bytes - 64 * MiB


def test_nearly_full_metadata_refuses_new_volumes(backend: LvmBackend, vid: str) -> None:
    ratio = backend.capacity().metadata_used_ratio
    tight = LvmBackend(backend.vg, POOL, lvm_config=NO_UDEV_CONFIG,
                       metadata_full_ratio=ratio / 2)
    with pytest.raises(CsiError) as e:
        tight.create(vid, 8 * MiB)
    assert e.value.code == Code.RESOURCE_EXHAUSTED and "metadata" in e.value.message
    assert tight.capacity().available_bytes == 0
    assert not backend.exists(vid)
    backend.create(vid, 8 * MiB)
    with pytest.raises(CsiError) as e:
        tight.snapshot(vid, "s1")
    assert e.value.code == Code.RESOURCE_EXHAUSTED


def test_allocated_ranges_are_exactly_the_written_chunks(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 64 * MiB)
    dev = backend.device(vid)
    write_at(dev, 0, os.urandom(4096))                        # chunk 0 (partial)
    write_at(dev, 5 * MiB, os.urandom(3 * CHUNK))            # three chunks
    write_at(dev, 5 * MiB + 3 * CHUNK, os.urandom(CHUNK))    # touching: merged
    write_at(dev, 63 * MiB + 100, os.urandom(10))            # last MiB, unaligned
    assert backend.allocated_ranges(vid) == [
        Extent(0, CHUNK), Extent(5 * MiB, 4 * CHUNK), Extent(63 * MiB, CHUNK)]


def test_changed_ranges_via_thin_delta(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 64 * MiB)
    dev = backend.device(vid)
    write_at(dev, 0, os.urandom(MiB))
    write_at(dev, 8 * MiB, os.urandom(2 * CHUNK))
    backend.snapshot(vid, "base")
    assert backend.changed_ranges(vid, "base") == []
    write_at(dev, 256 * 1024 + 10, b"z" * 100)               # inside chunk 4 (shared before)
    write_at(dev, 8 * MiB + CHUNK, os.urandom(CHUNK))         # second chunk of the 8 MiB write
    write_at(dev, 20 * MiB, os.urandom(3 * CHUNK))            # never written before
    expected = [Extent(4 * CHUNK, CHUNK), Extent(8 * MiB + CHUNK, CHUNK),
                Extent(20 * MiB, 3 * CHUNK)]
    assert backend.changed_ranges(vid, "base") == expected
    assert backend.changed_ranges(vid, "base") == expected   # metadata snap was released
    assert backend.changed_ranges(vid, "no-such-snap") is None
    for call in (lambda: backend.changed_ranges(vid, "base", "no-such-snap"),
                 lambda: backend.allocated_ranges(vid, "no-such-snap")):
        with pytest.raises(CsiError) as e:
            call()
        assert e.value.code == Code.NOT_FOUND


def test_discarded_blocks_count_as_changed(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 16 * MiB)
    dev = backend.device(vid)
    write_at(dev, 0, os.urandom(4 * CHUNK))
    backend.snapshot(vid, "base")
    subprocess.run(["blkdiscard", "-o", str(CHUNK), "-l", str(2 * CHUNK), dev], check=True)
    assert backend.changed_ranges(vid, "base") == [Extent(CHUNK, 2 * CHUNK)]
    assert backend.allocated_ranges(vid) == [Extent(0, CHUNK), Extent(3 * CHUNK, CHUNK)]


def test_stale_metadata_snapshot_is_recovered(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 16 * MiB)
    write_at(backend.device(vid), 0, os.urandom(CHUNK))
    tpool = dm_name(backend.vg, POOL) + "-tpool"
    subprocess.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], check=True)
    assert backend.allocated_ranges(vid) == [Extent(0, CHUNK)]
    # released afterwards: reserving again works
    subprocess.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], check=True)
    subprocess.run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], check=True)
