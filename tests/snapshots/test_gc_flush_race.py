"""GC racing flushes through the real node processes: `gc.collect` runs in a tight loop with a
zero grace period while node-a flushes volumes (NodeUnstage) and uploads snapshots whose chunks
are in the bucket as garbage at that moment (a deleted volume held the same data, so the flush
finds them with a HEAD and reuses them). Every committed generation and every snapshot must
then hydrate on node-b to exactly the bytes written."""
from __future__ import annotations

import pytest

import os
import threading
import time

from csi_perssd.remote import gc
from tests.harness.cluster import block_cap

from .conftest import MiB

pytestmark = [pytest.mark.root, pytest.mark.s3]

PARAMS = {"chunkSize": "1Mi"}
SIZE = 16 * MiB


def _write_block(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_block(path: str, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def test_gc_loop_racing_node_flushes_and_snapshots(cluster) -> None:
    cap = block_cap()
    cat = cluster.catalog()
    stop = threading.Event()
    runs = [0]
    deleted = [0]
    errors: list[BaseException] = []

    def gc_loop() -> None:
        while not stop.is_set():
            try:
                rep = gc.collect(cat, grace=0, keep=0, dry_run=False)
                runs[0] += 1
                deleted[0] += len(rep.deleted_chunks)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return
            time.sleep(0.02)

    t = threading.Thread(target=gc_loop, daemon=True)
    t.start()
    checks: list[tuple[str, bytes]] = []
    try:
        for r in range(3):
            shared = os.urandom(12 * MiB)
            g = cluster.create(f"garbage-{r}", SIZE, cap=cap, params=PARAMS)
            _write_block(cluster.attach("node-a", g, cap=cap), shared)
            cluster.release("node-a", g)
            data = shared + os.urandom(4 * MiB)
            v = cluster.create(f"race-{r}", SIZE, cap=cap, params=PARAMS)
            _write_block(cluster.attach("node-a", v, cap=cap), data)
            cluster.delete(g)                 # its chunks are garbage now, the loop collects them ...
            snap = cluster.snapshot(v, f"race-snap-{r}")          # ... while node-a uploads them again
            cluster.release("node-a", v)                          # ... and flushes them again
            checks.append((v, data))
            checks.append((cluster.restore(f"race-restore-{r}", SIZE, snapshot=snap.snapshot_id, cap=cap), data))
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert runs[0] >= 10 and deleted[0] > 0, f"gc ran {runs[0]} times and deleted {deleted[0]} chunks: no race"
    for vid, want in checks:
        dev = cluster.attach("node-b", vid, cap=cap)
        try:
            assert _read_block(dev, len(want)) == want, f"{vid}: restored bytes differ"
        finally:
            cluster.release("node-b", vid)
    print(f"gc runs {runs[0]}, chunks deleted {deleted[0]}, {len(checks)} volumes verified")
