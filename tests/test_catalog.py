"""remote/catalog.py on FileStore: typed records, idempotency by name, atomic writes, schema
version, conditional updates under thread races, commit_generation fencing."""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from csi_perssd import ids
from csi_perssd.errors import Code, CsiError, Fenced
from csi_perssd.remote import catalog as catmod
from csi_perssd.remote.catalog import Catalog, NodeRecord, SnapshotRecord, VolumeRecord
from csi_perssd.remote.filestore import FileStore

CAPS = [{"access_type": "mount", "fs_type": "ext4", "mode": "SINGLE_NODE_WRITER", "mount_flags": []}]


@pytest.fixture
def cat(tmp_path) -> Catalog:
    return Catalog(FileStore(str(tmp_path / "store")))


def vol(name: str = "pvc-1", size: int = 1 << 30, **kw) -> VolumeRecord:
    return VolumeRecord(id=ids.new_volume_id(), name=name, size=size, capabilities=CAPS, **kw)


def files_under(root) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]


class TestIdempotencyByName:
    def test_create_then_get(self, cat):
        rec, created = cat.create_volume(vol())
        assert created
        got = cat.get_volume(rec.id)
        assert got == rec and got.etag

    def test_same_name_returns_the_existing_record(self, cat):
        first, _ = cat.create_volume(vol("data", size=1 << 30))
        again, created = cat.create_volume(vol("data", size=2 << 30))
        assert not created and again.id == first.id and again.size == 1 << 30
        assert len(cat.list_volumes()) == 1

    def test_different_names_are_different_volumes(self, cat):
        a, _ = cat.create_volume(vol("a"))
        b, _ = cat.create_volume(vol("b"))
        assert a.id != b.id and len(cat.list_volumes()) == 2

    def test_hostile_names_are_hashed_not_used_as_keys(self, cat, tmp_path):
        rec, _ = cat.create_volume(vol("../../../etc/passwd"))
        assert cat.create_volume(vol("../../../etc/passwd"))[0].id == rec.id
        for f in files_under(tmp_path):
            assert os.path.realpath(f).startswith(str(tmp_path))

    def test_delete_frees_the_name(self, cat):
        a, _ = cat.create_volume(vol("reuse"))
        cat.delete_volume(a)
        assert cat.get_volume(a.id) is None
        b, created = cat.create_volume(vol("reuse"))
        assert created and b.id != a.id

    def test_a_stale_name_is_taken_over(self, cat):
        a, _ = cat.create_volume(vol("stale"))
        cat.store.delete(catmod.volume_key(a.id))      # a delete that crashed half-way
        b, created = cat.create_volume(vol("stale"))
        assert created and b.id != a.id and cat.get_volume(b.id) is not None

    def test_concurrent_creates_of_one_name_make_one_volume(self, cat):
        barrier = threading.Barrier(8)

        def create(_: int) -> tuple[str, bool]:
            barrier.wait()
            rec, created = cat.create_volume(vol("racy"))
            return rec.id, created
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(create, range(8)))
        assert len({r[0] for r in results}) == 1
        assert sum(r[1] for r in results) == 1
        assert len(cat.list_volumes()) == 1

    def test_snapshots_are_idempotent_by_name_too(self, cat):
        s = SnapshotRecord(id=ids.new_snapshot_id(), name="snap", source_volume="pvol-1", size=1)
        a, created = cat.create_snapshot(s)
        b, again = cat.create_snapshot(SnapshotRecord(id=ids.new_snapshot_id(), name="snap", source_volume="pvol-1", size=1))
        assert created and not again and a.id == b.id


class TestLookups:
    def test_unknown_volume(self, cat):
        assert cat.get_volume("pvol-" + "0" * 32) is None
        with pytest.raises(CsiError) as e:
            cat.volume("pvol-" + "0" * 32)
        assert e.value.code == Code.NOT_FOUND

    def test_hostile_ids_never_reach_the_store(self, cat):
        for bad in ("../x", "a/b", ""):
            with pytest.raises(CsiError) as e:
                cat.get_volume(bad)
            assert e.value.code == Code.INVALID_ARGUMENT

    def test_update_of_an_unknown_volume_is_not_found(self, cat):
        with pytest.raises(CsiError) as e:
            cat.update_volume("pvol-" + "0" * 32, lambda r: None)
        assert e.value.code == Code.NOT_FOUND

    def test_nodes(self, cat):
        cat.put_node(NodeRecord(id="node-b", pool="p"))
        cat.put_node(NodeRecord(id="node-a", pool="p", available_bytes=5))
        cat.put_node(NodeRecord(id="node-a", pool="p", available_bytes=7))     # heartbeat overwrites
        assert [n.id for n in cat.list_nodes()] == ["node-a", "node-b"]
        assert cat.get_node("node-a").available_bytes == 7
        assert cat.get_node("node-z") is None


