"""GroupController: CreateVolumeGroupSnapshot / GetVolumeGroupSnapshot / DeleteVolumeGroupSnapshot.

A group snapshot is a catalog record (`groupsnaps/<gid>.json`) naming one normal snapshot per
source volume (each restorable and listable, with its group_snapshot_id). All of them show one
point in time (write-order consistency, spec):
- Members nobody has staged: their committed generation IS their content, as long as nobody
  takes them over meanwhile. Each record's ownership epoch is read before its manifest is
  pinned and checked again after the whole group was cut; a change fails the group.
- Members staged on one node: that node cuts the group (`groupcut.GroupCutWorker`): every file
  system frozen at once (one watchdog for the group), every local copy taken, every one thawed;
  the others are pinned as above. The controller leaves it a request `grouprequests/<node>/<gid>.json`.
- Members owned by different nodes: refused (FAILED_PRECONDITION, the spec's "cannot snapshot
  multiple volumes together"). A cross-node freeze would hold one node's file systems frozen
  while it waits on another through object-store polling; that wait is what the watchdog bounds
  but cannot make short, and a dead node would leave the rest frozen until it fires.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import encryption, ids
from .csi import csi_pb2 as pb
from .csi import csi_pb2_grpc as rpc
from .errors import Code, CsiError, invalid, not_found, precondition
from .remote.catalog import Catalog, GroupSnapshotRecord, SnapshotRecord, VolumeRecord
from .remote.codec import Codec
from .remote.layout import group_request_key, snapshot_manifest_key, wake_key
from .snapshots import Snapshots, _check_params, _ts, snapshot_by_name
from .stores import Stores

log = logging.getLogger(__name__)
GCap = pb.GroupControllerServiceCapability.RPC


def member_name(gid: str, vid: str) -> str:
    return f"group:{gid}:{vid}"


def observe(vol: VolumeRecord) -> dict[str, Any]:
    """What must not change while a group is cut for a member pinned at its committed generation."""
    return {"owner": vol.owner, "epoch": vol.epoch}


def check_unchanged(cat: Catalog, seen: dict[str, dict[str, Any]]) -> None:
    """FAILED_PRECONDITION when a pinned member changed hands since it was observed."""
    for vid, before in seen.items():
        now = observe(cat.volume(vid))
        if now != before:
            raise precondition(f"volume {vid} was published to node {now['owner'] or '-'} while the group "
                               f"snapshot was being cut; its committed generation is no longer its content")


def pin_members(cat: Catalog, snaps: Snapshots, members: Iterable[tuple[SnapshotRecord, VolumeRecord]],
                codec: Callable[[VolumeRecord], Codec] | None = None) -> dict[str, dict[str, Any]]:
    """Pin the committed generation of members no node is writing; return what was observed
    of each (for `check_unchanged` once the group is cut). `codec(vol)`: how to encode the empty
    manifest of a never-flushed member (an encrypted one's lineage; default: the configured KEK)."""
    seen: dict[str, dict[str, Any]] = {}
    for snap, vol in members:
        seen[vol.id] = observe(vol)
        snaps.pin_generation(cat, snap, vol, None if codec is None else functools.partial(codec, vol))
    return seen


def reset_members(cat: Catalog, grec: GroupSnapshotRecord) -> None:
    """Before a (re)cut: no member may look ready from an earlier, abandoned cut."""
    def unready(r: SnapshotRecord) -> None:
        r.ready, r.progress = False, "waiting for the group to be cut"
    for sid in grec.snapshots:
        cat.update_snapshot_if_exists(sid, unready)


def fail_group(cat: Catalog, gid: str, err: CsiError) -> None:
    def fail(r: GroupSnapshotRecord) -> None:
        r.error, r.error_code, r.node = err.message, err.code.name, ""
    cat.update_group_if_exists(gid, fail)


def mark_group_ready(cat: Catalog, gid: str, cut_at: float) -> GroupSnapshotRecord:
    def ready(r: GroupSnapshotRecord) -> None:
        r.ready, r.node, r.error, r.error_code, r.created_at = True, "", "", "", cut_at
    return cat.update_group(gid, ready)


class GroupSnapshots(rpc.GroupControllerServicer):
    def __init__(self, stores: Stores, controller: Any):
        self.stores = stores
        self.controller = controller          # its per-ID locks and its Snapshots

    def GroupControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=[pb.GroupControllerServiceCapability(
            rpc=GCap(type=GCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))])

    # -- Create ------------------------------------------------------------------------------
    def CreateVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        name = ids.name(request.name, "name")
        sources = [ids.volume_id(v) for v in request.source_volume_ids]
        if not sources:
            raise invalid("source_volume_ids is required")
        if len(set(sources)) != len(sources):
            raise invalid("source_volume_ids names a volume more than once")
        _check_params(dict(request.parameters))
        cat = self.stores.catalog(dict(request.secrets))
        with self.controller.locks.hold("groupname:" + name):
            grec = cat.create_group(GroupSnapshotRecord(
                id=ids.new_group_snapshot_id(), name=name, source_volumes=sources, snapshots=[],
                parameters=dict(request.parameters)))[0]
            if sorted(grec.source_volumes) != sorted(sources) or grec.parameters != dict(request.parameters):
                raise CsiError(Code.ALREADY_EXISTS, f"group snapshot name {name!r} already names {grec.id} "
                               f"of volumes {', '.join(grec.source_volumes)} with other parameters or volumes")
            grec = self._progress(cat, grec, dict(request.secrets))
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=self.proto(cat, grec))

    def _progress(self, cat: Catalog, grec: GroupSnapshotRecord, secrets: dict[str, str]) -> GroupSnapshotRecord:
        """Start (or restart after an error) the cut of a group that is not ready."""
        if grec.ready:
            return grec
        if grec.error:
            err = CsiError(Code.__members__.get(grec.error_code, Code.INTERNAL), f"group snapshot {grec.id}: {grec.error}")
            log.warning("%s; it is retried at the next CreateVolumeGroupSnapshot", err.message)
            self._delete_members(cat, grec)

            def clear(r: GroupSnapshotRecord) -> None:
                r.error, r.error_code, r.snapshots = "", "", []
            cat.update_group(grec.id, clear)
            raise err
        if grec.node:
            return grec                         # its node is cutting it
        try:
            return self._start(cat, grec, secrets)
        except CsiError as e:
            if e.code in (Code.FAILED_PRECONDITION, Code.NOT_FOUND, Code.INVALID_ARGUMENT):
                self._delete_members(cat, grec)     # spec: no snapshot is leaked
                cat.delete_group(grec)
            raise

    def _start(self, cat: Catalog, grec: GroupSnapshotRecord, secrets: dict[str, str]) -> GroupSnapshotRecord:
        vols = [cat.volume(v) for v in grec.source_volumes]
        local = [v.id for v in vols if v.persistence != "object"]
        if local:
            raise precondition(f"volume(s) {', '.join(local)} have persistence=local: their data never leaves "
                               "their node, so they cannot be snapshotted to the object store")
        owners = sorted({v.owner for v in vols if v.owner})
        if len(owners) > 1:
            raise precondition(f"the volumes are in use on {len(owners)} nodes ({', '.join(owners)}); a group "
                               "snapshot is cut on one node: snapshot volumes that are used together on one node, "
                               "or stop the workloads on all but one node first")
        members = self._members(cat, grec, vols)
        grec = cat.update_group(grec.id, lambda r: setattr(r, "snapshots", [s.id for s, _ in members]))
        if owners:
            return self._request(cat, grec, owners[0])
        cut_at = time.time()
        cfg = self.controller.snapshots.cfg
        seen = pin_members(cat, self.controller.snapshots, members, lambda vol: encryption.codec_for(
            vol.encryption, secrets, cfg, f"group snapshot of volume {vol.id}", "group-snapshotter"))
        check_unchanged(cat, seen)
        for sid in grec.snapshots:
            cat.update_snapshot(sid, lambda r: setattr(r, "created_at", cut_at))
        log.info("group snapshot %s of %s: ready at once (no member is in use)", grec.id, ", ".join(grec.source_volumes))
        return mark_group_ready(cat, grec.id, cut_at)

    def _members(self, cat: Catalog, grec: GroupSnapshotRecord,
                 vols: list[VolumeRecord]) -> list[tuple[SnapshotRecord, VolumeRecord]]:
        out = []
        for vol in vols:
            rec = SnapshotRecord(id=ids.new_snapshot_id(), name=member_name(grec.id, vol.id),
                                 source_volume=vol.id, size=vol.size, group=grec.id,
                                 encryption=dict(vol.encryption))
            got, _ = cat.create_snapshot(rec)
            out.append((got, vol))
        return out

    def _request(self, cat: Catalog, grec: GroupSnapshotRecord, node: str) -> GroupSnapshotRecord:
        reset_members(cat, grec)
        req = {"group": grec.id, "created_at": time.time()}
        cat.store.put(group_request_key(node, grec.id), json.dumps(req).encode())
        cat.store.put(wake_key(node), json.dumps(req).encode())     # after it: the node's next HEAD sees it
        log.info("group snapshot %s: members in use on %s, asked it to cut the group", grec.id, node)
        return cat.update_group(grec.id, lambda r: setattr(r, "node", node))

    # -- Get / Delete ------------------------------------------------------------------------
    def GetVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        gid = ids.group_snapshot_id(request.group_snapshot_id)
        cat = self.stores.catalog(dict(request.secrets))
        grec = cat.get_group(gid)
        if grec is None:
            raise not_found(f"group snapshot {gid} does not exist")
        self._check_ids(grec, request.snapshot_ids)
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=self.proto(cat, grec))

    def DeleteVolumeGroupSnapshot(self, request: Any, context: Any) -> Any:
        gid = ids.group_snapshot_id(request.group_snapshot_id)
        cat = self.stores.catalog(dict(request.secrets))
        with self.controller.locks.hold(gid):
            grec = cat.get_group(gid)
            if grec is None:
                return pb.DeleteVolumeGroupSnapshotResponse()
            self._check_ids(grec, request.snapshot_ids)
            if grec.node:
                cat.store.delete(group_request_key(grec.node, gid))
            self._delete_members(cat, grec)
            cat.delete_group(grec)
        log.info("group snapshot %s deleted with its %d snapshots", gid, len(grec.snapshots))
        return pb.DeleteVolumeGroupSnapshotResponse()

    @staticmethod
    def _check_ids(grec: GroupSnapshotRecord, given: Iterable[str]) -> None:
        given = list(given)
        if given and sorted(given) != sorted(grec.snapshots):
            raise invalid(f"snapshot_ids do not match the snapshots of group snapshot {grec.id} "
                          f"({', '.join(grec.snapshots) or 'none'})")

    @staticmethod
    def _delete_members(cat: Catalog, grec: GroupSnapshotRecord) -> None:
        names = {member_name(grec.id, v) for v in grec.source_volumes}
        sids = set(grec.snapshots) | {s.id for s in map(lambda n: snapshot_by_name(cat, n), names) if s is not None}
        for sid in sorted(sids):
            rec = cat.get_snapshot(sid)
            cat.store.delete(snapshot_manifest_key(sid))
            if rec is not None:
                cat.delete_snapshot(rec)

    def proto(self, cat: Catalog, grec: GroupSnapshotRecord) -> pb.VolumeGroupSnapshot:
        snaps = [cat.get_snapshot(sid) for sid in grec.snapshots]
        members = [self.controller.snapshots.proto(s) for s in snaps if s is not None]
        for m in members:
            m.ready_to_use = m.ready_to_use and grec.ready
        return pb.VolumeGroupSnapshot(group_snapshot_id=grec.id, snapshots=members,
                                      creation_time=_ts(grec.created_at),
                                      ready_to_use=grec.ready and len(members) == len(grec.source_volumes))
