"""Garbage collection of the bucket (mark-and-sweep), safe against concurrent flushes through the
handshake described in remote/guard.py (FlushGuard is the writer's half; `collect` the other).

Mark: every chunk referenced by a manifest of a live volume (the committed generation, the
`keep` generations before it, any newer not yet committed generation younger than the grace
period), of a snapshot, or by a live claim. Sweep: unreferenced chunks older than the grace
period; manifests of pruned generations and of deleted volumes or snapshots; stale snapshot
requests and dead collectors' tombs.

Cost follows what changed: manifests are written once under a key naming their volume and
generation, so a `ManifestCache` (the hashes each manifest references, by key and ETag) lets a
run with nothing new read no manifest it already read; records come from the catalog's record
cache the same way. What a run still pays is its LISTs (chunks/, volumes/, snapshots/, gc/,
requests/), two PUTs and a DELETE; `GcReport` reports requests and bytes read.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import CsiError
from . import layout
from .catalog import Catalog, VolumeRecord
from .chunkmap import hex_slots
from .codec import manifest_ref_digests
from .guard import CLAIM_TTL_S, CLONE_CLAIM_TTL_S, SWEEP_LIMIT_S, TOMB_TTL_S, FlushGuard, GuardStats, new_id
from .store import NotFound, ObjectInfo, ObjectStore, reachable

__all__ = ["FlushGuard", "GcReport", "GuardStats", "ManifestCache", "collect"]
log = logging.getLogger(__name__)
REQUEST_MIN_AGE_S = 3600.0         # snapshot requests without a snapshot record: removed after this


class ManifestCache:
    """The chunks a manifest references (their raw digests, 32 bytes each: a 16 TiB volume's
    manifest is 128 MiB here, not 4 Mi strs), by its key and ETag (manifests are written once;
    an ETag that changed means the object was replaced and is read again)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._d: dict[str, tuple[str, bytes]] = {}

    def get(self, key: str, etag: str) -> bytes | None:
        with self._mu:
            hit = self._d.get(key)
        return hit[1] if hit is not None and etag and hit[0] == etag else None

    def put(self, key: str, etag: str, hashes: bytes) -> None:
        if etag:
            with self._mu:
                self._d[key] = (etag, hashes)

    def retain(self, keys: Iterable[str]) -> None:
        """Forget manifests that are gone from the store."""
        keep = set(keys)
        with self._mu:
            self._d = {k: v for k, v in self._d.items() if k in keep}

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class GcReport:
    referenced_chunks: int = 0
    chunk_objects: int = 0
    deleted_chunks: list[str] = field(default_factory=list)
    deleted_chunk_bytes: int = 0
    deleted_manifests: list[str] = field(default_factory=list)
    deleted_other: list[str] = field(default_factory=list)
    deleted_other_bytes: int = 0
    kept_young: int = 0
    live_claims: int = 0
    stopped_early: bool = False
    dry_run: bool = False
    duration_s: float = 0.0
    manifests_read: int = 0            # GETs of manifests this run
    manifests_cached: int = 0          # manifests whose hashes came from the cache
    bytes_read: int = 0                # bytes of the GETs this run (manifests and claims)
    requests: dict[str, int] = field(default_factory=dict)     # by operation (S3 stores)

    @property
    def freed_bytes(self) -> int:
        return self.deleted_chunk_bytes + self.deleted_other_bytes

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        s = (f"{verb} {len(self.deleted_chunks)} chunks and {len(self.deleted_manifests) + len(self.deleted_other)} "
             f"other objects, freeing {self.freed_bytes} bytes ({self.deleted_chunk_bytes} in chunks); "
             f"{self.referenced_chunks} chunks referenced, {self.kept_young} unreferenced but younger than "
             f"the grace period, {self.live_claims} flushes in progress; read {self.manifests_read} manifests "
             f"({self.manifests_cached} cached), {self.bytes_read} bytes")
        if self.requests:
            s += ", requests " + " ".join(f"{op}={n}" for op, n in sorted(self.requests.items()))
        return s + ("; stopped early (time limit), the next run continues" if self.stopped_early else "")


def _drop(store: ObjectStore, info: ObjectInfo, rep: GcReport, dry_run: bool) -> None:
    rep.deleted_other.append(info.key)
    rep.deleted_other_bytes += info.size
    if not dry_run:
        store.delete(info.key)


