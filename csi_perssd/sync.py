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
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import encryption, metrics
from .config import Config
from .errors import Code, CsiError, Fenced, aborted
from .events import VolumeEvents
from .local import fs
from .local.backend import Backend, Planned
from .local.keyfiles import NodeKeys
from .local.state import FlushJob, FlushState, LocalVolume, Phase
from .local.volumes import STAGED_PHASES, LocalVolumes
from .remote.catalog import Catalog, VolumeRecord, check_owner
from .remote.chunkmap import ChunkMap
from .remote.codec import PLAIN, Codec
from .remote.manifest import Manifest
from .remote.store import StoreError, unreachable
from .remote.transfer import FlushPlan, FlushStats
from .stores import Stores

log = logging.getLogger(__name__)


PRE_SNAP = "flush-pre"          # the point-in-time copy a pre-flush reads (change-tracking backends)
SWITCH_SNAP = "lazy-switch"     # the local volume when a lazily staged volume left the FUSE path (dm)


def _count_flush(stats: FlushStats, chunk_size: int, dt: float) -> None:
    """A flush pass's duration and bytes, into the metrics."""
    metrics.TRANSFER_SECONDS.labels("flush").observe(dt)
    metrics.BYTES.labels("flushed_read").inc(stats.bytes_read)
    metrics.BYTES.labels("uploaded").inc(stats.bytes_uploaded)
    metrics.BYTES.labels("skipped_hole").inc(stats.hole_chunks * chunk_size)
    metrics.BYTES.labels("skipped_known").inc(stats.chunks_skipped_known * chunk_size)


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
    hashes: ChunkMap            # the chunks it stored (its manifest's chunk table)
    manifest: Manifest | None   # set when it read PRE_SNAP


