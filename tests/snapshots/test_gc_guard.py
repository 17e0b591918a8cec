"""The GC/flush handshake (gc.FlushGuard) against a real S3 server, in-process and deterministic:
a collection that deletes chunks a flush decided to reuse is detected and repaired before commit;
without the guard the same interleaving loses data (so these tests can fail)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from csi_perssd.remote import gc
from csi_perssd import volume_io
from csi_perssd.remote.catalog import Catalog
from csi_perssd.remote.manifest import Manifest

MiB = 1 << 20
CS = 1 << 20
pytestmark = pytest.mark.s3


def _image(path: str, chunks: list[bytes]) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)


def _missing(store, m: Manifest) -> list[str]:  # type: ignore[no-untyped-def]
    from csi_perssd.remote.chunks import chunk_key
    return [h for h in m.referenced_hashes() if store.head(chunk_key(h)) is None]


def _hydrated_equals(store, m: Manifest, src: str, tmp) -> bool:  # type: ignore[no-untyped-def]
    out = str(tmp / "out.img")
    with open(out, "wb") as f:
        f.truncate(m.volume_size)
    volume_io.hydrate(store, m, out)
    with open(out, "rb") as a, open(src, "rb") as b:
        return a.read() == b.read()


def test_reused_chunk_deleted_by_gc_is_repaired(s3_store, tmp_path) -> None:
    data = [os.urandom(CS) for _ in range(6)]
    old = str(tmp_path / "old.img")
    _image(old, data)
    # an earlier volume stored these chunks, then was deleted: they are unreferenced garbage
    volume_io.flush_path(s3_store, old, 6 * CS, CS, check_exists=False)
    src = str(tmp_path / "new.img")
    _image(src, data[:4] + [os.urandom(CS), os.urandom(CS)])
    cat = Catalog(s3_store)

    # without the guard: HEAD finds the old chunks, gc deletes them, the manifest dangles
    m_bad, st = volume_io.flush_path(s3_store, src, 6 * CS, CS, check_exists=True)
    assert st.chunks_skipped_known == 4
    gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert len(_missing(s3_store, m_bad)) == 6, "the unguarded flush must have lost its chunks"

    # with the guard: same interleaving, but the claim step sees the collection and repairs
    volume_io.flush_path(s3_store, old, 6 * CS, CS, check_exists=False)          # garbage again
    guard = gc.FlushGuard.begin(s3_store, "test/new")
    m, st = volume_io.flush_path(s3_store, src, 6 * CS, CS, check_exists=True)
    assert st.chunks_skipped_known == 4
    rep = gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert rep.deleted_chunks, "the collection must have deleted the reused chunks"
    g = guard.claim(m, source=volume_io.source_of(src))
    assert g.overlapped and g.repaired_chunks == 6
    assert _missing(s3_store, m) == []
    # a collection after the claim keeps every claimed chunk
    gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert _missing(s3_store, m) == []
    guard.release()
    assert _hydrated_equals(s3_store, m, src, tmp_path)
    # released and unreferenced: the next collection frees everything
    gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert list(s3_store.list("chunks/")) == []
    assert list(s3_store.list("gc/claims/")) == [] and list(s3_store.list("gc/running/")) == []


def test_no_overlap_costs_no_verification(s3_store, tmp_path) -> None:
    src = str(tmp_path / "a.img")
    _image(src, [os.urandom(CS) for _ in range(3)])
    guard = gc.FlushGuard.begin(s3_store, "test/a")
    m, _ = volume_io.flush_path(s3_store, src, 3 * CS, CS)
    g = guard.claim(m, source=volume_io.source_of(src))
    guard.release()
    assert not g.overlapped and g.verified_chunks == 0


def test_claim_without_source_aborts_when_chunks_vanished(s3_store, tmp_path) -> None:
    src = str(tmp_path / "a.img")
    _image(src, [os.urandom(CS) for _ in range(2)])
    m, _ = volume_io.flush_path(s3_store, src, 2 * CS, CS)
    guard = gc.FlushGuard.begin(s3_store, "test/pin")
    gc.collect(Catalog(s3_store), grace=0, keep=0, dry_run=False)
    from csi_perssd.errors import CsiError
    with pytest.raises(CsiError) as ei:
        guard.claim(m)
    assert ei.value.code.name == "ABORTED"
    guard.release()


def test_gc_loop_racing_guarded_flushes(s3_store, tmp_path) -> None:
    """gc in a tight loop with grace 0 while guarded flushes reuse old garbage chunks and upload
    new ones: every committed manifest hydrates to its source."""
    cat = Catalog(s3_store)
    pool = [os.urandom(CS) for _ in range(8)]
    stop = threading.Event()
    runs = [0]
    errors: list[BaseException] = []

    def gc_loop() -> None:
        while not stop.is_set():
            try:
                gc.collect(cat, grace=0, keep=0, dry_run=False)
                runs[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                return

    t = threading.Thread(target=gc_loop, daemon=True)
    t.start()
    try:
        results = []
        overlaps: list[gc.GuardStats] = []
        for r in range(4):
            garbage = str(tmp_path / f"g{r}.img")
            _image(garbage, pool)
            volume_io.flush_path(s3_store, garbage, 8 * CS, CS, check_exists=False)      # old, unreferenced
            src = str(tmp_path / f"s{r}.img")
            _image(src, [pool[(r + k) % 8] for k in range(4)] + [os.urandom(CS) for _ in range(4)])
            guard = gc.FlushGuard.begin(s3_store, f"test/{r}")
            m, _ = volume_io.flush_path(s3_store, src, 8 * CS, CS, check_exists=True, workers=2)
            overlaps.append(guard.claim(m, source=volume_io.source_of(src)))
            key = f"volumes/pvol-race{r}/gen/0000000001.manifest"
            s3_store.put(key, m.encode())
            # "commit": the manifest is referenced by a live snapshot record from now on
            from csi_perssd.remote.catalog import SnapshotRecord
            cat.create_snapshot(SnapshotRecord(id=f"snap-race{r}", name=f"race{r}", source_volume="pvol-x",
                                               size=8 * CS, ready=True,
                                               manifest_key=f"snapshots/snap-race{r}.manifest"))
            s3_store.put(f"snapshots/snap-race{r}.manifest", m.encode())
            guard.release()
            results.append((m, src))
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert runs[0] >= 3, f"gc ran only {runs[0]} times"
    assert any(g.overlapped for g in overlaps), "the collections never overlapped a flush: no race tested"
    print(f"gc runs {runs[0]}, overlapped flushes {sum(g.overlapped for g in overlaps)}, "
          f"chunks uploaded again {sum(g.repaired_chunks for g in overlaps)}")
    for m, src in results:
        assert _missing(s3_store, m) == []
        assert _hydrated_equals(s3_store, m, src, tmp_path)


def test_snapshot_committed_between_gc_reads_keeps_its_manifest(s3_store, tmp_path, monkeypatch) -> None:
    """The interleaving behind test_gc_loop_racing_guarded_flushes' rare loss, forced: a guarded
    writer creates its snapshot record and then writes the snapshot manifest while a collection
    runs, both after the collection read the snapshot records. That collection must not take the
    manifest for a deleted snapshot's leftover (it used to list the manifests after reading the
    records and delete it: once the claim was released the next run deleted its chunks).
    The collector's clock runs 2 s ahead of the S3 server's here, so the manifest is older than
    the zero grace period, as whole-second LastModified times make it under load anyway."""
    from csi_perssd.remote.catalog import SnapshotRecord
    import types
    cat = Catalog(s3_store)
    src = str(tmp_path / "s.img")
    _image(src, [os.urandom(CS) for _ in range(4)])
    guard = gc.FlushGuard.begin(s3_store, "test/snap")
    m, _ = volume_io.flush_path(s3_store, src, 4 * CS, CS)
    assert not guard.claim(m, source=volume_io.source_of(src)).overlapped
    mkey = "snapshots/snap-between.manifest"
    committed = []

    def commit() -> None:       # the writer's "commit", as in the racing test
        cat.create_snapshot(SnapshotRecord(id="snap-between", name="between", source_volume="pvol-x",
                                           size=4 * CS, ready=True, manifest_key=mkey))
        s3_store.put(mkey, m.encode())
        committed.append(True)

    scan_pages = s3_store.scan_pages

    def scan_then_commit(prefix, *a, **kw):  # type: ignore[no-untyped-def]
        yield from scan_pages(prefix, *a, **kw)
        if prefix == "snapshots/" and not committed:
            commit()            # the collection has just read the snapshot records
    monkeypatch.setattr(s3_store, "scan_pages", scan_then_commit)
    monkeypatch.setattr(gc, "time", types.SimpleNamespace(time=lambda: time.time() + 2.0, monotonic=time.monotonic))
    rep = gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert committed, "the writer never committed during the collection: nothing tested"
    assert mkey not in rep.deleted_manifests
    assert s3_store.head(mkey) is not None
    guard.release()
    rep = gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert not rep.deleted_chunks and s3_store.head(mkey) is not None
    assert _missing(s3_store, m) == []
    assert _hydrated_equals(s3_store, m, src, tmp_path)


def test_claim_aborts_when_the_source_is_shorter_than_its_manifest(s3_store, tmp_path) -> None:
    """The repair source cannot give a chunk back (the file ended early): ABORTED, retriable, as for
    a source that changed; nothing is uploaded under the chunk's name."""
    src = str(tmp_path / "a.img")
    _image(src, [os.urandom(CS) for _ in range(2)])
    guard = gc.FlushGuard.begin(s3_store, "test/short")
    m, _ = volume_io.flush_path(s3_store, src, 2 * CS, CS)
    gc.collect(Catalog(s3_store), grace=0, keep=0, dry_run=False)     # the chunks were not claimed yet
    assert len(_missing(s3_store, m)) == 2
    os.truncate(src, CS // 2)
    from csi_perssd.errors import CsiError
    with pytest.raises(CsiError) as ei:
        guard.claim(m, source=volume_io.source_of(src))
    assert ei.value.code.name == "ABORTED" and "flush again" in ei.value.message
    assert len(_missing(s3_store, m)) == 2
    guard.release()


def test_manifest_stored_past_the_claimed_generation_survives_a_collection(s3_store, tmp_path, monkeypatch) -> None:
    """put_manifest stores a flush's manifest under the first free generation: generation + 2 when
    a fenced-out node left an uncommitted generation + 1, which is the one the writer's claim names.
    A collection running with a zero grace period that read the record (still at the old
    generation) must keep that manifest anyway; it used to delete it, and the commit that followed
    made a generation whose manifest was gone. The collector's clock runs 2 s ahead of the
    server's, so the manifest is older than the grace period (see the test above)."""
    import types
    from csi_perssd.errors import CsiError
    from csi_perssd.remote.catalog import VolumeRecord, manifest_key
    cat = Catalog(s3_store)
    vid = "pvol-" + "2" * 32
    cat.create_volume(VolumeRecord(id=vid, name="gen-plus-two", size=4 * CS, capabilities=[], owner="node-a",
                                   epoch=1, chunk_size=CS))
    first = str(tmp_path / "g1.img")
    _image(first, [os.urandom(CS) for _ in range(4)])
    m1, _ = volume_io.flush_path(s3_store, first, 4 * CS, CS)
    cat.commit_generation(vid, cat.put_manifest(vid, 1, m1.encode()), "node-a", 1)
    s3_store.put(manifest_key(vid, 2), m1.encode())         # a fenced-out node's uncommitted generation 2
    src = str(tmp_path / "g.img")
    _image(src, [os.urandom(CS) for _ in range(4)])
    guard = gc.FlushGuard.begin(s3_store, f"node-a/{vid}")
    m, _ = volume_io.flush_path(s3_store, src, 4 * CS, CS)
    assert not guard.claim(m, source=volume_io.source_of(src), manifests=[manifest_key(vid, 2)]).overlapped
    stored: list[int] = []
    scan_pages = s3_store.scan_pages

    def write_then_scan(prefix, *a, **kw):  # type: ignore[no-untyped-def]
        if prefix == "volumes/" and not stored:     # the writer stores its manifest as the run lists volumes
            stored.append(cat.put_manifest(vid, 2, m.encode()))
        yield from scan_pages(prefix, *a, **kw)
    monkeypatch.setattr(s3_store, "scan_pages", write_then_scan)
    monkeypatch.setattr(gc, "time", types.SimpleNamespace(time=lambda: time.time() + 2.0, monotonic=time.monotonic))
    rep = gc.collect(cat, grace=0, keep=0, dry_run=False)
    assert stored == [3], f"the manifest went to generation {stored}, not 3: nothing tested"
    assert manifest_key(vid, 3) not in rep.deleted_manifests, "the collection deleted the writer's manifest"
    cat.commit_generation(vid, 3, "node-a", 1)
    guard.release()
    monkeypatch.undo()
    gc.collect(cat, grace=0, keep=0, dry_run=False)
    try:
        got = Manifest.decode(cat.get_manifest(vid, 3))
    except CsiError as e:
        pytest.fail(f"committed generation 3 lost its manifest: {e}")
    assert got.entries == m.entries and _missing(s3_store, got) == []
    assert _hydrated_equals(s3_store, got, src, tmp_path)
