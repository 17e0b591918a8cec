"""Snapshots, restores and clones with real data: a staged volume with a running writer, an
unstaged volume (instant, no new chunk), restores and clones to a larger size (file system grown
on stage), the source deleted (snapshots and clones still restore after gc), and finally
everything deleted: `csi-perssd gc` leaves no chunk object. Also `ls`, `inspect`, `gc --dry-run`
and the measurement of a snapshot of a staged 256 MiB volume with 1% changed."""
from __future__ import annotations

import pytest

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

from csi_perssd.csi import csi_pb2 as pb

from .conftest import MiB, write_file

pytestmark = [pytest.mark.root, pytest.mark.s3]

RESULTS = Path(os.environ.get("PERSSD_SNAPSHOT_RESULTS", "/tmp/perssd-snapshot-results.json"))


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fs_total(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def test_staged_snapshot_with_running_writer(cluster) -> None:
    vid = cluster.create("live", 64 * MiB)
    target = cluster.attach("node-a", vid)
    write_file(f"{target}/before.marker", b"before the snapshot\n")
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        with open(f"{target}/log.txt", "w") as f:
            while not stop.is_set():
                f.write(f"{written[0]:08d}\n")
                f.flush()
                written[0] += 1
                time.sleep(0.0005)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        first = cluster.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name="live-snap")).snapshot
        assert not first.ready_to_use, "a staged volume's snapshot is made by its node: not ready at once"
        snap = cluster.snapshot(vid, "live-snap")
        at_ready = written[0]
        write_file(f"{target}/after.marker", b"after the snapshot\n")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(10)
    assert snap.snapshot_id == first.snapshot_id and snap.size_bytes == 64 * MiB
    assert snap.creation_time.seconds >= first.creation_time.seconds - 1
    src_lines = Path(f"{target}/log.txt").read_text().splitlines()

    rid = cluster.restore("live-restored", 64 * MiB, snapshot=snap.snapshot_id)
    rt = cluster.attach("node-b", rid)
    try:
        assert Path(f"{rt}/before.marker").read_bytes() == b"before the snapshot\n"
        assert not Path(f"{rt}/after.marker").exists(), "data written after the freeze leaked into the snapshot"
        lines = Path(f"{rt}/log.txt").read_text().splitlines()
        assert 0 < len(lines) <= at_ready, (len(lines), at_ready)
        assert lines == [f"{i:08d}" for i in range(len(lines))], "the restored log is not a consistent prefix"
        assert lines == src_lines[:len(lines)]
        assert len(src_lines) > len(lines), "the writer kept writing after the freeze"
    finally:
        cluster.release("node-b", rid)
        cluster.release("node-a", vid)


def test_unstaged_snapshot_is_instant_and_stores_nothing(cluster) -> None:
    vid = cluster.create("cold", 64 * MiB)
    target = cluster.attach("node-a", vid)
    write_file(f"{target}/data.bin", os.urandom(8 * MiB))
    want = sha(f"{target}/data.bin")
    cluster.release("node-a", vid)
    before = cluster.chunk_objects()
    t0 = time.monotonic()
    snap = cluster.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name="cold-snap")).snapshot
    dt = time.monotonic() - t0
    assert snap.ready_to_use and snap.size_bytes == 64 * MiB
    assert cluster.chunk_objects() == before, "a snapshot of an unstaged volume must not store chunks"
    print(f"unstaged snapshot ready in {dt * 1000:.0f} ms")

    # restore and clone to larger sizes, on the other node: same data, grown file system
    rid = cluster.restore("cold-restored", 128 * MiB, snapshot=snap.snapshot_id)
    cid = cluster.restore("cold-clone", 96 * MiB, volume=vid)
    assert cluster.chunk_objects() == before, "restores and clones copy no chunk"
    for vol, size in ((rid, 128 * MiB), (cid, 96 * MiB)):
        t = cluster.attach("node-b", vol)
        try:
            assert sha(f"{t}/data.bin") == want
            assert fs_total(t) > size - 16 * MiB, f"file system of {vol} not grown: {fs_total(t)} bytes"
            write_file(f"{t}/own.bin", vol.encode() * 1000)       # the copies diverge from the source
        finally:
            cluster.release("node-b", vol)

    # delete the source, collect: the snapshot and the clone keep their chunks
    cluster.delete(vid)
    out = cluster.cli("gc", "--grace-seconds", "0").stdout
    assert "deleted" in out
    for vol in (cluster.restore("cold-restored-2", 64 * MiB, snapshot=snap.snapshot_id), cid, rid):
        t = cluster.attach("node-a", vol)
        try:
            assert sha(f"{t}/data.bin") == want
            if vol != cid and vol != rid:
                assert not Path(f"{t}/own.bin").exists()
            else:
                assert Path(f"{t}/own.bin").read_bytes() == vol.encode() * 1000
        finally:
            cluster.release("node-a", vol)