def _claim_done(cat: Catalog, doc: object, info: ObjectInfo, now: float) -> bool:
    if not isinstance(doc, dict):
        return True
    if now - info.mtime > CLAIM_TTL_S:
        return True
    if doc.get("volume"):
        try:
            # the clone's record exists: its generations protect the manifest from now on
            return cat.get_volume(str(doc["volume"])) is not None or now - info.mtime > CLONE_CLAIM_TTL_S
        except CsiError:
            return True
    return False


def _live_claims(cat: Catalog, now: float, dry_run: bool, rep: GcReport) -> tuple[set[str], set[str]]:
    store = cat.store
    hashes: set[str] = set()
    manifests: set[str] = set()
    for info in list(store.list(layout.GC_CLAIMS)):
        try:
            data = store.get(info.key)[0]
        except NotFound:
            continue                        # released meanwhile
        rep.bytes_read += len(data)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if _claim_done(cat, doc, info, now):
            _drop(store, info, rep, dry_run)
            continue
        assert isinstance(doc, dict)
        rep.live_claims += 1
        hashes.update(doc.get("hashes", []))
        manifests.update(doc.get("manifests", []))
    return hashes, manifests


def collect(cat: Catalog, *, grace: float, keep: int, dry_run: bool,
            sweep_limit: float = SWEEP_LIMIT_S, cache: ManifestCache | None = None) -> GcReport:
    """One collection. `cache`: keep it between runs (the controller's periodic GC does) so a
    run reads only the manifests that are new since the last one."""
    rep = GcReport(dry_run=dry_run)
    store = cat.store
    before = store.stats.snapshot()["requests"]
    tomb = layout.gc_tomb_key(run := new_id())
    t0 = time.monotonic()
    with reachable(store):
        if not dry_run:
            store.put(tomb, json.dumps({"run": run, "started": time.time()}).encode())
            store.put(layout.GC_LAST_RUN, json.dumps({"run": run, "started": time.time()}).encode())
        try:
            _collect(cat, rep, time.time(), grace=grace, keep=keep, dry_run=dry_run,
                     deadline=t0 + sweep_limit, cache=cache if cache is not None else ManifestCache())
        finally:
            if not dry_run:
                store.delete(tomb)
    rep.duration_s = time.monotonic() - t0
    after = store.stats.snapshot()["requests"]
    rep.requests = {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}
    log.info("gc: %s", rep.summary())
    return rep


@dataclass
class _Plan:
    keep_keys: list[ObjectInfo] = field(default_factory=list)
    drop: list[ObjectInfo] = field(default_factory=list)


def _plan_generations(cat: Catalog, plan: _Plan, t_start: float, grace: float, keep: int,
                      claimed: set[str]) -> list[str]:
    """Which volume manifests to keep and which to drop; returns every manifest key seen."""
    page = cat.volume_page()            # records and manifests from one listing
    volumes: dict[str, VolumeRecord] = {v.id: v for v in page.records}
    # a claim names the generation its writer will store (committed + 1), but put_manifest takes
    # the first free one: + 2 when a fenced-out node left an uncommitted + 1. While a claim names
    # one of a volume's manifests, none of its generations newer than the committed one goes.
    writing = {p[0] for p in map(layout.parse_manifest_key, claimed) if p is not None}
    gens: dict[str, list[tuple[int, ObjectInfo]]] = {}
    for vid, gen, info in page.manifests:
        gens.setdefault(vid, []).append((gen, info))
    seen = []
    for vid, lst in gens.items():
        lst.sort(key=lambda t: t[0])
        vol = volumes.get(vid)
        committed = [g for g, _ in lst if vol is not None and g <= vol.generation]
        kept = set(committed[-(keep + 1):]) if committed else set()
        for g, info in lst:
            seen.append(info.key)
            young = t_start - info.mtime <= grace
            uncommitted = vol is None or g > vol.generation
            if info.key in claimed or g in kept or (uncommitted and (young or vid in writing)):
                plan.keep_keys.append(info)     # young orphans: a clone whose record is being written
            else:
                plan.drop.append(info)
    return seen


def _snapshot_manifests(store: ObjectStore) -> list[tuple[str, ObjectInfo]]:
    """(snapshot ID, info) of every snapshots/<sid>.manifest. Listed BEFORE the snapshot records
    are read: writers create a snapshot's record before they write its manifest, so a manifest
    this listing shows has a record the later read sees unless the snapshot was deleted. (Read
    the other way round, a record and manifest both written between the two reads looked like a
    deleted snapshot's leftover manifest, and whole-second LastModified times can make a manifest
    written during the run look older than a zero grace period: the sweep deleted it.)"""
    out = []
    for info in store.list(layout.SNAPSHOTS):
        sid = layout.parse_snapshot_manifest_key(info.key)
        if sid is not None:
            out.append((sid, info))
    return out


