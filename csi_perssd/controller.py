"""Controller service: volumes in the catalog, topology, capacity, ownership (publish/unpublish).

The controller never touches a node's disks: local volumes are created lazily at NodeStage.
Snapshot RPCs live in `snapshots.py`; this class delegates to it."""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

from google.protobuf import wrappers_pb2

from . import TOPOLOGY_NODE_KEY, TOPOLOGY_POOL_KEY, attach, caps, encryption, ids, modify, params
from .config import Config
from .csi import csi_pb2 as pb
from .csi import csi_pb2_grpc as rpc
from .errors import Code, CsiError, invalid, not_found, precondition
from .locks import IdLocks
from .pagetoken import token_after
from .remote.catalog import Catalog, NodeRecord, VolumeRecord
from .remote.codec import PLAIN, Codec
from .stores import Stores

log = logging.getLogger(__name__)
Cap = pb.ControllerServiceCapability.RPC
DEFAULT_SIZE = 1 << 30
ALIGN = 1 << 20
TOKEN_PREFIX = "v1:"
XFS_MIN = 300 << 20      # mkfs.xfs refuses smaller devices
# Their requests carry no CSI secrets: served (and advertised) only when the driver reaches its
# catalog without them (Stores.own_store). Published nodes and volume conditions are reported
# only through ListVolumes and ControllerGetVolume, so they go with them.
WITHOUT_SECRETS = (Cap.LIST_VOLUMES, Cap.GET_VOLUME, Cap.GET_CAPACITY, Cap.LIST_VOLUMES_PUBLISHED_NODES,
                   Cap.VOLUME_CONDITION)


def round_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def pick_size(cr: pb.CapacityRange | None, max_bytes: int, min_bytes: int = ALIGN) -> int:
    """The size to provision for a capacity range: required rounded up to 1 MiB (and to the
    file system's minimum), never above limit; OUT_OF_RANGE when no size fits."""
    req = cr.required_bytes if cr else 0
    lim = cr.limit_bytes if cr else 0
    if req < 0 or lim < 0:
        raise invalid("capacity_range bytes must not be negative")
    if lim and req > lim:
        raise CsiError(Code.OUT_OF_RANGE, f"required_bytes {req} exceeds limit_bytes {lim}")
    size = max(round_up(req) if req else DEFAULT_SIZE, min_bytes)
    if lim and size > lim:
        size = max(req, min_bytes, lim - lim % 4096)   # the largest 4 KiB-aligned size within the limit
        if size > lim or size % 512:
            raise CsiError(Code.OUT_OF_RANGE, f"no volume size fits capacity range [{req}, {lim}] "
                           f"(minimum {min_bytes} bytes, multiples of 4 KiB)")
    if max_bytes and size > max_bytes:
        raise CsiError(Code.OUT_OF_RANGE, f"{size} bytes exceeds the largest volume this driver "
                       f"can create ({max_bytes} bytes)")
    return size


def min_size(cap_list: list[dict[str, Any]]) -> int:
    return XFS_MIN if any(c["fs_type"] == "xfs" for c in cap_list) else ALIGN


def fits(size: int, cr: pb.CapacityRange | None) -> bool:
    if cr is None:
        return True
    return (not cr.required_bytes or size >= cr.required_bytes) and (not cr.limit_bytes or size <= cr.limit_bytes)


