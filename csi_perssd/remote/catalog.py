"""The catalog: typed records for volumes, snapshots and nodes, kept in the ObjectStore.

This is the driver's one state module; the keys it uses are built in `remote.layout`.
Listings cost O(what they return): `volume_page` and `snapshot_page` read one LIST page from a
token and GET only the records of that page that changed since this process last read them
(a `RecordCache` keyed by key and the LIST's version tag).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import Code, CsiError, Fenced, not_found, precondition
from . import layout
from .chunks import DEFAULT_COMPRESSION
from .layout import group_key, manifest_key, name_key, node_key, snapshot_key, volume_key
from .store import NotFound, ObjectInfo, ObjectStore, PreconditionFailed, reachable

__all__ = ["Catalog", "NodeRecord", "RecordCache", "SnapshotRecord", "VolumeRecord", "manifest_key",
           "name_key", "node_key", "snapshot_key", "volume_key"]
log = logging.getLogger(__name__)

SCHEMA = 1
CAS_RETRIES = 20
LIST_REUSE_S = 5.0          # a LIST page serves the next pages of a listing for this long


@dataclass
class VolumeRecord:
    id: str
    name: str
    size: int
    capabilities: list[dict[str, Any]]  # [{"access_type","fs_type","mount_flags","mode"}]
    mobility: str = "pool"              # pool | node
    persistence: str = "object"         # object | local
    pool: str = ""
    node: str = ""                      # the node a mobility=node volume lives on
    parameters: dict[str, str] = field(default_factory=dict)
    chunk_size: int = 4 << 20
    compression: int = DEFAULT_COMPRESSION
    owner: str = ""                     # node that holds ownership (ControllerPublish)
    epoch: int = 0                      # bumped on every ownership change
    generation: int = 0                 # committed generation, 0 = never flushed (all zero)
    generation_node: str = ""           # node that committed it (its local copy is current)
    source: dict[str, str] = field(default_factory=dict)   # {"snapshot": sid} | {"volume": vid}
    mutable_parameters: dict[str, str] = field(default_factory=dict)   # applied (modify.py)
    published: dict[str, Any] = field(default_factory=dict)  # {"capability", "readonly"} of the owner's publish
    state: str = "created"              # created | deleting
    encryption: dict[str, str] = field(default_factory=dict)  # wrapped lineage key (crypto.WrappedKey)
    created_at: float = field(default_factory=time.time)
    claim: dict[str, str] = field(default_factory=dict)    # PVC {"namespace","name","uid"} (params.claim)
    schema: int = SCHEMA
    etag: str = field(default="", compare=False, repr=False)


@dataclass
class SnapshotRecord:
    id: str
    name: str
    source_volume: str
    size: int
    generation: int = 0                 # manifest generation of the source volume it refers to
    manifest_key: str = ""              # key of the manifest it pins
    ready: bool = False
    node: str = ""                      # node doing the upload, when not ready
    progress: str = ""
    error: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    group: str = ""                     # group snapshot this one is a member of
    encryption: dict[str, str] = field(default_factory=dict)  # its source's lineage key, wrapped
    created_at: float = field(default_factory=time.time)
    schema: int = SCHEMA
    etag: str = field(default="", compare=False, repr=False)


@dataclass
class GroupSnapshotRecord:
    id: str
    name: str
    source_volumes: list[str]           # in request order
    snapshots: list[str]                # member snapshot IDs, one per source volume, same order
    parameters: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    node: str = ""                      # node cutting it (members staged there), when not ready
    error: str = ""
    error_code: str = ""                # grpc.StatusCode name of the error
    created_at: float = field(default_factory=time.time)   # the cut, once ready
    schema: int = SCHEMA
    etag: str = field(default="", compare=False, repr=False)


@dataclass
class NodeRecord:
    id: str
    pool: str
    total_bytes: int = 0
    available_bytes: int = 0
    reclaimable_bytes: int = 0          # clean cached copies that may be evicted
    max_volume_bytes: int = 0
    max_volumes: int = 0                # NodeGetInfo max_volumes_per_node (0 = no limit)
    version: str = ""
    heartbeat: float = field(default_factory=time.time)
    schema: int = SCHEMA
    etag: str = field(default="", compare=False, repr=False)


R = TypeVar("R", VolumeRecord, SnapshotRecord, NodeRecord, GroupSnapshotRecord)
N = TypeVar("N", VolumeRecord, SnapshotRecord, GroupSnapshotRecord)     # the records that have a name


def _encode(rec: Any) -> bytes:
    d = dataclasses.asdict(rec)
    d.pop("etag", None)
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _decode(cls: type[R], data: bytes, etag: str) -> R:
    d = json.loads(data)
    if d.get("schema", 0) > SCHEMA:
        raise CsiError(Code.FAILED_PRECONDITION,
                       f"catalog record schema {d.get('schema')} is newer than this driver ({SCHEMA})")
    known = {f.name for f in dataclasses.fields(cls)}
    rec = cls(**{k: v for k, v in d.items() if k in known})
    rec.etag = etag
    return rec


def check_owner(rec: VolumeRecord, node: str, epoch: int, consequence: str) -> None:
    """Raise Fenced unless `node` holds the volume with ownership epoch `epoch`: the record is
    the proof (epochs only grow, so another owner or epoch means the node was fenced out)."""
    if rec.owner != node or rec.epoch != epoch:
        raise Fenced(f"volume {rec.id}: node {node} (epoch {epoch}) no longer owns it "
                     f"(owner {rec.owner or '-'}, epoch {rec.epoch}); {consequence}")


class RecordCache:
    """Record bytes by key, valid while the LIST's version tag of the key is unchanged: a listing
    of records that did not change costs its LIST lines only. Bounded (least recently used go)."""

    def __init__(self, max_entries: int = 50_000):
        self.max_entries = max_entries
        self._mu = threading.Lock()
        self._d: OrderedDict[str, tuple[str, bytes, str]] = OrderedDict()   # key -> (tag, data, etag)
        self._pages: dict[str, list[tuple[float, list[ObjectInfo], str]]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str, tag: str) -> tuple[bytes, str] | None:
        with self._mu:
            hit = self._d.get(key)
            if hit is None or not tag or hit[0] != tag:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return hit[1], hit[2]

    def put(self, key: str, tag: str, data: bytes, etag: str) -> None:
        if not tag:
            return
        with self._mu:
            self._d[key] = (tag, data, etag)
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._mu:
            self._d.pop(key, None)
            self._pages.pop(key.split("/", 1)[0] + "/", None)     # this process changed the listing

    # -- LIST pages: a paginated listing reads each LIST page once -------------------------------
    def page_after(self, prefix: str, after: str) -> tuple[list[ObjectInfo], str] | None:
        """From a LIST page of the last LIST_REUSE_S seconds that holds the key `after`: the
        entries that follow it in the page (the server's order) and the server's continuation
        token for the page after it ("" when it was the last)."""
        now = time.monotonic()
        with self._mu:
            for t, infos, token in reversed(self._pages.get(prefix, [])):
                if now - t > LIST_REUSE_S:
                    continue
                keys = [i.key for i in infos]
                if after in keys:
                    return infos[keys.index(after) + 1:], token
        return None

    def remember_page(self, prefix: str, infos: list[ObjectInfo], token: str) -> None:
        with self._mu:
            pages = self._pages.setdefault(prefix, [])
            pages.append((time.monotonic(), infos, token))
            del pages[:-4]


@dataclass
class VolumePage:
    records: list[VolumeRecord]
    generations: dict[str, set[int]]    # manifests present in the store, per listed volume
    more: bool                          # records after the last one exist
    last: str = ""                      # the last ID listed: the next page starts after it
    manifests: list[tuple[str, int, ObjectInfo]] = field(default_factory=list)  # (vid, gen, info) seen


@dataclass
class SnapshotPage:
    records: list[SnapshotRecord]
    more: bool
    last: str = ""


class Catalog:
    """Typed records with conditional updates. All methods raise CsiError (UNAVAILABLE when the
    store cannot be reached), never StoreError."""

    def __init__(self, store: ObjectStore, cache: RecordCache | None = None):
        self.store = store
        self.cache = cache if cache is not None else RecordCache()

    # -- low level -------------------------------------------------------------------------
    def _get(self, cls: type[R], key: str) -> R | None:
        try:
            with reachable(self.store):
                data, etag = self.store.get(key)
        except NotFound:
            return None
        return _decode(cls, data, etag)

    def _listed(self, cls: type[R], info: ObjectInfo) -> R | None:
        """The record a listing names: from the cache while its version tag is unchanged."""
        hit = self.cache.get(info.key, info.etag)
        if hit is not None:
            return _decode(cls, hit[0], hit[1])
        try:
            with reachable(self.store):
                data, etag = self.store.get(info.key)
        except NotFound:
            return None                 # deleted since the LIST
        rec = _decode(cls, data, etag)
        self.cache.put(info.key, info.etag, data, etag)
        return rec

    def _put(self, key: str, rec: Any, *, create: bool = False) -> None:
        with reachable(self.store):
            rec.etag = self.store.put(key, _encode(rec), if_none_match=create,
                                      if_match=None if create or not rec.etag else rec.etag)
        self.cache.drop(key)

    def _delete(self, key: str) -> None:
        with reachable(self.store):
            self.store.delete(key)
        self.cache.drop(key)

    def _update(self, cls: type[R], key: str, fn: Callable[[R], None], what: str) -> R:
        rec = self._update_existing(cls, key, fn, what)
        if rec is None:
            raise not_found(f"{what} not found")
        return rec

    def _update_existing(self, cls: type[R], key: str, fn: Callable[[R], None], what: str) -> R | None:
        """Read-modify-write with If-Match (retried on a lost race); None when there is no record."""
        for _ in range(CAS_RETRIES):
            rec = self._get(cls, key)
            if rec is None:
                return None
            fn(rec)
            try:
                self._put(key, rec)
                return rec
            except PreconditionFailed:
                time.sleep(0.01)
                continue
        raise CsiError(Code.ABORTED, f"{what}: too many concurrent updates, try again")

    def _scan(self, prefix: str, after_key: str) -> Iterator[ObjectInfo]:
        """Objects under prefix after after_key; a LIST page read moments ago (the previous page
        of a paginated listing) is not read again for the next page."""
        # only a continuation (after a token) reuses: a listing that starts sees every writer
        hit = self.cache.page_after(prefix, after_key) if after_key else None
        token = ""
        if hit is not None:
            rest, token = hit
            yield from rest
            if not token:
                return
            after_key = ""
        with reachable(self.store):
            for page, nxt in self.store.scan_pages(prefix, after_key, token):
                self.cache.remember_page(prefix, page, nxt)
                yield from page

    def _records(self, cls: type[R], prefix: str, after_id: str, limit: int,
                 key: Callable[[str], str], on_other: Callable[[ObjectInfo], None] | None = None
                 ) -> tuple[list[R], bool, str]:
        """Records directly under prefix with IDs after after_id in key order, at most limit
        (0: all), whether more exist, and the last listed ID (the next page starts after it,
        even when that record vanished before its GET). Reads LIST pages only as far as needed."""
        infos: list[ObjectInfo] = []
        more = False
        seen: set[str] = set()          # a page boundary may list a key twice (server order)
        for info in self._scan(prefix, key(after_id) if after_id else ""):
            if info.key in seen:
                continue
            seen.add(info.key)
            rid = layout.record_id(prefix, info.key)
            if rid is not None and after_id and rid == after_id:
                continue                # the token's own record, listed again after its manifests
            if rid is None:
                if on_other is not None:
                    on_other(info)
                continue
            if limit and len(infos) == limit:
                more = True
                break
            infos.append(info)
        infos.sort(key=lambda i: i.key.encode())
        recs = [r for r in (self._listed(cls, i) for i in infos) if r is not None]
        last = (layout.record_id(prefix, infos[-1].key) or "") if infos else ""
        return recs, more, last

    def _create_named(self, cls: type[N], kind: str, rec: N, key: str) -> tuple[N, bool]:
        """Create rec unless `name` already maps to a record; return (record, created)."""
        nkey = name_key(kind, rec.name)
        with reachable(self.store):
            for _ in range(CAS_RETRIES):
                got = self._claim_name(cls, nkey, rec, key)
                if got is not None:
                    return got
        raise CsiError(Code.ABORTED, f"name {rec.name!r}: too many concurrent creations")

    def _claim_name(self, cls: type[N], nkey: str, rec: N, key: str) -> tuple[N, bool] | None:
        """One round of `_create_named`; None: lost a race, try again."""
        try:
            data, etag = self.store.get(nkey)
            existing = self._get(cls, key.replace(rec.id, json.loads(data)["id"]))
            if existing is not None:
                return existing, False
            # stale name (a delete crashed half-way): take it over
            try:
                self.store.put(nkey, json.dumps({"id": rec.id}).encode(), if_match=etag)
            except PreconditionFailed:
                return None
            self._put(key, rec, create=True)
            return rec, True
        except NotFound:
            pass
        self._put(key, rec, create=True)
        try:
            self.store.put(nkey, json.dumps({"id": rec.id}).encode(), if_none_match=True)
        except PreconditionFailed:
            self._delete(key)   # someone created the same name first: theirs wins
            rec.etag = ""
            return None
        return rec, True

    # -- volumes ---------------------------------------------------------------------------
    def create_volume(self, rec: VolumeRecord) -> tuple[VolumeRecord, bool]:
        return self._create_named(VolumeRecord, "names", rec, volume_key(rec.id))

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        try:
            with reachable(self.store):
                data, _ = self.store.get(name_key("names", name))
        except NotFound:
            return None
        return self.get_volume(json.loads(data)["id"])

    def get_volume(self, vid: str) -> VolumeRecord | None:
        return self._get(VolumeRecord, volume_key(vid))

    def volume_exists(self, vid: str) -> bool:
        """One HEAD: whether the volume's record is there (a node checking its own copies)."""
        with reachable(self.store):
            return self.store.head(volume_key(vid)) is not None

    def volume(self, vid: str) -> VolumeRecord:
        rec = self.get_volume(vid)
        if rec is None:
            raise not_found(f"volume {vid} does not exist")
        return rec

    def update_volume(self, vid: str, fn: Callable[[VolumeRecord], None]) -> VolumeRecord:
        return self._update(VolumeRecord, volume_key(vid), fn, f"volume {vid}")

    def volume_page(self, after: str = "", limit: int = 0) -> VolumePage:
        """Volumes with IDs after `after` (key order), at most `limit` (0: all), with the
        generations whose manifests exist — from the same LIST, no request per volume."""
        gens: dict[str, set[int]] = {}
        manifests: list[tuple[str, int, ObjectInfo]] = []

        def other(info: ObjectInfo) -> None:
            parsed = layout.parse_manifest_key(info.key)
            if parsed is not None:
                gens.setdefault(parsed[0], set()).add(parsed[1])
                manifests.append((parsed[0], parsed[1], info))
        recs, more, last = self._records(VolumeRecord, layout.VOLUMES, after, limit, volume_key, other)
        return VolumePage(recs, {r.id: gens.get(r.id, set()) for r in recs}, more, last, manifests)

    def list_volumes(self) -> list[VolumeRecord]:
        return sorted(self.volume_page().records, key=lambda r: (r.created_at, r.id))

    def delete_volume(self, rec: VolumeRecord) -> None:
        """Remove the record and its name; manifests and chunks are left to garbage collection
        (remote/gc.py removes the manifests of volumes that no longer exist once they are past the
        grace period)."""
        self._delete(volume_key(rec.id))
        self._delete(name_key("names", rec.name))

    # -- generations -----------------------------------------------------------------------
    def put_manifest(self, vid: str, gen: int, data: bytes) -> int:
        """Store a manifest under the first free generation >= gen; return that generation."""
        with reachable(self.store):
            for _ in range(100):
                try:
                    self.store.put(manifest_key(vid, gen), data, if_none_match=True)
                    return gen
                except PreconditionFailed:
                    gen += 1        # a fenced-out node left an uncommitted manifest here
        raise CsiError(Code.INTERNAL, f"volume {vid}: cannot find a free generation number")

    def get_manifest(self, vid: str, gen: int) -> bytes:
        try:
            with reachable(self.store):
                return self.store.get(manifest_key(vid, gen))[0]
        except NotFound:
            raise CsiError(Code.DATA_LOSS, f"volume {vid}: manifest of generation {gen} is missing") from None

    def list_generations(self, vid: str) -> list[int]:
        with reachable(self.store):
            keys = [i.key for i in self.store.list(layout.generations_prefix(vid))]
        parsed = (layout.parse_manifest_key(k) for k in keys)
        return sorted(p[1] for p in parsed if p is not None)

    def delete_manifest(self, vid: str, gen: int) -> None:
        self._delete(manifest_key(vid, gen))

    def commit_generation(self, vid: str, gen: int, node: str, epoch: int) -> VolumeRecord:
        """Make `gen` the committed generation, fenced by ownership: only the owner with the
        current epoch may commit (a conditional write on the record's ETag)."""
        def apply(rec: VolumeRecord) -> None:
            check_owner(rec, node, epoch, f"generation {gen} not committed")
            if gen <= rec.generation:
                raise precondition(f"volume {vid}: generation {rec.generation} is already committed")
            rec.generation = gen
            rec.generation_node = node
        return self.update_volume(vid, apply)

    def keep_generation(self, vid: str, gen: int, node: str, epoch: int) -> VolumeRecord:
        """`node` releases the volume with nothing changed since generation `gen`: no new
        generation; its copy is current (generation_node), fenced by ownership like a commit."""
        def apply(rec: VolumeRecord) -> None:
            check_owner(rec, node, epoch, "local data kept")
            if rec.generation != gen:
                raise precondition(f"volume {vid}: generation {rec.generation} is committed, not {gen}")
            rec.generation_node = node
        return self.update_volume(vid, apply)

    # -- snapshots -------------------------------------------------------------------------
    def create_snapshot(self, rec: SnapshotRecord) -> tuple[SnapshotRecord, bool]:
        return self._create_named(SnapshotRecord, "snapnames", rec, snapshot_key(rec.id))

    def get_snapshot(self, sid: str) -> SnapshotRecord | None:
        return self._get(SnapshotRecord, snapshot_key(sid))

    def update_snapshot(self, sid: str, fn: Callable[[SnapshotRecord], None]) -> SnapshotRecord:
        return self._update(SnapshotRecord, snapshot_key(sid), fn, f"snapshot {sid}")

    def update_snapshot_if_exists(self, sid: str, fn: Callable[[SnapshotRecord], None]) -> SnapshotRecord | None:
        """`update_snapshot`, but None (nothing written) when the snapshot was deleted."""
        return self._update_existing(SnapshotRecord, snapshot_key(sid), fn, f"snapshot {sid}")

    def snapshot_page(self, after: str = "", limit: int = 0) -> SnapshotPage:
        recs, more, last = self._records(SnapshotRecord, layout.SNAPSHOTS, after, limit, snapshot_key)
        return SnapshotPage(recs, more, last)

    def list_snapshots(self) -> list[SnapshotRecord]:
        return sorted(self.snapshot_page().records, key=lambda r: (r.created_at, r.id))

    def delete_snapshot(self, rec: SnapshotRecord) -> None:
        self._delete(snapshot_key(rec.id))
        self._delete(name_key("snapnames", rec.name))

    # -- group snapshots -------------------------------------------------------------------
    def create_group(self, rec: GroupSnapshotRecord) -> tuple[GroupSnapshotRecord, bool]:
        return self._create_named(GroupSnapshotRecord, "groupnames", rec, group_key(rec.id))

    def get_group(self, gid: str) -> GroupSnapshotRecord | None:
        return self._get(GroupSnapshotRecord, group_key(gid))

    def update_group(self, gid: str, fn: Callable[[GroupSnapshotRecord], None]) -> GroupSnapshotRecord:
        return self._update(GroupSnapshotRecord, group_key(gid), fn, f"group snapshot {gid}")

    def update_group_if_exists(self, gid: str, fn: Callable[[GroupSnapshotRecord], None]) -> GroupSnapshotRecord | None:
        """`update_group`, but None (nothing written) when the group snapshot was deleted."""
        return self._update_existing(GroupSnapshotRecord, group_key(gid), fn, f"group snapshot {gid}")

    def delete_group(self, rec: GroupSnapshotRecord) -> None:
        self._delete(group_key(rec.id))
        self._delete(name_key("groupnames", rec.name))

    # -- nodes -----------------------------------------------------------------------------
    def put_node(self, rec: NodeRecord) -> None:
        rec.etag = ""
        self._put(node_key(rec.id), rec)

    def get_node(self, node: str) -> NodeRecord | None:
        return self._get(NodeRecord, node_key(node))

    def list_nodes(self) -> list[NodeRecord]:
        recs, _, _ = self._records(NodeRecord, layout.NODES, "", 0, node_key)
        return sorted(recs, key=lambda r: r.id)