def _plan_snapshots(manifests: list[tuple[str, ObjectInfo]], plan: _Plan, snap_ids: set[str], t_start: float,
                    grace: float, claimed: set[str]) -> list[str]:
    seen = []
    for sid, info in manifests:
        seen.append(info.key)
        if sid in snap_ids or info.key in claimed or t_start - info.mtime <= grace:
            plan.keep_keys.append(info)
        else:
            plan.drop.append(info)
    return seen


def _mark(store: ObjectStore, keys: list[ObjectInfo], referenced: set[str], cache: ManifestCache,
          rep: GcReport, workers: int = 8) -> None:
    misses = []
    for info in keys:
        hashes = cache.get(info.key, info.etag)
        if hashes is None:
            misses.append(info)
        else:
            rep.manifests_cached += 1
            referenced.update(hex_slots(hashes))

    def read(info: ObjectInfo) -> tuple[ObjectInfo, bytes, str] | None:
        try:
            data, etag = store.get(info.key)
        except NotFound:
            return None                     # deleted meanwhile with its record
        return info, data, etag
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for got in ex.map(read, misses):
            if got is None:
                continue
            info, data, etag = got
            rep.manifests_read += 1
            rep.bytes_read += len(data)
            hashes = manifest_ref_digests(data)         # plain or sealed: no keys needed
            cache.put(info.key, info.etag or etag, hashes)
            referenced.update(hex_slots(hashes))


def _collect(cat: Catalog, rep: GcReport, t_start: float, *, grace: float, keep: int, dry_run: bool,
             deadline: float, cache: ManifestCache) -> None:
    store = cat.store
    # order matters (see remote/guard.py): chunks, then claims, then manifests; snapshot
    # manifests before snapshot records (see _snapshot_manifests)
    chunks = list(store.list(layout.CHUNKS))
    referenced, claimed = _live_claims(cat, t_start, dry_run, rep)
    snap_manifests = _snapshot_manifests(store)
    snap_ids = {s.id for s in cat.list_snapshots()}
    plan = _Plan()
    seen = _plan_generations(cat, plan, t_start, grace, keep, claimed)
    seen += _plan_snapshots(snap_manifests, plan, snap_ids, t_start, grace, claimed)
    _mark(store, plan.keep_keys, referenced, cache, rep)
    cache.retain(seen)
    rep.referenced_chunks = len(referenced)
    rep.chunk_objects = len(chunks)
    for info in store.list(layout.REQUESTS):
        parsed = layout.parse_request_key(info.key)
        if parsed and parsed[1] not in snap_ids and t_start - info.mtime > max(grace, REQUEST_MIN_AGE_S):
            _drop(store, info, rep, dry_run)
    for info in store.list(layout.GC_RUNNING):
        if t_start - info.mtime > 2 * TOMB_TTL_S:
            rep.deleted_other.append(info.key)     # a crashed collector's tomb
            if not dry_run:
                store.delete(info.key)
    _sweep(store, rep, chunks, referenced, plan.drop, t_start, grace, dry_run, deadline)


def _sweep(store: ObjectStore, rep: GcReport, chunks: list[ObjectInfo], referenced: set[str],
           drop: list[ObjectInfo], t_start: float, grace: float, dry_run: bool, deadline: float) -> None:
    def unreferenced() -> Iterator[ObjectInfo]:
        for info in chunks:
            h = layout.parse_chunk_key(info.key) or info.key.rsplit("/", 1)[-1]
            if h in referenced:
                continue
            if t_start - info.mtime <= grace:
                rep.kept_young += 1
                continue
            yield info
    rep.deleted_chunk_bytes += _delete_in_time(store, unreferenced(), rep.deleted_chunks, rep, dry_run, deadline)
    rep.deleted_other_bytes += _delete_in_time(store, drop, rep.deleted_manifests, rep, dry_run, deadline)


def _delete_in_time(store: ObjectStore, infos: Iterable[ObjectInfo], deleted: list[str], rep: GcReport,
                    dry_run: bool, deadline: float) -> int:
    """Delete `infos` in order (a dry run only lists them) until the sweep's deadline, which
    stops the run early; the keys go into `deleted`; returns their bytes."""
    freed = 0
    for info in infos:
        if not dry_run and time.monotonic() > deadline:
            rep.stopped_early = True
            break
        deleted.append(info.key)
        freed += info.size
        if not dry_run:
            store.delete(info.key)
    return freed
