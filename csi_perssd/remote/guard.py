"""The writer's half of the protocol that keeps garbage collection (remote/gc.py) safe against
flushes running at the same time, and the keys and timings both halves share.

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
             them, list manifests (snapshot manifests before snapshot records), delete, DELETE its tomb. It deletes nothing once
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
waits for it to end and repairs whatever it deleted before committing. volume_io.flush itself
needs no change; callers wrap it (see `FlushGuard`).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ..errors import Code, CsiError
from .chunks import DEFAULT_COMPRESSION, chunk_span
from .codec import PLAIN, Codec
from .layout import GC_LAST_RUN, GC_RUNNING, chunk_key, gc_claim_key
from .manifest import Manifest
from .store import NotFound, ObjectStore, StoreError, reachable
from .transfer import ChunkSource

log = logging.getLogger(__name__)
TOMB_TTL_S = 600.0                 # a collector's tomb older than this is dead (crashed collector)
SWEEP_LIMIT_S = TOMB_TTL_S / 2     # a collector stops deleting this long after writing its tomb
CLAIM_TTL_S = 6 * 3600.0           # a claim left behind by a crashed writer stops protecting
CLONE_CLAIM_TTL_S = 120.0          # a clone's claim whose volume record never appeared (crash)
WAIT_POLL_S = 0.2
# opens the flushed source for reads of chunks of the given size (the caller's local reader)
SourceOpener = Callable[[int], AbstractContextManager[ChunkSource]]


def new_id() -> str:
    """A run or claim ID: sortable by time, unique."""
    return f"{int(time.time() * 1000):013d}-{secrets.token_hex(4)}"


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
        manifest, stats = volume_io.flush(store, dev, plan)
        guard.claim(manifest, source=volume_io.source_of(dev), compression_level=1)   # may repair chunks
        ...put_manifest + commit_generation...
        guard.release()

    `claim` raises CsiError(ABORTED) when a chunk is missing and there is no source to upload
    it again from (e.g. a snapshot that pins a manifest whose source was deleted meanwhile)."""

    def __init__(self, store: ObjectStore, owner: str, resumed: bool = False):
        self.store = store
        self.owner = owner
        self.resumed = resumed
        self.key = gc_claim_key(new_id())
        self.claimed = False
        self.stats = GuardStats()
        self._before = self._gc_state()

    @classmethod
    def begin(cls, store: ObjectStore, owner: str, resumed: bool = False) -> FlushGuard:
        with reachable(store):
            return cls(store, owner, resumed)

    def _gc_state(self) -> tuple[str, set[str]]:
        try:
            last = self.store.get(GC_LAST_RUN)[1]
        except NotFound:
            last = ""
        now = time.time()
        tombs = {i.key for i in self.store.list(GC_RUNNING) if now - i.mtime < TOMB_TTL_S}
        return last, tombs

    def claim(self, manifest: Manifest | set[str], *, source: SourceOpener | None = None,
              compression_level: int = DEFAULT_COMPRESSION, manifests: list[str] | tuple[str, ...] = (),
              volume: str = "", codec: Codec = PLAIN) -> GuardStats:
        """`manifest`: the manifest, or only the chunk names it references (a sealed manifest
        copied without its keys; then there is no source to repair from). `volume`: the claim
        protects a new volume's first manifest until its record exists (a clone); a collector
        drops it once it sees that record. `codec` encodes repaired chunks like the flush did.
        `source(chunk_size)` opens what the flush read (volume_io.source_of), only when a chunk
        must be uploaded again."""
        hashes = sorted(manifest.referenced_hashes() if isinstance(manifest, Manifest) else manifest)
        doc = {"owner": self.owner, "created_at": time.time(), "hashes": hashes, "manifests": list(manifests),
               "volume": volume}
        with reachable(self.store):
            self.store.put(self.key, json.dumps(doc, separators=(",", ":")).encode())
            self.claimed = True
            last, tombs = self._gc_state()
            overlapped = bool(self._before[1]) or bool(tombs) or last != self._before[0]
            self.stats.overlapped = overlapped
            if overlapped or self.resumed:
                self._wait_for(tombs)
                self._verify(manifest, source, compression_level, codec)
        if overlapped:
            log.info("%s: a garbage collection overlapped the flush: verified %d chunks, uploaded %d again",
                     self.owner, self.stats.verified_chunks, self.stats.repaired_chunks)
        return self.stats

    def _wait_for(self, tombs: set[str]) -> None:
        t0 = time.monotonic()
        while tombs:
            now = time.time()
            alive = {i.key for i in self.store.list(GC_RUNNING) if now - i.mtime < TOMB_TTL_S}
            tombs &= alive
            if tombs:
                time.sleep(WAIT_POLL_S)
        self.stats.waited_s = time.monotonic() - t0

    def _verify(self, manifest: Manifest | set[str], source: SourceOpener | None, level: int,
                codec: Codec) -> None:
        first: dict[str, int] = {}
        if not isinstance(manifest, Manifest):
            first = {h: -1 for h in sorted(manifest)}
            source = None
        else:
            for i, h in manifest.data_items():
                first.setdefault(h, i)
        missing = []
        for h in first:
            self.stats.verified_chunks += 1
            info = self.store.head(chunk_key(h))
            if info is None or info.size <= 0:
                missing.append(h)
        if not missing:
            return
        if source is None:
            raise CsiError(Code.ABORTED, f"{self.owner}: {len(missing)} chunks were garbage-collected "
                           f"meanwhile and there is no source to upload them again from; try again")
        assert isinstance(manifest, Manifest)
        with source(manifest.chunk_size) as reader:
            for h in missing:
                i = first[h]
                off, length = chunk_span(i, manifest.volume_size, manifest.chunk_size)
                try:
                    buf = reader.read(off, length)
                except OSError as e:  # the source ended early or went away: the same as a changed source
                    raise CsiError(Code.ABORTED, f"{self.owner}: cannot re-read chunk {i} to upload it again "
                                   f"({e}); flush again") from e
                if codec.name(buf) != h:
                    raise CsiError(Code.ABORTED, f"{self.owner}: chunk {i} was garbage-collected meanwhile and "
                                   f"the source changed since it was read; flush again")
                blob = codec.encode(h, buf, level)
                self.store.put(chunk_key(h), blob)
                self.stats.repaired_chunks += 1
                self.stats.repaired_bytes += len(blob)

    def release(self) -> None:
        """The manifest is committed (or abandoned): the claim is no longer needed."""
        if self.claimed:
            try:
                self.store.delete(self.key)
            except StoreError as e:
                log.warning("%s: cannot remove claim %s (it expires by itself): %s", self.owner, self.key, e)
            self.claimed = False
