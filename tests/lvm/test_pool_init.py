"""NVMe discovery (pyudev) and `pool init` refusing anything that is not empty, on emulated NVMe."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from csi_perssd.cli import pool as pool_cli
from csi_perssd.errors import Code, CsiError
from csi_perssd.local import devices
from csi_perssd.local.lvm import LvmBackend
from csi_perssd.local.lvmcli import NO_UDEV_CONFIG

from tests.lvm.util import POOL_DEVICE, SCRATCH_DEVICE, lvm

SCRATCH_VG = "perssd-scratch"


def _reread_partitions(dev: str) -> None:
    """BLKRRPART, retried: udev in the guest probes a device right after it was written."""
    for _ in range(40):
        subprocess.run(["udevadm", "settle"], capture_output=True)
        if subprocess.run(["blockdev", "--rereadpt", dev], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"blockdev --rereadpt {dev} kept failing (device busy)")


def _wipe(dev: str) -> None:
    subprocess.run(["lvm", "vgremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", SCRATCH_VG],
                   capture_output=True)
    subprocess.run(["lvm", "pvremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", dev],
                   capture_output=True)
    subprocess.run(["wipefs", "--all", dev], check=True, capture_output=True)
    _reread_partitions(dev)


@pytest.fixture
def scratch(backend: LvmBackend) -> Iterator[str]:
    """The second NVMe disk, empty; the session pool exists on the first."""
    _wipe(SCRATCH_DEVICE)
    yield SCRATCH_DEVICE
    _wipe(SCRATCH_DEVICE)


def _init(spec: str, **kw) -> list[str]:
    return pool_cli.init(spec, SCRATCH_VG, "perssd-pool", lvm_config=NO_UDEV_CONFIG, **kw)


def test_discovers_nvme_namespaces_with_model_serial_size(scratch: str) -> None:
    found = {d.path: d for d in devices.nvme_namespaces()}
    assert set(found) >= {POOL_DEVICE, scratch}
    pool_dev, empty = found[POOL_DEVICE], found[scratch]
    assert pool_dev.kind == "nvme" and pool_dev.model == "QEMU NVMe Ctrl"
    assert (pool_dev.serial, empty.serial) == ("perssd-test0", "perssd-test1")
    assert (pool_dev.size, empty.size) == (24 << 30, 2 << 30)
    assert empty.empty and empty.in_use() == []
    assert pool_dev.signature == "LVM2_member"
    assert pool_dev.holders                       # the pool's dm devices sit on it
    assert not pool_dev.empty and pool_dev.busy


def test_auto_finds_nothing_when_every_disk_holds_data(scratch: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", scratch], check=True)
    assert devices.lookup(scratch).signature == "ext4"
    with pytest.raises(CsiError) as e:
        _init("auto")
    assert e.value.code == Code.FAILED_PRECONDITION
    assert f"{scratch}: skipped, it holds a ext4 signature" in e.value.message
    assert f"{POOL_DEVICE}: skipped" in e.value.message


def test_explicit_non_empty_device_is_refused_without_force(scratch: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", scratch], check=True)
    with pytest.raises(CsiError) as e:
        _init(scratch)
    assert e.value.code == Code.FAILED_PRECONDITION
    assert "ext4" in e.value.message and "--force" in e.value.message
    assert devices.lookup(scratch).signature == "ext4"        # untouched


def test_partitions_are_refused(scratch: str) -> None:
    # an MBR with one Linux partition at 1 MiB, 64 MiB long (sfdisk/parted are not installed)
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 64 * 2048)
    with open(scratch, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    _reread_partitions(scratch)
    assert devices.lookup(scratch).signature == "dos"
    d = devices.lookup(scratch)
    assert d.partitions == [os.path.basename(scratch) + "p1"]
    with pytest.raises(CsiError) as e:
        _init(scratch)
    assert "has partitions" in e.value.message


def test_mounted_device_is_refused_even_with_force(scratch: str, tmp_path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", scratch], check=True)
    mnt = tmp_path / "m"
    mnt.mkdir()
    subprocess.run(["mount", scratch, str(mnt)], check=True)
    try:
        with pytest.raises(CsiError) as e:
            _init(scratch, force=True)
        assert f"is mounted at {mnt}" in e.value.message
        assert "--force" not in e.value.message
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_in_use_pool_device_is_refused_even_with_force(scratch: str) -> None:
    with pytest.raises(CsiError) as e:
        _init(POOL_DEVICE, force=True)
    assert "is held by" in e.value.message


def test_force_wipes_and_init_is_idempotent(scratch: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", scratch], check=True)
    msgs = _init(scratch, force=True)
    assert any("wiping" in m for m in msgs), msgs
    assert any("created thin pool" in m for m in msgs), msgs
    again = _init(scratch)
    assert f"{scratch}: already in the volume group" in again
    assert any("exists, kept" in m for m in again)
    b = LvmBackend(SCRATCH_VG, "perssd-pool", lvm_config=NO_UDEV_CONFIG)
    assert b.check() == []
    b.create("pvol-x", 1 << 20)
    st = pool_cli.status(SCRATCH_VG, "perssd-pool", lvm_config=NO_UDEV_CONFIG)
    assert st["pool"]["zero"] and st["pool"]["chunk_size"] == 64 * 1024
    assert [v["id"] for v in st["volumes"]] == ["pvol-x"]
    states = {d["path"]: d["state"] for d in st["devices"]}
    assert states[scratch] == "in pool"
    b.delete("pvol-x")


def test_auto_takes_only_the_empty_disk(scratch: str) -> None:
    msgs = _init("auto")
    assert f"{POOL_DEVICE}: skipped" in " ".join(msgs)
    assert any(f"created volume group {SCRATCH_VG} on {scratch}" == m for m in msgs), msgs
    pvs = {pv.name: pv.vg for pv in LvmBackend(SCRATCH_VG).lvm.pvs()}
    assert pvs[scratch] == SCRATCH_VG and pvs[POOL_DEVICE] != SCRATCH_VG


def test_pool_status_cli(backend: LvmBackend, vid: str) -> None:
    backend.create(vid, 4 << 20)
    res = subprocess.run([sys.executable, "-m", "csi_perssd.cli", "pool", "status",
                          "--volume-group", backend.vg, "--lvm-config", NO_UDEV_CONFIG],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"volume group {backend.vg}, thin pool perssd-pool" in res.stdout
    assert f"{POOL_DEVICE}" in res.stdout and "in pool" in res.stdout
    assert vid in res.stdout and "zeroing on" in res.stdout
    assert "problem" not in res.stdout
    lvm("lvs", backend.vg)          # the CLI left lvm in a usable state
