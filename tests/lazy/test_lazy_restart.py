"""Lazy hydration across restarts: the serving process outlives the node plugin (SIGKILL of the
plugin while a reader streams the volume: no error, right data), and a kill -9 of the whole node
(plugin and server) during hydration with concurrent writes loses no acknowledged write."""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time

import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, block_cap

from .helpers import CHUNK, LAZY, MiB, manager, pread_direct, status, write_device

pytestmark = [pytest.mark.root, pytest.mark.s3]
# no background hydration: chunks are fetched only when read or written, so the volume is still
# hydrating whenever the test acts (background hydration: test_lazy_volume.py, benchmarks)
CLUSTER = {"node_extra": ["--lazy-background-workers", "0"]}
SIZE = 48 * MiB


def _volume(cl: Cluster, name: str, data: bytes) -> str:
    cap = block_cap()
    vid = cl.create(name, SIZE, cap=cap, params=LAZY)
    write_device(cl.attach("node-a", vid, cap=cap), data)
    cl.release("node-a", vid)
    return vid


def _stream(path: str, out: list[bytes], errors: list[BaseException]) -> None:
    """Read the device back to front (the background hydrator works front to back, so the
    reader asks for chunks it has not fetched yet); `out` ends up in device order."""
    try:
        for off in range(SIZE - MiB, -1, -MiB):
            out.insert(0, pread_direct(path, off, MiB))
            time.sleep(0.01)
    except BaseException as e:      # noqa: BLE001 - reported by the test
        errors.append(e)


def test_sigkill_of_the_node_plugin_does_not_disturb_a_reader(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(SIZE)
    vid = _volume(cl, "lazy-plugin-kill", data)
    target = cl.attach("node-b", vid, cap=cap)
    pid = status(cl, "node-b", vid)["pid"]
    got: list[bytes] = []
    errors: list[BaseException] = []
    reader = threading.Thread(target=_stream, args=(target, got, errors))
    reader.start()
    time.sleep(0.3)
    cl.nodes["node-b"].kill()                   # SIGKILL of the plugin, mid-stream
    cl.nodes["node-b"].start()                  # recover() adopts the running server
    reader.join(120)
    assert not errors, f"the reader saw {errors[0]!r}"
    assert b"".join(got) == data
    st = status(cl, "node-b", vid)
    assert st["pid"] == pid, "the restarted plugin adopted the same serving process"
    assert st["on_demand"] > 0, "the reader was served before hydration completed"
    cl.release("node-b", vid)                   # the restarted plugin unstages it
    cl.delete(vid)


def _writer(path: str, acked: list[tuple[int, bytes]], inflight: list[tuple[int, bytes]],
            stop: threading.Event) -> None:
    rnd = random.Random(7)
    while not stop.is_set():
        off = rnd.randrange(0, SIZE // 2 // 4096) * 4096      # the second half stays missing
        buf = rnd.randbytes(4096 * rnd.randint(1, 4))
        inflight[:] = [(off, buf)]
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, buf, off)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return                              # the node died under it: not acknowledged
        acked.append((off, buf))
        inflight.clear()


def _matches(got: bytes, model: bytes, inflight: list[tuple[int, bytes]]) -> bool:
    """`got` equals the model of acknowledged writes, except that each 4 KiB block of the write
    in flight at the kill (not acknowledged) may hold its old or its new content."""
    if got == model:
        return True
    if not inflight:
        return False
    off, buf = inflight[0]
    end = off + len(buf)
    if got[:off] != model[:off] or got[end:] != model[end:]:
        return False
    return all(got[b:b + 4096] in (model[b:b + 4096], buf[b - off:b - off + 4096])
               for b in range(off, end, 4096))


def test_kill_9_of_the_node_during_hydration_keeps_every_acknowledged_write(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(SIZE)
    vid = _volume(cl, "lazy-node-kill", data)
    target = cl.attach("node-b", vid, cap=cap)
    pid = status(cl, "node-b", vid)["pid"]
    acked: list[tuple[int, bytes]] = []
    inflight: list[tuple[int, bytes]] = []
    stop = threading.Event()
    w = threading.Thread(target=_writer, args=(target, acked, inflight, stop))
    w.start()
    deadline = time.monotonic() + 30
    while len(acked) < 8 and w.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(cl, "node-b", vid)["missing"] >= SIZE // 2 // CHUNK, "hydration is still running"
    dead_before = _dead_loops()
    cl.nodes["node-b"].kill()
    os.kill(pid, 9)                             # the whole node: plugin and serving process
    stop.set()
    w.join(30)
    assert len(acked) >= 8
    model = bytearray(data)
    for off, buf in acked:
        model[off:off + len(buf)] = buf

    cl.nodes["node-b"].start()                  # recover(): a new server resumes from the state
    assert status(cl, "node-b", vid)["pid"] != pid
    assert _matches(pread_direct(target, 0, SIZE), bytes(model), inflight), "node-b after its restart"
    cl.release("node-b", vid)                   # flush: chunks written here, from the dirty set
    target = cl.attach("node-a", vid, cap=cap)
    assert _matches(pread_direct(target, 0, SIZE), bytes(model), inflight), "node-a, through S3"
    cl.release("node-a", vid)
    assert not manager(cl, "node-a").active(vid)
    # the restart detached the loop device on the dead server's file (the kernel cannot stat
    # that file: a listing that skipped such devices left one behind per crash)
    assert _dead_loops() == dead_before, "a loop device on the dead server's file was left attached"
    cl.delete(vid)


def _dead_loops() -> set[str]:
    """Loop devices whose backing file the kernel cannot stat (losetup shows no inode)."""
    res = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-INO"],
                         capture_output=True, text=True, timeout=60, check=True)
    devs = json.loads(res.stdout)["loopdevices"] if res.stdout.strip() else []
    return {d["name"] for d in devs if d["back-ino"] is None}


def test_restage_on_the_same_node_resumes_hydration(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(SIZE)
    vid = _volume(cl, "lazy-resume", data)
    target = cl.attach("node-b", vid, cap=cap)
    assert pread_direct(target, 0, 2 * CHUNK) == data[:2 * CHUNK]
    cl.unpublish("node-b", vid)
    cl.unstage("node-b", vid)                   # stays published to node-b (no ControllerUnpublish)
    left = status(cl, "node-b", vid)["missing"]
    assert left == SIZE // CHUNK - 2, "released part-way through hydration"
    staging, target = cl.paths("node-b", vid)
    n = cl.nodes["node-b"].node
    n.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                volume_capability=cap))
    n.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                    target_path=target, volume_capability=cap))
    st = status(cl, "node-b", vid)
    assert (st["missing"], st["on_demand"]) == (left, 2), "the second stage resumed, not restarted"
    assert pread_direct(target, 0, SIZE) == data
    assert status(cl, "node-b", vid)["on_demand"] == SIZE // CHUNK
    cl.release("node-b", vid)
    cl.delete(vid)
