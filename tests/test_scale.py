"""Control-plane cost stays O(what is asked), counted at the store (S3Store.stats against SeaweedFS),
never timed: a ListVolumes page, an unchanged re-listing, an idle node's window, snapshot pick-up
through the wake-up object, and a GC run with nothing new."""
from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from csi_perssd.config import Config
from csi_perssd.controller import Controller
from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote import gc, layout
from csi_perssd.remote.catalog import Catalog, SnapshotRecord, VolumeRecord, _encode
from csi_perssd.remote.factory import StoreFactory
from csi_perssd.remote.manifest import Manifest
from csi_perssd.stores import Stores
from tests.harness.seaweed import Seaweed

pytestmark = pytest.mark.s3
N = 500


def _requests(store: Any) -> dict[str, int]:
    return dict(store.stats.snapshot()["requests"])


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}


@pytest.fixture(scope="module")
def bucket(seaweed: Seaweed) -> tuple[Seaweed, str]:
    """N volume records (2 generations each), a snapshot per 10 volumes, 2 nodes; written directly."""
    if not seaweed.running:
        seaweed.start()
    prefix = f"scale-{secrets.token_hex(4)}"
    from tests.plugins.s3 import make_s3_store
    st = make_s3_store(seaweed, prefix)
    manifest = Manifest(8 << 20, 4 << 20, [secrets.token_hex(32), None]).encode()

    def one(i: int) -> None:
        vid = f"pvol-{i:032x}"
        owner = "node-a" if i % 10 == 0 else ""
        for g in (1, 2):
            st.put(layout.manifest_key(vid, g), manifest)
        st.put(layout.volume_key(vid), _encode(VolumeRecord(
            id=vid, name=f"v{i}", size=8 << 20, capabilities=[], pool="default", owner=owner,
            epoch=1 if owner else 0, generation=2)))
        if i % 10 == 0:
            st.put(layout.snapshot_key(f"psnap-{i:032x}"), _encode(SnapshotRecord(
                id=f"psnap-{i:032x}", name=f"s{i}", source_volume=vid, size=8 << 20, ready=True)))
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(one, range(N)))
    return seaweed, prefix


@pytest.fixture
def own_credentials(bucket: tuple[Seaweed, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's own credentials, from the environment as in a deployment (ListVolumes and
    the other calls without secrets use these, never an earlier call's secrets)."""
    sw, _ = bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", sw.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sw.secret_key)


def _controller(sw: Seaweed, prefix: str) -> tuple[Controller, Any]:
    """A controller on its own credentials (the own_credentials fixture) and its store."""
    cfg = Config(mode="controller", catalog=sw.url(prefix), s3_endpoint=sw.endpoint)
    stores = Stores(cfg, StoreFactory())               # a private factory: its own store and stats
    return Controller(cfg, stores), stores.store()


def test_a_list_volumes_page_costs_its_page_not_the_catalog(bucket: tuple[Seaweed, str], own_credentials: None) -> None:
    ctl, store = _controller(*bucket)
    b = _requests(store)
    page = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=100), None)
    cold = _delta(b, _requests(store))
    assert len(page.entries) == 100 and page.next_token
    assert sum(cold.values()) <= 110 and cold.get("get", 0) == 100 and cold.get("list", 0) <= 2, cold
    published = [e for e in page.entries if e.status.published_node_ids]
    assert len(published) == 10 and all(list(e.status.published_node_ids) == ["node-a"] for e in published)
    assert not any(e.status.volume_condition.abnormal for e in page.entries)
    b = _requests(store)
    again = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=100), None)
    warm = _delta(b, _requests(store))
    # unchanged records: their LIST line only (here not even that: the LIST page is moments old)
    assert set(warm) <= {"list"} and warm.get("list", 0) <= 1, warm
    assert [e.volume.volume_id for e in again.entries] == [e.volume.volume_id for e in page.entries]


def test_an_unchanged_full_listing_costs_only_lists(bucket: tuple[Seaweed, str], own_credentials: None) -> None:
    ctl, store = _controller(*bucket)
    ctl.ListVolumes(pb.ListVolumesRequest(), None)
    b = _requests(store)
    token, seen = "", 0
    while True:
        r = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=100, starting_token=token), None)
        seen += len(r.entries)
        token = r.next_token
        if not token:
            break
    cost = _delta(b, _requests(store))
    # 5 pages of 100 from LIST pages of 1,000 keys (a record and 2 manifests per volume)
    assert seen == N and set(cost) <= {"list"} and cost.get("list", 0) <= 3, cost
    snaps = Catalog(store).snapshot_page("", 10)
    assert len(snaps.records) == 10 and snaps.more


