"""A volume released with nothing changed since its committed generation commits no new one.

Staged read-write and released without a write, a rawfile volume on a pool that cannot reflink
(no change tracking: the pre-flush and the final pass read everything allocated) used to get a
new generation identical to the last: a manifest PUT and a record PUT that change nothing (and
push a distinct older generation out of the ones GC keeps). The requests the node sends for the
volume are counted at a proxy in front of SeaweedFS, by key, from NodeUnpublish to the end of
NodeUnstage."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.layout import generations_prefix, volume_key
from tests.harness.cluster import Cluster, block_cap
from tests.harness.s3proxy import CountingProxy
from tests.harness.seaweed import Seaweed

from .helpers import CHUNK, MiB, sha256_file

pytestmark = [pytest.mark.root, pytest.mark.s3]
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def counted(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, CountingProxy]]:
    if not seaweed.running:
        seaweed.start()
    with CountingProxy(seaweed.endpoint) as proxy:
        cl = Cluster(tmp_path_factory.mktemp("unchanged"), nodes=("node-a",), seaweed=seaweed,
                     prefix=f"u-{secrets.token_hex(5)}", node_extra=["--s3-endpoint", proxy.endpoint])
        try:
            cl.start()
            yield cl, proxy
        finally:
            cl.stop()


def _puts(proxy: CountingProxy, before: dict[tuple[str, str], int], cl: Cluster, vid: str) -> dict[str, int]:
    """PUTs of the volume's record and of its manifests since `before`."""
    base = f"/{cl.seaweed.bucket}/{cl.prefix}/"
    out = {"record": 0, "manifest": 0}
    for (method, path), n in proxy.by_key().items():
        n -= before.get((method, path), 0)
        if method != "PUT" or not n:
            continue
        if path == base + volume_key(vid):
            out["record"] += n
        elif path.startswith(base + generations_prefix(vid)):
            out["manifest"] += n
    return out


def _release_counted(cl: Cluster, proxy: CountingProxy, vid: str) -> dict[str, int]:
    before = proxy.by_key()
    cl.unpublish("node-a", vid)         # starts the pre-flush
    cl.unstage("node-a", vid)           # the final pass
    puts = _puts(proxy, before, cl, vid)
    assert cl.controller is not None
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid,
                                                                                          node_id="node-a"))
    return puts


def test_a_release_with_nothing_written_commits_no_new_generation(counted: tuple[Cluster, CountingProxy]):
    cl, proxy = counted
    cap = block_cap()
    vid = cl.create("unchanged", SIZE, cap=cap)
    dev = cl.attach("node-a", vid, cap=cap)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(3 * CHUNK), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = sha256_file(dev)
    assert _release_counted(cl, proxy, vid) == {"record": 1, "manifest": 1}     # generation 1
    assert cl.catalog().volume(vid).generation == 1

    dev = cl.attach("node-a", vid, cap=cap)         # read-write, nothing written
    assert sha256_file(dev) == want
    assert _release_counted(cl, proxy, vid) == {"record": 0, "manifest": 0}, \
        "an unchanged volume committed a generation identical to the last"
    rec = cl.catalog().volume(vid)
    assert rec.generation == 1 and rec.generation_node == "node-a"
    assert sorted(cl.catalog().list_generations(vid)) == [1]

    dev = cl.attach("node-a", vid, cap=cap)         # a write after that: committed as before
    assert sha256_file(dev) == want
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4096), CHUNK + 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = sha256_file(dev)
    assert _release_counted(cl, proxy, vid) == {"record": 1, "manifest": 1}
    assert cl.catalog().volume(vid).generation == 2
    assert sha256_file(cl.attach("node-a", vid, cap=cap)) == want
    cl.release("node-a", vid)
    cl.delete(vid)