def test_snapshot_of_staged_256mib_volume_with_1pct_changed(cluster) -> None:
    size = 256 * MiB
    vid = cluster.create("bench", size)
    target = cluster.attach("node-a", vid)
    write_file(f"{target}/big.bin", os.urandom(200 * MiB))
    cluster.release("node-a", vid)                        # last flush
    target = cluster.attach("node-a", vid)                # from the local cache
    changed = int(size * 0.01)
    with open(f"{target}/big.bin", "r+b") as f:
        f.seek(100 * MiB)
        f.write(os.urandom(changed))
        f.flush()
        os.fsync(f.fileno())
    want = sha(f"{target}/big.bin")
    chunks_before = cluster.chunk_objects()
    t0 = time.monotonic()
    snap = cluster.snapshot(vid, "bench-snap")
    ready_s = time.monotonic() - t0
    chunks_after = cluster.chunk_objects()
    rec = cluster.catalog().get_snapshot(snap.snapshot_id)
    m = re.search(r"read (\d+) bytes, uploaded (\d+) bytes \((\d+) chunks\)", rec.progress)
    assert m, rec.progress
    read, uploaded, nchunks = map(int, m.groups())
    new_bytes = sum(v for k, v in chunks_after.items() if k not in chunks_before)
    result = {"volume_bytes": size, "changed_bytes": changed, "ready_seconds": round(ready_s, 3),
              "bytes_read": read, "bytes_uploaded": uploaded, "chunks_uploaded": nchunks,
              "new_chunk_object_bytes": new_bytes}
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"snapshot of a staged 256 MiB volume with 1% changed: {result}")
    assert uploaded == new_bytes
    assert uploaded <= 6 * 4 * MiB, "an incremental snapshot must upload only the changed chunks"
    cluster.release("node-a", vid)
    rid = cluster.restore("bench-restored", size, snapshot=snap.snapshot_id)
    t = cluster.attach("node-b", rid)
    try:
        assert sha(f"{t}/big.bin") == want
    finally:
        cluster.release("node-b", rid)


def test_ls_and_inspect(cluster, capsys, monkeypatch) -> None:
    vols = [e.volume.volume_id for e in cluster.ctl.ListVolumes(pb.ListVolumesRequest()).entries]
    snaps = [e.snapshot.snapshot_id for e in cluster.ctl.ListSnapshots(pb.ListSnapshotsRequest()).entries]
    assert vols and snaps
    out = cluster.cli("ls").stdout
    for i in vols + snaps:
        assert i in out, f"{i} missing from ls:\n{out}"
    assert "dedup" in out and "GENS" in out and "OWNER" in out
    # inspect in-process (the same entry point as the CLI, without another interpreter start)
    from csi_perssd import cli
    argv = ["--catalog", cluster.seaweed.url(cluster.prefix), *cluster.store_args()]
    for k, v in cluster.env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert cli.main(["inspect", vols[0], *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == vols[0] and "generations" in doc
    assert cli.main(["inspect", snaps[0], *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == snaps[0] and doc["source_volume"] and doc["ready"]
    assert cli.main(["inspect", "pvol-" + "0" * 32, *argv]) == 1


def test_delete_everything_then_gc_leaves_no_chunk(cluster) -> None:
    for e in cluster.ctl.ListSnapshots(pb.ListSnapshotsRequest()).entries:
        cluster.delete_snapshot(e.snapshot.snapshot_id)
    for e in cluster.ctl.ListVolumes(pb.ListVolumesRequest()).entries:
        cluster.delete(e.volume.volume_id)
    before = cluster.chunk_objects()
    assert before
    dry = cluster.cli("gc", "--dry-run", "--grace-seconds", "0").stdout
    assert f"would delete {len(before)} chunks" in dry, dry
    m = re.search(r"freeing (\d+) bytes \((\d+) in chunks\)", dry)
    assert m and int(m.group(2)) == sum(before.values()), dry
    assert sum(1 for line in dry.splitlines() if line.startswith("would delete chunks/")) == len(before)
    assert cluster.chunk_objects() == before, "--dry-run must delete nothing"
    out = cluster.cli("gc", "--grace-seconds", "0").stdout
    assert cluster.chunk_objects() == {}, out
    left = [i.key for i in cluster.store().list("") if not i.key.startswith(("nodes/", "gc/last-run"))]
    assert left == [], f"objects left after deleting everything: {left}"