class VolumeSync:
    def __init__(self, cfg: Config, stores: Stores, backend: Backend, vols: LocalVolumes,
                 unstage_wait: float | None = None, events: VolumeEvents | None = None):
        self.cfg = cfg
        self.events = events if events is not None else VolumeEvents(node_id=cfg.node_id)
        self.node_id = cfg.node_id
        self.stores = stores
        self.backend = backend
        self.vols = vols
        self.unstage_wait = cfg.unstage_wait_seconds if unstage_wait is None else unstage_wait
        self._mu = threading.Lock()
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
                                workers=cfg.lazy_background_workers, spare=cfg.hydrate == "lazy")

    def secrets_for(self, vid: str) -> dict[str, str]:
        """The object store secrets of THIS volume's NodeStage; none (the driver's own configured
        credentials) when this process has not staged it, e.g. after a restart. Never another
        volume's: those may reach objects this volume's owner must not."""
        with self._mu:
            got = self._secrets.get(vid)
        return dict(got) if got else {}

    def _delete_local(self, vid: str) -> None:
        """Remove the local copy, its lazy hydration state and its state record."""
        self.lazy.discard(vid)
        self.backend.delete(vid)
        self.vols.remove(vid)
        self.keys.drop(vid)

    # -- stage -----------------------------------------------------------------------------
    def prepare(self, rec: VolumeRecord, lv: LocalVolume | None, secrets: dict[str, str]) -> LocalVolume:
        """Make the local copy hold the committed generation; returns it CLEAN or DIRTY."""
        vid = rec.id
        if lv is not None and lv.phase == Phase.FLUSHING and self._running(vid):
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
        if lv is None:                      # a node that never held it: no listing
            planned = self._planned(rec)
            if planned is not None:
                made = self._lazy_meanwhile(rec, planned)
                if made is not None:
                    return made
            elif self.backend.create_unlisted(vid, rec.size):
                return self._fresh(rec, secrets, created=True)
        have = self.backend.exists(vid)
        remade = False                      # the local copy went: made again below
        if lv is not None and not have:
            log.warning("volume %s: its local data is gone; making it again", vid)
            self.vols.remove(vid)
            lv, remade = None, True
        if lv is None and have:             # local data without a record: generation 0
            lv = self.vols.create(LocalVolume(id=vid, persistence=rec.persistence, epoch=rec.epoch))
        if lv is not None and rec.persistence == "object" and self._stale(rec, lv):
            self._delete_local(vid)
            lv, remade = None, True
        if lv is None:
            planned = self._planned(rec) if remade else None
            made = self._lazy_meanwhile(rec, planned) if planned is not None else None
            return made if made is not None else self._fresh(rec, secrets)
        return self._reuse(rec, lv)

    def _lazy(self, rec: VolumeRecord) -> bool:
        """Is a fresh local copy of the volume staged lazily? (The lazy server, another process,
        has no lineage keys: encrypted volumes hydrate fully.)"""
        return (rec.persistence == "object" and rec.generation > 0 and not rec.encryption
                and (rec.parameters.get("hydrate") or self.cfg.hydrate) == "lazy")

    def _planned(self, rec: VolumeRecord) -> Planned | None:
        """For a lazy stage of a volume whose local copy is to be made: what the backend would
        make without a listing, when it can say so beforehand (LVM)."""
        return self.backend.plan_unlisted(rec.id, rec.size) if self._lazy(rec) else None

    def _stale(self, rec: VolumeRecord, lv: LocalVolume) -> bool:
        """Discard the local copy? Only when it holds another generation than the committed one
        or the catalog proved this node fenced out (Phase.FENCED)."""
        fenced = lv.phase == Phase.FENCED
        if lv.generation == rec.generation and not fenced:
            return False
        if lv.dirty:
            log.error("volume %s: unflushed local changes on top of generation %d are discarded: "
                      "%s (this node was fenced out)", rec.id, lv.generation,
                      f"generation {rec.generation} was committed meanwhile by {rec.generation_node or 'another node'}"
                      if lv.generation != rec.generation else "ownership was taken over")
        else:
            log.info("volume %s: local copy holds generation %d, committed is %d: rehydrating",
                     rec.id, lv.generation, rec.generation)
        return True

    def _reuse(self, rec: VolumeRecord, lv: LocalVolume) -> LocalVolume:
        vid = rec.id
        if self.backend.size(vid) < rec.size:
            self.backend.expand(vid, rec.size)
        log.info("volume %s: reusing the local copy (generation %d%s)", vid, lv.generation,
                 ", with unflushed changes" if lv.dirty else "")
        size = self.backend.size(vid)

        def touch(cur: LocalVolume) -> None:
            cur.persistence, cur.epoch, cur.last_used, cur.size = rec.persistence, rec.epoch, time.time(), size
        # a crash left it hydrating (generation 0, nothing to hydrate) or flushing (no thread runs
        # that job any more: its writes are kept and flushed at the next unstage)
        to = {Phase.HYDRATING: Phase.CLEAN, Phase.FLUSHING: Phase.DIRTY}.get(lv.phase)
        return self.vols.update(vid, touch, to=to)

    def _fresh(self, rec: VolumeRecord, secrets: dict[str, str], created: bool = False) -> LocalVolume:
        vid = rec.id
        if not created:
            self._create(vid, rec.size)
        # recorded before hydrating: a crash in the middle leaves generation 0, never "current"
        self.vols.create(LocalVolume(id=vid, persistence=rec.persistence, epoch=rec.epoch))
        if self._lazy(rec):
            self._stage_lazy(rec, secrets)
        elif rec.persistence == "object" and rec.generation > 0:
            self._hydrate(rec, secrets)
        return self._made_current(rec)

    def _made_current(self, rec: VolumeRecord) -> LocalVolume:
        """The fresh local copy holds (or serves) the committed generation: CLEAN."""
        size = self.backend.size(rec.id)

        def hydrated(cur: LocalVolume) -> None:
            cur.size, cur.last_used = size, time.time()
            cur.generation = rec.generation if rec.persistence == "object" else 0
        return self.vols.update(rec.id, hydrated, to=Phase.CLEAN)

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

    def _hydrate(self, rec: VolumeRecord, secrets: dict[str, str]) -> None:
        """Write the committed generation into the fresh local volume. On any failure the
        half-written volume and its state record are removed (nothing is left as "current")."""
        from . import volume_io
        from .remote.transfer import ChunkCorrupted
        t0 = time.monotonic()
        self.events.hydrate_started(rec)
        try:
            cat = self.stores.volume_catalog(secrets)
            codec = self.codec(rec)
            manifest = codec.open_manifest(cat.get_manifest(rec.id, rec.generation),
                                           f"volume {rec.id} generation {rec.generation}")
            # rawfile: straight into the backing file, before a loop device exists
            dest = self.backend.hydrate_path(rec.id)
            stats = volume_io.hydrate(cat.store, manifest, dest, workers=self.cfg.hydrate_workers, codec=codec)
        except BaseException as e:
            self._discard(rec.id)
            self.events.hydrate_done(rec, 0, time.monotonic() - t0, error=str(e) or type(e).__name__)
            if isinstance(e, ChunkCorrupted):
                log.error("volume %s generation %d: %s; the local copy was removed", rec.id, rec.generation, e)
                raise CsiError(Code.DATA_LOSS, f"volume {rec.id} generation {rec.generation}: {e}") from e
            _map_transfer_error(e, rec.id, "hydrating", f"hydrating generation {rec.generation}")
        dt = time.monotonic() - t0
        metrics.TRANSFER_SECONDS.labels("hydrate").observe(dt)
        metrics.BYTES.labels("hydrated").inc(stats.bytes_written)
        self._mark_generation(rec.id, rec.generation)
        self.events.hydrate_done(rec, stats.bytes_written, dt)
        log.info("volume %s: hydrated generation %d: %d bytes in %.2fs (%.1f MB/s of volume)", rec.id,
                 rec.generation, stats.bytes_written, dt, rec.size / max(dt, 1e-6) / 1e6)

    def _stage_lazy(self, rec: VolumeRecord, secrets: dict[str, str]) -> None:
        """Record the committed generation as the fresh local volume's content without copying it:
        the node serves it through a lazy hydration server (lazy/), which fetches chunks as they
        are read and the rest in the background."""
        t0 = time.monotonic()
        try:
            cat = self.stores.volume_catalog(secrets)
            manifest = Manifest.decode(cat.get_manifest(rec.id, rec.generation))
            disk = self.backend.disk_path(rec.id)
            self.lazy.begin(rec.id, disk, manifest)
        except BaseException as e:
            self._discard(rec.id)
            _map_transfer_error(e, rec.id, "staging", f"lazy stage of generation {rec.generation}")
        log.info("volume %s: generation %d staged lazily (%d data chunks to fetch) in %.3fs", rec.id,
                 rec.generation, manifest.data_chunks, time.monotonic() - t0)

    def _lazy_meanwhile(self, rec: VolumeRecord, planned: Planned) -> LocalVolume | None:
        """A lazy stage that makes the local volume while its server starts: the server takes the
        job and opens its object store (another thread) while the backend makes the volume without
        a listing (this thread: the backend's batch is this thread's); then the server opens it,
        and the stage sets up its devices as usual. None, with nothing left behind, when the
        backend declines to make it so: the caller goes the usual way."""
        vid = rec.id
        t0 = time.monotonic()
        try:
            cat = self.stores.volume_catalog(self.secrets_for(vid))
            manifest = Manifest.decode(cat.get_manifest(vid, rec.generation))
        except BaseException as e:
            _map_transfer_error(e, vid, "staging", f"lazy stage of generation {rec.generation}")
        self.lazy.discard(vid)              # what an interrupted stage may have left
        self.vols.create(LocalVolume(id=vid, persistence=rec.persistence, epoch=rec.epoch))
        made = False
        try:
            self.lazy.begin(vid, planned.disk, manifest, planned=planned)
            started = self.lazy.start_early(vid, self.secrets_for(vid))
            try:
                made = self.backend.create_unlisted(vid, rec.size)
            finally:
                wait([started])             # nothing is torn down under the starting thread
            if not made:
                log.info("volume %s: its local volume is not made without a listing: the usual way", vid)
                self.lazy.discard(vid)
                self.vols.remove(vid)
                return None
            started.result()                # the server's start failed: raised here
            disk = self.backend.disk_path(vid)
            try:
                self.lazy.open_disk(vid, disk)
            except CsiError as e:           # e.g. another size than planned: served the usual way
                log.warning("volume %s: %s; starting its lazy server again on it", vid, e.message)
                self.lazy.discard(vid)
                self.lazy.begin(vid, disk, manifest)
        except BaseException as e:
            if made:
                self._discard(vid)
            else:
                self.lazy.discard(vid)
                self.vols.remove(vid)
            _map_transfer_error(e, vid, "staging", f"lazy stage of generation {rec.generation}")
        log.info("volume %s: generation %d staged lazily (%d data chunks to fetch), its local volume "
                 "created meanwhile, in %.3fs", vid, rec.generation, manifest.data_chunks, time.monotonic() - t0)
        return self._made_current(rec)

    def _discard(self, vid: str) -> None:
        try:
            self.lazy.discard(vid)
            self.backend.delete(vid)
        except CsiError as e:
            log.error("volume %s: cannot remove the half-hydrated local copy: %s", vid, e)
        self.vols.remove(vid)
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
    def on_release(self, lv: LocalVolume) -> None:
        """Last target gone: sync the file system and start flushing while it is still staged."""
        if lv.persistence != "object" or not lv.dirty:
            return
        if lv.access_type == "mount" and lv.staged_path and fs.mount_info(lv.staged_path):
            fs.sync_fs(lv.staged_path)
        self._start(lv, final=False)

    def finish(self, vid: str) -> None:
        """Called by NodeUnstage after unmounting (the volume is FLUSHING, DIRTY, FENCED or
        CLEAN). Returns when the generation is committed (CLEAN); the node's copy of the lineage
        key goes then (nothing is left to flush)."""
        lv = self.vols.get(vid)
        if lv is None or lv.phase == Phase.CLEAN:
            self.keys.drop(vid)
            return
        deadline = time.monotonic() + self.unstage_wait
        started = False
        while True:
            if not self._running(vid):
                cur = self.vols.update(vid)
                if cur.phase == Phase.CLEAN:
                    self.vols.update(vid, _clear_job)
                    self.keys.drop(vid)
                    return
                if cur.phase == Phase.FENCED:
                    raise Fenced(cur.flush.error if cur.flush else f"volume {vid}: this node was fenced out")
                if cur.phase == Phase.DIRTY and started:
                    break           # failed again in this call: report, kubelet retries later
                if cur.phase == Phase.DIRTY and cur.flush is not None:
                    log.warning("volume %s: retrying flush after: %s", vid, cur.flush.error)
                elif cur.flush is not None and cur.flush.state == FlushState.RUNNING and cur.flush.final:
                    # no thread runs it: the process restarted before resume() or the record
                    # was overwritten; the final pass starts (again) from its journal
                    log.info("volume %s: flush job was not running: starting the final pass", vid)
                self._start(cur, final=True)
                started = True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wait(vid, min(left, 1.0))
        raise self._not_done(vid)

    def _not_done(self, vid: str) -> CsiError:
        cur = self.vols.get(vid)
        job = cur.flush if cur is not None else None
        done, total = self._progress.get(vid, (0, 0))
        err = f"; last error: {job.error}" if job is not None and job.error else ""
        failed = job is not None and job.state == FlushState.FAILED
        code = Code.UNAVAILABLE if job is not None and failed and job.error_code == Code.UNAVAILABLE.name else Code.ABORTED
        what = "failed" if failed else "in progress"
        return CsiError(code, f"volume {vid}: flush to the object store {what}: "
                        f"{done}/{total} bytes ({100 * done // max(total, 1)}%){err}; local data kept, retry later")

    def resume(self, lv: LocalVolume) -> None:
        if lv.persistence != "object":
            return
        job_due = lv.flush is not None and lv.flush.state in (FlushState.RUNNING, FlushState.FAILED)
        if lv.phase in (Phase.FLUSHING, Phase.DIRTY) or (lv.phase in STAGED_PHASES and job_due):
            log.info("volume %s: resuming the interrupted flush", lv.id)
            self._start(lv, final=lv.phase not in STAGED_PHASES)

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

    def _start(self, lv: LocalVolume, final: bool) -> None:
        """Start a flush thread: the final pass (unstaged: FLUSHING) or a pre-flush (staged)."""
        with self._mu:
            t = self._threads.get(lv.id)
            if t is not None and t.is_alive():
                return
            job = FlushJob(generation_base=lv.generation, epoch=lv.epoch, final=final)

            def set_job(cur: LocalVolume) -> None:
                cur.flush = job
            if self.vols.update_if(lv.id, set_job, to=Phase.FLUSHING if final else None) is None:
                return
            self._progress.pop(lv.id, None)
            t = threading.Thread(target=self._run, args=(lv.id, job), name=f"flush-{lv.id}", daemon=True)
            self._threads[lv.id] = t
            metrics.FLUSH_JOBS.inc()
            t.start()

    def _run(self, vid: str, job: FlushJob) -> None:
        try:
            self._flush(vid, job)
        except Exception as e:     # recorded in the job; NodeUnstage reports it
            self._failed(vid, job, e)
        finally:
            metrics.FLUSH_JOBS.dec()

    def _failed(self, vid: str, job: FlushJob, e: Exception) -> None:
        # only the catalog's proof fences; every other error (FAILED_PRECONDITION included)
        # keeps the local data and is retried
        fenced = isinstance(e, Fenced)
        code, job.error = _flush_failure(e)
        job.state = FlushState.FENCED if fenced else FlushState.FAILED
        job.error_code = code.name

        def record(lv: LocalVolume) -> None:
            lv.flush = job
        # the final pass decides the unstaged volume's phase; a pre-flush leaves it staged
        to = (Phase.FENCED if fenced else Phase.DIRTY) if job.final else None
        self.vols.update_if(vid, record, to=to)
        self.events.flush_failed(vid, job.error, fenced)
        if fenced:
            log.error("volume %s: flush not committed, local data kept: %s", vid, e)
        else:
            log.warning("volume %s: flush failed (will retry on the next NodeUnstage): %s", vid, e)

    def _flush(self, vid: str, job: FlushJob) -> None:
        # the final pass commits: it follows gc's handshake (claim its chunks, repair what a
        # concurrent garbage collection deleted) before the generation is committed
        from .remote.guard import FlushGuard
        guard = (FlushGuard.begin(self.stores.volume_catalog(self.secrets_for(vid)).store, f"{self.node_id}/{vid}",
                                  resumed=Path(self.vols.journal_path(vid)).exists())
                 if job.final else None)
        try:
            self._flush_guarded(vid, job, guard)
        finally:
            if guard is not None:
                guard.release()

    def _flush_guarded(self, vid: str, job: FlushJob, guard: Any) -> None:
        from . import volume_io
        # only the final pass (after unmount, no writer left) may trust its journal on resume:
        # a pre-flush runs while the file system is still mounted and its chunks may change
        cat = self.stores.volume_catalog(self.secrets_for(vid))
        rec = cat.volume(vid)
        self.events.track(rec)
        check_owner(rec, self.node_id, job.epoch, "local data kept, not committed")
        codec = self.codec(rec)
        base = codec.open_manifest(cat.get_manifest(vid, rec.generation), f"volume {vid}") if rec.generation else None
        dev = self.backend.device(vid)
        size = self.backend.size(vid)
        pre = self._take_preflushed(vid, job, rec.generation, size)
        source, snap = dev, None
        if not job.final and self.backend.tracks_changes:
            # read a point-in-time copy: its manifest is exact, so the final pass (after
            # unmount) only reads what changed after it
            self.backend.delete_snapshot(vid, PRE_SNAP)
            source, snap = self.backend.snapshot(vid, PRE_SNAP), PRE_SNAP
        ranges, mode, flush_base = self._ranges(vid, base, rec.generation if base is not None else 0,
                                                snap, pre)
        if job.final and _unchanged(base, flush_base, ranges, mode, size):
            self._keep_generation(vid, job, cat, rec)
            return
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
            plan = FlushPlan(size=size, chunk_size=rec.chunk_size, base=flush_base, ranges=ranges,
                             ranges_mode=mode, generation=rec.generation + 1,
                             parent=rec.generation if base is not None else None,
                             known=pre.hashes if pre is not None else None,
                             compression_level=rec.compression, workers=self.cfg.flush_workers,
                             journal_path=self.vols.journal_path(vid) if job.final else None, codec=codec)
            manifest, stats = volume_io.flush(cat.store, source, plan, progress)
        finally:
            metrics.FLUSH_BACKLOG.dec(total - last[0])
        dt = time.monotonic() - t0
        _count_flush(stats, rec.chunk_size, dt)
        if not job.final:
            # a pre-flush while still staged: chunks are stored, the final pass commits
            with self._mu:
                self._preflushed[vid] = _PreFlush(
                    rec.generation, size, started_at,
                    manifest.chunk_map(),
                    manifest if snap is not None else None)
            job.state, job.done_bytes = FlushState.UPLOADED, total

            def uploaded(lv: LocalVolume) -> None:
                lv.flush = job
            self.vols.update_if(vid, uploaded)
            self.events.flush_uploaded(vid, stats.bytes_uploaded, dt)
            log.info("volume %s: background flush uploaded %d bytes in %.2fs", vid, stats.bytes_uploaded, dt)
            return
        if base is not None and _same_content(manifest, base):     # read it all, found the same chunks
            self._keep_generation(vid, job, cat, rec)
            return
        gen = self._commit(vid, job, cat, rec, manifest, codec, volume_io.source_of(dev), guard)
        job.state, job.manifest_gen, job.done_bytes = FlushState.COMMITTED, gen, total

        def committed(lv: LocalVolume) -> None:
            lv.generation, lv.flush, lv.dirty = gen, job, False
        self.vols.update_if(vid, committed, to=Phase.CLEAN)
        Path(self.vols.journal_path(vid)).unlink(missing_ok=True)
        self._mark_generation(vid, gen, previous=rec.generation)
        self._report_committed(vid, gen, stats, size, dt)

    def _commit(self, vid: str, job: FlushJob, cat: Catalog, rec: VolumeRecord, manifest: Manifest, codec: Codec,
                source: Any, guard: Any) -> int:
        """The final pass's commit of generation n+1: gc's handshake (its chunks claimed), the
        manifest (If-None-Match), then the record (If-Match, owner + epoch checked)."""
        if guard is not None:
            from .remote.catalog import manifest_key
            guard.claim(manifest, source=source, compression_level=rec.compression, codec=codec,
                        manifests=[manifest_key(vid, rec.generation + 1)])
        gen = cat.put_manifest(vid, rec.generation + 1, codec.encode_manifest(manifest))
        cat.commit_generation(vid, gen, self.node_id, job.epoch)
        return gen

    def _keep_generation(self, vid: str, job: FlushJob, cat: Catalog, rec: VolumeRecord) -> None:
        """The final pass of a volume in which nothing changed since its committed generation
        (a lazily staged volume nothing was written to; a tracked backend with no change; or a
        pass that read everything and found exactly the committed chunks): no chunk, no
        manifest, no new generation. The record only notes, fenced by ownership, that
        this node's copy is current (ControllerUnpublish and takeover tell data loss by it)."""
        if rec.generation_node != self.node_id:
            cat.keep_generation(vid, rec.generation, self.node_id, job.epoch)
        job.state, job.manifest_gen, job.done_bytes = FlushState.COMMITTED, rec.generation, 0

        def kept(lv: LocalVolume) -> None:
            lv.flush, lv.dirty = job, False
        self.vols.update_if(vid, kept, to=Phase.CLEAN)
        Path(self.vols.journal_path(vid)).unlink(missing_ok=True)
        if self.backend.tracks_changes:         # the pre-flush's point-in-time copy, if it made one
            try:
                self.backend.delete_snapshot(vid, PRE_SNAP)
            except CsiError as e:
                log.warning("volume %s: cannot drop the pre-flush snapshot: %s", vid, e)
        log.info("volume %s: nothing changed since generation %d: nothing uploaded, no new generation",
                 vid, rec.generation)

    def _report_committed(self, vid: str, gen: int, stats: FlushStats, size: int, dt: float) -> None:
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
        tracking = self.backend.tracks_changes
        try:
            if (pre is not None and pre.manifest is not None and tracking
                    and self.backend.snapshot_path(vid, PRE_SNAP) is not None):
                changed = self.backend.changed_ranges(vid, PRE_SNAP)
                if changed is not None:
                    log.info("volume %s: %d bytes changed since the pre-flush", vid,
                             sum(r.length for r in changed))
                    return changed, "changed", pre.manifest
            if base is not None:
                switched = self._switched_ranges(vid, base_gen, snap)
                if switched is not None:
                    return switched, "changed", base
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

    def before_lazy_switch(self, vid: str) -> None:
        """Device-mapper path, right before the table moves onto the local volume: a snapshot of
        it (writes after it are found by change tracking; the ones before are in the lazy dirty
        set, kept across the switch). Without change tracking the next flush reads everything."""
        if not self.backend.tracks_changes:
            return
        try:
            self.backend.delete_snapshot(vid, SWITCH_SNAP)
            self.backend.snapshot(vid, SWITCH_SNAP)
        except CsiError as e:       # the switch goes on; the next flush reads everything allocated
            log.warning("volume %s: no snapshot at the switch to the local volume (the next flush "
                        "hashes everything): %s", vid, e)

    def _switched_ranges(self, vid: str, base_gen: int, snap: str | None) -> list[Any] | None:
        """After a lazy volume's switch to the local volume: what it wrote while lazily hydrated
        and what changed since the switch; None when it was not switched or is not tracked."""
        written = self.lazy.written_before_switch(vid)
        if written is None or not self.backend.tracks_changes:
            return None
        if self.backend.snapshot_path(vid, SWITCH_SNAP) is None:
            return None
        after = self.backend.changed_ranges(vid, SWITCH_SNAP, snap=snap)
        if after is None:
            return None
        from .local.lvm import merge_extents
        out = merge_extents([*written, *after])
        log.info("volume %s: %d bytes written on this node since generation %d (%d while lazily hydrated, "
                 "%d after the switch to the local volume)", vid, sum(r.length for r in out), base_gen,
                 sum(r.length for r in written), sum(r.length for r in after))
        return out

    def _mark_generation(self, vid: str, gen: int, previous: int = 0) -> None:
        """Keep a snapshot of the local copy as generation `gen` (the next flush's base) and drop
        the previous one and the pre-flush's; only for backends that track changes (thin
        snapshots and reflinks cost nothing until the volume is written). What a lazily staged
        volume wrote before its switch to the local volume is in this generation: forgotten."""
        self.lazy.forget_written(vid)
        if not self.backend.tracks_changes:
            return
        try:
            self.backend.snapshot(vid, self._gen_snap(gen))
            if previous and previous != gen:
                self.backend.delete_snapshot(vid, self._gen_snap(previous))
            self.backend.delete_snapshot(vid, PRE_SNAP)
            self.backend.delete_snapshot(vid, SWITCH_SNAP)
        except CsiError as e:
            log.warning("volume %s: no base snapshot for generation %d (next flush hashes everything): %s",
                        vid, gen, e)

    # -- cache -----------------------------------------------------------------------------
    def clean_cached(self) -> list[LocalVolume]:
        """Local copies that hold a committed generation and nothing else: evictable."""
        out = []
        for lv in self.vols.all():
            if not self._evictable(lv):
                continue
            out.append(lv)
        return sorted(out, key=lambda v: v.last_used)

    def _evictable(self, lv: LocalVolume) -> bool:
        if lv.phase != Phase.CLEAN or lv.dirty or lv.persistence != "object" or self._running(lv.id):
            return False
        with self._mu:
            return lv.id not in self._preparing

    def reclaimable_bytes(self) -> int:
        total = 0
        for lv in self.clean_cached():
            try:
                total += sum(r.length for r in self.backend.allocated_ranges(lv.id))
            except CsiError:
                continue
        return total

    def _drop(self, vid: str, still: Callable[[LocalVolume], bool], why: str) -> bool:
        """Delete the local copy under the volume's lock if `still(record)` holds then (an RPC
        on it meanwhile wins: nothing is dropped); `why` is logged with the volume ID for %s."""
        try:
            with self.vols.hold(vid):
                lv = self.vols.get(vid)
                if lv is None or not still(lv):
                    return False
                log.info(why, vid)
                self._delete_local(vid)
                return True
        except CsiError as e:
            if e.code == Code.ABORTED:
                return False
            raise

    def evict(self, need: int, keep: str = "") -> bool:
        """Evict clean cached copies, least recently used first, until `need` bytes fit."""
        evicted = False
        for lv in self.clean_cached():
            if lv.id == keep:
                continue
            if self.backend.capacity().available_bytes >= need:
                break
            evicted |= self._drop(lv.id, self._evictable, f"evicting cached copy of volume %s (generation {lv.generation}, "
                                  f"last used {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(lv.last_used))})")
        return evicted and self.backend.capacity().available_bytes >= need

    def drop_deleted(self, exists: Callable[[str], bool]) -> None:
        """Remove local copies of volumes deleted from the catalog (not staged)."""
        def droppable(lv: LocalVolume) -> bool:
            if lv.phase in STAGED_PHASES or lv.targets or self._running(lv.id) or exists(lv.id):
                return False
            with self._mu:
                return lv.id not in self._preparing
        for lv in self.vols.all():
            if droppable(lv):
                self._drop(lv.id, droppable, "volume %s was deleted: removing its local copy")
        for vid in self.backend.list_volumes():
            if self.vols.get(vid) is None and not exists(vid):
                log.info("removing orphaned local volume %s", vid)
                self.lazy.discard(vid)
                self.backend.delete(vid)