def test_gc_with_nothing_new_reads_no_manifest_again(bucket: tuple[Seaweed, str], own_credentials: None) -> None:
    _, store = _controller(*bucket)
    cat = Catalog(store)
    cache = gc.ManifestCache()
    first = gc.collect(cat, grace=3600, keep=2, dry_run=True, cache=cache)
    assert first.manifests_read == 2 * N and first.bytes_read > 0
    b = _requests(store)
    second = gc.collect(cat, grace=3600, keep=2, dry_run=True, cache=cache)
    cost = _delta(b, _requests(store))
    assert second.manifests_read == 0 and second.manifests_cached == 2 * N and second.bytes_read == 0
    assert cost.get("get", 0) == 0 and second.requests == cost, cost


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs for the rawfile pool: its free space moves only when this test writes."""
    d = tmp_path / "raw"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "perssd-scale", str(d)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True, capture_output=True, timeout=30)


def _node(sw: Seaweed, prefix: str, tmp: Path, **cfg_over: Any) -> Any:
    from csi_perssd.runtime import Runtime
    cfg = Config(mode="node", node_id="node-a", backend="rawfile", rawfile_dir=str(tmp / "raw"),
                 state_dir=str(tmp / "state"), endpoint=f"unix://{tmp}/csi.sock", catalog=sw.url(prefix),
                 s3_endpoint=sw.endpoint, **cfg_over)
    rt = Runtime(cfg)
    stores = Stores(cfg, StoreFactory())
    creds = {"accessKeyId": sw.access_key, "secretAccessKey": sw.secret_key}
    stores.catalog(creds)                              # adopted: the node's background work uses them
    rt.stores = rt.sync.stores = rt.node.stores = stores
    return rt, stores.store(creds)


@pytest.mark.root
def test_an_idle_node_costs_a_head_per_poll_whatever_the_catalog_holds(bucket: tuple[Seaweed, str],
                                                                      tmp_path: Path, pool: Path) -> None:
    from csi_perssd.snapshots import NodeSnapshotWorker
    rt, store = _node(*bucket, tmp_path, heartbeat_seconds=0.2, wake_poll_seconds=0.2, wake_idle_seconds=0.2)
    for i in (10, 20, 30):
        rt.backend.create(f"pvol-{i:032x}", 1 << 20)  # cached copies of volumes that exist
    rt.heartbeat()
    worker = NodeSnapshotWorker(rt)
    worker.tick()                                      # the first round lists once
    b = _requests(store)
    rounds = 0
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        rt.heartbeat()
        worker.tick()
        rounds += 1
        time.sleep(0.2)
    cost = _delta(b, _requests(store))
    # idle: one HEAD of the wake-up object per round; no LIST, no GET; the node record is not
    # rewritten (unchanged) and the local copies are checked only every volume_check_seconds
    assert cost == {"head": rounds}, cost
    assert rounds >= 5
    rt._checked_at = -1e18
    b = _requests(store)
    rt.heartbeat()
    assert _delta(b, _requests(store)) == {"head": 3}  # one HEAD per local copy, not a catalog listing


def test_snapshot_requests_reach_the_node_through_the_wake_up_object(bucket: tuple[Seaweed, str],
                                                                     tmp_path: Path) -> None:
    from csi_perssd.snapshots import NodeSnapshotWorker
    sw, prefix = bucket
    rt, store = _node(sw, prefix, tmp_path)
    worker = NodeSnapshotWorker(rt)
    worker.tick()
    b = _requests(store)
    assert worker.tick() == 0 and _delta(b, _requests(store)) == {"head": 1}
    # the controller's side of a request (Snapshots._start): the request, then the wake-up
    sid = f"psnap-{secrets.token_hex(16)}"
    store.put(layout.request_key("node-a", sid), json.dumps({"snapshot": sid, "volume": f"pvol-{0:032x}"}).encode())
    store.put(layout.wake_key("node-a"), b"{}")
    b = _requests(store)
    worker.tick()                                      # no snapshot record: the request is dropped
    cost = _delta(b, _requests(store))
    assert cost.get("list") == 1 and store.head(layout.request_key("node-a", sid)) is None, cost


def test_pages_across_list_page_boundaries_list_every_volume_once(seaweed: Seaweed) -> None:
    """Tiny LIST pages (7 keys) against SeaweedFS's own order (a volume's gen/ directory before
    its record): paging by 5 from tokens returns every volume exactly once, in ID order."""
    from tests.plugins.s3 import make_s3_store
    st = make_s3_store(seaweed, list_page_size=7)
    vids = [f"pvol-{i:032x}" for i in range(41)]
    for i, vid in enumerate(vids):
        st.put(layout.volume_key(vid), _encode(VolumeRecord(id=vid, name=f"b{i}", size=1 << 20, capabilities=[])))
        for g in range(1, 1 + i % 3):
            st.put(layout.manifest_key(vid, g), b"m")
    cat = Catalog(st)
    got: list[str] = []
    after = ""
    while True:
        page = cat.volume_page(after, 5)
        got += [r.id for r in page.records]
        assert all(page.generations[r.id] == set(range(1, 1 + int(r.id[-8:], 16) % 3)) for r in page.records)
        if not page.more:
            break
        after = page.last
    assert got == vids


def test_a_volume_staged_during_an_idle_wait_is_polled_at_the_fast_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's rounds on a fake clock (wake_poll 3 s, wake_idle 60 s): one HEAD round a
    minute while nothing is staged, and from the first 3 s step after a volume is staged, one
    every 3 s. It used to sleep out the whole idle minute first: the first snapshot request of a
    volume staged just after the node started waited ~60 s (conformance test_snapshot_metadata's
    60 s deadline then failed under load)."""
    import types
    from csi_perssd import snapshots
    from csi_perssd.local.state import Phase
    clock = [0.0]
    staged_at = 130.0

    class Stop:
        def wait(self, timeout: float) -> bool:
            clock[0] += timeout
            return clock[0] > 160.0

    volumes = types.SimpleNamespace(all=lambda: [types.SimpleNamespace(phase=Phase.STAGED)]
                                    if clock[0] >= staged_at else [])
    cfg = Config(mode="node", node_id="node-a", wake_poll_seconds=3.0, wake_idle_seconds=60.0)
    rt = types.SimpleNamespace(cfg=cfg, stop_event=Stop(), volumes=volumes)
    ticks: list[float] = []
    worker = snapshots.NodeSnapshotWorker(rt)
    monkeypatch.setattr(worker, "tick", lambda: ticks.append(clock[0]) or 0)
    monkeypatch.setattr(snapshots, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    worker._loop()
    assert ticks == [60.0, 120.0, 132.0, 135.0, 138.0, 141.0, 144.0, 147.0, 150.0, 153.0, 156.0, 159.0], ticks
