"""Host-side tests of the LVM/device code that need no device-mapper: parsing, naming, decisions.

The real LVM path runs in the VM suite (tests/lvm, `make test-lvm`)."""
from __future__ import annotations

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local import devices
from csi_perssd.local.backend import Extent
from csi_perssd.local.devices import BlockDevice, parse_blkid_export
from csi_perssd.local.lvm import LvmBackend, blocks_to_extents, merge_extents
from csi_perssd.local.lvmcli import (ThinRange, classify, dm_name, parse_thin_delta,
                                     parse_thin_dump)
from csi_perssd.cli.pool import format_status, plan

# Output of thin_delta / thin_dump 0.9.0 captured in the test VM.
DELTA_TERSE = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="1">
    <same begin="5" length="1"/>
    <different begin="6" length="1"/>
    <same begin="7" length="1"/>
    <right_only begin="100" length="2"/>
    <left_only begin="200" length="3"/>
  </diff>
</superblock>"""
DELTA_VERBOSE = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="1">
    <same>
      <range begin="5" data_begin="0" length="1"/>
    </same>
    <different>
      <range begin="6" left_data_begin="1" right_data_begin="3" length="1"/>
    </different>
    <right_only>
      <range begin="100" data_begin="4" length="2"/>
    </right_only>
  </diff>
</superblock>"""
DUMP = """<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="5" data_block="0" time="0"/>
    <single_mapping origin_block="6" data_block="3" time="1"/>
    <range_mapping origin_begin="100" data_begin="4" length="2" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="1" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="9" data_block="7" time="0"/>
  </device>
</superblock>"""
K64 = 64 * 1024


def test_thin_delta_terse_and_verbose() -> None:
    assert parse_thin_delta(DELTA_TERSE) == [
        ThinRange(5, 1, "same"), ThinRange(6, 1, "different"), ThinRange(7, 1, "same"),
        ThinRange(100, 2, "right_only"), ThinRange(200, 3, "left_only")]
    assert parse_thin_delta(DELTA_VERBOSE) == [
        ThinRange(5, 1, "same"), ThinRange(6, 1, "different"), ThinRange(100, 2, "right_only")]


def test_thin_dump_of_one_device() -> None:
    assert parse_thin_dump(DUMP, 1) == [ThinRange(5, 1), ThinRange(6, 1), ThinRange(100, 2)]
    assert parse_thin_dump(DUMP, 2) == [ThinRange(9, 1)]
    assert parse_thin_dump(DUMP, 3) == []


def test_garbage_tool_output_is_internal() -> None:
    with pytest.raises(CsiError) as e:
        parse_thin_delta("thin_delta: no metadata snapshot")
    assert e.value.code == Code.INTERNAL


def test_blocks_to_byte_extents_merge_and_clip() -> None:
    ranges = parse_thin_dump(DUMP, 1)
    assert blocks_to_extents(ranges, K64, 200 * K64) == [Extent(5 * K64, 2 * K64),
                                                          Extent(100 * K64, 2 * K64)]
    # a volume ending inside block 100 is clipped at its end
    assert blocks_to_extents(ranges, K64, 100 * K64 + 10) == [Extent(5 * K64, 2 * K64),
                                                               Extent(100 * K64, 10)]
    assert merge_extents([Extent(10, 5), Extent(0, 10), Extent(12, 1), Extent(30, 0)]) == \
        [Extent(0, 15)]


def test_dm_names_double_dashes() -> None:
    assert dm_name("perssd", "perssd-pool") == "perssd-perssd--pool"
    assert dm_name("my-vg", "pv-a-b") == "my--vg-pv--a--b"


@pytest.mark.parametrize("stderr,code", [
    ('Volume group "nosuch" not found', Code.NOT_FOUND),
    ('Failed to find logical volume "perssd/x"', Code.NOT_FOUND),
    ("Insufficient free space: 1024 extents needed, but only 10 available", Code.RESOURCE_EXHAUSTED),
    ("Cannot create new thin volume, free space in thin pool perssd/pool reached threshold.",
     Code.RESOURCE_EXHAUSTED),
    ("Logical volume perssd/pv-x in use.", Code.FAILED_PRECONDITION),
    ("Size is not a multiple of 512.", Code.INTERNAL),
])
def test_lvm_errors_map_to_csi_codes(stderr: str, code: Code) -> None:
    assert classify(stderr) == code


