"""Change tracking on a rawfile pool that can reflink (XFS here, as on a node whose NVMe is
formatted XFS): the pre-flush reads a reflink snapshot, the final pass reads only what changed
after it, and an incremental flush reads only what changed since the committed generation.

Read bytes come from the node's perssd_transfer_bytes_total{kind="flushed_read"} counter."""
from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator

import pytest

from tests.harness.cluster import Cluster, block_cap, mount_cap
from tests.harness.seaweed import Seaweed
from tests.harness.xfsdir import xfs_dir

from .helpers import CHUNK, MiB, sha256_file, tree_sums, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def xcluster(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("reflink")
    with xfs_dir(str(base / "xfs"), 1 << 30) as path:
        cl = Cluster(path, seaweed=seaweed, prefix=f"rt-{secrets.token_hex(5)}", metrics=True)
        try:
            cl.start()
            yield cl
        finally:
            cl.stop()


def _write(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_block_volume_final_pass_and_incremental_read_only_changes(xcluster: Cluster):
    cl, cap = xcluster, block_cap()
    vid = cl.create("tracked-block", SIZE, cap=cap)
    dev = cl.attach("node-a", vid, cap=cap)
    data = os.urandom(40 * MiB)
    _write(dev, 0, data)
    expected = hashlib.sha256(data + bytes(SIZE - len(data))).hexdigest()
    read0 = cl.transferred("node-a", "flushed_read")
    cl.release("node-a", vid)
    read = cl.transferred("node-a", "flushed_read") - read0
    # the pre-flush read the 40 MiB once; the final pass found nothing changed after it
    assert read == 40 * MiB, f"first flush read {read / MiB:.1f} MiB, want exactly 40"
    assert "0 bytes changed since the pre-flush" in cl.nodes["node-a"].log_path.read_text()

    dev_b = cl.attach("node-b", vid, cap=cap)
    assert sha256_file(dev_b) == expected

    offsets = [1 * MiB, 17 * MiB + 4096, 50 * MiB]
    for off in offsets:
        _write(dev_b, off, os.urandom(MiB))
    changed_chunks = {o // CHUNK for o in offsets} | {(o + MiB - 1) // CHUNK for o in offsets}
    read0, up0 = cl.transferred("node-b", "flushed_read"), cl.transferred("node-b", "uploaded")
    want = sha256_file(dev_b)
    cl.release("node-b", vid)
    read = cl.transferred("node-b", "flushed_read") - read0
    uploaded = cl.transferred("node-b", "uploaded") - up0
    assert read == len(changed_chunks) * CHUNK, \
        f"incremental flush read {read / MiB:.1f} MiB for {len(changed_chunks)} changed chunks"
    assert 0 < uploaded <= len(changed_chunks) * CHUNK + 4096

    back = cl.attach("node-a", vid, cap=cap)   # node-a's cache is a generation behind: rehydrates
    assert sha256_file(back) == want
    cl.release("node-a", vid)
    cl.delete(vid)


def test_file_system_volume_round_trip_with_tracking(xcluster: Cluster):
    cl, cap = xcluster, mount_cap("ext4")
    vid = cl.create("tracked-fs", 128 * MiB, cap=cap)
    target = cl.attach("node-a", vid, cap=cap)
    sums = write_tree(target, random_mib=24)
    read0 = cl.transferred("node-a", "flushed_read")
    cl.release("node-a", vid)
    read = cl.transferred("node-a", "flushed_read") - read0
    # one full read (pre-flush) plus the few chunks unmounting touched (superblock, journal)
    assert read < 24 * MiB * 1.5 + 8 * CHUNK, f"read {read / MiB:.1f} MiB to flush ~26 MiB of files"

    target_b = cl.attach("node-b", vid, cap=cap)
    assert tree_sums(target_b) == sums
    (open(os.path.join(target_b, "added.txt"), "w")).write("node-b was here\n" * 1000)
    sums["added.txt"] = hashlib.sha256(b"node-b was here\n" * 1000).hexdigest()
    read0 = cl.transferred("node-b", "flushed_read")
    cl.release("node-b", vid)
    read = cl.transferred("node-b", "flushed_read") - read0
    assert read <= 16 * CHUNK, f"a small change made the incremental flush read {read / MiB:.1f} MiB"

    target_a = cl.attach("node-a", vid, cap=cap)
    assert tree_sums(target_a) == sums
    cl.release("node-a", vid)
    cl.delete(vid)
