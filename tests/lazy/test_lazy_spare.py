"""The warm spare lazy server: a node that stages lazily keeps one server process started ahead
(interpreter, imports and the S3 client's model loaded: ~0.5 s on a node, minutes under the VM
rig's emulation), so a lazy NodeStage does not wait for a cold start."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from csi_perssd import volume_io
from csi_perssd.lazy.manager import LazyManager, proc_start_time
from csi_perssd.remote.filestore import FileStore

MiB = 1 << 20
pytestmark = [pytest.mark.root]


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc_start_time(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not proc_start_time(pid)


def test_the_warm_spare_serves_the_next_lazy_stage_and_a_new_one_is_kept(tmp_path: Path):
    data = os.urandom(8 * MiB)
    src = tmp_path / "src"
    src.write_bytes(data)
    manifest, _ = volume_io.flush_path(FileStore(str(tmp_path / "store")), str(src), len(data), 4 * MiB)
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(len(data))
    mgr = LazyManager(str(tmp_path / "state"), {"catalog": f"file://{tmp_path / 'store'}"},
                      fetch_timeout=10, workers=0, spare=True, spare_delay=3600)
    spare = mgr.spare_pid
    assert spare, "spare=True (the node's default is lazy): a spare is started with the manager"
    vid = "pvol-spare"
    mgr.begin(vid, str(disk), manifest)
    try:
        assert mgr.ensure_server(vid, {})
        st = mgr.status(vid)
        assert st is not None and st["pid"] == spare and st["store_ready"], st
        log = (mgr.dir(vid) / "server.log").read_text()
        assert f"spare {spare}" in log
        # no secrets of its own, the node's store settings: it takes the store the spare opened
        assert "the one the spare opened before the job" in log and "object store opened in" not in log, log
        with open(mgr.file(vid), "rb") as f:            # on demand through the spare-turned-server
            assert f.read() == data
        assert mgr.spare_pid == 0, "the next spare does not warm up during the stage's hydration"
        timer = mgr._spare_timer
        assert timer is not None and timer.is_alive() and timer.interval == 3600
        timer.cancel()
        timer.function()                                # what the timer runs, now
        nxt = mgr.spare_pid
        assert nxt and nxt != spare, "a new spare is kept for the next lazy stage"
    finally:
        mgr.release(vid)
        mgr.discard(vid)
    assert _gone(spare), "the server ended with its mount"
    nxt = mgr.spare_pid
    other = "pvol-spare-secrets"              # secrets of its own: it opens its own store with them
    mgr.begin(other, str(disk), manifest)
    try:
        assert mgr.ensure_server(other, {"accessKeyID": "k", "secretAccessKey": "s"})
        log = (mgr.dir(other) / "server.log").read_text()
        assert f"spare {nxt}" in log and "object store opened in" in log, log
        with open(mgr.file(other), "rb") as f:
            assert f.read(MiB) == data[:MiB]
    finally:
        mgr.release(other)
        mgr.discard(other)
    assert _gone(nxt)
    nxt = mgr.spare_pid
    if not nxt:
        mgr.keep_spare()
        nxt = mgr.spare_pid
    mgr.stop_spare()
    assert _gone(nxt) and mgr.spare_pid == 0, "a spare ends at EOF on its stdin, unused"