class TestAtomicWritesAndSchema:
    def test_records_are_json_with_a_schema_version_and_no_temp_files_remain(self, cat, tmp_path):
        rec, _ = cat.create_volume(vol())
        for i in range(20):
            cat.update_volume(rec.id, lambda r: setattr(r, "epoch", r.epoch + 1))
        data = json.loads((tmp_path / "store" / catmod.volume_key(rec.id)).read_bytes())
        assert data["schema"] == catmod.SCHEMA and data["epoch"] == 20 and "etag" not in data
        assert not [f for f in files_under(tmp_path / "store") if os.path.basename(f).startswith(".tmp-")]

    def test_readers_never_see_a_partial_record(self, cat, tmp_path):
        rec, _ = cat.create_volume(vol(parameters={"pad": "x" * 200_000}))
        path = tmp_path / "store" / catmod.volume_key(rec.id)
        stop = threading.Event()
        bad: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    json.loads(path.read_bytes())
                except ValueError as e:
                    bad.append(str(e))
        t = threading.Thread(target=reader)
        t.start()
        try:
            for i in range(30):
                cat.update_volume(rec.id, lambda r, i=i: r.parameters.__setitem__("pad", str(i) * (100_000 + i * 1000)))
        finally:
            stop.set()
            t.join()
        assert not bad

    def test_a_newer_schema_is_refused(self, cat):
        rec, _ = cat.create_volume(vol())
        key = catmod.volume_key(rec.id)
        data = json.loads(cat.store.get(key)[0])
        data["schema"] = catmod.SCHEMA + 1
        cat.store.put(key, json.dumps(data).encode())
        with pytest.raises(CsiError) as e:
            cat.get_volume(rec.id)
        assert e.value.code == Code.FAILED_PRECONDITION and "schema" in e.value.message

    def test_unknown_fields_are_ignored(self, cat):
        rec, _ = cat.create_volume(vol())
        key = catmod.volume_key(rec.id)
        data = json.loads(cat.store.get(key)[0])
        data["field_from_the_future"] = 1
        cat.store.put(key, json.dumps(data).encode())
        assert cat.get_volume(rec.id).name == rec.name


class TestConditionalUpdates:
    def test_concurrent_updates_lose_nothing(self, cat):
        rec, _ = cat.create_volume(vol())
        ok = []
        mu = threading.Lock()

        def bump(_: int) -> None:
            for _ in range(10):
                try:
                    cat.update_volume(rec.id, lambda r: setattr(r, "epoch", r.epoch + 1))
                except CsiError as e:
                    assert e.code == Code.ABORTED          # only "too many concurrent updates"
                    continue
                with mu:
                    ok.append(1)
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(bump, range(4)))
        assert len(ok) >= 20
        assert cat.volume(rec.id).epoch == len(ok)

    def test_a_stale_etag_loses(self, cat):
        rec, _ = cat.create_volume(vol())
        stale = cat.volume(rec.id)
        cat.update_volume(rec.id, lambda r: setattr(r, "owner", "node-a"))
        from csi_perssd.remote.store import PreconditionFailed
        stale.owner = "node-b"
        with pytest.raises(PreconditionFailed):
            cat._put(catmod.volume_key(rec.id), stale)
        assert cat.volume(rec.id).owner == "node-a"


class TestCommitGenerationFencing:
    @pytest.fixture
    def owned(self, cat) -> VolumeRecord:
        rec, _ = cat.create_volume(vol())

        def take(r: VolumeRecord) -> None:
            r.owner, r.epoch = "node-a", 3
        return cat.update_volume(rec.id, take)

    def test_the_owner_commits(self, cat, owned):
        gen = cat.put_manifest(owned.id, 1, b"manifest-1")
        rec = cat.commit_generation(owned.id, gen, "node-a", 3)
        assert (rec.generation, rec.generation_node) == (1, "node-a")
        assert cat.list_generations(owned.id) == [1]
        assert cat.get_manifest(owned.id, 1) == b"manifest-1"

    @pytest.mark.parametrize("node,epoch", [("node-b", 3), ("node-a", 2), ("node-a", 4)])
    def test_another_node_or_epoch_is_fenced_out(self, cat, owned, node, epoch):
        gen = cat.put_manifest(owned.id, 1, b"m")
        with pytest.raises(CsiError) as e:
            cat.commit_generation(owned.id, gen, node, epoch)
        assert e.value.code == Code.FAILED_PRECONDITION
        assert isinstance(e.value, Fenced)     # the catalog's proof: the node may discard
        assert cat.volume(owned.id).generation == 0

    def test_an_older_generation_cannot_replace_a_newer_one(self, cat, owned):
        cat.commit_generation(owned.id, cat.put_manifest(owned.id, 1, b"1"), "node-a", 3)
        cat.commit_generation(owned.id, cat.put_manifest(owned.id, 2, b"2"), "node-a", 3)
        with pytest.raises(CsiError) as e:
            cat.commit_generation(owned.id, 1, "node-a", 3)
        assert e.value.code == Code.FAILED_PRECONDITION
        assert not isinstance(e.value, Fenced)  # not fencing: the local data must stay
        assert cat.volume(owned.id).generation == 2

    def test_manifests_are_written_once_at_the_next_free_generation(self, cat, owned):
        assert cat.put_manifest(owned.id, 1, b"fenced node's leftover") == 1
        assert cat.put_manifest(owned.id, 1, b"real") == 2
        assert cat.get_manifest(owned.id, 1) == b"fenced node's leftover"

    def test_missing_manifest_is_data_loss(self, cat, owned):
        with pytest.raises(CsiError) as e:
            cat.get_manifest(owned.id, 9)
        assert e.value.code == Code.DATA_LOSS

    def test_concurrent_commits_one_wins(self, cat, owned):
        gens = [cat.put_manifest(owned.id, 1, f"m{i}".encode()) for i in range(6)]
        barrier = threading.Barrier(6)

        def commit(gen: int) -> int | None:
            barrier.wait()
            try:
                return cat.commit_generation(owned.id, gen, "node-a", 3).generation
            except CsiError as e:
                assert e.code in (Code.FAILED_PRECONDITION, Code.ABORTED)
                return None
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(commit, gens))
        final = cat.volume(owned.id).generation
        assert final == max(r for r in results if r is not None)
        assert final in gens
