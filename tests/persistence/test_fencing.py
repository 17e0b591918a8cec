"""Ownership fencing: ControllerPublish to node-b while node-a owns the volume is refused; after
`csi-perssd takeover VOL --from node-a --to node-b` node-a's stale epoch cannot commit (NodeUnstage
ends FAILED_PRECONDITION, its local data kept) and node-b sees the last committed generation."""
from __future__ import annotations

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, mount_cap

from .helpers import MiB, code, image, loop_of, mounted, tree_sums, unstage_once, write_tree

pytestmark = [pytest.mark.root, pytest.mark.s3]


def _publish(cl: Cluster, vid: str, node: str) -> tuple[grpc.StatusCode, str]:
    return code(cl.controller.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=mount_cap()))


def test_takeover_fences_the_old_owner(cluster: Cluster, tmp_path):
    cl = cluster
    cat = cl.catalog()
    vid = cl.create("fencing", 64 * MiB)
    target = cl.attach("node-a", vid)
    committed = write_tree(target, random_mib=4)
    cl.release("node-a", vid)
    gen1 = cat.volume(vid)

    # node-a uses it again and writes more: these writes will be lost by the takeover
    target = cl.attach("node-a", vid)
    lost = write_tree(f"{target}/later", random_mib=4, seed=9)
    c, msg = _publish(cl, vid, "node-b")
    assert c == grpc.StatusCode.FAILED_PRECONDITION, (c, msg)
    assert "node-a" in msg and "takeover" in msg

    res = cl.cli("takeover", vid, "--from", "node-a", "--to", "node-b")
    assert res.returncode == 0, res.stderr
    assert "lost" in res.stdout and "node-b" in res.stdout
    after = cat.volume(vid)
    assert (after.owner, after.epoch, after.generation) == ("node-b", gen1.epoch + 2, gen1.generation)
    # the takeover is refused when the named node is not the owner (no blind steal)
    bad = cl.cli("takeover", vid, "--from", "node-a", "--to", "node-c")
    assert bad.returncode == 1 and "owned by node-b" in bad.stderr
    hostile = cl.cli("takeover", "../" + vid, "--from", "node-b", "--to", "node-a")
    assert hostile.returncode == 1 and "INVALID_ARGUMENT" in hostile.stderr
    assert cat.volume(vid).owner == "node-b"

    # node-a lets go: its stale epoch cannot commit; NodeUnstage says so, every time
    cl.unpublish("node-a", vid)
    for _ in range(2):
        c, msg = unstage_once(cl, "node-a", vid)
        assert c == grpc.StatusCode.FAILED_PRECONDITION, (c, msg)
        assert "no longer owns" in msg and "node-b" in msg and "local data kept" in msg
    assert cat.volume(vid).generation == gen1.generation
    # ... and the commit itself is fenced in the catalog (a conditional write on the record)
    with pytest.raises(Exception) as ei:
        cat.commit_generation(vid, gen1.generation + 1, "node-a", gen1.epoch + 1)
    assert "no longer owns" in str(ei.value)
    # node-a's local data is kept, including the writes it could not commit
    dev = loop_of(image(cl, "node-a", vid))
    assert dev
    with mounted(dev, tmp_path / "a-kept", readonly=True) as m:
        kept = tree_sums(m)
    assert all(kept.get(f"later/{k}") == v for k, v in lost.items())

    # node-b sees the last committed generation (without node-a's later writes)
    c, msg = _publish(cl, vid, "node-b")
    assert c == grpc.StatusCode.OK, msg
    target_b = cl.attach("node-b", vid)
    assert tree_sums(target_b) == committed
    with open(f"{target_b}/from-b.txt", "w") as f:
        f.write("b was here\n")
    cl.release("node-b", vid)

    # node-a stages it again later: its fenced copy is discarded, it gets node-b's generation
    target_a = cl.attach("node-a", vid)
    got = tree_sums(target_a)
    assert "from-b.txt" in got and not any(k.startswith("later/") for k in got)
    cl.release("node-a", vid)
    cl.delete(vid)


def _set_schema(cat, vid: str, schema: int) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the volume record with another schema number (as a newer driver would write it)."""
    import json

    from csi_perssd.remote.catalog import volume_key
    data, _ = cat.store.get(volume_key(vid))
    rec = json.loads(data)
    rec["schema"] = schema
    cat.store.put(volume_key(vid), json.dumps(rec, sort_keys=True, separators=(",", ":")).encode())


def test_a_precondition_that_is_not_fencing_keeps_the_unflushed_writes(cluster: Cluster):
    """Data-loss regression: the flush fails with a FAILED_PRECONDITION that is not fencing (the
    volume record is of a newer schema than this driver reads). NodeUnstage answers a retriable
    ABORTED, the local copy keeps its unflushed writes, the next NodeStage on the node reuses it
    (it is not discarded as "fenced") and the next unstage commits them."""
    from csi_perssd.remote.catalog import SCHEMA
    cl = cluster
    cat = cl.catalog()
    vid = cl.create("not-fenced", 64 * MiB)
    target = cl.attach("node-a", vid)
    first = write_tree(target, random_mib=4)
    cl.release("node-a", vid)
    gen1 = cat.volume(vid).generation
    assert gen1 >= 1

    target = cl.attach("node-a", vid)
    later = write_tree(f"{target}/later", random_mib=4, seed=5)
    _set_schema(cat, vid, SCHEMA + 1)
    cl.unpublish("node-a", vid)
    c, msg = unstage_once(cl, "node-a", vid)
    assert c == grpc.StatusCode.ABORTED, (c, msg)
    assert "newer than this driver" in msg and "local data kept" in msg, msg
    _set_schema(cat, vid, SCHEMA)          # the record is readable again
    assert cat.volume(vid).generation == gen1

    # the next stage on node-a reuses the local copy: the writes that were not flushed are there
    target = cl.attach("node-a", vid)
    want = {**first, **{f"later/{k}": v for k, v in later.items()}}
    assert tree_sums(target) == want
    cl.release("node-a", vid)
    assert cat.volume(vid).generation > gen1

    # ... and they were committed: node-b hydrates them
    target_b = cl.attach("node-b", vid)
    assert tree_sums(target_b) == want
    cl.release("node-b", vid)
    cl.delete(vid)
