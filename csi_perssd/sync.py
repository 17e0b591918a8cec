"""VolumeSync: the node's link between local volumes and the object store.

- prepare (NodeStage): make the local copy hold the committed generation — reuse a current
  cached copy, otherwise create the local volume and hydrate it (evicting clean cached copies,
  least recently used first, when space runs out).
- on_release (last NodeUnpublish): sync and start a background flush job.
- finish (NodeUnstage, after unmount): run the final flush and commit the generation with the
  node's ownership epoch; ABORTED with progress while a job runs (kubelet retries).
- resume (restart): a job that was running continues; the journal skips chunks already uploaded.

NodeUnstage waits up to `unstage_wait` seconds (default 20, environment variable
--unstage-wait-seconds) for the flush before answering ABORTED with its progress.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import encryption, metrics
from .config import Config
from .errors import Code, CsiError, Fenced, aborted
from .events import VolumeEvents
from .local import fs
from .local.backend import Backend
from .local.keyfiles import NodeKeys
from .local.state import FlushJob, FlushState, LocalVolume, NodeState
from .remote.catalog import VolumeRecord, check_owner
from .remote.codec import PLAIN, Codec
from .remote.manifest import Manifest
from .remote.store import StoreError
from .stores import Stores

log = logging.getLogger(__name__)


PRE_SNAP = "flush-pre"          # the point-in-time copy a pre-flush reads (change-tracking backends)


def _clear_job(lv: LocalVolume) -> None:
    lv.flush, lv.dirty = None, False


@dataclass
class _PreFlush:
    """A pre-flush's result, kept for the final pass of the same volume. With a change-tracking
    backend it read the snapshot PRE_SNAP, so `manifest` is exact for that snapshot and the final
    pass reads only what changed after it; otherwise it read the live device (a moving target)
    and the final pass reads everything again, but uploads none of `hashes`."""
    base_generation: int
    size: int
    started_at: float           # its uploads are at most this old (gc grace period)
    hashes: dict[str, int]      # hash -> stored size
    manifest: Manifest | None   # set when it read PRE_SNAP


class VolumeSync:
    def __init__(self, cfg: Config, stores: Stores, backend: Backend, state: NodeState,
                 unstage_wait: float | None = None, events: VolumeEvents | None = None):
        self.cfg = cfg
        self.events = events if events is not None else VolumeEvents(node_id=cfg.node_id)
        self.node_id = cfg.node_id
        self.stores = stores
        self.backend = backend
        self.state = state
        self.unstage_wait = cfg.unstage_wait_seconds if unstage_wait is None else unstage_wait
        self._mu = threading.Lock()
        self._state_mu = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._preparing: set[str] = set()
        self._secrets: dict[str, dict[str, str]] = {}     # NodeStage secrets, memory only
        self.keys = NodeKeys(cfg.state_dir)     # lineage keys of staged/dirty encrypted volumes
        self._progress: dict[str, tuple[int, int]] = {}
        # what the last pre-flush of each volume stored (see _PreFlush): the final pass starts
        # from it instead of doing the work again
        self._preflushed: dict[str, _PreFlush] = {}
        from .lazy.manager import LazyManager
        self.lazy = LazyManager(cfg.state_dir, {"catalog": cfg.catalog, "s3_endpoint": cfg.s3_endpoint,
                                                "s3_region": cfg.s3_region, "s3_ca_bundle": cfg.s3_ca_bundle},
                                fetch_timeout=cfg.lazy_fetch_timeout_seconds,
                                workers=cfg.lazy_background_workers)

    def secrets_for(self, vid: str) -> dict[str, str]:
        """The object store secrets of the volume's NodeStage (or what worked last)."""
        with self._mu:
            got = self._secrets.get(vid)
        return dict(got) if got else dict(self.stores.last_secrets)

    def _delete_local(self, vid: str) -> None:
        """Remove the local copy, its lazy hydration state and its state record."""
        self.lazy.discard(vid)
        self.backend.delete(vid)
        self.state.delete(vid)
        self.keys.drop(vid)

    # -- stage -----------------------------------------------------------------------------
    def prepare(self, rec: VolumeRecord, lv: LocalVolume | None, secrets: dict[str, str]) -> LocalVolume:
        vid = rec.id
        if lv is not None and lv.flush is not None and lv.flush.state == FlushState.RUNNING and self._running(vid):
            raise aborted(f"volume {vid}: a flush of its previous use is still running; try again")
        if rec.encryption:          # before anything is created: a missing or wrong KEK fails here
            self.keys.put(vid, encryption.open_lineage(rec.encryption, encryption.require_kek(
                secrets, self.cfg, "NodeStageVolume", "node-stage"), f"volume {vid}"))
        with self._mu:
            self._preparing.add(vid)         # not evictable while it is being made current
            if secrets:
                # the flush at NodeUnstage (which has none) uses them; the KEK is not kept
                self._secrets[vid] = {k: v for k, v in secrets.items() if k != encryption.SECRET_KEY}
        try:
            return self._prepare(rec, lv, secrets)
        finally:
            with self._mu:
                self._preparing.discard(vid)

    def _prepare(self, rec: VolumeRecord, lv: LocalVolume | None, secrets: dict[str, str]) -> LocalVolume:
        vid = rec.id
        self.events.track(rec)
        have = self.backend.exists(vid)
        if lv is None or not have:
            lv = LocalVolume(id=vid, persistence=rec.persistence)
        lv.persistence, lv.epoch, lv.last_used = rec.persistence, rec.epoch, time.time()
        fenced = lv.flush is not None and lv.flush.state == FlushState.FENCED
        if have and rec.persistence == "object" and (lv.generation != rec.generation or fenced):
            if lv.dirty:
                log.error("volume %s: unflushed local changes on top of generation %d are discarded: "
                          "%s (this node was fenced out)", vid, lv.generation,
                          f"generation {rec.generation} was committed meanwhile by {rec.generation_node or 'another node'}"
                          if lv.generation != rec.generation else "ownership was taken over")
            else:
                log.info("volume %s: local copy holds generation %d, committed is %d: rehydrating",
                         vid, lv.generation, rec.generation)
            self._delete_local(vid)
            have = False
            lv = LocalVolume(id=vid, persistence=rec.persistence, epoch=rec.epoch)
        if have:
            if self.backend.size(vid) < rec.size:
                self.backend.expand(vid, rec.size)
            log.info("volume %s: reusing the local copy (generation %d%s)", vid, lv.generation,
                     ", with unflushed changes" if lv.dirty else "")
        else:
            self._create(vid, rec.size)
            lv.generation, lv.dirty, lv.flush = 0, False, None
            # recorded before hydrating: a crash in the middle leaves generation 0, never "current"
            self.state.put(lv)
            if rec.persistence == "object" and rec.generation > 0:
                # the lazy server (another process) has no lineage keys: encrypted volumes hydrate fully
                if (rec.parameters.get("hydrate") or self.cfg.hydrate) == "lazy" and not rec.encryption:
                    self._stage_lazy(rec, lv, secrets)
                else:
                    self._hydrate(rec, lv, secrets)
        lv.size = self.backend.size(vid)
        self.state.put(lv)
        return lv

    def _create(self, vid: str, size: int) -> None:
        try:
            self.backend.create(vid, size)
            return
        except CsiError as e:
            if e.code != Code.RESOURCE_EXHAUSTED:
                raise
            if not self.evict(size, keep=vid):
                raise
        self.backend.create(vid, size)

    def _hydrate(self, rec: VolumeRecord, lv: LocalVolume, secrets: dict[str, str]) -> None:
        """Write the committed generation into the fresh local volume. On any failure the
        half-written volume and its state record are removed (nothing is left as "current")."""
        from .remote import transfer
        t0 = time.monotonic()
        self.events.hydrate_started(rec)
        try:
            cat = self.stores.catalog(secrets)
            codec = self.codec(rec)
            manifest = codec.open_manifest(cat.get_manifest(rec.id, rec.generation),
                                           f"volume {rec.id} generation {rec.generation}")
            # rawfile: straight into the backing file, before a loop device exists
            dest = getattr(self.backend, "hydrate_path", self.backend.device)(rec.id)
            stats = transfer.hydrate(cat.store, manifest, dest, workers=self.cfg.hydrate_workers, codec=codec)
        except BaseException as e:
            self._discard(rec.id)
            self.events.hydrate_done(rec, 0, time.monotonic() - t0, error=str(e) or type(e).__name__)
            if isinstance(e, transfer.ChunkCorrupted):
                log.error("volume %s generation %d: %s; the local copy was removed", rec.id, rec.generation, e)
                raise CsiError(Code.DATA_LOSS, f"volume {rec.id} generation {rec.generation}: {e}") from e
            if isinstance(e, StoreError):
                raise CsiError(Code.UNAVAILABLE,
                               f"volume {rec.id}: object store unreachable while hydrating: {e}") from e
            if isinstance(e, (OSError, ValueError)):
                raise CsiError(Code.INTERNAL, f"volume {rec.id}: hydrating generation {rec.generation}: {e}") from e
            raise
        dt = time.monotonic() - t0
        metrics.TRANSFER_SECONDS.labels("hydrate").observe(dt)
        metrics.BYTES.labels("hydrated").inc(stats.bytes_written)
        lv.generation = rec.generation
        self._mark_generation(rec.id, rec.generation)
        self.events.hydrate_done(rec, stats.bytes_written, dt)
        log.info("volume %s: hydrated generation %d: %d bytes in %.2fs (%.1f MB/s of volume)", rec.id,
                 rec.generation, stats.bytes_written, dt, rec.size / max(dt, 1e-6) / 1e6)

    def _stage_lazy(self, rec: VolumeRecord, lv: LocalVolume, secrets: dict[str, str]) -> None:
        """Record the committed generation as the fresh local volume's content without copying it:
        the node serves it through a lazy hydration server (lazy/), which fetches chunks as they
        are read and the rest in the background."""
        t0 = time.monotonic()
        try:
            cat = self.stores.catalog(secrets)
            manifest = Manifest.decode(cat.get_manifest(rec.id, rec.generation))
            disk = getattr(self.backend, "disk_path", self.backend.device)(rec.id)
            self.lazy.begin(rec.id, disk, manifest)
        except BaseException as e:
            self._discard(rec.id)
            if isinstance(e, StoreError):
                raise CsiError(Code.UNAVAILABLE,
                               f"volume {rec.id}: object store unreachable while staging: {e}") from e
            if isinstance(e, (OSError, ValueError)):
                raise CsiError(Code.INTERNAL, f"volume {rec.id}: lazy stage of generation {rec.generation}: {e}") from e
            raise
        lv.generation = rec.generation
        log.info("volume %s: generation %d staged lazily (%d data chunks to fetch) in %.3fs", rec.id,
                 rec.generation, manifest.data_chunks, time.monotonic() - t0)

    def _discard(self, vid: str) -> None:
        try:
            self.lazy.discard(vid)
            self.backend.delete(vid)
        except CsiError as e:
            log.error("volume %s: cannot remove the half-hydrated local copy: %s", vid, e)
        self.state.delete(vid)
        self.keys.drop(vid)

    def codec(self, rec: VolumeRecord) -> Codec:
        """How the volume's chunks and manifests are encoded: PLAIN, or sealed with the lineage key
        this node kept from NodeStage (else the configured fallback KEK). FAILED_PRECONDITION
        when the volume is encrypted and this node has no key for it."""
        if not rec.encryption:
            return PLAIN
        keys = self.keys.get(rec.id)
        if keys is not None and keys.lineage == rec.encryption.get("lineage"):
            return Codec(keys)
        if self.cfg.encryption_key_file:
            return encryption.codec_for(rec.encryption, None, self.cfg, f"volume {rec.id}", "node-stage")
        raise CsiError(Code.FAILED_PRECONDITION, f"volume {rec.id} is encrypted and this node holds no key "
                       f"for it (NodeStageVolume with its node-stage secret provides one)")

    # -- release / unstage -----------------------------------------------------------------
    def on_publish(self, lv: LocalVolume) -> None:
        if not lv.readonly:
            lv.dirty = True

    def on_release(self, lv: LocalVolume) -> None:
        """Last target gone: sync the file system and start flushing while it is still staged."""
        if lv.persistence != "object" or not lv.dirty:
            return
        if lv.access_type == "mount" and lv.staged_path and fs.mount_info(lv.staged_path):
            fs.sync_fs(lv.staged_path)
        self._start(lv, final=False)

    def finish(self, lv: LocalVolume) -> None:
        """Called by NodeUnstage after unmounting. Returns when the generation is committed; the
        node's copy of the lineage key goes then (nothing is left to flush)."""
        if lv.persistence != "object" or not lv.dirty:
            self.keys.drop(lv.id)
            return
        deadline = time.monotonic() + self.unstage_wait
        started = False
        while True:
            cur = self.state.get(lv.id) or lv
            job = cur.flush
            if not self._running(lv.id):
                if job is not None and job.state == FlushState.COMMITTED and job.final:
                    self._update(lv.id, _clear_job)
                    self.keys.drop(lv.id)
                    return
                if job is not None and job.state == FlushState.FENCED:
                    raise Fenced(job.error)
                if job is not None and job.state == FlushState.FAILED and started:
                    break           # failed again in this call: report, kubelet retries later
                if job is not None and job.state == FlushState.FAILED:
                    log.warning("volume %s: retrying flush after: %s", lv.id, job.error)
                elif job is not None and job.state == FlushState.RUNNING:
                    # no thread runs it: the process restarted before resume() or the record
                    # was overwritten; the final pass starts (again) from its journal
                    log.info("volume %s: flush job was not running: starting the final pass", lv.id)
                self._start(cur, final=True)
                started = True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wait(lv.id, min(left, 1.0))
        cur = self.state.get(lv.id) or lv
        done, total = self._progress.get(lv.id, (0, 0))
        err = f"; last error: {cur.flush.error}" if cur.flush and cur.flush.error else ""
        failed = cur.flush is not None and cur.flush.state == FlushState.FAILED
        code = Code.UNAVAILABLE if failed and cur.flush.error_code == Code.UNAVAILABLE.name else Code.ABORTED  # type: ignore[union-attr]
        what = "failed" if failed else "in progress"
        raise CsiError(code, f"volume {lv.id}: flush to the object store {what}: "
                       f"{done}/{total} bytes ({100 * done // max(total, 1)}%){err}; local data kept, retry later")

    def resume(self, lv: LocalVolume) -> None:
        if lv.flush is not None and lv.flush.state in (FlushState.RUNNING, FlushState.FAILED) and lv.persistence == "object":
            log.info("volume %s: resuming the interrupted flush", lv.id)
            self._start(lv, final=lv.flush.final or not lv.staged)

    def _wait(self, vid: str, timeout: float) -> None:
        """Until the volume's flush thread ends (at most `timeout` s): NodeUnstage goes on the
        moment the pre-flush or the final pass is done, not at the next poll."""
        with self._mu:
            t = self._threads.get(vid)
        if t is not None and t.is_alive():
            t.join(timeout)
        else:
            time.sleep(min(timeout, 0.05))

    def _running(self, vid: str) -> bool:
        with self._mu:
            t = self._threads.get(vid)
            return t is not None and t.is_alive()

    def _update(self, vid: str, fn: Callable[[LocalVolume], None]) -> LocalVolume | None:
        """Read-modify-write of the volume's state record for the job's own fields (flush,
        generation, dirty): never writes back a stale copy of the fields the Node service owns."""
        with self._state_mu:
            lv = self.state.get(vid)
            if lv is None:
                return None
            fn(lv)
            self.state.put(lv)
            return lv

    def _start(self, lv: LocalVolume, final: bool) -> None:
        with self._mu:
            t = self._threads.get(lv.id)
            if t is not None and t.is_alive():
                return
            job = FlushJob(generation_base=lv.generation, epoch=lv.epoch, final=final)
            lv.flush = job

            def set_job(cur: LocalVolume) -> None:
                cur.flush = job
            if self._update(lv.id, set_job) is None:
                self.state.put(lv)
            self._progress.pop(lv.id, None)
            t = threading.Thread(target=self._run, args=(lv.id, job), name=f"flush-{lv.id}", daemon=True)
            self._threads[lv.id] = t
            metrics.FLUSH_JOBS.inc()
            t.start()

    def _run(self, vid: str, job: FlushJob) -> None:
        try:
            self._flush(vid, job)
        except Exception as e:     # recorded in the job; NodeUnstage reports it
            # only the catalog's proof fences; every other error (FAILED_PRECONDITION included)
            # keeps the local data and is retried
            fenced = isinstance(e, Fenced)
            code = (Code.UNAVAILABLE if isinstance(e, StoreError)
                    else e.code if isinstance(e, CsiError) else Code.INTERNAL)
            job.state = FlushState.FENCED if fenced else FlushState.FAILED
            job.error_code = code.name
            job.error = f"object store unreachable: {e}" if code == Code.UNAVAILABLE else str(e)

            def record(lv: LocalVolume) -> None:
                lv.flush = job
            self._update(vid, record)
            self.events.flush_failed(vid, job.error, fenced)
            if fenced:
                log.error("volume %s: flush not committed, local data kept: %s", vid, e)
            else:
                log.warning("volume %s: flush failed (will retry on the next NodeUnstage): %s", vid, e)
        finally:
            metrics.FLUSH_JOBS.dec()

    def _flush(self, vid: str, job: FlushJob) -> None:
        # the final pass commits: it follows gc's handshake (claim its chunks, repair what a
        # concurrent garbage collection deleted) before the generation is committed
        from .remote.guard import FlushGuard
        guard = (FlushGuard.begin(self.stores.catalog().store, f"{self.node_id}/{vid}",
                                     resumed=Path(self.state.journal_path(vid)).exists())
                 if job.final else None)
        try:
            self._flush_guarded(vid, job, guard)
        finally:
            if guard is not None:
                guard.release()

    def _flush_guarded(self, vid: str, job: FlushJob, guard: Any) -> None:
        from .remote import transfer
        # only the final pass (after unmount, no writer left) may trust its journal on resume:
        # a pre-flush runs while the file system is still mounted and its chunks may change
        with self._mu:
            secrets = self._secrets.get(vid)
        cat = self.stores.catalog(secrets)
        rec = cat.volume(vid)
        self.events.track(rec)
        check_owner(rec, self.node_id, job.epoch, "local data kept, not committed")
        codec = self.codec(rec)
        base = codec.open_manifest(cat.get_manifest(vid, rec.generation), f"volume {vid}") if rec.generation else None
        dev = self.backend.device(vid)
        size = self.backend.size(vid)
        pre = self._take_preflushed(vid, job, rec.generation, size)
        source, snap = dev, None
        if not job.final and getattr(self.backend, "tracks_changes", False):
            # read a point-in-time copy: its manifest is exact, so the final pass (after
            # unmount) only reads what changed after it
            self.backend.delete_snapshot(vid, PRE_SNAP)
            source, snap = self.backend.snapshot(vid, PRE_SNAP), PRE_SNAP
        ranges, mode, flush_base = self._ranges(vid, base, rec.generation if base is not None else 0,
                                                snap, pre)
        total = sum(r.length for r in ranges)
        job.total_bytes = total
        metrics.FLUSH_BACKLOG.inc(total)
        self.events.flush_started(vid, total, job.final)
        last = [0]

        def progress(done: int, tot: int) -> None:
            self._progress[vid] = (done, tot)
            job.done_bytes = done
            metrics.FLUSH_BACKLOG.dec(done - last[0])
            last[0] = done
            self.events.flush_progress(vid, done, tot)

        t0, started_at = time.monotonic(), time.time()     # uploads are as old as the pass's start
        try:
            manifest, stats = transfer.flush(cat.store, source, size, rec.chunk_size, base=flush_base,
                                             ranges=ranges, ranges_mode=mode,
                                             generation=rec.generation + 1,
                                             parent=rec.generation if base is not None else None,
                                             known=pre.hashes if pre is not None else None,
                                             compression_level=rec.compression, workers=self.cfg.flush_workers,
                                             journal_path=self.state.journal_path(vid) if job.final else None,
                                             progress=progress, codec=codec)
        finally:
            metrics.FLUSH_BACKLOG.dec(total - last[0])
        dt = time.monotonic() - t0
        metrics.TRANSFER_SECONDS.labels("flush").observe(dt)
        metrics.BYTES.labels("flushed_read").inc(stats.bytes_read)
        metrics.BYTES.labels("uploaded").inc(stats.bytes_uploaded)
        metrics.BYTES.labels("skipped_hole").inc(stats.hole_chunks * rec.chunk_size)
        metrics.BYTES.labels("skipped_known").inc(stats.chunks_skipped_known * rec.chunk_size)
        if not job.final:
            # a pre-flush while still staged: chunks are stored, the final pass commits
            with self._mu:
                self._preflushed[vid] = _PreFlush(
                    rec.generation, size, started_at,
                    {h: manifest.sizes.get(h, 0) for h in manifest.referenced_hashes()},
                    manifest if snap is not None else None)
            job.state, job.done_bytes = FlushState.UPLOADED, total

            def uploaded(lv: LocalVolume) -> None:
                lv.flush = job
            self._update(vid, uploaded)
            self.events.flush_uploaded(vid, stats.bytes_uploaded, dt)
            log.info("volume %s: background flush uploaded %d bytes in %.2fs", vid, stats.bytes_uploaded, dt)
            return
        if guard is not None:
            from .remote.catalog import manifest_key
            guard.claim(manifest, source_path=dev, compression_level=rec.compression, codec=codec,
                        manifests=[manifest_key(vid, rec.generation + 1)])
        gen = cat.put_manifest(vid, rec.generation + 1, codec.encode_manifest(manifest))
        cat.commit_generation(vid, gen, self.node_id, job.epoch)
        job.state, job.manifest_gen, job.done_bytes = FlushState.COMMITTED, gen, total

        def committed(lv: LocalVolume) -> None:
            lv.generation, lv.flush = gen, job
        self._update(vid, committed)
        Path(self.state.journal_path(vid)).unlink(missing_ok=True)
        self._mark_generation(vid, gen, previous=rec.generation)
        self.events.flush_committed(vid, gen, stats.bytes_read, stats.bytes_uploaded, dt)
        log.info("volume %s: committed generation %d: read %d bytes, uploaded %d bytes in %d chunks "
                 "(%d known, %d holes) in %.2fs (%.1f MB/s of volume)", vid, gen, stats.bytes_read,
                 stats.bytes_uploaded, stats.chunks_uploaded, stats.chunks_skipped_known, stats.hole_chunks,
                 dt, size / max(dt, 1e-6) / 1e6)

    def _take_preflushed(self, vid: str, job: FlushJob, base_gen: int, size: int) -> _PreFlush | None:
        """The pre-flush's result, for the final pass: only when it flushed from the same base
        generation and size, recently enough that garbage collection's grace period covers its
        uploads until the final pass claims them."""
        if not job.final:
            return None
        with self._mu:
            pre = self._preflushed.pop(vid, None)
        if pre is None:
            return None
        if (pre.base_generation != base_gen or pre.size != size
                or time.time() - pre.started_at > min(600.0, self.cfg.gc_grace_seconds / 2)):
            return None
        return pre

    # -- change tracking (LVM thin: thin_delta; rawfile on XFS/btrfs: reflinks + FIEMAP) ----
    @staticmethod
    def _gen_snap(gen: int) -> str:
        return f"gen-{gen}"

    def _ranges(self, vid: str, base: Manifest | None, base_gen: int, snap: str | None,
                pre: _PreFlush | None) -> tuple[list[Any], str, Manifest | None]:
        """What the flush must read, and the manifest whose entries the rest keeps:
        - the final pass after a pre-flush that read PRE_SNAP: what changed since that snapshot,
          on top of the pre-flush's manifest;
        - otherwise, where the backend tracks changes: what changed since the committed
          generation's snapshot (of `snap` when the flush reads that snapshot);
        - else everything allocated (of `snap`), compared with `base` by hash."""
        lazy = self.lazy.changed_extents(vid)
        if lazy is not None and base is not None:
            # not fully hydrated: chunks never fetched are unchanged by definition, and every
            # chunk written here is in the (write-ahead) dirty set
            log.info("volume %s: lazily hydrated, %d bytes written on this node", vid,
                     sum(r.length for r in lazy))
            return lazy, "changed", base
        tracking = getattr(self.backend, "tracks_changes", False)
        try:
            if (pre is not None and pre.manifest is not None and tracking
                    and self.backend.snapshot_path(vid, PRE_SNAP) is not None):
                changed = self.backend.changed_ranges(vid, PRE_SNAP)
                if changed is not None:
                    log.info("volume %s: %d bytes changed since the pre-flush", vid,
                             sum(r.length for r in changed))
                    return changed, "changed", pre.manifest
            if base is not None and tracking:
                gen_snap = self._gen_snap(base_gen)
                if self.backend.snapshot_path(vid, gen_snap) is not None:
                    changed = self.backend.changed_ranges(vid, gen_snap, snap=snap)
                    if changed is not None:
                        log.info("volume %s: %d bytes changed since generation %d", vid,
                                 sum(r.length for r in changed), base_gen)
                        return changed, "changed", base
        except CsiError as e:
            log.warning("volume %s: change tracking failed, hashing everything: %s", vid, e)
        return self.backend.allocated_ranges(vid, snap=snap), "allocated", base

    def _mark_generation(self, vid: str, gen: int, previous: int = 0) -> None:
        """Keep a snapshot of the local copy as generation `gen` (the next flush's base) and drop
        the previous one and the pre-flush's; only for backends that track changes (thin
        snapshots and reflinks cost nothing until the volume is written)."""
        if not getattr(self.backend, "tracks_changes", False):
            return
        try:
            self.backend.snapshot(vid, self._gen_snap(gen))
            if previous and previous != gen:
                self.backend.delete_snapshot(vid, self._gen_snap(previous))
            self.backend.delete_snapshot(vid, PRE_SNAP)
        except CsiError as e:
            log.warning("volume %s: no base snapshot for generation %d (next flush hashes everything): %s",
                        vid, gen, e)

    # -- cache -----------------------------------------------------------------------------
    def clean_cached(self) -> list[LocalVolume]:
        """Local copies that hold a committed generation and nothing else: evictable."""
        out = []
        for lv in self.state.all():
            if lv.staged or lv.dirty or lv.persistence != "object" or self._running(lv.id):
                continue
            with self._mu:
                if lv.id in self._preparing:
                    continue
            if lv.flush is not None and lv.flush.state != FlushState.COMMITTED:
                continue
            out.append(lv)
        return sorted(out, key=lambda v: v.last_used)

    def reclaimable_bytes(self) -> int:
        total = 0
        for lv in self.clean_cached():
            try:
                total += sum(r.length for r in self.backend.allocated_ranges(lv.id))
            except CsiError:
                continue
        return total

    def evict(self, need: int, keep: str = "") -> bool:
        """Evict clean cached copies, least recently used first, until `need` bytes fit."""
        evicted = False
        for lv in self.clean_cached():
            if lv.id == keep:
                continue
            if self.backend.capacity().available_bytes >= need:
                break
            log.info("evicting cached copy of volume %s (generation %d, last used %s)", lv.id,
                     lv.generation, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(lv.last_used)))
            self._delete_local(lv.id)
            evicted = True
        return evicted and self.backend.capacity().available_bytes >= need

    def drop_deleted(self, exists: Callable[[str], bool]) -> None:
        """Remove local copies of volumes deleted from the catalog (not staged)."""
        for lv in self.state.all():
            if lv.staged or lv.targets or self._running(lv.id) or exists(lv.id):
                continue
            with self._mu:
                if lv.id in self._preparing:
                    continue
            log.info("volume %s was deleted: removing its local copy", lv.id)
            self._delete_local(lv.id)
        for vid in self.backend.list_volumes():
            if self.state.get(vid) is None and not exists(vid):
                log.info("removing orphaned local volume %s", vid)
                self.lazy.discard(vid)
                self.backend.delete(vid)
