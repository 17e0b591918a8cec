"""Lazy hydration (StorageClass hydrate: lazy) on the FUSE + loop path, background hydration off:
every chunk the node holds was fetched because a read or a write asked for it.

A raw block volume: the test reads and writes the exact device bytes (O_DIRECT, so the page cache
and readahead do not fetch chunks the test did not ask for)."""
from __future__ import annotations

import errno
import os
import re
import time

import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.blockio import write_at
from tests.harness.cluster import Cluster, block_cap
from tests.plugins.s3 import seaweed_outage

from .helpers import (
    CHUNK,
    LAZY,
    MiB,
    committed,
    manager,
    pread_direct,
    server_log,
    status,
    write_device,
)

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = {"node_extra": ["--lazy-background-workers", "0", "--lazy-fetch-timeout-seconds", "3"]}


def _volume(cl: Cluster, name: str, size: int, data: bytes) -> str:
    """A lazy volume whose committed generation 1 holds `data` at offset 0 (written on node-a)."""
    cap = block_cap()
    vid = cl.create(name, size, cap=cap, params=LAZY)
    target = cl.attach("node-a", vid, cap=cap)      # generation 0: nothing to hydrate
    assert not manager(cl, "node-a").active(vid)
    write_device(target, data)
    cl.release("node-a", vid)
    return vid


def test_lazy_stage_serves_reads_on_demand_and_flushes_only_written_chunks(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(48 * MiB)                    # chunks 0-11 hold data, 12-15 are holes
    vid = _volume(cl, "lazy-demand", 64 * MiB, data)
    gen1 = committed(cl, vid)
    assert gen1.data_chunks == 12

    target = cl.attach("node-b", vid, cap=cap)
    st = status(cl, "node-b", vid)
    # staged instantly: not one chunk was fetched before NodeStage returned
    assert (st["missing"], st["on_demand"], st["background"]) == (12, 0, 0), st

    assert pread_direct(target, 2 * CHUNK + 64 * 1024, MiB) == data[2 * CHUNK + 64 * 1024:][:MiB]
    assert pread_direct(target, 13 * CHUNK, 4096) == bytes(4096)        # a hole: nothing to fetch
    assert status(cl, "node-b", vid)["on_demand"] == 1, "one read of one chunk fetches one chunk"

    # a partial write to a missing chunk fills it first; a write to a hole needs no fetch
    write_at(target, 5 * CHUNK + 8192, b"B" * 4096)
    write_at(target, 14 * CHUNK, b"H" * 4096)
    st = status(cl, "node-b", vid)
    assert (st["on_demand"], st["missing"]) == (2, 10), st
    model = bytearray(data + bytes(16 * MiB))
    model[5 * CHUNK + 8192:5 * CHUNK + 12288] = b"B" * 4096
    model[14 * CHUNK:14 * CHUNK + 4096] = b"H" * 4096
    assert pread_direct(target, 5 * CHUNK, CHUNK) == model[5 * CHUNK:6 * CHUNK]

    before = set(cl.chunks())
    cl.release("node-b", vid)                      # released with 10 chunks never fetched
    gen2 = committed(cl, vid)
    assert gen2.generation == 2
    assert len(set(cl.chunks()) - before) == 2, "only the two chunks written on node-b are uploaded"
    changed = [i for i, (a, b) in enumerate(zip(gen1.entries, gen2.entries)) if a != b]
    assert changed == [5, 14], "never-fetched chunks keep their manifest entries"
    assert manager(cl, "node-b").active(vid), "the hydration state stays for a later stage here"

    # node-a's copy is stale now (generation 2 came from node-b): it stages lazily again
    target = cl.attach("node-a", vid, cap=cap)
    assert pread_direct(target, 0, 64 * MiB) == bytes(model)
    assert status(cl, "node-a", vid)["missing"] == 0
    cl.release("node-a", vid)
    assert not manager(cl, "node-a").active(vid), "fully hydrated: the next stage is native"
    cl.delete(vid)


def test_chunk_altered_in_bucket_is_an_io_error_for_its_range_only(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(16 * MiB)
    vid = _volume(cl, "lazy-corrupt", 16 * MiB, data)
    h = committed(cl, vid).entries[2]
    assert h is not None
    key = f"{cl.prefix}/chunks/{h[:2]}/{h}"
    client = cl.seaweed.client()
    client.put_object(Bucket=cl.seaweed.bucket, Key=key, Body=b"\x00" + os.urandom(CHUNK))

    target = cl.attach("node-b", vid, cap=cap)
    with pytest.raises(OSError) as e:
        pread_direct(target, 2 * CHUNK, 4096)
    assert e.value.errno == errno.EIO
    assert pread_direct(target, CHUNK, CHUNK) == data[CHUNK:2 * CHUNK]
    assert pread_direct(target, 3 * CHUNK, CHUNK) == data[3 * CHUNK:]
    with pytest.raises(OSError):
        pread_direct(target, 2 * CHUNK + CHUNK - 4096, 4096)    # still an error: never wrong data
    assert "does not match its BLAKE3 hash" in server_log(cl, "node-b", vid)
    assert status(cl, "node-b", vid)["missing"] == 2                # chunks 0 and 2
    cl.release("node-b", vid)
    cl.delete(vid)


def test_store_outage_during_on_demand_read_waits_then_fails_and_recovers(cluster: Cluster, seaweed):
    cl, cap = cluster, block_cap()
    data = os.urandom(8 * MiB)
    vid = _volume(cl, "lazy-outage", 8 * MiB, data)
    target = cl.attach("node-b", vid, cap=cap)
    key = str(committed(cl, vid).entries[1])            # the chunk the read needs (its hash)
    with seaweed_outage(seaweed):
        with pytest.raises(OSError) as e:
            pread_direct(target, CHUNK, 4096)
    assert e.value.errno == errno.EIO
    log = server_log(cl, "node-b", vid)
    assert "object store unreachable for 3s" in log
    # the read waited and retried before the EIO: the error names its attempts, and each failed
    # attempt but the last was logged as a retry of that chunk (exact counts, not a duration)
    found = re.search(r"I/O error: chunk (\S+): object store unreachable for 3s \((\d+) attempts\)", log)
    assert found is not None, log
    assert found.group(1).endswith(key), (found.group(1), key)
    attempts = int(found.group(2))
    assert attempts >= 2, f"the read failed after {attempts} attempt(s): it did not wait and retry"
    retried = set(int(n) for n in re.findall(rf"chunk \S*{re.escape(key)}: object store error \(attempt (\d+),", log))
    assert retried >= set(range(1, attempts)), (attempts, sorted(retried))
    assert pread_direct(target, 0, 8 * MiB) == data, "after the outage the same reads succeed"
    cl.release("node-b", vid)
    cl.delete(vid)


def _snapshot(cl: Cluster, vid: str, name: str, timeout: float = 60.0) -> pb.Snapshot:
    ctl = cl.controller.controller                           # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while True:
        snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name=name)).snapshot
        if snap.ready_to_use:
            return snap
        assert time.monotonic() < deadline, f"snapshot {name} not ready after {timeout}s"
        time.sleep(0.1)


