"""`csi-perssd ls` and `csi-perssd inspect`: what the bucket holds, read from the bucket only."""
from __future__ import annotations

import json
import time
from typing import Any

from . import ids
from .config import Config
from .errors import CsiError
from .remote import layout
from .remote.catalog import Catalog
from .remote.manifest import Manifest
from .remote.layout import snapshot_manifest_key
from .snapshots import read_manifest
from .stores import Stores


def _h(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _t(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def summary(cat: Catalog) -> dict[str, Any]:
    vols, snaps = cat.list_volumes(), cat.list_snapshots()
    chunk_bytes = {i.key.rsplit("/", 1)[-1]: i.size for i in cat.store.list(layout.CHUNKS)}
    logical = 0
    refs: set[str] = set()
    out_v = []
    problems: list[str] = []
    for v in vols:
        gens = cat.list_generations(v.id)
        m = None
        if v.generation:
            try:
                m = Manifest.decode(cat.get_manifest(v.id, v.generation))
            except CsiError as e:
                problems.append(f"volume {v.id}: {e}")
        if m is not None:
            logical += m.logical_bytes
            refs |= m.referenced_hashes()
        out_v.append({"id": v.id, "name": v.name, "size": v.size, "owner": v.owner, "epoch": v.epoch,
                      "generation": v.generation, "generations": gens, "mobility": v.mobility,
                      "persistence": v.persistence, "pool": v.pool,
                      "data_bytes": m.logical_bytes if m else 0})
    out_s = []
    for s in snaps:
        m = None
        if s.manifest_key:
            try:
                m = read_manifest(cat, s.manifest_key)
            except CsiError as e:
                problems.append(f"snapshot {s.id}: {e}")
        if m is not None:
            logical += m.logical_bytes
            refs |= m.referenced_hashes()
        out_s.append({"id": s.id, "name": s.name, "source": s.source_volume, "size": s.size,
                      "ready": s.ready, "created": s.created_at, "data_bytes": m.logical_bytes if m else 0,
                      "progress": s.progress, "error": s.error})
    stored = sum(chunk_bytes.values())
    return {"volumes": out_v, "snapshots": out_s, "chunks": len(chunk_bytes), "stored_bytes": stored,
            "logical_bytes": logical, "unreferenced_chunks": len(set(chunk_bytes) - refs),
            "dedup_ratio": (logical / stored) if stored else 0.0, "problems": problems,
            "flushes_in_progress": sum(1 for _ in cat.store.list(layout.GC_CLAIMS))}


def ls(cfg: Config) -> int:
    s = summary(Stores(cfg).catalog())
    print(f"{'VOLUME':40} {'NAME':24} {'SIZE':>9} {'DATA':>9} {'GEN':>4} {'GENS':>5} {'OWNER':12} {'EPOCH':>5} MOBILITY/PERSISTENCE")
    for v in s["volumes"]:
        print(f"{v['id']:40} {v['name'][:24]:24} {_h(v['size']):>9} {_h(v['data_bytes']):>9} {v['generation']:>4} "
              f"{len(v['generations']):>5} {v['owner'] or '-':12} {v['epoch']:>5} {v['mobility']}/{v['persistence']}")
    print(f"\n{'SNAPSHOT':40} {'NAME':24} {'SOURCE':40} {'SIZE':>9} {'DATA':>9} READY CREATED")
    for sn in s["snapshots"]:
        print(f"{sn['id']:40} {sn['name'][:24]:24} {sn['source']:40} {_h(sn['size']):>9} {_h(sn['data_bytes']):>9} "
              f"{'yes' if sn['ready'] else 'no':5} {_t(sn['created'])}"
              + ("" if sn["ready"] else f"  ({sn['error'] or sn['progress']})"))
    print(f"\nchunks: {s['chunks']} objects, {_h(s['stored_bytes'])} stored for {_h(s['logical_bytes'])} of data "
          f"(dedup+compression ratio {s['dedup_ratio']:.2f}x); {s['unreferenced_chunks']} unreferenced (gc); "
          f"{s['flushes_in_progress']} flushes in progress")
    for p in s["problems"]:
        print(f"PROBLEM: {p}")
    return 1 if s["problems"] else 0


def inspect(cfg: Config, ident: str) -> int:
    cat = Stores(cfg).catalog()
    try:
        if ident.startswith(ids.SNAPSHOT_PREFIX):
            rec: Any = cat.get_snapshot(ident)
            m = read_manifest(cat, rec.manifest_key or snapshot_manifest_key(ident)) if rec and rec.ready else None
        else:
            rec = cat.get_volume(ident)
            m = Manifest.decode(cat.get_manifest(ident, rec.generation)) if rec and rec.generation else None
    except CsiError as e:
        print(f"inspect {ident}: {e}")
        return 1
    if rec is None:
        print(f"{ident}: not found")
        return 1
    import dataclasses
    d = dataclasses.asdict(rec)
    d.pop("etag", None)
    if not ident.startswith(ids.SNAPSHOT_PREFIX):
        d["generations"] = cat.list_generations(ident)
    if m is not None:
        d["manifest"] = {"volume_size": m.volume_size, "chunk_size": m.chunk_size, "data_chunks": m.data_chunks,
                         "hole_chunks": m.hole_chunks, "logical_bytes": m.logical_bytes,
                         "stored_bytes": m.stored_bytes, "stats": m.stats}
    print(json.dumps(d, indent=2, sort_keys=True))
    return 0
