"""A lazy stage whose local volume is made while its server starts (LVM: lvcreate overlaps the
server's start and the device set-up): the server serves the planned size before the disk
exists (reads from the object store, writes wait) and opens it when the plugin asks."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from csi_perssd import volume_io
from csi_perssd.errors import Code, CsiError
from csi_perssd.lazy.manager import LazyManager
from csi_perssd.local import fs
from csi_perssd.local.backend import Planned
from csi_perssd.remote.filestore import FileStore
from tests.harness.blockio import write_at
from tests.lazy.helpers import pread_direct

MiB = 1 << 20
pytestmark = [pytest.mark.root]


def _volume(tmp_path: Path) -> tuple[bytes, LazyManager, object]:
    data = os.urandom(8 * MiB)
    src = tmp_path / "src"
    src.write_bytes(data)
    manifest, _ = volume_io.flush_path(FileStore(str(tmp_path / "store")), str(src), len(data), 4 * MiB)
    mgr = LazyManager(str(tmp_path / "state"), {"catalog": f"file://{tmp_path / 'store'}"},
                      fetch_timeout=20, workers=0)
    return data, mgr, manifest


def test_the_device_is_up_before_the_disk_exists_and_reads_wait_for_its_open(tmp_path: Path):
    data, mgr, manifest = _volume(tmp_path)
    disk, vid = tmp_path / "disk", "pvol-pending"
    mgr.begin(vid, str(disk), manifest, planned=Planned(str(disk), len(data), 512))   # type: ignore[arg-type]
    try:
        assert mgr.start_early(vid, {}).result(timeout=120) is None
        dev = mgr.device(vid)                      # a device on the file before the open
        assert not disk.exists(), "nothing touches the planned path before the open"
        assert fs.block_size(dev) == len(data) and fs.logical_sector_size(dev) == 512
        st = mgr.status(vid)
        assert st is not None and st["disk_open"] is False and st["store_ready"], st
        # a read before the open (a device scanner's: lvcreate scans every block device) is
        # answered from the object store at once, and nothing is written anywhere
        assert pread_direct(dev, 4 * MiB - 4096, 8192) == data[4 * MiB - 4096:4 * MiB + 4096]
        assert pread_direct(dev, len(data) - 4096, 4096) == data[-4096:]
        assert not disk.exists()
        st = mgr.status(vid)
        assert st is not None and st["on_demand"] == 0 and st["missing"] == 2, st
        # a write waits for the open (it lands on the local volume)
        page = os.urandom(4096)
        done: list[bool] = []
        writer = threading.Thread(target=lambda: done.append(bool(write_at(dev, 4 * MiB + 4096, page)) or True))
        writer.start()
        time.sleep(1.0)
        assert writer.is_alive() and not done, "a write before the open waits for it"
        with open(disk, "wb") as f:
            f.truncate(len(data))
        mgr.open_disk(vid, str(disk))
        writer.join(30)
        assert done == [True]
        want = data[:4 * MiB + 4096] + page + data[4 * MiB + 8192:]
        with open(mgr.file(vid), "rb") as f:
            assert f.read() == want
        assert disk.read_bytes() == want, "the local volume holds it all (both chunks fetched)"
        st = mgr.status(vid)
        assert st is not None and st["disk_open"] is True and st["on_demand"] == 2 and st["missing"] == 0, st
        settings = json.loads((mgr.dir(vid) / "server.json").read_text())
        assert settings["disk"] == str(disk) and "disk_pending" not in settings
        mgr.open_disk(vid, str(disk))              # again: nothing to do
        log = (mgr.dir(vid) / "server.log").read_text()
        assert "the disk opens when the plugin asks" in log and f"local volume {disk} open" in log, log
    finally:
        mgr.release(vid)
        mgr.discard(vid)
    assert not mgr.dir(vid).exists() and not mgr.attached(vid)


def test_a_disk_of_another_size_than_planned_is_refused_and_left_untouched(tmp_path: Path):
    data, mgr, manifest = _volume(tmp_path)
    disk, vid = tmp_path / "disk", "pvol-pending-size"
    mgr.begin(vid, str(disk), manifest, planned=Planned(str(disk), len(data), 512))   # type: ignore[arg-type]
    try:
        mgr.start_early(vid, {}).result(timeout=120)
        with open(disk, "wb") as f:
            f.truncate(len(data) - 4 * MiB)
        with pytest.raises(CsiError) as e:
            mgr.open_disk(vid, str(disk))
        assert e.value.code == Code.INTERNAL
        assert f"has {len(data) - 4 * MiB} bytes, not the planned {len(data)}" in e.value.message
        assert disk.read_bytes() == bytes(len(data) - 4 * MiB), "nothing written to the refused disk"
        st = mgr.status(vid)
        assert st is not None and st["disk_open"] is False and st["missing"] == 2, st
        assert json.loads((mgr.dir(vid) / "server.json").read_text())["disk_pending"] is True
    finally:
        mgr.discard(vid)
    assert not mgr.dir(vid).exists() and not mgr.attached(vid)
