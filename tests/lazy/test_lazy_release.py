"""A lazily staged volume released with nothing written on its node (issue 17 item 3): nothing is
uploaded and no new generation is committed; the record notes that the node's copy is current.
Background hydration is off: the node holds only the chunk the test read."""
from __future__ import annotations

import os

import pytest

from tests.harness.cluster import Cluster, block_cap

from .helpers import CHUNK, LAZY, MiB, manager, pread_direct, status, write_device

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = {"node_extra": ["--lazy-background-workers", "0"]}


def test_lazy_release_with_nothing_written_commits_no_new_generation(cluster: Cluster):
    cl, cap = cluster, block_cap()
    data = os.urandom(6 * CHUNK)
    vid = cl.create("lazy-unchanged", 8 * CHUNK, cap=cap, params=LAZY)
    write_device(cl.attach("node-a", vid, cap=cap), data)
    cl.release("node-a", vid)
    cat = cl.catalog()
    assert (cat.volume(vid).generation, cat.list_generations(vid)) == (1, [1])

    target = cl.attach("node-b", vid, cap=cap)
    assert pread_direct(target, 3 * CHUNK, MiB) == data[3 * CHUNK:3 * CHUNK + MiB]
    assert manager(cl, "node-b").active(vid) and status(cl, "node-b", vid)["missing"] == 5
    objects = cl.objects()
    sent = cl.transferred("node-b", "uploaded"), cl.transferred("node-b", "flushed_read")
    cl.release("node-b", vid)                      # read only: nothing written on node-b

    rec = cat.volume(vid)
    assert (rec.generation, cat.list_generations(vid)) == (1, [1]), "a release with nothing written committed"
    assert rec.generation_node == "node-b", "the record does not say node-b's copy is current"
    assert (cl.transferred("node-b", "uploaded"), cl.transferred("node-b", "flushed_read")) == sent
    written = {k for k in cl.objects() if k not in objects and ("/chunks/" in k or "/gen/" in k)}
    assert not written, f"chunks or manifests written: {sorted(written)}"

    # node-a's copy of generation 1 is still current: staged again, its data is all there
    target = cl.attach("node-a", vid, cap=cap)
    assert not manager(cl, "node-a").active(vid)
    assert pread_direct(target, 0, 6 * CHUNK) == data
    cl.release("node-a", vid)
    cl.delete(vid)