def test_snapshot_of_a_lazily_staged_volume_holds_fetched_written_and_never_fetched_chunks(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(16 * MiB)
    vid = _volume(cl, "lazy-snap", 16 * MiB, data)
    target = cl.attach("node-b", vid, cap=cap)
    assert pread_direct(target, CHUNK, 4096) == data[CHUNK:CHUNK + 4096]        # chunk 1 fetched
    write_at(target, 2 * CHUNK + 4096, b"S" * 8192)                         # chunk 2 written
    model = bytearray(data)
    model[2 * CHUNK + 4096:2 * CHUNK + 12288] = b"S" * 8192
    snap = _snapshot(cl, vid, "lazy-snap-1")
    assert status(cl, "node-b", vid)["missing"] == 2, "the snapshot fetched nothing (chunks 0 and 3)"
    src = pb.VolumeContentSource()
    src.snapshot.snapshot_id = snap.snapshot_id
    restored = cl.create("lazy-snap-restored", 16 * MiB, cap=cap, source=src)
    got = pread_direct(cl.attach("node-a", restored, cap=cap), 0, 16 * MiB)
    assert got == bytes(model)
    cl.release("node-a", restored)
    cl.release("node-b", vid)
    cl.controller.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))  # type: ignore[union-attr]
    cl.delete(restored)
    cl.delete(vid)


def test_gc_keeps_never_fetched_chunks_the_newest_generation_of_a_partly_hydrated_volume_references(
        cluster: Cluster):
    """A partly hydrated volume committed again (and again) references the chunks it never fetched
    by the hashes of the generation it was staged from; once that generation is pruned, GC must
    still keep them (they are the newest generation's), and delete what no kept generation uses."""
    cl, cap = cluster, block_cap()
    data = os.urandom(32 * MiB)                     # chunks 0-7
    vid = _volume(cl, "lazy-gc", 32 * MiB, data)
    gen1 = committed(cl, vid)
    model = bytearray(data)
    for gen, i in ((2, 1), (3, 3), (4, 3)):         # restaged on node-b, one chunk rewritten each time
        target = cl.attach("node-b", vid, cap=cap)
        payload = os.urandom(CHUNK)
        write_at(target, i * CHUNK, payload)
        model[i * CHUNK:(i + 1) * CHUNK] = payload
        cl.release("node-b", vid)
        assert committed(cl, vid).generation == gen
        assert status(cl, "node-b", vid)["missing"] > 0, "still partly hydrated"
    newest = committed(cl, vid)
    never_fetched = [i for i in range(8) if i not in (1, 3)]
    assert [newest.entries[i] for i in never_fetched] == [gen1.entries[i] for i in never_fetched]
    pruned = {f"{cl.prefix}/chunks/{h[:2]}/{h}" for h in (gen1.entries[1], gen1.entries[3])
              if h is not None} - cl.committed_chunks(vid)

    res = cl.cli("gc", "--grace-seconds", "0", "--keep-generations", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    left = set(cl.chunks())
    assert cl.committed_chunks(vid) <= left, "GC deleted chunks the newest generation references"
    assert len(pruned) == 2 and not pruned & left, "GC ran: chunks only old generations used are gone"

    target = cl.attach("node-b", vid, cap=cap)      # resumes: the never-fetched chunks come from S3
    assert pread_direct(target, 0, 32 * MiB) == bytes(model)
    cl.release("node-b", vid)
    target = cl.attach("node-a", vid, cap=cap)      # and from scratch on another node
    assert pread_direct(target, 0, 32 * MiB) == bytes(model)
    cl.release("node-a", vid)
    cl.delete(vid)
