"""`csi-perssd inspect`: one volume or snapshot in detail (record, generations, manifest): as JSON
(`-o json`, the default), or as `key: value` lines for people (`-o wide`)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import encryption, ids
from ..config import Config
from ..crypto import envelope
from ..errors import CsiError
from ..remote.layout import snapshot_manifest_key
from ..remote.manifest import Manifest
from ..remote.store import StoreError
from ..stores import Stores
from .flags import config_from_args, store_flags


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show one volume or snapshot in detail")
    p.add_argument("id")
    p.add_argument("-o", "--output", choices=("json", "wide"), default="json",
                   help="json (default) or wide: every field as an aligned `key: value` line")
    store_flags(p)
    p.set_defaults(run=lambda args: inspect(config_from_args(args), args.id, args.output))


def _lines(d: dict[str, Any], indent: str = "") -> list[str]:
    """Nested dicts as indented `key: value` lines; lists of scalars joined with commas."""
    width = max((len(k) for k in d), default=0) + 1
    out = []
    for k in sorted(d):
        v = d[k]
        if isinstance(v, dict) and v:
            out.append(f"{indent}{k}:")
            out += _lines(v, indent + "  ")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{indent}{k}:")
            for x in v:                 # YAML-like: "- " opens each item
                item = _lines(x, indent + "    ")
                item[0] = indent + "  - " + item[0][len(indent) + 4:]
                out += item
        elif isinstance(v, list):
            out.append(f"{indent}{k + ':':{width}} {', '.join(map(str, v)) or '-'}")
        else:
            out.append(f"{indent}{k + ':':{width}} {'-' if v in ('', None, {}) else v}")
    return out


def inspect(cfg: Config, ident: str, output: str = "json") -> int:
    cat = Stores(cfg).catalog()
    try:
        if ident.startswith(ids.SNAPSHOT_PREFIX):
            rec: Any = cat.get_snapshot(ident)
            key = rec.manifest_key or snapshot_manifest_key(ident) if rec and rec.ready else ""
            data = cat.store.get(key)[0] if key else b""
        else:
            rec = cat.get_volume(ident)
            data = cat.get_manifest(ident, rec.generation) if rec and rec.generation else b""
        m = _manifest_view(data) if data else None
    except (CsiError, ValueError, StoreError) as e:
        print(f"inspect {ident}: {e}")
        return 1
    if rec is None:
        print(f"{ident}: not found")
        return 1
    d = dataclasses.asdict(rec)
    d.pop("etag", None)
    d["encryption"] = encryption.public_view(rec.encryption)     # never the wrapped key
    if not ident.startswith(ids.SNAPSHOT_PREFIX):
        d["generations"] = cat.list_generations(ident)
    if m is not None:
        d["manifest"] = m
    if output == "wide":
        print("\n".join(_lines(d)))
    else:
        print(json.dumps(d, indent=2, sort_keys=True))
    return 0


def _manifest_view(data: bytes) -> dict[str, Any]:
    """What a manifest shows without keys: everything when plain; the public header when sealed."""
    if envelope.is_sealed_meta(data):
        h = envelope.read_header(data)
        return {"encrypted": True, "lineage": h.lineage, "distinct_chunks": len(h.refs), **h.numbers}
    m = Manifest.decode(data)
    return {"volume_size": m.volume_size, "chunk_size": m.chunk_size, "data_chunks": m.data_chunks,
            "hole_chunks": m.hole_chunks, "logical_bytes": m.logical_bytes,
            "stored_bytes": m.stored_bytes, "stats": m.stats}
