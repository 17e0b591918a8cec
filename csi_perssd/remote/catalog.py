"""The catalog: typed records for volumes, snapshots and nodes, kept in the ObjectStore.

This is the driver's one state module. Layout under the store (see DESIGN.md):
  names/<sha256(name)>            -> {"id": vid}           (CreateVolume idempotency, If-None-Match)
  volumes/<vid>.json              VolumeRecord             (updated with If-Match on the ETag)
  volumes/<vid>/gen/<n>.manifest  manifest of generation n (written once, If-None-Match)
  snapnames/<sha256(name)>        -> {"id": sid}
  snapshots/<sid>.json            SnapshotRecord
  nodes/<node>.json               NodeRecord (heartbeat)
  requests/<node>/<sid>.json      work for a node (snapshot of a staged volume)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import ids
from ..errors import Code, CsiError, Fenced, not_found, precondition, unavailable
from .store import NotFound, ObjectStore, PreconditionFailed, StoreError

log = logging.getLogger(__name__)

SCHEMA = 1
CAS_RETRIES = 20


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
    compression: int = 3
    owner: str = ""                     # node that holds ownership (ControllerPublish)
    epoch: int = 0                      # bumped on every ownership change
    generation: int = 0                 # committed generation, 0 = never flushed (all zero)
    generation_node: str = ""           # node that committed it (its local copy is current)
    source: dict[str, str] = field(default_factory=dict)   # {"snapshot": sid} | {"volume": vid}
    state: str = "created"              # created | deleting
    encryption: dict[str, str] = field(default_factory=dict)  # wrapped lineage key (crypto.WrappedKey)
    created_at: float = field(default_factory=time.time)
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
    encryption: dict[str, str] = field(default_factory=dict)  # its source's lineage key, wrapped
    created_at: float = field(default_factory=time.time)
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
    version: str = ""
    heartbeat: float = field(default_factory=time.time)
    schema: int = SCHEMA
    etag: str = field(default="", compare=False, repr=False)


R = TypeVar("R", VolumeRecord, SnapshotRecord, NodeRecord)
N = TypeVar("N", VolumeRecord, SnapshotRecord)     # the records that have a name


def name_key(kind: str, name: str) -> str:
    return f"{kind}/{hashlib.sha256(name.encode()).hexdigest()}"


def volume_key(vid: str) -> str:
    return f"volumes/{ids.volume_id(vid)}.json"


def manifest_key(vid: str, gen: int) -> str:
    return f"volumes/{ids.volume_id(vid)}/gen/{gen:010d}.manifest"


def snapshot_key(sid: str) -> str:
    return f"snapshots/{ids.snapshot_id(sid)}.json"


def node_key(node: str) -> str:
    return f"nodes/{ids.node_id(node)}.json"


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


class Catalog:
    """Typed records with conditional updates. All methods raise CsiError (UNAVAILABLE when the
    store cannot be reached), never StoreError."""

    def __init__(self, store: ObjectStore):
        self.store = store

    # -- low level -------------------------------------------------------------------------
    def _get(self, cls: type[R], key: str) -> R | None:
        try:
            data, etag = self.store.get(key)
        except NotFound:
            return None
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e
        return _decode(cls, data, etag)

    def _put(self, key: str, rec: Any, *, create: bool = False) -> None:
        try:
            rec.etag = self.store.put(key, _encode(rec), if_none_match=create,
                                      if_match=None if create or not rec.etag else rec.etag)
        except PreconditionFailed:
            raise
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e

    def _delete(self, key: str) -> None:
        try:
            self.store.delete(key)
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e

    def _update(self, cls: type[R], key: str, fn: Callable[[R], None], what: str) -> R:
        for _ in range(CAS_RETRIES):
            rec = self._get(cls, key)
            if rec is None:
                raise not_found(f"{what} not found")
            fn(rec)
            try:
                self._put(key, rec)
                return rec
            except PreconditionFailed:
                time.sleep(0.01)
                continue
        raise CsiError(Code.ABORTED, f"{what}: too many concurrent updates, try again")

    def _list(self, cls: type[R], prefix: str) -> Iterator[R]:
        try:
            infos = list(self.store.list(prefix))
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e
        for info in infos:
            rest = info.key[len(prefix):]
            if "/" in rest or not rest.endswith(".json"):
                continue
            rec = self._get(cls, info.key)
            if rec is not None:
                yield rec

    def _create_named(self, cls: type[N], kind: str, rec: N, key: str) -> tuple[N, bool]:
        """Create rec unless `name` already maps to a record; return (record, created)."""
        nkey = name_key(kind, rec.name)
        for _ in range(CAS_RETRIES):
            try:
                data, etag = self.store.get(nkey)
                existing_id = json.loads(data)["id"]
                existing = self._get(cls, key.replace(rec.id, existing_id))
                if existing is not None:
                    return existing, False
                # stale name (a delete crashed half-way): take it over
                try:
                    self.store.put(nkey, json.dumps({"id": rec.id}).encode(), if_match=etag)
                except PreconditionFailed:
                    continue
                self._put(key, rec, create=True)
                return rec, True
            except NotFound:
                pass
            except StoreError as e:
                raise unavailable(f"object store {self.store.url}: {e}") from e
            try:
                self._put(key, rec, create=True)
                try:
                    self.store.put(nkey, json.dumps({"id": rec.id}).encode(), if_none_match=True)
                except PreconditionFailed:
                    self._delete(key)   # someone created the same name first: theirs wins
                    rec.etag = ""
                    continue
                return rec, True
            except StoreError as e:
                raise unavailable(f"object store {self.store.url}: {e}") from e
        raise CsiError(Code.ABORTED, f"name {rec.name!r}: too many concurrent creations")

    # -- volumes ---------------------------------------------------------------------------
    def create_volume(self, rec: VolumeRecord) -> tuple[VolumeRecord, bool]:
        return self._create_named(VolumeRecord, "names", rec, volume_key(rec.id))

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        try:
            data, _ = self.store.get(name_key("names", name))
        except NotFound:
            return None
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e
        return self.get_volume(json.loads(data)["id"])

    def get_volume(self, vid: str) -> VolumeRecord | None:
        return self._get(VolumeRecord, volume_key(vid))

    def volume(self, vid: str) -> VolumeRecord:
        rec = self.get_volume(vid)
        if rec is None:
            raise not_found(f"volume {vid} does not exist")
        return rec

    def update_volume(self, vid: str, fn: Callable[[VolumeRecord], None]) -> VolumeRecord:
        return self._update(VolumeRecord, volume_key(vid), fn, f"volume {vid}")

    def list_volumes(self) -> list[VolumeRecord]:
        return sorted(self._list(VolumeRecord, "volumes/"), key=lambda r: (r.created_at, r.id))

    def delete_volume(self, rec: VolumeRecord) -> None:
        """Remove the record and its name; manifests and chunks are left to garbage collection
        (gc.py removes the manifests of volumes that no longer exist once they are past the grace period)."""
        self._delete(volume_key(rec.id))
        self._delete(name_key("names", rec.name))

    # -- generations -----------------------------------------------------------------------
    def put_manifest(self, vid: str, gen: int, data: bytes) -> int:
        """Store a manifest under the first free generation >= gen; return that generation."""
        for _ in range(100):
            try:
                self.store.put(manifest_key(vid, gen), data, if_none_match=True)
                return gen
            except PreconditionFailed:
                gen += 1        # a fenced-out node left an uncommitted manifest here
            except StoreError as e:
                raise unavailable(f"object store {self.store.url}: {e}") from e
        raise CsiError(Code.INTERNAL, f"volume {vid}: cannot find a free generation number")

    def get_manifest(self, vid: str, gen: int) -> bytes:
        try:
            return self.store.get(manifest_key(vid, gen))[0]
        except NotFound:
            raise CsiError(Code.DATA_LOSS, f"volume {vid}: manifest of generation {gen} is missing") from None
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e

    def list_generations(self, vid: str) -> list[int]:
        prefix = f"volumes/{ids.volume_id(vid)}/gen/"
        try:
            keys = [i.key for i in self.store.list(prefix)]
        except StoreError as e:
            raise unavailable(f"object store {self.store.url}: {e}") from e
        return sorted(int(k[len(prefix):].split(".")[0]) for k in keys if k.endswith(".manifest"))

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

    # -- snapshots -------------------------------------------------------------------------
    def create_snapshot(self, rec: SnapshotRecord) -> tuple[SnapshotRecord, bool]:
        return self._create_named(SnapshotRecord, "snapnames", rec, snapshot_key(rec.id))

    def get_snapshot(self, sid: str) -> SnapshotRecord | None:
        return self._get(SnapshotRecord, snapshot_key(sid))

    def update_snapshot(self, sid: str, fn: Callable[[SnapshotRecord], None]) -> SnapshotRecord:
        return self._update(SnapshotRecord, snapshot_key(sid), fn, f"snapshot {sid}")

    def list_snapshots(self) -> list[SnapshotRecord]:
        return sorted(self._list(SnapshotRecord, "snapshots/"), key=lambda r: (r.created_at, r.id))

    def delete_snapshot(self, rec: SnapshotRecord) -> None:
        self._delete(snapshot_key(rec.id))
        self._delete(name_key("snapnames", rec.name))

    # -- nodes -----------------------------------------------------------------------------
    def put_node(self, rec: NodeRecord) -> None:
        rec.etag = ""
        self._put(node_key(rec.id), rec)

    def get_node(self, node: str) -> NodeRecord | None:
        return self._get(NodeRecord, node_key(node))

    def list_nodes(self) -> list[NodeRecord]:
        return sorted(self._list(NodeRecord, "nodes/"), key=lambda r: r.id)
