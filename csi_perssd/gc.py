"""Garbage collection of the bucket (mark-and-sweep) and the protocol that keeps it safe
against flushes running at the same time.

Collect: every chunk referenced by a manifest of a live volume (the committed generation, the
`keep` generations before it, any newer not yet committed generation younger than the grace
period), of a snapshot, or by a live claim, is marked; unreferenced chunks older than the grace
period are deleted. Also removed: manifests of pruned generations and of deleted volumes or
snapshots, and stale snapshot requests, once older than the grace period.

Why a grace period is not enough. A flush skips uploading a chunk that a HEAD finds in the
store; if that chunk is old and unreferenced, a collection may delete it after the flush
decided to reuse it, and the committed manifest would reference a missing chunk. A long flush
(or a small grace period) has the same problem with the chunks it uploaded itself. So writers
and the collector follow a handshake (both sides write first, then read the other's record —
the object store is strongly consistent):

  collector: PUT gc/running/<run>.json (tomb), PUT gc/last-run.json, LIST gc/claims/ + read
             them, list manifests, delete, DELETE its tomb. It deletes nothing once
             SWEEP_LIMIT_S have passed since its tomb was written (the rest waits for the
             next run) and a tomb older than TOMB_TTL_S counts as dead.
  writer (`FlushGuard`): before reading its base manifest, read gc/last-run.json and the
             tombs; upload; PUT gc/claims/<id>.json listing every chunk of the new manifest;
             read last-run and the tombs again. If a collection overlapped (a tomb at either
             read, or last-run changed) or the flush resumed a journal: wait until those
             tombs are gone, HEAD every chunk of the manifest and upload again the ones that
             are missing (re-read from the source, hash checked). Commit, then DELETE the claim.

A collector that read the claims after the writer's claim PUT keeps those chunks. One that read
them before had written its tomb and last-run before that PUT, so the writer sees the overlap,
waits for it to end and repairs whatever it deleted before committing. transfer.flush itself
needs no change; callers wrap it (see `FlushGuard`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from .errors import Code, CsiError, unavailable
from .remote.catalog import Catalog
from .remote.chunks import chunk_key, chunk_span
from .remote.codec import PLAIN, Codec, manifest_refs
from .remote.manifest import Manifest
from .remote.store import NotFound, ObjectStore, StoreError

log = logging.getLogger(__name__)
RUNNING = "gc/running/"
LAST_RUN = "gc/last-run.json"
CLAIMS = "gc/claims/"
TOMB_TTL_S = 600.0                 # a collector's tomb older than this is dead (crashed collector)
SWEEP_LIMIT_S = TOMB_TTL_S / 2     # a collector stops deleting this long after writing its tomb
CLAIM_TTL_S = 6 * 3600.0           # a claim left behind by a crashed writer stops protecting
CLONE_CLAIM_TTL_S = 120.0          # a clone's claim whose volume record never appeared (crash)
REQUEST_MIN_AGE_S = 3600.0         # snapshot requests without a snapshot record: removed after this
WAIT_POLL_S = 0.2
_GEN_RE = re.compile(r"volumes/([^/]+)/gen/(\d+)\.manifest")
_SNAP_MANIFEST_RE = re.compile(r"snapshots/([^/]+)\.manifest")
_REQUEST_RE = re.compile(r"requests/([^/]+)/([^/]+)\.json")


def _new_id() -> str:
    return f"{int(time.time() * 1000):013d}-{secrets.token_hex(4)}"


# -- writer side -------------------------------------------------------------------------------
@dataclass
class GuardStats:
    overlapped: bool = False
    verified_chunks: int = 0
    repaired_chunks: int = 0
    repaired_bytes: int = 0
    waited_s: float = 0.0


class FlushGuard:
    """The writer's half of the handshake. Use:

        guard = FlushGuard.begin(store, "node-a/pvol-x", resumed=journal_exists)
        base = ...read the base manifest...
        manifest, stats = transfer.flush(store, dev, ...)
        guard.claim(manifest, source_path=dev, compression_level=3)   # may repair chunks
        ...put_manifest + commit_generation...
        guard.release()

    `claim` raises CsiError(ABORTED) when a chunk is missing and there is no source to upload
    it again from (e.g. a snapshot that pins a manifest whose source was deleted meanwhile)."""

    def __init__(self, store: ObjectStore, owner: str, resumed: bool = False):
        self.store = store
        self.owner = owner
        self.resumed = resumed
        self.key = f"{CLAIMS}{_new_id()}.json"
        self.claimed = False
        self.stats = GuardStats()
        self._before = self._gc_state()

    @classmethod
    def begin(cls, store: ObjectStore, owner: str, resumed: bool = False) -> FlushGuard:
        try:
            return cls(store, owner, resumed)
        except StoreError as e:
            raise unavailable(f"object store {store.url}: {e}") from e

    def _gc_state(self) -> tuple[str, set[str]]:
        try:
            last = self.store.get(LAST_RUN)[1]
        except NotFound:
            last = ""
        now = time.time()
        tombs = {i.key for i in self.store.list(RUNNING) if now - i.mtime < TOMB_TTL_S}
        return last, tombs

    def claim(self, manifest: Manifest | set[str], *, source_path: str | None = None,
              compression_level: int = 3, manifests: list[str] | tuple[str, ...] = (),
              volume: str = "", codec: Codec = PLAIN) -> GuardStats:
        """`manifest`: the manifest, or only the chunk names it references (a sealed manifest
        copied without its keys; then there is no source to repair from). `volume`: the claim
        protects a new volume's first manifest until its record exists (a clone); a collector
        drops it once it sees that record. `codec` encodes repaired chunks like the flush did."""
        hashes = sorted(manifest.referenced_hashes() if isinstance(manifest, Manifest) else manifest)
        doc = {"owner": self.owner, "created_at": time.time(), "hashes": hashes, "manifests": list(manifests),
               "volume": volume}
        try:
            self.store.put(self.key, json.dumps(doc, separators=(",", ":")).encode())
            self.claimed = True
            last, tombs = self._gc_state()
            overlapped = bool(self._before[1]) or bool(tombs) or last != self._before[0]
            self.stats.overlapped = overlapped
            if overlapped or self.resumed:
                self._wait_for(tombs)
                self._verify(manifest, source_path, compression_level, codec)
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e
        if overlapped:
            log.info("%s: a garbage collection overlapped the flush: verified %d chunks, uploaded %d again",
                     self.owner, self.stats.verified_chunks, self.stats.repaired_chunks)
        return self.stats

    def _wait_for(self, tombs: set[str]) -> None:
        t0 = time.monotonic()
        while tombs:
            now = time.time()
            alive = {i.key for i in self.store.list(RUNNING) if now - i.mtime < TOMB_TTL_S}
            tombs &= alive
            if tombs:
                time.sleep(WAIT_POLL_S)
        self.stats.waited_s = time.monotonic() - t0

    def _verify(self, manifest: Manifest | set[str], source_path: str | None, level: int,
                codec: Codec) -> None:
        first: dict[str, int] = {}
        if not isinstance(manifest, Manifest):
            first = {h: -1 for h in sorted(manifest)}
            source_path = None
        else:
            for i, h in enumerate(manifest.entries):
                if h is not None:
                    first.setdefault(h, i)
        missing = []
        for h in first:
            self.stats.verified_chunks += 1
            info = self.store.head(chunk_key(h))
            if info is None or info.size <= 0:
                missing.append(h)
        if not missing:
            return
        if source_path is None:
            raise CsiError(Code.ABORTED, f"{self.owner}: {len(missing)} chunks were garbage-collected "
                           f"meanwhile and there is no source to upload them again from; try again")
        assert isinstance(manifest, Manifest)
        fd = os.open(source_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for h in missing:
                i = first[h]
                off, length = chunk_span(i, manifest.volume_size, manifest.chunk_size)
                buf = os.pread(fd, length, off)
                while len(buf) < length:
                    more = os.pread(fd, length - len(buf), off + len(buf))
                    if not more:
                        break
                    buf += more
                if codec.name(buf) != h:
                    raise CsiError(Code.ABORTED, f"{self.owner}: chunk {i} was garbage-collected meanwhile and "
                                   f"the source changed since it was read; flush again")
                blob = codec.encode(h, buf, level)
                self.store.put(chunk_key(h), blob)
                self.stats.repaired_chunks += 1
                self.stats.repaired_bytes += len(blob)
        finally:
            os.close(fd)

    def release(self) -> None:
        """The manifest is committed (or abandoned): the claim is no longer needed."""
        if self.claimed:
            try:
                self.store.delete(self.key)
            except StoreError as e:
                log.warning("%s: cannot remove claim %s (it expires by itself): %s", self.owner, self.key, e)
            self.claimed = False


# -- collector ---------------------------------------------------------------------------------
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

    @property
    def freed_bytes(self) -> int:
        return self.deleted_chunk_bytes + self.deleted_other_bytes

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        s = (f"{verb} {len(self.deleted_chunks)} chunks and {len(self.deleted_manifests) + len(self.deleted_other)} "
             f"other objects, freeing {self.freed_bytes} bytes ({self.deleted_chunk_bytes} in chunks); "
             f"{self.referenced_chunks} chunks referenced, {self.kept_young} unreferenced but younger than "
             f"the grace period, {self.live_claims} flushes in progress")
        return s + ("; stopped early (time limit), the next run continues" if self.stopped_early else "")


def _live_claims(cat: Catalog, now: float, dry_run: bool, rep: GcReport) -> tuple[set[str], set[str]]:
    store = cat.store
    hashes: set[str] = set()
    manifests: set[str] = set()
    for info in list(store.list(CLAIMS)):
        try:
            doc = json.loads(store.get(info.key)[0])
        except NotFound:
            continue                        # released meanwhile
        except ValueError:
            doc = {}
        done = False
        if isinstance(doc, dict) and doc.get("volume"):
            try:
                # the clone's record exists: its generations protect the manifest from now on
                done = cat.get_volume(str(doc["volume"])) is not None or now - info.mtime > CLONE_CLAIM_TTL_S
            except CsiError:
                done = True
        if done or now - info.mtime > CLAIM_TTL_S or not isinstance(doc, dict):
            rep.deleted_other.append(info.key)
            rep.deleted_other_bytes += info.size
            if not dry_run:
                store.delete(info.key)
            continue
        rep.live_claims += 1
        hashes.update(doc.get("hashes", []))
        manifests.update(doc.get("manifests", []))
    return hashes, manifests


def collect(cat: Catalog, *, grace: float, keep: int, dry_run: bool,
            sweep_limit: float = SWEEP_LIMIT_S) -> GcReport:
    rep = GcReport(dry_run=dry_run)
    store = cat.store
    run = _new_id()
    tomb = f"{RUNNING}{run}.json"
    t0 = time.monotonic()
    try:
        if not dry_run:
            store.put(tomb, json.dumps({"run": run, "started": time.time()}).encode())
            store.put(LAST_RUN, json.dumps({"run": run, "started": time.time()}).encode())
        t_start = time.time()
        try:
            _collect(cat, rep, t_start, grace=grace, keep=keep, dry_run=dry_run,
                     deadline=t0 + sweep_limit)
        finally:
            if not dry_run:
                store.delete(tomb)
    except StoreError as e:
        raise unavailable(f"object store {store.url}: {e}") from e
    rep.duration_s = time.monotonic() - t0
    log.info("gc: %s", rep.summary())
    return rep


def _collect(cat: Catalog, rep: GcReport, t_start: float, *, grace: float, keep: int, dry_run: bool,
             deadline: float) -> None:
    store = cat.store
    # order matters (see the module docstring): chunks, then claims, then manifests
    chunks = list(store.list("chunks/"))
    referenced, claimed_manifests = _live_claims(cat, t_start, dry_run, rep)
    volumes = {v.id: v for v in cat.list_volumes()}
    snap_ids = {s.id for s in cat.list_snapshots()}
    keep_keys: list[str] = []
    drop: list[tuple[str, int]] = []
    gens: dict[str, list[tuple[int, str, float, int]]] = {}
    for info in store.list("volumes/"):
        m = _GEN_RE.fullmatch(info.key)
        if m:
            gens.setdefault(m.group(1), []).append((int(m.group(2)), info.key, info.mtime, info.size))
    for vid, lst in gens.items():
        lst.sort()
        vol = volumes.get(vid)
        committed = [g for g, _, _, _ in lst if vol is not None and g <= vol.generation]
        kept = set(committed[-(keep + 1):]) if committed else set()
        for g, key, mtime, size in lst:
            young = t_start - mtime <= grace
            if key in claimed_manifests or g in kept or (young and (vol is None or g > vol.generation)):
                keep_keys.append(key)       # young orphans: a clone whose record is being written
            else:
                drop.append((key, size))
    for info in store.list("snapshots/"):
        m = _SNAP_MANIFEST_RE.fullmatch(info.key)
        if not m:
            continue
        if m.group(1) in snap_ids or info.key in claimed_manifests or t_start - info.mtime <= grace:
            keep_keys.append(info.key)
        else:
            drop.append((info.key, info.size))
    for key in keep_keys:
        try:
            referenced |= manifest_refs(store.get(key)[0])      # plain or sealed: no keys needed
        except NotFound:
            continue                        # deleted meanwhile with its record
    rep.referenced_chunks = len(referenced)
    rep.chunk_objects = len(chunks)
    for info in store.list("requests/"):
        m = _REQUEST_RE.fullmatch(info.key)
        if m and m.group(2) not in snap_ids and t_start - info.mtime > max(grace, REQUEST_MIN_AGE_S):
            rep.deleted_other.append(info.key)
            rep.deleted_other_bytes += info.size
            if not dry_run:
                store.delete(info.key)
    for info in store.list(RUNNING):
        if t_start - info.mtime > 2 * TOMB_TTL_S:
            rep.deleted_other.append(info.key)     # a crashed collector's tomb
            if not dry_run:
                store.delete(info.key)
    for info in chunks:
        h = info.key.rsplit("/", 1)[-1]
        if h in referenced:
            continue
        if t_start - info.mtime <= grace:
            rep.kept_young += 1
            continue
        if not dry_run and time.monotonic() > deadline:
            rep.stopped_early = True
            break
        rep.deleted_chunks.append(info.key)
        rep.deleted_chunk_bytes += info.size
        if not dry_run:
            store.delete(info.key)
    for key, size in drop:
        if not dry_run and time.monotonic() > deadline:
            rep.stopped_early = True
            break
        rep.deleted_manifests.append(key)
        rep.deleted_other_bytes += size
        if not dry_run:
            store.delete(key)

