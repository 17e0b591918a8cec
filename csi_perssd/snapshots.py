"""Snapshots, restore and clones through the object store.

Controller side (`Snapshots`): CreateSnapshot / DeleteSnapshot / ListSnapshots and the content
sources of CreateVolume. A snapshot pins a manifest of its own (`snapshots/<sid>.manifest`), so
it survives the deletion of its source volume and the pruning of old generations.
- Source not staged (no owner): the snapshot copies the committed generation's manifest —
  instant, ready, no chunk copied.
- Source owned by a node: the controller leaves a request record `requests/<node>/<sid>.json`;
  that node's `NodeSnapshotWorker` freezes the file system, takes a local point-in-time copy,
  thaws, uploads the copy incrementally and marks the snapshot ready.
Clones and restores: the new volume's generation 1 is the source's manifest (resized when the
new volume is larger) — no chunk is copied.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from . import encryption, ids
from .config import Config
from .csi import csi_pb2 as pb
from .errors import Code, CsiError, aborted, invalid, not_found, precondition
from .local import fs
from .local.state import Phase
from .local.volumes import STAGED_PHASES
from .pagetoken import token_after
from .remote.catalog import Catalog, SnapshotRecord, VolumeRecord
from .remote.codec import PLAIN, Codec, manifest_summary
from .remote.guard import FlushGuard
from .remote.layout import manifest_key, name_key, request_key, requests_prefix, snapshot_manifest_key, wake_key
from .remote.manifest import Manifest
from .remote.store import NotFound, reachable
from .stores import Stores

log = logging.getLogger(__name__)
TOKEN_PREFIX = "s1:"


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _check_params(p: dict[str, str]) -> None:
    unknown = sorted(k for k in p if not k.startswith("csi.storage.k8s.io/"))
    if unknown:
        raise invalid(f"unknown snapshot parameter(s): {', '.join(unknown)} (none are supported)")


def snapshot_by_name(cat: Catalog, name: str) -> SnapshotRecord | None:
    try:
        with reachable(cat.store):
            data, _ = cat.store.get(name_key("snapnames", name))
    except NotFound:
        return None
    try:
        return cat.get_snapshot(json.loads(data)["id"])
    except (ValueError, KeyError, CsiError):
        return None                 # a damaged name record: creation takes it over


def read_manifest(cat: Catalog, key: str, codec: Codec = PLAIN) -> Manifest:
    try:
        with reachable(cat.store):
            return codec.open_manifest(cat.store.get(key)[0], f"manifest {key}")
    except NotFound:
        raise CsiError(Code.DATA_LOSS, f"manifest {key} is missing") from None


class Snapshots:
    def __init__(self, cfg: Config, stores: Stores, controller: Any):
        self.cfg = cfg
        self.stores = stores
        self.controller = controller

    def proto(self, rec: SnapshotRecord) -> pb.Snapshot:
        return pb.Snapshot(size_bytes=rec.size, snapshot_id=rec.id, source_volume_id=rec.source_volume,
                           creation_time=_ts(rec.created_at), ready_to_use=rec.ready,
                           group_snapshot_id=rec.group)

    # -- CreateSnapshot --------------------------------------------------------------------
    def create(self, request: Any) -> pb.CreateSnapshotResponse:
        src = ids.volume_id(request.source_volume_id)
        name = ids.name(request.name, "name")
        _check_params(dict(request.parameters))
        cat = self.stores.catalog(dict(request.secrets))
        with self.controller.locks.hold("snapname:" + name):
            same = snapshot_by_name(cat, name)
            if same is not None and same.source_volume != src:
                raise CsiError(Code.ALREADY_EXISTS, f"snapshot name {name!r} already names {same.id} "
                               f"of volume {same.source_volume}, not of {src}")
            if same is not None and same.ready:
                return pb.CreateSnapshotResponse(snapshot=self.proto(same))    # even if the source is gone now
            vol = cat.volume(src)
            if vol.persistence != "object":
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {vol.id} has persistence=local: its data never "
                               f"leaves the node, so it cannot be snapshotted to the object store "
                               f"(use persistence=object for volumes that need snapshots)")
            rec = SnapshotRecord(id=ids.new_snapshot_id(), name=name, source_volume=src, size=vol.size,
                                 parameters=dict(request.parameters), encryption=dict(vol.encryption))
            got, created = cat.create_snapshot(rec)
            if not created and got.source_volume != src:
                raise CsiError(Code.ALREADY_EXISTS, f"snapshot name {name!r} already names {got.id} "
                               f"of volume {got.source_volume}, not of {src}")
            if got.error and not got.ready:
                log.warning("snapshot %s of %s: retrying after: %s", got.id, src, got.error)
                got = cat.update_snapshot(got.id, lambda r: setattr(r, "error", ""))
            if created or (not got.ready and not got.node):
                got = self._start(cat, got, vol, dict(request.secrets))
        if not got.ready:
            age = time.time() - got.created_at
            log.info("snapshot %s of %s: not ready yet after %.1fs: %s", got.id, src, age,
                     got.progress or "waiting for node " + got.node)
        return pb.CreateSnapshotResponse(snapshot=self.proto(got))

    def _start(self, cat: Catalog, snap: SnapshotRecord, vol: VolumeRecord,
               secrets: dict[str, str]) -> SnapshotRecord:
        if vol.owner:
            req = {"snapshot": snap.id, "volume": vol.id, "created_at": time.time()}
            with reachable(cat.store):
                cat.store.put(request_key(vol.owner, snap.id), json.dumps(req).encode())
                # after the request: a node that sees the new wake-up lists and finds it
                cat.store.put(wake_key(vol.owner), json.dumps(req).encode())

            def assign(r: SnapshotRecord) -> None:
                r.node, r.progress = vol.owner, f"requested from node {vol.owner}"
            log.info("snapshot %s of %s: volume is in use on %s, asked it for a point-in-time copy",
                     snap.id, vol.id, vol.owner)
            return cat.update_snapshot(snap.id, assign)
        return self.pin_generation(cat, snap, vol, lambda: encryption.codec_for(
            vol.encryption, secrets, self.cfg, f"snapshot of volume {vol.id}", "snapshotter"))

    def pin_generation(self, cat: Catalog, snap: SnapshotRecord, vol: VolumeRecord,
                       empty_codec: Callable[[], Codec] | None = None) -> SnapshotRecord:
        """Make the snapshot refer to the volume's committed generation: copy its manifest, byte
        for byte (a sealed one needs no key: its public header names the chunks to claim).
        Guarded against a concurrent garbage collection that prunes that generation. A volume
        never flushed gets an empty manifest, encoded by `empty_codec()` (its lineage's, for
        an encrypted volume: the one case that needs the KEK; by default the configured one)."""
        guard = FlushGuard.begin(cat.store, f"snapshot {snap.id}")
        try:
            vol = cat.volume(vol.id)
            if vol.generation:
                data = cat.get_manifest(vol.id, vol.generation)
            else:
                codec = empty_codec() if empty_codec is not None else encryption.codec_for(
                    vol.encryption, None, self.cfg, f"snapshot of volume {vol.id}", "snapshotter")
                data = codec.encode_manifest(Manifest.empty(vol.size, vol.chunk_size))
            refs, size = manifest_summary(data, f"volume {vol.id} generation {vol.generation}")
            guard.claim(refs, manifests=[snapshot_manifest_key(snap.id)])
            with reachable(cat.store):
                cat.store.put(snapshot_manifest_key(snap.id), data)
            rec = self._mark_ready(cat, snap.id, size, vol.generation, "ready (pinned the committed generation)")
        finally:
            guard.release()
        log.info("snapshot %s of %s: ready at once (generation %d, %d distinct chunks, nothing copied)",
                 snap.id, vol.id, vol.generation, len(refs))
        return rec

    @staticmethod
    def _mark_ready(cat: Catalog, sid: str, size: int, generation: int, progress: str,
                    cut_at: float | None = None) -> SnapshotRecord:
        def ready(r: SnapshotRecord) -> None:
            r.ready, r.generation, r.manifest_key, r.node = True, generation, snapshot_manifest_key(sid), ""
            r.size, r.progress, r.error = size, progress, ""
            if cut_at is not None:
                r.created_at = cut_at       # spec: when the point-in-time copy was taken
        rec = cat.update_snapshot_if_exists(sid, ready)
        if rec is None:                     # deleted while it was being made: drop what we wrote
            cat.store.delete(snapshot_manifest_key(sid))
            raise not_found(f"snapshot {sid} not found")
        return rec

    # -- GetSnapshot / DeleteSnapshot / ListSnapshots --------------------------------------
    def get(self, request: Any) -> pb.GetSnapshotResponse:
        """One snapshot's current state, ready or not yet (spec: "must be retrievable");
        NOT_FOUND once it is deleted."""
        sid = ids.snapshot_id(request.snapshot_id)
        rec = self.stores.catalog(dict(request.secrets)).get_snapshot(sid)
        if rec is None:
            raise not_found(f"snapshot {sid} does not exist")
        return pb.GetSnapshotResponse(snapshot=self.proto(rec))

    def delete(self, request: Any) -> pb.DeleteSnapshotResponse:
        sid = ids.snapshot_id(request.snapshot_id)
        cat = self.stores.catalog(dict(request.secrets))
        with self.controller.locks.hold(sid):
            rec = cat.get_snapshot(sid)
            if rec is None:
                return pb.DeleteSnapshotResponse()
            if rec.group and cat.get_group(rec.group) is not None:
                raise precondition(f"snapshot {sid} is a member of group snapshot {rec.group}; "
                                   "delete the group snapshot (DeleteVolumeGroupSnapshot) instead")
            if rec.node:
                cat.store.delete(request_key(rec.node, sid))
            cat.store.delete(snapshot_manifest_key(sid))
            cat.delete_snapshot(rec)
        log.info("snapshot %s deleted; its chunks are left to garbage collection", sid)
        return pb.DeleteSnapshotResponse()

    def list(self, request: Any) -> pb.ListSnapshotsResponse:
        """A page costs one LIST from the token plus a GET per changed record of the page (a
        source_volume_id filter reads on until the page is full); one snapshot_id: one GET."""
        if request.max_entries < 0:
            raise invalid("max_entries must not be negative")
        after = token_after(request.starting_token, TOKEN_PREFIX, ids.snapshot_id)
        cat = self.stores.catalog(dict(request.secrets))
        if request.snapshot_id:
            try:
                one = cat.get_snapshot(ids.snapshot_id(request.snapshot_id))
            except CsiError:
                one = None          # a malformed ID names no snapshot
            recs = [r for r in [one] if r is not None and r.id > after
                    and (not request.source_volume_id or r.source_volume == request.source_volume_id)]
            return pb.ListSnapshotsResponse(entries=[pb.ListSnapshotsResponse.Entry(snapshot=self.proto(r))
                                                     for r in recs])
        limit, more = request.max_entries, False
        out: list[SnapshotRecord] = []
        while True:
            page = cat.snapshot_page(after, limit - len(out) if limit else 0)
            out += [r for r in page.records
                    if not request.source_volume_id or r.source_volume == request.source_volume_id]
            more, after = page.more, page.last
            if not more or (limit and len(out) >= limit):
                break
        resp = pb.ListSnapshotsResponse(entries=[pb.ListSnapshotsResponse.Entry(snapshot=self.proto(r)) for r in out])
        if more:
            resp.next_token = TOKEN_PREFIX + after
        return resp

    # -- CreateVolume content sources ------------------------------------------------------
    def resolve_source(self, cat: Catalog, src: pb.VolumeContentSource, size: int, cr: Any) -> dict[str, str]:
        kind = src.WhichOneof("type")
        if kind == "snapshot":
            sid = ids.snapshot_id(src.snapshot.snapshot_id)
            snap = cat.get_snapshot(sid)
            if snap is None:
                raise not_found(f"source snapshot {sid} does not exist")
            if not snap.ready:
                raise aborted(f"source snapshot {sid} is not ready yet")
            src_size = snap.size
            out = {"snapshot": sid}
        elif kind == "volume":
            vid = ids.volume_id(src.volume.volume_id)
            vol = cat.get_volume(vid)
            if vol is None:
                raise not_found(f"source volume {vid} does not exist")
            if vol.persistence != "object":
                raise invalid(f"source volume {vid} has persistence=local and cannot be cloned through the object store")
            src_size = vol.size
            out = {"volume": vid}
        else:
            raise invalid("volume_content_source must name a snapshot or a volume")
        if cr is not None and cr.limit_bytes and cr.limit_bytes < src_size:
            raise CsiError(Code.OUT_OF_RANGE, f"the source holds {src_size} bytes, more than limit_bytes {cr.limit_bytes}")
        if size < src_size:
            if cr is not None and cr.required_bytes and cr.required_bytes < src_size:
                raise CsiError(Code.OUT_OF_RANGE, f"requested {cr.required_bytes} bytes, smaller than the source's {src_size}")
        return out

    @staticmethod
    def source_encryption(cat: Catalog, source: dict[str, str]) -> dict[str, str]:
        """The wrapped lineage key of a content source ({} when it is not encrypted)."""
        if "snapshot" in source:
            snap = cat.get_snapshot(source["snapshot"])
            if snap is None:
                raise not_found(f"source snapshot {source['snapshot']} does not exist")
            return dict(snap.encryption)
        return dict(cat.volume(source["volume"]).encryption)

    def source_manifest(self, cat: Catalog, source: dict[str, str], codec: Codec = PLAIN) -> Manifest | None:
        if "snapshot" in source:
            snap = cat.get_snapshot(source["snapshot"])
            if snap is None:
                raise not_found(f"source snapshot {source['snapshot']} does not exist")
            return read_manifest(cat, snap.manifest_key or snapshot_manifest_key(snap.id), codec)
        vol = cat.volume(source["volume"])
        if not vol.generation:
            return None
        return codec.open_manifest(cat.get_manifest(vol.id, vol.generation),
                                   f"volume {vol.id} generation {vol.generation}")

    def prepare_clone(self, cat: Catalog, rec: VolumeRecord, codec: Codec = PLAIN) -> None:
        """Write the new volume's generation 1 (the source's manifest) before its record exists.
        Guarded: if a garbage collection deleted a chunk of the source meanwhile (the source was
        deleted concurrently), ABORTED and nothing is written."""
        guard = FlushGuard.begin(cat.store, f"clone {rec.id}")
        try:
            m = self.source_manifest(cat, rec.source, codec)
            if m is None:
                guard.release()
                return
            rec.size = max(rec.size, m.volume_size)
            if rec.size > m.volume_size:
                m = m.resize(rec.size)
            rec.chunk_size = m.chunk_size
            rec.parameters["chunkSize"] = str(m.chunk_size)
            m.generation, m.parent = 1, None
            guard.claim(m, manifests=[manifest_key(rec.id, 1)], volume=rec.id)
            rec.generation = cat.put_manifest(rec.id, 1, codec.encode_manifest(m))
        except BaseException:
            guard.release()
            raise
        # the claim protects generation 1 until the caller has written the volume record
        threading.Thread(target=self._release_when_recorded, args=(cat, guard, rec.id),
                         name=f"clone-claim-{rec.id}", daemon=True).start()
        log.info("volume %s: generation %d is a copy of %s's manifest (%d data chunks, none copied)",
                 rec.id, rec.generation, rec.source, m.data_chunks)

    @staticmethod
    def _release_when_recorded(cat: Catalog, guard: FlushGuard, vid: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cat.get_volume(vid) is not None:
                    break
            except CsiError:
                pass
            time.sleep(0.05)
        guard.release()         # also after the timeout: CreateVolume failed, gen 1 is garbage

    # -- periodic work ---------------------------------------------------------------------
    def start_background(self, runtime: Any) -> None:
        if self.cfg.gc_interval_seconds > 0:
            from .remote import gc
            cache = gc.ManifestCache()      # kept across runs: a run reads only new manifests

            def collect() -> None:
                gc.collect(self.stores.background_catalog(), grace=self.cfg.gc_grace_seconds,
                           keep=self.cfg.gc_keep_generations, dry_run=False, cache=cache)
            runtime._loop("gc", self.cfg.gc_interval_seconds, collect)


class NodeSnapshotWorker:
    """Picks up snapshot requests for this node: freeze, local copy, thaw, upload, mark ready.

    Pick-up without polling a LIST: the controller writes requests/<node>/<sid>.json, then
    rewrites nodes/<node>.wake. The worker HEADs the wake-up object (every wake_poll_seconds
    while a volume is staged here, wake_idle_seconds otherwise) and LISTs its requests only when
    the ETag changed, while a request is still pending, or every request_sweep_seconds. The HEAD
    is taken before the LIST, so a request written after that LIST changes the next HEAD."""

    def __init__(self, runtime: Any, poll_seconds: float | None = None):
        self.rt = runtime
        cfg = runtime.cfg
        self.fast = poll_seconds if poll_seconds is not None else cfg.wake_poll_seconds
        self.slow = poll_seconds if poll_seconds is not None else cfg.wake_idle_seconds
        self.sweep = cfg.request_sweep_seconds
        self.node_id = cfg.node_id
        self.last_stats: dict[str, dict[str, Any]] = {}
        self._seen: str | None = None           # ETag of the wake-up object at the last LIST
        self._pending = True                    # requests left unfinished (or never listed yet)
        self._swept_at = time.monotonic()
        # more request kinds woken by the same wake-up (groupcut.GroupCutWorker.poll_once):
        # each returns how many of its requests are still unfinished
        self.also: list[Callable[[], int]] = []

    def start(self) -> None:
        threading.Thread(target=self._loop, name="snapshot-worker", daemon=True).start()

    def _has_staged(self) -> bool:
        try:
            return any(lv.phase in STAGED_PHASES for lv in self.rt.volumes.all())
        except Exception:       # state unreadable: poll fast, it costs one HEAD
            return True

    def _loop(self) -> None:
        """A round every `fast` seconds while a volume is staged here, every `slow` seconds
        otherwise; whether one is staged is checked every `fast` seconds (local state, no
        request), so a volume staged during an idle wait is polled at once, not up to `slow`
        seconds later (its first snapshot request waited that long)."""
        last = time.monotonic()
        while not self.rt.stop_event.wait(min(self.fast, self.slow)):
            if not self._has_staged() and time.monotonic() - last < self.slow:
                continue
            last = time.monotonic()
            try:
                self.tick()
            except Exception as e:   # the next round retries
                log.warning("snapshot worker: %s", e)

    def tick(self) -> int:
        """One round: a HEAD, and a LIST of requests only when there may be something new."""
        cat = self.rt.stores.background_catalog()
        with reachable(cat.store):
            info = cat.store.head(wake_key(self.node_id))
        tag = info.etag if info is not None else ""
        now = time.monotonic()
        if tag == self._seen and not self._pending and now - self._swept_at < self.sweep:
            return 0
        self._seen, self._swept_at = tag, now
        try:
            return self.poll_once()
        except BaseException:
            self._pending = True                # list again next round
            raise

    def poll_once(self) -> int:
        cat = self.rt.stores.background_catalog()
        prefix = requests_prefix(self.node_id)
        done = 0
        with reachable(cat.store):
            infos = list(cat.store.list(prefix))
        self._pending = False
        for info in infos:
            try:
                req = json.loads(cat.store.get(info.key)[0])
                sid, vid = ids.snapshot_id(req["snapshot"]), ids.volume_id(req["volume"])
            except (NotFound, ValueError, KeyError, CsiError):
                cat.store.delete(info.key)
                continue
            if self.handle(cat, sid, vid):
                cat.store.delete(info.key)
                done += 1
            else:
                self._pending = True            # try again next round, without waiting for a wake-up
        for poll in self.also:
            if poll():
                self._pending = True
        return done

    def handle(self, cat: Catalog, sid: str, vid: str) -> bool:
        """Returns True when the request is finished (done or impossible)."""
        snap = cat.get_snapshot(sid)
        if snap is None or snap.ready:
            return True
        backend, vols = self.rt.backend, self.rt.volumes
        lv = vols.get(vid)
        vol = cat.get_volume(vid)
        if vol is None:
            self._fail(cat, sid, f"source volume {vid} was deleted")
            return True
        if lv is None or not backend.exists(vid):
            # nothing local: the committed generation is the volume's content
            Snapshots(self.rt.cfg, self.rt.stores, None).pin_generation(
                cat, snap, vol, lambda: self.rt.sync.codec(vol))
            return True
        if lv.phase not in STAGED_PHASES:
            if lv.phase in (Phase.FLUSHING, Phase.DIRTY):
                return False            # the unstage flush will commit; pin after it
            Snapshots(self.rt.cfg, self.rt.stores, None).pin_generation(
                cat, snap, vol, lambda: self.rt.sync.codec(vol))
            return True
        local = sid
        try:
            cut = self._cut(vid, local)
        except CsiError as e:
            if e.code == Code.ABORTED:
                return False            # an RPC holds the volume; next round
            raise
        if cut is None:
            return False                # unstaged meanwhile: the next round pins or waits
        path, cut_at, frozen_s, changed = cut
        log.info("snapshot %s of %s: point-in-time copy taken in %.3fs (file system frozen meanwhile)", sid, vid, frozen_s)
        self.upload_copy(cat, snap, path, vid, cut_at, changed)
        return True

    def _cut(self, vid: str, local: str) -> tuple[str, float, float, list[Any] | None] | None:
        """Take the point-in-time copy `local` of a staged volume under its operation lock
        (file system frozen while it is taken, with the lazy volume's written extents);
        None when it is no longer staged."""
        backend, vols = self.rt.backend, self.rt.volumes
        with vols.hold(vid):
            lv = vols.get(vid)
            if lv is None or lv.phase not in STAGED_PHASES:
                return None
            t0 = time.monotonic()
            cut_at = time.time()
            if lv.access_type == "mount" and fs.mount_info(lv.staged_path) is not None and not lv.readonly:
                with fs.frozen(lv.staged_path, self.rt.cfg.freeze_timeout_seconds):
                    changed = self.rt.sync.lazy.changed_extents(vid)
                    path = backend.snapshot(vid, local)
            else:
                changed = self.rt.sync.lazy.changed_extents(vid)
                path = backend.snapshot(vid, local)
            return path, cut_at, time.monotonic() - t0, changed

    def upload_copy(self, cat: Catalog, snap: SnapshotRecord, path: str, vid: str, cut_at: float,
                    changed: list[Any] | None = None) -> None:
        """Upload the point-in-time copy `backend.snapshot(vid, snap.id)` made (`changed`: the lazy
        volume's written extents, taken with the copy), mark the snapshot ready, and drop the
        local copy (also when the upload fails)."""
        try:
            self._upload(cat, snap, path, vid, cut_at, changed)
        finally:
            self.rt.backend.delete_snapshot(vid, snap.id)

    def _upload(self, cat: Catalog, snap: SnapshotRecord, path: str, vid: str, cut_at: float,
                changed: list[Any] | None = None) -> None:
        guard = FlushGuard.begin(cat.store, f"snapshot {snap.id}")
        try:
            self._upload_guarded(cat, snap, path, vid, cut_at, guard, changed)
        finally:
            guard.release()

    def _upload_guarded(self, cat: Catalog, snap: SnapshotRecord, path: str, vid: str, cut_at: float,
                        guard: FlushGuard, changed: list[Any] | None = None) -> None:
        """`changed`: a lazily hydrated volume's chunks written on this node, taken with the copy
        (the copy holds only the chunks fetched so far; the others keep the base's entries)."""
        from . import volume_io
        from .remote.transfer import FlushPlan
        backend = self.rt.backend
        vol = cat.volume(vid)          # read after the guard began: its base cannot vanish unnoticed
        codec = self.rt.sync.codec(vol)        # the lineage key this node holds while staged
        base = (codec.open_manifest(cat.get_manifest(vid, vol.generation), f"volume {vid} generation {vol.generation}")
                if vol.generation else None)
        size = os.path.getsize(path) if os.path.isfile(path) else fs.block_size(path)
        ranges = backend.allocated_ranges(vid, snap.id)    # the snapshot's own map, not the live volume's
        mode = "allocated"
        if changed is not None and base is not None:
            ranges, mode = changed, "changed"
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] > 1.0:
                last[0] = now
                try:
                    cat.update_snapshot(snap.id, lambda r: setattr(r, "progress", f"uploaded {done}/{total} bytes"))
                except CsiError:
                    pass
        t0 = time.monotonic()
        plan = FlushPlan(size=size, chunk_size=vol.chunk_size, base=base, ranges=ranges, ranges_mode=mode,
                         compression_level=vol.compression, workers=self.rt.cfg.flush_workers, codec=codec)
        m, stats = volume_io.flush(cat.store, path, plan, progress)
        g = guard.claim(m, source=volume_io.source_of(path), compression_level=vol.compression, codec=codec,
                        manifests=[snapshot_manifest_key(snap.id)])
        uploaded = stats.bytes_uploaded + g.repaired_bytes
        cat.store.put(snapshot_manifest_key(snap.id), codec.encode_manifest(m))
        self.last_stats[snap.id] = {"bytes_uploaded": uploaded, "bytes_read": stats.bytes_read,
                                    "chunks_uploaded": stats.chunks_uploaded + g.repaired_chunks,
                                    "seconds": time.monotonic() - t0}
        Snapshots._mark_ready(cat, snap.id, size, 0,
                              f"ready: read {stats.bytes_read} bytes, uploaded {uploaded} bytes "
                              f"({stats.chunks_uploaded + g.repaired_chunks} chunks)", cut_at=cut_at)
        log.info("snapshot %s of %s ready in %.2fs: read %d bytes, uploaded %d bytes (%d chunks, %d known)",
                 snap.id, vid, time.monotonic() - t0, stats.bytes_read, uploaded,
                 stats.chunks_uploaded, stats.chunks_skipped_known)

    @staticmethod
    def _fail(cat: Catalog, sid: str, msg: str) -> None:
        def fail(r: SnapshotRecord) -> None:
            r.error, r.node = msg, ""
        cat.update_snapshot(sid, fail)