def _map_transfer_error(e: BaseException, vid: str, doing: str, step: str) -> NoReturn:
    """Raise what a failed hydrate or lazy stage reports: an unreachable store as UNAVAILABLE, a
    local I/O or format error as INTERNAL; anything else (a CsiError, an interrupt) as it was."""
    if isinstance(e, StoreError):
        raise unreachable(e, f"volume {vid}: object store unreachable while {doing}") from e
    if isinstance(e, (OSError, ValueError)):
        raise CsiError(Code.INTERNAL, f"volume {vid}: {step}: {e}") from e
    raise e


def _unchanged(base: Manifest | None, flush_base: Manifest | None, ranges: list[Any], mode: str, size: int) -> bool:
    """Whether a final pass has nothing to commit: nothing to read on top of the committed
    generation itself (changed ranges, all empty) and the volume kept its size."""
    return (base is not None and flush_base is base and mode == "changed" and size == base.volume_size
            and not any(r.length for r in ranges))


def _same_content(manifest: Manifest, base: Manifest) -> bool:
    """Whether a final pass's manifest holds exactly the committed generation's chunks."""
    return (manifest.volume_size == base.volume_size and manifest.chunk_size == base.chunk_size
            and manifest.chunk_map().same_chunks(base.chunk_map()))


def _flush_failure(e: Exception) -> tuple[Code, str]:
    """A failed flush's status code and the message kept in its job."""
    if isinstance(e, StoreError):
        err = unreachable(e, "object store unreachable")
        return err.code, err.message
    if isinstance(e, CsiError):
        return e.code, (f"object store unreachable: {e}" if e.code == Code.UNAVAILABLE else str(e))
    return Code.INTERNAL, str(e)
