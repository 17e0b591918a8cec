"""Two-node migration through S3: written on node-a, released (flush), staged on node-b (hydrate),
byte-identical; changed on node-b and moved back: the second flush uploads only changed chunks.

A raw block volume is used so the test can hash the exact device bytes on both nodes (the file
system is made and mounted by the test, read-only without journal replay when checking)."""
from __future__ import annotations

import time

import pytest

from tests.harness.cluster import Cluster, block_cap

from .helpers import (CHUNK, MiB, chunk_hashes, chunk_keys, image, mounted, run, sha256_file,
                      tree_sums, write_tree)

pytestmark = [pytest.mark.root, pytest.mark.s3]
SIZE = 256 * MiB


def test_volume_moves_node_a_to_b_and_back_uploading_only_changes(cluster: Cluster, tmp_path):
    cl, cap = cluster, block_cap()
    vid = cl.create("migration", SIZE, cap=cap)

    # -- node-a: file system with random data and a tree of files ------------------------------
    target = cl.attach("node-a", vid, cap=cap)
    run(["mkfs.ext4", "-q", "-F", target])
    with mounted(target, tmp_path / "a") as m:
        sums = write_tree(m, random_mib=96)
    assert cl.chunks() == {}, "nothing may be uploaded before the volume is released"
    t0 = time.monotonic()
    cl.release("node-a", vid)
    flush_s = time.monotonic() - t0
    chunks1 = cl.chunks()
    uploaded1 = cl.transferred("node-a", "uploaded")
    assert uploaded1 == sum(chunks1.values()) > 96 * MiB * 0.99, "uploaded bytes = the stored chunk objects"
    map_a = chunk_hashes(image(cl, "node-a", vid))
    assert chunk_keys(map_a, cl.prefix) == set(chunks1), "exactly the non-zero chunks are stored"
    hash_a = sha256_file(image(cl, "node-a", vid))

    # -- node-b: hydrate, byte-identical --------------------------------------------------------
    t0 = time.monotonic()
    target_b = cl.attach("node-b", vid, cap=cap)
    hydrate_s = time.monotonic() - t0
    hydrated = cl.transferred("node-b", "hydrated")
    assert sha256_file(target_b) == hash_a, "device bytes differ after hydration on node-b"
    with mounted(target_b, tmp_path / "b-ro", readonly=True) as m:
        assert tree_sums(m) == sums

    # -- change a little on node-b, move back: only the changed chunks are uploaded ------------
    with mounted(target_b, tmp_path / "b") as m:
        sums = write_tree(m / "new", random_mib=8, seed=2)
        sums = {f"new/{k}": v for k, v in sums.items()} | tree_sums(m)
        (m / "small/0/000.txt").unlink()
        sums.pop("small/0/000.txt")
    before_b = cl.transferred("node-b", "uploaded")
    t0 = time.monotonic()
    cl.release("node-b", vid)
    flush2_s = time.monotonic() - t0
    uploaded2 = cl.transferred("node-b", "uploaded") - before_b
    chunks2 = cl.chunks()
    new_objects = {k: v for k, v in chunks2.items() if k not in chunks1}
    map_b = chunk_hashes(image(cl, "node-b", vid))
    changed = [i for i, (x, y) in enumerate(zip(map_a, map_b)) if x != y]
    expected = chunk_keys({map_b[i] for i in changed}, cl.prefix) - set(chunks1)
    assert set(new_objects) == expected, "the incremental flush stored other chunks than the changed ones"
    assert uploaded2 == sum(new_objects.values()), "uploaded bytes differ from the new chunk objects"
    assert uploaded2 <= 1.2 * len(changed) * CHUNK
    # 8 MiB of new data = 2-3 chunks, plus the chunks of ext4 metadata it touched (bitmaps,
    # inode table, journal, superblock)
    assert len(changed) <= 12, f"{len(changed)} chunks changed for ~8 MiB of new data"
    assert uploaded2 < uploaded1 / 4

    hash_b = sha256_file(image(cl, "node-b", vid))
    target_a = cl.attach("node-a", vid, cap=cap)
    assert sha256_file(target_a) == hash_b, "device bytes differ after moving back to node-a"
    with mounted(target_a, tmp_path / "a-ro", readonly=True) as m:
        assert tree_sums(m) == sums
    cl.release("node-a", vid)
    cl.delete(vid)

    mb = SIZE / 1e6
    print(f"\nPERF migration: flush {SIZE // MiB} MiB volume ({uploaded1 / MiB:.1f} MiB uploaded) in {flush_s:.2f}s "
          f"= {mb / flush_s:.0f} MB/s of volume; hydrate ({hydrated / MiB:.1f} MiB written) in {hydrate_s:.2f}s "
          f"= {mb / hydrate_s:.0f} MB/s of volume; incremental flush: {len(changed)} changed chunks, "
          f"{len(new_objects)} new objects, {uploaded2} bytes uploaded in {flush2_s:.2f}s")
