"""Garbage collection of the bucket: mark-and-sweep, safe against concurrent flushes.

Mark: every chunk referenced by a manifest of a live volume (the committed generation, the
`keep` generations before it, and any newer, not yet committed generation: a flush in
progress) or of a snapshot. Sweep: unreferenced chunks whose object is older than the grace
period. A flush only skips uploading a chunk that is referenced by its base manifest (marked)
or that it refreshed itself (see transfer.flush's refresh), so a chunk written or re-used
after the mark phase is younger than the grace period and never deleted.
Also removed: manifests of generations older than the kept ones, manifests of volumes that no
longer exist, and uncommitted (fenced-out) generations older than the grace period.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from .config import Config
from .remote.catalog import Catalog
from .remote.manifest import Manifest
from .remote.store import StoreError
from .errors import CsiError, unavailable

log = logging.getLogger(__name__)
_GEN_RE = re.compile(r"volumes/([^/]+)/gen/(\d+)\.manifest")


@dataclass
class GcReport:
    referenced_chunks: int = 0
    chunk_objects: int = 0
    deleted_chunks: list[str] = field(default_factory=list)
    deleted_chunk_bytes: int = 0
    deleted_manifests: list[str] = field(default_factory=list)
    kept_young: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"{verb} {len(self.deleted_chunks)} chunks ({self.deleted_chunk_bytes} bytes) and "
                f"{len(self.deleted_manifests)} manifests; {self.referenced_chunks} chunks referenced, "
                f"{self.kept_young} unreferenced but younger than the grace period")


def collect(cat: Catalog, *, grace: float, keep: int, dry_run: bool) -> GcReport:
    rep = GcReport(dry_run=dry_run)
    store = cat.store
    t_start = time.time()
    try:
        # list chunks BEFORE marking: a chunk that appears later is not even a candidate
        chunks = list(store.list("chunks/"))
        volumes = {v.id: v for v in cat.list_volumes()}
        snapshots = cat.list_snapshots()
        gens: dict[str, list[tuple[int, str, float]]] = {}
        for info in store.list("volumes/"):
            m = _GEN_RE.fullmatch(info.key)
            if m:
                gens.setdefault(m.group(1), []).append((int(m.group(2)), info.key, info.mtime))
        referenced: set[str] = set()
        keep_keys: list[str] = []
        drop_keys: list[str] = []
        for vid, lst in gens.items():
            lst.sort()
            vol = volumes.get(vid)
            if vol is None:
                # a deleted volume (or a clone whose record write lost a race): old manifests go
                for g, key, mtime in lst:
                    (drop_keys if t_start - mtime > grace else keep_keys).append(key)
                continue
            committed = [g for g, _, _ in lst if g <= vol.generation]
            kept = set(committed[-(keep + 1):]) if committed else set()
            for g, key, mtime in lst:
                if g in kept or (g > vol.generation and t_start - mtime <= grace):
                    keep_keys.append(key)
                else:
                    drop_keys.append(key)
        for key in keep_keys:
            referenced |= Manifest.decode(store.get(key)[0]).referenced_hashes()
        for snap in snapshots:
            if snap.manifest_key:
                referenced |= Manifest.decode(store.get(snap.manifest_key)[0]).referenced_hashes()
            elif not snap.ready:
                # a snapshot being uploaded: its chunks are young, the grace period covers them
                pass
        rep.referenced_chunks = len(referenced)
        rep.chunk_objects = len(chunks)
        for info in chunks:
            h = info.key.rsplit("/", 1)[-1]
            if h in referenced:
                continue
            if t_start - info.mtime <= grace:
                rep.kept_young += 1
                continue
            rep.deleted_chunks.append(info.key)
            rep.deleted_chunk_bytes += info.size
            if not dry_run:
                store.delete(info.key)
        for key in drop_keys:
            rep.deleted_manifests.append(key)
            if not dry_run:
                store.delete(key)
    except StoreError as e:
        raise unavailable(f"object store {store.url}: {e}") from e
    log.info("gc: %s", rep.summary())
    return rep


def main(cfg: Config, *, dry_run: bool, grace: float, keep: int) -> int:
    from .stores import Stores
    try:
        rep = collect(Stores(cfg).catalog(), grace=grace, keep=keep, dry_run=dry_run)
    except CsiError as e:
        print(f"gc failed: {e}")
        return 1
    for key in rep.deleted_manifests:
        print(("would delete " if dry_run else "deleted ") + key)
    for key in rep.deleted_chunks:
        print(("would delete " if dry_run else "deleted ") + key)
    print(rep.summary())
    return 0
