"""The bucket layout (remote/layout.py): builders validate, parsers invert them, and nothing else
parses; the store factory caches and tells observers; the record cache follows LIST version tags."""
from __future__ import annotations

import pytest

from csi_perssd.errors import CsiError
from csi_perssd.remote import layout
from csi_perssd.remote.catalog import Catalog, VolumeRecord
from csi_perssd.remote.factory import StoreFactory
from csi_perssd.remote.filestore import FileStore

H = "ab" * 32


def test_builders_and_parsers_round_trip() -> None:
    assert layout.volume_key("pvol-1") == "volumes/pvol-1.json"
    assert layout.parse_manifest_key(layout.manifest_key("pvol-1", 7)) == ("pvol-1", 7)
    assert layout.manifest_key("pvol-1", 7) == "volumes/pvol-1/gen/0000000007.manifest"
    assert layout.parse_snapshot_manifest_key(layout.snapshot_manifest_key("psnap-2")) == "psnap-2"
    assert layout.parse_request_key(layout.request_key("node-a", "psnap-2")) == ("node-a", "psnap-2")
    assert layout.parse_chunk_key(layout.chunk_key(H)) == H
    assert layout.record_id(layout.VOLUMES, "volumes/pvol-1.json") == "pvol-1"
    assert layout.record_id(layout.NODES, layout.node_key("node-a")) == "node-a"
    assert layout.name_key("names", "x").startswith("names/") and len(layout.name_key("names", "x")) == 70


@pytest.mark.parametrize("key", ["volumes/pvol-1/gen/7.json", "volumes/pvol-1.json", "chunks/cd/" + H,
                                 "chunks/ab/" + H + "x", "requests/n/s.txt", "snapshots/s.json"])
def test_parsers_reject_other_kinds(key: str) -> None:
    assert layout.parse_manifest_key(key) is None or key.endswith(".manifest")
    assert layout.parse_chunk_key(key) is None
    assert layout.parse_request_key(key) is None
    assert layout.parse_snapshot_manifest_key(key) is None
    assert layout.record_id(layout.VOLUMES, "volumes/pvol-1/gen/x.json") is None


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x y"])
def test_builders_refuse_unsafe_ids(bad: str) -> None:
    with pytest.raises(CsiError):
        layout.volume_key(bad)
    with pytest.raises(CsiError):
        layout.request_key(bad, "psnap-1")
    with pytest.raises(ValueError):
        layout.chunk_key(bad)


def test_factory_caches_and_tells_observers(tmp_path) -> None:
    f = StoreFactory()
    seen: list[object] = []
    a = f.open(f"file://{tmp_path}/a")
    f.observe(seen.append)
    assert seen == [a]                                  # stores opened before are reported too
    assert f.open(f"file://{tmp_path}/a") is a
    b = f.open(f"file://{tmp_path}/b")
    assert b is not a and seen == [a, b]
    f.observe(seen.append)                              # registering twice counts once
    assert seen == [a, b]


def _vol(i: int) -> VolumeRecord:
    return VolumeRecord(id=f"pvol-{i:04d}", name=f"n{i}", size=1 << 20, capabilities=[])


def test_volume_pages_follow_the_token_across_deletes(tmp_path) -> None:
    cat = Catalog(FileStore(str(tmp_path / "st")))
    for i in range(7):
        cat.create_volume(_vol(i))
    cat.store.put(layout.manifest_key("pvol-0001", 1), b"m")
    p1 = cat.volume_page("", 3)
    assert [r.id for r in p1.records] == ["pvol-0000", "pvol-0001", "pvol-0002"] and p1.more
    assert p1.generations["pvol-0001"] == {1} and p1.last == "pvol-0002"
    cat.delete_volume(cat.volume("pvol-0002"))          # the token's own volume goes away
    cat.delete_volume(cat.volume("pvol-0003"))
    p2 = cat.volume_page(p1.last, 3)
    assert [r.id for r in p2.records] == ["pvol-0004", "pvol-0005", "pvol-0006"] and not p2.more


def test_record_cache_reads_only_changed_records(tmp_path) -> None:
    cat = Catalog(FileStore(str(tmp_path / "st")))
    for i in range(5):
        cat.create_volume(_vol(i))
    cat.volume_page()
    misses = cat.cache.misses
    assert len(cat.volume_page().records) == 5 and cat.cache.misses == misses
    cat.update_volume("pvol-0003", lambda r: setattr(r, "owner", "node-b"))
    page = cat.volume_page()
    assert cat.cache.misses == misses + 1
    assert {r.id: r.owner for r in page.records}["pvol-0003"] == "node-b"


def test_factory_keeps_one_store_per_url_and_settings() -> None:
    f = StoreFactory()
    a = f.open("s3://bucket/a", {"endpoint": "http://127.0.0.1:1"})
    b = f.open("s3://bucket/b", {"endpoint": "http://127.0.0.1:1"})
    assert a is not b and a.url == "s3://bucket/a" and b.url == "s3://bucket/b"
    assert f.open("s3://bucket/a", {"endpoint": "http://127.0.0.1:1"}) is a
    assert f.open("s3://bucket/a", {"endpoint": "http://127.0.0.1:2"}) is not a
