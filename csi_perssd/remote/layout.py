"""The bucket layout: every object key the driver writes, built and parsed here and nowhere else.

Keys are relative to the store's root (an S3 prefix or a directory):

  names/<sha256(name)>            {"id": vid}          CreateVolume idempotency (If-None-Match)
  volumes/<vid>.json              VolumeRecord         updated with If-Match on the ETag
  volumes/<vid>/gen/<n>.manifest  manifest of generation n (written once, If-None-Match)
  snapnames/<sha256(name)>        {"id": sid}
  snapshots/<sid>.json            SnapshotRecord
  snapshots/<sid>.manifest        the manifest a snapshot pins
  groupnames/<sha256(name)>       {"id": gid}
  groupsnaps/<gid>.json           GroupSnapshotRecord (its members are normal snapshots)
  nodes/<node>.json               NodeRecord (capacity; rewritten when it changes)
  nodes/<node>.wake               rewritten by the controller after it queues work for <node>
  nodes/probe.json                never written: a HEAD on it proves a set of store settings
  requests/<node>/<sid>.json      work for a node (a snapshot of a volume it has staged)
  grouprequests/<node>/<gid>.json work for a node (cut a group snapshot: groupcut.py)
  chunks/<h0h1>/<blake3 hex>      chunk blobs (content-addressed)
  gc/running/<run>.json           a collector's tomb while it runs
  gc/last-run.json                rewritten at the start of every collection
  gc/claims/<id>.json             a writer's claim on the chunks of a manifest it is committing

Every builder validates the IDs and hashes it is given (ids.*, a hex digest) so no caller can make an
odd key; every parser returns None for a key that is not of its kind.
"""
from __future__ import annotations

import hashlib
import re

from .. import ids

VOLUMES = "volumes/"
SNAPSHOTS = "snapshots/"
NODES = "nodes/"
REQUESTS = "requests/"
GROUPS = "groupsnaps/"
GROUP_REQUESTS = "grouprequests/"
CHUNKS = "chunks/"
GC_RUNNING = "gc/running/"
GC_LAST_RUN = "gc/last-run.json"
GC_CLAIMS = "gc/claims/"
PROBE_KEY = "nodes/probe.json"      # HEAD only: absent is fine, any answer proves the settings
RECORD_SUFFIX = ".json"

_GEN_RE = re.compile(r"volumes/([^/]+)/gen/(\d+)\.manifest")
_SNAP_MANIFEST_RE = re.compile(r"snapshots/([^/]+)\.manifest")
_REQUEST_RE = re.compile(r"requests/([^/]+)/([^/]+)\.json")
_CHUNK_RE = re.compile(r"chunks/[0-9a-f]{2}/([0-9a-f]{64})")
_HASH_RE = re.compile(r"[0-9a-f]{64}")     # a BLAKE3 digest in hex, as chunks.chunk_hash gives


# -- builders ------------------------------------------------------------------------------------
def name_key(kind: str, name: str) -> str:
    """kind: "names" (volumes), "snapnames" (snapshots) or "groupnames" (group snapshots)."""
    if kind not in ("names", "snapnames", "groupnames"):
        raise ValueError(f"unknown name kind {kind!r}")
    return f"{kind}/{hashlib.sha256(name.encode()).hexdigest()}"


def volume_key(vid: str) -> str:
    return f"{VOLUMES}{ids.volume_id(vid)}{RECORD_SUFFIX}"


def generations_prefix(vid: str) -> str:
    return f"{VOLUMES}{ids.volume_id(vid)}/gen/"


def manifest_key(vid: str, gen: int) -> str:
    return f"{generations_prefix(vid)}{gen:010d}.manifest"


def snapshot_key(sid: str) -> str:
    return f"{SNAPSHOTS}{ids.snapshot_id(sid)}{RECORD_SUFFIX}"


def snapshot_manifest_key(sid: str) -> str:
    return f"{SNAPSHOTS}{ids.snapshot_id(sid)}.manifest"


def group_key(gid: str) -> str:
    return f"{GROUPS}{ids.group_snapshot_id(gid)}{RECORD_SUFFIX}"


def group_requests_prefix(node: str) -> str:
    return f"{GROUP_REQUESTS}{ids.node_id(node)}/"


def group_request_key(node: str, gid: str) -> str:
    return f"{group_requests_prefix(node)}{ids.group_snapshot_id(gid)}{RECORD_SUFFIX}"


def node_key(node: str) -> str:
    return f"{NODES}{ids.node_id(node)}{RECORD_SUFFIX}"


def wake_key(node: str) -> str:
    return f"{NODES}{ids.node_id(node)}.wake"


def requests_prefix(node: str) -> str:
    return f"{REQUESTS}{ids.node_id(node)}/"


def request_key(node: str, sid: str) -> str:
    return f"{requests_prefix(node)}{ids.snapshot_id(sid)}{RECORD_SUFFIX}"


def chunk_key(h: str) -> str:
    """Object key of a chunk: chunks/<first two hex chars>/<hash>."""
    if not isinstance(h, str) or _HASH_RE.fullmatch(h) is None:
        raise ValueError(f"not a chunk hash: {str(h)[:80]!r}")
    return f"{CHUNKS}{h[:2]}/{h}"


def gc_tomb_key(run: str) -> str:
    return f"{GC_RUNNING}{run}{RECORD_SUFFIX}"


def gc_claim_key(claim: str) -> str:
    return f"{GC_CLAIMS}{claim}{RECORD_SUFFIX}"


# -- parsers -------------------------------------------------------------------------------------
def record_id(prefix: str, key: str) -> str | None:
    """The ID in `<prefix><id>.json` (a record directly under prefix), else None."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    if "/" in rest or not rest.endswith(RECORD_SUFFIX) or len(rest) <= len(RECORD_SUFFIX):
        return None
    return rest[:-len(RECORD_SUFFIX)]


def parse_manifest_key(key: str) -> tuple[str, int] | None:
    """(volume ID, generation) of volumes/<vid>/gen/<n>.manifest."""
    m = _GEN_RE.fullmatch(key)
    return (m.group(1), int(m.group(2))) if m else None


def parse_snapshot_manifest_key(key: str) -> str | None:
    m = _SNAP_MANIFEST_RE.fullmatch(key)
    return m.group(1) if m else None


def parse_request_key(key: str) -> tuple[str, str] | None:
    """(node, snapshot ID) of requests/<node>/<sid>.json."""
    m = _REQUEST_RE.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def parse_chunk_key(key: str) -> str | None:
    """The hash of chunks/<h0h1>/<hash> (None for anything else, e.g. a foreign object)."""
    m = _CHUNK_RE.fullmatch(key)
    if m is None or key[len(CHUNKS):len(CHUNKS) + 2] != m.group(1)[:2]:
        return None
    return m.group(1)