def test_lv_names_follow_lvm_rules() -> None:
    b = LvmBackend("perssd")
    assert b.volume_lv("pvol-0123abcd") == "pv-pvol-0123abcd"
    for vid in ("a" * 128, "x_tmeta", "y_rimage_0", "z_pmspare"):
        name = b.volume_lv(vid)
        assert name.startswith("ph-") and len(name) == 43, name
    assert b.volume_lv("a" * 128) != b.volume_lv("a" * 127)
    # ids map one way only: a hashed name can never be a plain one
    assert b.snapshot_lv("v", "s1") != b.snapshot_lv("v", "s2") != b.snapshot_lv("v1", "s")
    long_vg = LvmBackend("g" * 100)
    assert long_vg.volume_lv("pvol-" + "0" * 32).startswith("ph-")   # dm name would be too long
    with pytest.raises(CsiError) as e:
        b.volume_lv("../etc")
    assert e.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(CsiError):
        b.snapshot_lv("v", "a/b")


def test_check_reports_what_is_missing_here() -> None:
    problems = LvmBackend("perssd-host-test").check()
    assert problems, "the host kernel has no dm_thin_pool: check() must say so"
    assert any("dm_thin_pool" in p or "not found" in p for p in problems)


def test_blkid_export_parsing() -> None:
    assert parse_blkid_export("DEVNAME=/dev/x\nTYPE=LVM2_member\nUSAGE=raid\n") == "LVM2_member"
    assert parse_blkid_export("DEVNAME=/dev/x\nPTUUID=ab\nPTTYPE=gpt\n") == "gpt"
    assert parse_blkid_export("") == ""


def _dev(path: str, **kw) -> BlockDevice:
    return BlockDevice(path=path, name=path.rsplit("/", 1)[-1], kind="nvme", **kw)


def test_plan_takes_empty_refuses_used_and_force_never_takes_busy() -> None:
    empty, ext4 = _dev("/dev/nvme0n1"), _dev("/dev/nvme1n1", signature="ext4")
    mounted = _dev("/dev/nvme2n1", signature="xfs", mounts=["/data"])
    ours = _dev("/dev/nvme3n1", signature="LVM2_member", holders=["dm-0"])
    take, wipe, msgs = plan([empty, ours], {"/dev/nvme3n1"}, auto=False, force=False)
    assert take == [empty] and wipe == [] and msgs == ["/dev/nvme3n1: already in the volume group"]
    with pytest.raises(CsiError) as e:
        plan([empty, ext4], set(), auto=False, force=False)
    assert e.value.code == Code.FAILED_PRECONDITION
    assert "/dev/nvme1n1 holds a ext4 signature (pass --force to wipe it)" in e.value.message
    take, wipe, _ = plan([empty, ext4], set(), auto=False, force=True)
    assert take == [empty, ext4] and wipe == [ext4]
    with pytest.raises(CsiError) as e:
        plan([mounted], set(), auto=False, force=True)
    assert "is mounted at /data" in e.value.message and "--force" not in e.value.message
    take, _, msgs = plan([empty, ext4, mounted], set(), auto=True, force=False)
    assert take == [empty] and len(msgs) == 2


def test_resolve_rejects_non_dev_paths() -> None:
    with pytest.raises(CsiError) as e:
        devices.resolve("/etc/passwd")
    assert e.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(CsiError) as e:
        devices.resolve("/dev/does-not-exist")
    assert e.value.code == Code.NOT_FOUND


def test_status_formatting() -> None:
    st = {"volume_group": "perssd", "thin_pool": "perssd-pool", "problems": ["x missing"],
          "devices": [{"path": "/dev/nvme0n1", "size": 2**31, "state": "in pool",
                       "model": "M", "serial": "S"}],
          "pool": {"size": 2**30, "data_percent": 1.5, "metadata_percent": 10.0,
                   "metadata_size": 4 << 20, "chunk_size": 65536, "zero": True, "active": True},
          "volumes": [{"id": "pvol-1", "size": 2**20, "data_percent": None, "active": False,
                       "snapshots": 2}]}
    text = format_status(st)
    assert "/dev/nvme0n1" in text and "2.00 GiB" in text and "M S" in text
    assert "data 1.50% used, metadata 10.00%" in text and "chunk 64 KiB" in text
    assert "pvol-1" in text and "snapshots 2" in text and "problem: x missing" in text