class Controller(rpc.ControllerServicer):
    def __init__(self, cfg: Config, stores: Stores, local_node: NodeRecord | None = None):
        self.cfg = cfg
        self.stores = stores
        self.local_node = local_node          # set in --mode all
        self.locks = IdLocks()
        self._attach_locks: dict[str, threading.Lock] = {}
        self.snapshots: Any = None            # snapshots.Snapshots, attached by the runtime
        self.max_volume_bytes = cfg.max_volume_bytes
        self.own_store = stores.own_store()   # fixed for the process: the capabilities follow it
        if not self.own_store:
            log.warning("not advertised, answered UNIMPLEMENTED: %s (their requests carry no CSI secrets)",
                        ", ".join(Cap.Type.Name(c) for c in WITHOUT_SECRETS))

    # -- capabilities ----------------------------------------------------------------------
    def _caps(self) -> list[Cap.Type.ValueType]:
        c = [Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY,
             Cap.EXPAND_VOLUME, Cap.GET_VOLUME, Cap.VOLUME_CONDITION, Cap.LIST_VOLUMES_PUBLISHED_NODES,
             Cap.SINGLE_NODE_MULTI_WRITER, Cap.PUBLISH_READONLY, Cap.MODIFY_VOLUME]
        if not self.own_store:
            c = [t for t in c if t not in WITHOUT_SECRETS]
        if self.snapshots is not None:
            c += [Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS, Cap.CLONE_VOLUME]
            if self.cfg.enable_alpha:
                c.append(Cap.GET_SNAPSHOT)
        return c

    def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=Cap(type=t)) for t in self._caps()])

    def _require_own_store(self, rpc_name: str) -> None:
        """Before an RPC whose request carries no CSI secrets: UNIMPLEMENTED (spec:
        "disabled in the Plugin's current mode of operation") where the driver has no S3
        credentials of its own, as its capability is not advertised then."""
        if not self.own_store:
            raise CsiError(Code.UNIMPLEMENTED, f"{rpc_name} is disabled: its request carries no CSI secrets and "
                           "this driver has no S3 credentials of its own (a secrets-only deployment). Give the "
                           "controller its own credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile "
                           "or a role) and restart it to serve it")

    # -- topology --------------------------------------------------------------------------
    def _nodes(self, cat: Catalog) -> list[NodeRecord]:
        nodes = cat.list_nodes()
        if self.local_node is not None and all(n.id != self.local_node.id for n in nodes):
            nodes.append(self.local_node)
        return nodes

    def _place(self, cat: Catalog, vp: params.VolumeParams, req: pb.TopologyRequirement | None) -> tuple[str, str]:
        """Return (pool, node) for a new volume; node only for mobility=node."""
        segments: list[dict[str, str]] = []
        if req is not None:
            segments = [dict(t.segments) for t in req.preferred] + [dict(t.segments) for t in req.requisite]
        known = self._nodes(cat) if segments else []
        pools = {n.pool for n in known}
        for seg in segments:
            unknown = set(seg) - {TOPOLOGY_NODE_KEY, TOPOLOGY_POOL_KEY}
            if unknown:
                continue
            node = seg.get(TOPOLOGY_NODE_KEY, "")
            pool = seg.get(TOPOLOGY_POOL_KEY, "")
            if pool and pool not in pools:
                continue                       # no registered node serves this pool
            if node and pool and not any(n.id == node and n.pool == pool for n in known):
                continue                       # that node is unknown or in another pool
            if vp.mobility == "node" and not node:
                if pool:
                    members = [n for n in self._nodes(cat) if n.pool == pool]
                    if members:
                        best = max(members, key=lambda n: n.available_bytes + n.reclaimable_bytes)
                        return best.pool, best.id
                continue
            if node and not pool:
                rec = next((n for n in self._nodes(cat) if n.id == node), None)
                if rec is None:
                    continue
                pool = rec.pool
            if pool:
                return pool, node if vp.mobility == "node" else ""
        if segments:
            raise CsiError(Code.RESOURCE_EXHAUSTED,
                           "none of the requested topology segments names a known node or pool of this driver")
        if self.local_node is not None:
            return self.local_node.pool, self.local_node.id if vp.mobility == "node" else ""
        nodes = self._nodes(cat)
        if vp.mobility == "node":
            if not nodes:
                raise CsiError(Code.RESOURCE_EXHAUSTED, "no node has registered yet: cannot place a mobility=node volume")
            best = max(nodes, key=lambda n: n.available_bytes + n.reclaimable_bytes)
            return best.pool, best.id
        return (nodes[0].pool if nodes else self.cfg.pool), ""

    @staticmethod
    def _topology(rec: VolumeRecord) -> list[pb.Topology]:
        if rec.mobility == "node":
            return [pb.Topology(segments={TOPOLOGY_NODE_KEY: rec.node})]
        return [pb.Topology(segments={TOPOLOGY_POOL_KEY: rec.pool})]

    def volume_proto(self, rec: VolumeRecord) -> pb.Volume:
        v = pb.Volume(capacity_bytes=rec.size, volume_id=rec.id,
                      volume_context={"mobility": rec.mobility, "persistence": rec.persistence},
                      accessible_topology=self._topology(rec))
        if rec.source.get("snapshot"):
            v.content_source.snapshot.snapshot_id = rec.source["snapshot"]
        elif rec.source.get("volume"):
            v.content_source.volume.volume_id = rec.source["volume"]
        return v

    # -- volumes ---------------------------------------------------------------------------
    def CreateVolume(self, request: Any, context: Any) -> Any:
        name = ids.name(request.name, "name")
        cap_list = caps.from_list(request.volume_capabilities)
        for c in cap_list:
            why = caps.unsupported_reason(c)
            if why:
                raise invalid(why)
        if len({c["access_type"] for c in cap_list}) > 1:
            raise invalid("a volume cannot be both block and mount")
        vp = params.parse(dict(request.parameters))
        claim = params.claim(dict(request.parameters), name)
        mutable = modify.parse(dict(request.mutable_parameters))
        if vp.fs_type:
            for c in cap_list:
                if c["access_type"] == "mount" and c["fs_type"] != vp.fs_type and c["fs_type"] != caps.DEFAULT_FS:
                    raise invalid(f"fsType parameter {vp.fs_type} conflicts with capability fs_type {c['fs_type']}")
                if c["access_type"] == "mount":
                    c["fs_type"] = vp.fs_type
        cr = request.capacity_range if request.HasField("capacity_range") else None
        size = pick_size(cr, self.max_volume_bytes, min_size(cap_list))
        cat = self.stores.catalog(dict(request.secrets))
        source: dict[str, str] = {}
        if request.HasField("volume_content_source"):
            if self.snapshots is None:
                raise invalid("volume_content_source is not supported by this driver configuration")
            source = self.snapshots.resolve_source(cat, request.volume_content_source, size, cr)
        # before anything is written: a missing or wrong KEK fails the call here
        codec, wrapped = self._encryption(cat, vp, source, dict(request.secrets))
        with self.locks.hold("name:" + name):
            pool, node = self._place(cat, vp, request.accessibility_requirements
                                     if request.HasField("accessibility_requirements") else None)
            rec = VolumeRecord(id=ids.new_volume_id(), name=name, size=size, capabilities=cap_list,
                               mobility=vp.mobility, persistence=vp.persistence, pool=pool, node=node,
                               parameters=vp.as_dict(), chunk_size=vp.chunk_size, compression=vp.compression,
                               source=source, claim=claim, encryption=wrapped)
            modify.check_supported(rec, mutable)
            modify.apply(rec, mutable)          # spec: mutable_parameters take precedence over parameters
            existing = cat.volume_by_name(name)
            if existing is not None:
                self._check_compatible(existing, cr, cap_list, vp, source, mutable)
                self._check_accessible(cat, existing, request)
                got, created = existing, False
            else:
                self._check_room(cat, pool, node, size)
                if source and self.snapshots is not None:
                    self.snapshots.prepare_clone(cat, rec, codec)     # generation 1 = the source's manifest
                got, created = cat.create_volume(rec)
                if not created:
                    self._check_compatible(got, cr, cap_list, vp, source, mutable)
        log.info("volume %s %s for name %r: %d bytes, mobility=%s persistence=%s pool=%s%s",
                 got.id, "created" if created else "exists", name, got.size, got.mobility,
                 got.persistence, got.pool, f" node={got.node}" if got.node else "")
        return pb.CreateVolumeResponse(volume=self.volume_proto(got))

    def _encryption(self, cat: Catalog, vp: params.VolumeParams, source: dict[str, str],
                    secrets: dict[str, str]) -> tuple[Codec, dict[str, str]]:
        """The new volume's codec and wrapped lineage key: a fresh lineage, or its source's (a
        clone or restore shares the lineage's key, so its chunks are shared, not copied)."""
        src = self.snapshots.source_encryption(cat, source) if source and self.snapshots is not None else {}
        if vp.encryption == encryption.NONE:
            if src:
                raise invalid("the content source is encrypted: a clone or restore stays in its lineage "
                              "(use a StorageClass with encryption: aes-256-gcm and the same KEK)")
            return PLAIN, {}
        kek = encryption.require_kek(secrets, self.cfg, "CreateVolume", "provisioner")
        if source:
            if not src:
                raise invalid("the content source is not encrypted: an encrypted volume cannot share its "
                              "plaintext chunks (restore it with encryption: none)")
            return Codec(encryption.open_lineage(src, kek, "CreateVolume")), src
        keys, wrapped = encryption.new_lineage(kek)
        return Codec(keys), wrapped

    def _check_room(self, cat: Catalog, pool: str, node: str, size: int) -> None:
        """RESOURCE_EXHAUSTED when no node the volume may live on can ever hold it (as GetCapacity's
        maximum_volume_size reports); nodes that have not reported their capacity do not count."""
        cands = [n for n in self._nodes(cat) if n.pool == pool and (not node or n.id == node) and n.total_bytes]
        if not cands:
            return
        room = max((n.max_volume_bytes or n.available_bytes) + n.reclaimable_bytes for n in cands)
        if size > room:
            raise CsiError(Code.RESOURCE_EXHAUSTED, f"{size} bytes do not fit on any node of "
                           f"{'node ' + node if node else 'pool ' + pool} (at most {room} bytes)")

    def _check_accessible(self, cat: Catalog, rec: VolumeRecord, request: Any) -> None:
        """An existing volume must be accessible from one of the requisite segments (spec: else ALREADY_EXISTS)."""
        if not request.HasField("accessibility_requirements") or not request.accessibility_requirements.requisite:
            return
        pools = {n.id: n.pool for n in self._nodes(cat)}
        for t in request.accessibility_requirements.requisite:
            seg = dict(t.segments)
            if set(seg) - {TOPOLOGY_NODE_KEY, TOPOLOGY_POOL_KEY}:
                continue
            node, pool = seg.get(TOPOLOGY_NODE_KEY), seg.get(TOPOLOGY_POOL_KEY)
            if pool is not None and pool != rec.pool:
                continue
            if node is not None and (node != rec.node if rec.mobility == "node" else pools.get(node) != rec.pool):
                continue
            return
        raise CsiError(Code.ALREADY_EXISTS, f"volume name {rec.name!r} already exists as {rec.id} but it is not "
                       "accessible from the requisite topology")

    @staticmethod
    def _check_compatible(got: VolumeRecord, cr: Any, cap_list: list[dict[str, Any]],
                          vp: params.VolumeParams, source: dict[str, str], mutable: dict[str, str]) -> None:
        problems = []
        if not fits(got.size, cr):
            problems.append(f"its size {got.size} is outside the requested capacity range")
        def canon(cs: list[dict[str, Any]]) -> list[str]:     # records come back from JSON with sorted keys
            return sorted(json.dumps(c, sort_keys=True) for c in cs)
        if canon(got.capabilities) != canon(cap_list):
            problems.append("its capabilities differ")
        if got.parameters != vp.as_dict() or got.mobility != vp.mobility or got.persistence != vp.persistence:
            problems.append("its parameters differ")
        if got.source != source:
            problems.append("its content source differs")
        if got.mutable_parameters != mutable:
            problems.append(f"its mutable parameters are {got.mutable_parameters or 'none'}")
        if problems:
            raise CsiError(Code.ALREADY_EXISTS, f"volume name {got.name!r} already exists as {got.id} but "
                           + "; ".join(problems))

    def DeleteVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        cat = self.stores.catalog(dict(request.secrets))
        with self.locks.hold(vid):
            rec = cat.get_volume(vid)
            if rec is None:
                return pb.DeleteVolumeResponse()
            if rec.owner:
                raise precondition(f"volume {vid} is still published to node {rec.owner}; unpublish it first")
            cat.delete_volume(rec)
            log.info("volume %s (%r) deleted; its chunks are left to garbage collection", vid, rec.name)
        return pb.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        node = ids.node_id(request.node_id)
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = caps.to_dict(request.volume_capability)
        want = attach.entry(cap, request.readonly)
        cat = self.stores.catalog(dict(request.secrets))
        # per node, blocking: the attach count and the ownership change happen together
        with self.locks.hold(vid), self._attach_locks.setdefault(node, threading.Lock()):
            rec = cat.volume(vid)
            nrec = cat.get_node(node)
            if nrec is None and (self.local_node is None or self.local_node.id != node):
                raise not_found(f"node {node} is unknown to this driver (it has not registered)")
            self._check_cap(rec, cap)
            attach.check_republish(rec, node, want)
            nrec = nrec or self.local_node
            assert nrec is not None
            pool = nrec.pool
            if rec.mobility == "node" and rec.node != node:
                raise precondition(f"volume {vid} lives on node {rec.node} (mobility=node) and cannot be used on {node}")
            if rec.mobility == "pool" and rec.pool != pool:
                raise precondition(f"volume {vid} belongs to pool {rec.pool}; node {node} is in pool {pool}")

            def take(r: VolumeRecord) -> None:
                if r.owner and r.owner != node:
                    raise precondition(f"volume {vid} is owned by node {r.owner} (epoch {r.epoch}) which has not "
                                       f"released it; use `csi-perssd takeover {vid} --from {r.owner}` if that node is dead")
                attach.check_republish(r, node, want)
                if r.owner != node:
                    r.owner = node
                    r.epoch += 1
                r.published = want
            if rec.owner != node:
                attach.check_limit(cat, node, nrec.max_volumes, vid)
            rec = cat.update_volume(vid, take)
        ctx = {"epoch": str(rec.epoch)}
        if request.readonly:
            ctx["readonly"] = "true"            # NodeStage mounts read-only
        return pb.ControllerPublishVolumeResponse(publish_context=ctx)

    def ControllerUnpublishVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        node = ids.node_id(request.node_id) if request.node_id else ""
        cat = self.stores.catalog(dict(request.secrets))
        with self.locks.hold(vid):
            rec = cat.get_volume(vid)
            if rec is None:
                return pb.ControllerUnpublishVolumeResponse()   # spec: NOT_FOUND allowed, OK is kinder

            def release(r: VolumeRecord) -> None:
                if r.owner and (not node or r.owner == node):
                    if r.owner != r.generation_node and r.persistence == "object":
                        log.warning("volume %s released by %s before it committed a generation: "
                                    "data written since generation %d (by %s) is not in the object store",
                                    vid, r.owner, r.generation, r.generation_node or "-")
                    r.owner = ""
                    r.published = {}
            cat.update_volume(vid, release)
        return pb.ControllerUnpublishVolumeResponse()

    @staticmethod
    def _check_cap(rec: VolumeRecord, cap: dict[str, Any]) -> None:
        why = caps.unsupported_reason(cap)
        if why:
            raise invalid(why)
        kinds = {c["access_type"] for c in rec.capabilities}
        if cap["access_type"] not in kinds:
            raise invalid(f"volume {rec.id} was created for {'/'.join(sorted(kinds))} access, not {cap['access_type']}")

    def ValidateVolumeCapabilities(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        cap_list = caps.from_list(request.volume_capabilities)
        cat = self.stores.catalog(dict(request.secrets))
        rec = cat.volume(vid)
        vp = params.parse(dict(request.parameters))
        for raw, c in zip(request.volume_capabilities, cap_list):
            why = caps.unsupported_reason(c)
            if why is None:
                kinds = {x["access_type"] for x in rec.capabilities}
                fss = {x["fs_type"] for x in rec.capabilities if x["access_type"] == "mount"}
                if c["access_type"] not in kinds:
                    why = f"volume is {'/'.join(sorted(kinds))}, not {c['access_type']}"
                elif c["access_type"] == "mount" and raw.mount.fs_type and c["fs_type"] not in fss:
                    # an empty fs_type asks for no particular file system (NodeStage uses the volume's)
                    why = f"volume holds {'/'.join(sorted(fss))}, not {c['fs_type']}"
            if why is None and request.parameters and (vp.mobility != rec.mobility or vp.persistence != rec.persistence):
                why = "parameters differ from the volume's"
            if why is None and request.mutable_parameters:
                try:
                    modify.check_supported(rec, modify.parse(dict(request.mutable_parameters)))
                except CsiError as e:
                    why = e.message
            if why:
                return pb.ValidateVolumeCapabilitiesResponse(message=why)
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters))

    @staticmethod
    def _condition(rec: VolumeRecord, generations: set[int] | list[int]) -> tuple[list[str], pb.VolumeCondition]:
        """Published nodes and condition from the record and the generations present in the store."""
        cond = pb.VolumeCondition(abnormal=False, message="ok")
        if rec.persistence == "object" and rec.generation and rec.generation not in generations:
            cond = pb.VolumeCondition(abnormal=True, message=f"manifest of committed generation {rec.generation} is missing")
        return ([rec.owner] if rec.owner else []), cond

    def _status(self, rec: VolumeRecord, cat: Catalog) -> tuple[list[str], pb.VolumeCondition]:
        gens = cat.list_generations(rec.id) if rec.persistence == "object" and rec.generation else []
        return self._condition(rec, gens)

    def ListVolumes(self, request: Any, context: Any) -> Any:
        """One page: a LIST from the token (records and their manifests' keys) and a GET for each
        record of the page that changed since this controller last read it. The token is the last
        volume ID returned, so it stays valid when volumes are deleted between pages."""
        self._require_own_store("ListVolumes")
        if request.max_entries < 0:
            raise invalid("max_entries must not be negative")
        after = token_after(request.starting_token, TOKEN_PREFIX, ids.volume_id)
        cat = self.stores.catalog()
        page = cat.volume_page(after, request.max_entries)
        resp = pb.ListVolumesResponse()
        for r in page.records:
            nodes, cond = self._condition(r, page.generations.get(r.id, set()))
            resp.entries.add(volume=self.volume_proto(r),
                             status=pb.ListVolumesResponse.VolumeStatus(published_node_ids=nodes, volume_condition=cond))
        if page.more:
            resp.next_token = TOKEN_PREFIX + page.last
        return resp

    def ControllerGetVolume(self, request: Any, context: Any) -> Any:
        self._require_own_store("ControllerGetVolume")
        vid = ids.volume_id(request.volume_id)
        cat = self.stores.catalog()
        rec = cat.volume(vid)
        nodes, cond = self._status(rec, cat)
        return pb.ControllerGetVolumeResponse(
            volume=self.volume_proto(rec),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=nodes, volume_condition=cond))

    def GetCapacity(self, request: Any, context: Any) -> Any:
        self._require_own_store("GetCapacity")
        for c in request.volume_capabilities:
            if caps.unsupported_reason(caps.to_dict(c)):
                return pb.GetCapacityResponse(available_capacity=0)
        params.parse(dict(request.parameters))
        cat = self.stores.catalog()
        nodes = self._nodes(cat)
        if request.HasField("accessible_topology"):
            seg = dict(request.accessible_topology.segments)
            if set(seg) - {TOPOLOGY_NODE_KEY, TOPOLOGY_POOL_KEY}:
                nodes = []
            if TOPOLOGY_NODE_KEY in seg:
                nodes = [n for n in nodes if n.id == seg[TOPOLOGY_NODE_KEY]]
            if TOPOLOGY_POOL_KEY in seg:
                nodes = [n for n in nodes if n.pool == seg[TOPOLOGY_POOL_KEY]]
        # a volume lives on one node at a time: the capacity of a segment is its roomiest node
        avail = max((n.available_bytes + n.reclaimable_bytes for n in nodes), default=0)
        biggest = max((n.max_volume_bytes for n in nodes), default=0)
        if self.max_volume_bytes:
            biggest = min(biggest, self.max_volume_bytes) if biggest else self.max_volume_bytes
        resp = pb.GetCapacityResponse(available_capacity=avail)
        if nodes:
            resp.maximum_volume_size.CopyFrom(wrappers_pb2.Int64Value(value=min(biggest, avail) if biggest else avail))
        return resp

    def ControllerExpandVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        cr = request.capacity_range
        if cr.required_bytes < 0 or cr.limit_bytes < 0:
            raise invalid("capacity_range bytes must not be negative")
        # required_bytes 0: nothing to grow to (pick_size would mean "the default size")
        size = pick_size(cr, self.max_volume_bytes) if cr.required_bytes else 0
        cap = caps.to_dict(request.volume_capability) if request.HasField("volume_capability") else None
        cat = self.stores.catalog(dict(request.secrets))
        with self.locks.hold(vid):
            if cap is not None:
                self._check_cap(cat.volume(vid), cap)      # spec: "Exceeds capabilities" -> INVALID_ARGUMENT
            def grow(r: VolumeRecord) -> None:
                if size > r.size:
                    r.size = size
            rec = cat.update_volume(vid, grow)
            if cr.limit_bytes and rec.size > cr.limit_bytes:
                raise CsiError(Code.OUT_OF_RANGE, f"volume {vid} already has {rec.size} bytes, more than "
                               f"limit_bytes {cr.limit_bytes} (volumes never shrink)")
        return pb.ControllerExpandVolumeResponse(capacity_bytes=rec.size, node_expansion_required=True)

    def ControllerModifyVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        if not request.mutable_parameters:
            raise invalid("mutable_parameters is required")
        mutable = modify.parse(dict(request.mutable_parameters))
        cat = self.stores.catalog(dict(request.secrets))
        with self.locks.hold(vid):
            modify.check_supported(cat.volume(vid), mutable)
            rec = cat.update_volume(vid, lambda r: modify.apply(r, mutable))
        log.info("volume %s: mutable parameters now %s (effective at its next flush)", vid, rec.mutable_parameters)
        return pb.ControllerModifyVolumeResponse()

    # -- snapshots: delegated ---------------------------------------------------------------
    def _snap(self) -> Any:
        if self.snapshots is None:
            raise CsiError(Code.UNIMPLEMENTED, "snapshots are not enabled")
        return self.snapshots

    def CreateSnapshot(self, request: Any, context: Any) -> Any:
        return self._snap().create(request)

    def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        return self._snap().delete(request)

    def ListSnapshots(self, request: Any, context: Any) -> Any:
        return self._snap().list(request)

    def GetSnapshot(self, request: Any, context: Any) -> Any:
        """CSI alpha: served (and GET_SNAPSHOT advertised) only with --enable-alpha."""
        if not self.cfg.enable_alpha:
            raise CsiError(Code.UNIMPLEMENTED, "GetSnapshot is an alpha RPC: it needs --enable-alpha")
        return self._snap().get(request)
