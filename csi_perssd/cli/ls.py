"""`csi-perssd ls`: the volumes, snapshots and chunks the bucket holds, read from the bucket only."""
from __future__ import annotations

import json
import time
from typing import Any

from ..config import Config
from ..errors import CsiError
from ..remote import layout
from ..remote.catalog import Catalog
from ..remote.codec import manifest_refs
from ..remote.manifest import Manifest
from ..remote.store import StoreError
from ..snapshots import read_manifest
from ..stores import Stores
from .flags import config_from_args, store_flags


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ls", help="list volumes, snapshots and generations in the bucket")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                   help="table (default), wide (adds pool, claim, committing node, creation time) or json")
    store_flags(p)
    p.set_defaults(run=lambda args: ls(config_from_args(args), args.output))


OUTPUTS = ("table", "wide", "json")


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
                data = cat.get_manifest(v.id, v.generation)
                if v.encryption:
                    refs |= manifest_refs(data)     # sealed: only its public header without keys
                else:
                    m = Manifest.decode(data)
            except (CsiError, ValueError) as e:
                problems.append(f"volume {v.id}: {e}")
        if m is not None:
            logical += m.logical_bytes
            refs |= m.referenced_hashes()
        out_v.append({"id": v.id, "name": v.name, "size": v.size, "owner": v.owner, "epoch": v.epoch,
                      "generation": v.generation, "generations": gens, "mobility": v.mobility,
                      "persistence": v.persistence, "pool": v.pool,
                      "data_bytes": m.logical_bytes if m else 0, "claim": dict(v.claim),
                      "generation_node": v.generation_node, "created": v.created_at})
    out_s = []
    for s in snaps:
        m = None
        if s.manifest_key:
            try:
                if s.encryption:
                    refs |= manifest_refs(cat.store.get(s.manifest_key)[0])
                else:
                    m = read_manifest(cat, s.manifest_key)
            except (CsiError, ValueError, StoreError) as e:
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


def _claim(v: dict[str, Any]) -> str:
    c = v.get("claim") or {}
    return f"{c['namespace']}/{c['name']}" if c.get("name") else "-"


def _volume_lines(s: dict[str, Any], wide: bool) -> list[str]:
    base = (f"{'VOLUME':40} {'NAME':24} {'SIZE':>9} {'DATA':>9} {'GEN':>4} {'GENS':>5} {'OWNER':12} "
            f"{'EPOCH':>5} MOBILITY/PERSISTENCE")
    out = [f"{base}  {'POOL':12} {'CLAIM':32} {'COMMITTED-BY':12} CREATED" if wide else base]
    for v in s["volumes"]:
        line = (f"{v['id']:40} {v['name'][:24]:24} {_h(v['size']):>9} {_h(v['data_bytes']):>9} "
                f"{v['generation']:>4} {len(v['generations']):>5} {v['owner'] or '-':12} {v['epoch']:>5} "
                f"{v['mobility']}/{v['persistence']}")
        if wide:
            line = (f"{line:<{len(base)}}  {v['pool'] or '-':12} {_claim(v)[:32]:32} "
                    f"{v['generation_node'] or '-':12} {_t(v['created'])}")
        out.append(line)
    return out


def _snapshot_lines(s: dict[str, Any], wide: bool) -> list[str]:
    out = [f"{'SNAPSHOT':40} {'NAME':24} {'SOURCE':40} {'SIZE':>9} {'DATA':>9} READY CREATED"]
    for sn in s["snapshots"]:
        state = "" if sn["ready"] else f"  ({sn['error'] or sn['progress']})"
        name = sn["name"] if wide else sn["name"][:24]
        out.append(f"{sn['id']:40} {name:24} {sn['source']:40} {_h(sn['size']):>9} "
                   f"{_h(sn['data_bytes']):>9} {'yes' if sn['ready'] else 'no':5} {_t(sn['created'])}{state}")
    return out


def ls(cfg: Config, output: str = "table") -> int:
    s = summary(Stores(cfg).catalog())
    if output == "json":
        print(json.dumps(s, indent=2, sort_keys=True))
        return 1 if s["problems"] else 0
    wide = output == "wide"
    print("\n".join(_volume_lines(s, wide)))
    print("\n" + "\n".join(_snapshot_lines(s, wide)))
    print(f"\nchunks: {s['chunks']} objects, {_h(s['stored_bytes'])} stored for {_h(s['logical_bytes'])} of data "
          f"(dedup+compression ratio {s['dedup_ratio']:.2f}x); {s['unreferenced_chunks']} unreferenced (gc); "
          f"{s['flushes_in_progress']} flushes in progress")
    for p in s["problems"]:
        print(f"PROBLEM: {p}")
    return 1 if s["problems"] else 0
