"""Node service: stage (hydrate + mkfs + mount), publish (bind), unpublish, unstage (flush),
stats, expansion. Each RPC is a short sequence of idempotent ensure-steps; object-store work
(hydrate on stage, flush on release) is delegated to `sync.VolumeSync`."""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import TOPOLOGY_NODE_KEY, TOPOLOGY_POOL_KEY, caps, ids
from .config import Config
from .csi import csi_pb2 as pb
from .csi import csi_pb2_grpc as rpc
from .errors import Code, CsiError, invalid, not_found, precondition
from .lazy import dm
from .local import fs, proc
from .local.backend import Backend
from .local.state import LocalVolume, Phase
from .local.volumes import LocalVolumes
from .remote.catalog import VolumeRecord
from .stores import Stores
from .sync import VolumeSync

log = logging.getLogger(__name__)
NCap = pb.NodeServiceCapability.RPC


def _cap_matches(lv: LocalVolume, cap: dict[str, Any]) -> bool:
    if lv.access_type != cap["access_type"]:
        return False
    return cap["access_type"] == "block" or (lv.fs_type == cap["fs_type"] and lv.mount_flags == cap["mount_flags"])


def _lookup_path(value: str) -> str | None:
    """volume_path of NodeGetVolumeStats/NodeExpandVolume: only compared with the paths this node
    staged or published, never used before it matched one. A missing, NUL-bearing or oversize path
    is INVALID_ARGUMENT; any other path that is not one of the volume's (relative, with '..')
    is the spec's "volume does not exist on specified volume_path": NOT_FOUND (as csi-sanity expects),
    signalled by None."""
    if not value:
        raise invalid("volume_path is required")
    try:
        return ids.host_path(value, "volume_path")
    except CsiError:
        if "\x00" in value or len(value.encode("utf-8")) > ids.MAX_PATH_BYTES:
            raise
        return None                  # cannot be one of the volume's paths


class Node(rpc.NodeServicer):
    def __init__(self, cfg: Config, stores: Stores, backend: Backend, vols: LocalVolumes, sync: VolumeSync):
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.stores = stores
        self.backend = backend
        self.vols = vols                # the only writer of the node's state records
        self.sync = sync
        self.locks = vols.locks

    # -- info ------------------------------------------------------------------------------
    def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return pb.NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=self.cfg.max_volumes_per_node,
            accessible_topology=pb.Topology(segments={TOPOLOGY_NODE_KEY: self.node_id,
                                                      TOPOLOGY_POOL_KEY: self.cfg.pool}))

    def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        types = [NCap.STAGE_UNSTAGE_VOLUME, NCap.GET_VOLUME_STATS, NCap.EXPAND_VOLUME,
                 NCap.VOLUME_CONDITION, NCap.SINGLE_NODE_MULTI_WRITER]
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=NCap(type=t)) for t in types])

    # -- helpers ---------------------------------------------------------------------------
    def _record(self, vid: str, secrets: dict[str, str] | None = None) -> VolumeRecord:
        """The volume's record, read with this call's secrets, else the driver's own configured
        credentials; never the secrets another call left."""
        return self.stores.volume_catalog(secrets).volume(vid)

    def _known_or_missing(self, vid: str, secrets: dict[str, str] | None = None) -> None:
        """For calls on a volume this node holds nothing of: NOT_FOUND when the volume does not
        exist (read with the call's secrets, else the driver's own credentials). A store that
        cannot answer (an outage; a deployment whose only credentials come with CSI secrets, and
        NodeUnstage/NodeUnpublish carry none) is no error here: the caller goes on as for a
        volume that exists, since this node holds nothing of it either way."""
        try:
            known = self.stores.volume_catalog(secrets).get_volume(vid) is not None
        except CsiError as e:
            if e.code != Code.UNAVAILABLE:
                raise
            log.info("volume %s: not on this node; whether it exists is unknown: %s", vid, e.message)
            return
        if not known:
            raise not_found(f"volume {vid} does not exist")

    @contextmanager
    def _held(self, volume_id: str, path: str, field: str) -> Iterator[tuple[str, str, LocalVolume | None]]:
        """The start of NodeUnstage and NodeUnpublish: validate the volume ID and the path, hold
        the volume's lock, look up its local copy. None: this node holds nothing of the volume
        (NOT_FOUND when it does not exist; OK when the store cannot tell)."""
        vid = ids.volume_id(volume_id)
        checked = ids.host_path(path, field)
        with self.locks.hold(vid):
            lv = self.vols.get(vid)
            if lv is None:
                self._known_or_missing(vid)
            yield vid, checked, lv

    # -- stage -----------------------------------------------------------------------------
    def NodeStageVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        staging = ids.host_path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = caps.to_dict(request.volume_capability)
        why = caps.unsupported_reason(cap)
        if why:
            raise invalid(why)
        secrets = dict(request.secrets)
        # the backend reuses one listing of its volumes through the stage (LVM: one lvs); the
        # tool runs are counted and logged (each costs 0.3-1 s under emulation)
        with self.locks.hold(vid), self.backend.batch(), proc.tally() as tools:
            rec = self._record(vid, secrets)
            kinds = {c["access_type"] for c in rec.capabilities}
            if cap["access_type"] not in kinds:     # spec: "Exceeds capabilities" -> FAILED_PRECONDITION
                raise precondition(f"volume {vid} was created for {'/'.join(sorted(kinds))} access, not {cap['access_type']}")
            if cap["access_type"] == "mount":
                fss = sorted({c["fs_type"] for c in rec.capabilities if c["access_type"] == "mount"})
                if not request.volume_capability.mount.fs_type and fss:
                    cap["fs_type"] = fss[0]             # no fs_type given: the one the volume was created for
                if cap["fs_type"] not in fss:
                    raise precondition(f"volume {vid} was created for {'/'.join(fss)}, not {cap['fs_type']}")
            lv = self.vols.get(vid)
            if lv is not None and lv.staged:
                if lv.staged_path != staging:
                    raise precondition(f"volume {vid} is already staged at {lv.staged_path}")
                if not _cap_matches(lv, cap):
                    raise CsiError(Code.ALREADY_EXISTS, f"volume {vid} is staged at {staging} with a different capability")
                self._ensure_staged_mount(lv)
                return pb.NodeStageVolumeResponse()
            self._check_placement(rec, request.publish_context)
            lv = self.sync.prepare(rec, lv, secrets)       # local copy of the committed generation
            readonly = caps.is_read_only_mode(cap) or request.publish_context.get("readonly") == "true"
            lv = self._stage(lv, staging, cap, readonly)
        log.info("volume %s staged at %s (%s, generation %d; %s)", vid, staging, lv.device, lv.generation,
                 tools.summary())
        return pb.NodeStageVolumeResponse()

    def _stage(self, lv: LocalVolume, staging: str, cap: dict[str, Any], readonly: bool) -> LocalVolume:
        """CLEAN | DIRTY -> STAGED: make the file system (mount access) and mount it."""
        device = self._device(lv.id)
        if cap["access_type"] == "mount":
            formatted = fs.ensure_fs(device, cap["fs_type"])
            # a volume that grew while unstaged (expansion, restore to a larger size): ext4
            # grows offline before the mount, xfs only online after it
            pending = not formatted and not readonly and fs.grow_unmounted(device, cap["fs_type"])
            Path(staging).mkdir(parents=True, exist_ok=True)
            self._mount(device, staging, cap["fs_type"], cap["mount_flags"], readonly)
            if pending:
                fs.grow_fs(device, staging, cap["fs_type"])
        else:
            Path(staging).mkdir(parents=True, exist_ok=True)

        def staged(cur: LocalVolume) -> None:
            cur.access_type, cur.fs_type, cur.mount_flags = cap["access_type"], cap["fs_type"], cap["mount_flags"]
            cur.device, cur.staged_path, cur.readonly = device, staging, readonly
            if not readonly:
                cur.dirty = True
        return self.vols.update(lv.id, staged, to=Phase.STAGED)

    def _check_placement(self, rec: VolumeRecord, publish_context: Any) -> None:
        if rec.mobility == "node" and rec.node != self.node_id:
            raise precondition(f"volume {rec.id} lives on node {rec.node} (mobility=node), not on {self.node_id}")
        if rec.mobility == "pool" and rec.pool != self.cfg.pool:
            raise precondition(f"volume {rec.id} belongs to pool {rec.pool}; this node is in pool {self.cfg.pool}")
        if rec.owner != self.node_id:
            raise precondition(f"volume {rec.id} is not published to node {self.node_id} "
                               f"(owner: {rec.owner or 'none'}); ControllerPublishVolume first")
        epoch = publish_context.get("epoch") if publish_context else None
        if epoch is not None and epoch != str(rec.epoch):
            raise precondition(f"volume {rec.id}: publish epoch {epoch} is stale (current {rec.epoch})")

    def _mount(self, dev: str, path: str, fs_type: str, flags: list[str], readonly: bool) -> None:
        try:
            fs.ensure_mounted(dev, path, fs_type, flags, readonly=readonly)
        except fs.MountConflict as e:
            raise CsiError(Code.ALREADY_EXISTS, e.message) from e

    def _device(self, vid: str, read_only: bool = False) -> str:
        """The block device the volume is staged on: the loop device on its lazy hydration
        server's file while it is lazily hydrated, else the backend's device."""
        lazy = self.sync.lazy
        if lazy.active(vid):
            dev: list[str] = []         # set up while the server opens its object store
            lazy.ensure_server(vid, self.sync.secrets_for(vid),
                               meanwhile=lambda: dev.append(lazy.device(vid, read_only=read_only)))
            return dev[0]
        if not read_only and dm.available() and dm.exists(vid):
            return dm.path(vid)         # switched to the local volume when hydration completed
        return self.backend.device(vid, read_only=read_only)

    def switch_completed(self) -> None:
        """Device-mapper path (a background loop): volumes whose lazy hydration completed move
        from the FUSE-served device to the local volume under their mounted file system."""
        for lv in self.vols.all():
            if not (lv.staged and self.sync.lazy.active(lv.id)):
                continue
            st = self.sync.lazy.status(lv.id)       # without the volume's lock: RPCs on it go on
            if not st or not st.get("complete"):
                continue
            try:
                with self.locks.hold(lv.id):
                    self.sync.lazy.switch_if_complete(lv.id, self.backend.device(lv.id),
                                                      before_switch=functools.partial(self.sync.before_lazy_switch, lv.id))
            except CsiError as e:
                if e.code != Code.ABORTED:      # ABORTED: an RPC holds the volume; next round
                    log.warning("volume %s: switch to the local volume failed: %s", lv.id, e)

    def _recover_lazy(self, lv: LocalVolume) -> None:
        """A plugin restart finds the volume's lazy server running (it outlives the plugin) and
        changes nothing. After a node restart (or the server's death) the mounts on the dead
        server's device are dropped first: they are made again on a new server's device."""
        lazy = self.sync.lazy
        if not lazy.active(lv.id) or lazy.serving(lv.id):
            return
        log.warning("volume %s: its lazy hydration server is gone: restarting it and remounting", lv.id)
        for path in [*lv.targets, lv.staged_path]:
            if fs.mount_info(path) is not None:
                fs.run(["umount", "-l", path], ok=(0, 32), what="umount -l (device of a dead lazy server)")

    def _ensure_staged_mount(self, lv: LocalVolume) -> None:
        device = self._device(lv.id)
        if lv.access_type == "mount":
            Path(lv.staged_path).mkdir(parents=True, exist_ok=True)
            self._mount(device, lv.staged_path, lv.fs_type, lv.mount_flags, readonly=lv.readonly)
        lv.device = device
        self.vols.update(lv.id, lambda cur: setattr(cur, "device", device))

    def NodeUnstageVolume(self, request: Any, context: Any) -> Any:
        with self._held(request.volume_id, request.staging_target_path, "staging_target_path") as (vid, staging, lv):
            if lv is None:
                fs.ensure_unmounted(staging)
                return pb.NodeUnstageVolumeResponse()
            if lv.staged_path and lv.staged_path != staging:
                # spec: "not staged to the staging_target_path" -> OK; the real staging stays
                log.warning("NodeUnstage of %s at %s: it is staged at %s; nothing to do", vid, staging, lv.staged_path)
                return pb.NodeUnstageVolumeResponse()
            if lv.targets:
                raise precondition(f"volume {vid} is still published at {', '.join(sorted(lv.targets))}")
            if lv.staged_path:
                if lv.access_type == "mount" and fs.mount_info(lv.staged_path):
                    fs.sync_fs(lv.staged_path)
                fs.ensure_unmounted(staging)
                flush = lv.persistence == "object" and lv.dirty
                self.vols.update(vid, lambda cur: setattr(cur, "staged_path", ""),
                                 to=Phase.FLUSHING if flush else Phase.CLEAN)
            self.sync.finish(vid)           # flush + commit; ABORTED with progress while it runs
            self.sync.lazy.release_all(vid)  # hydration state kept: a later stage here resumes
            self.backend.release(vid)
            self.vols.update(vid, lambda cur: setattr(cur, "device", ""))
        log.info("volume %s unstaged from %s", vid, staging)
        return pb.NodeUnstageVolumeResponse()

    # -- publish ---------------------------------------------------------------------------
    def NodePublishVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        target = ids.host_path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):   # required fields first, then the preconditions
            raise invalid("volume_capability is required")
        if not request.staging_target_path:     # spec: "Staging target path not set" -> FAILED_PRECONDITION
            raise precondition("staging_target_path is required: this driver has STAGE_UNSTAGE_VOLUME")
        staging = ids.host_path(request.staging_target_path, "staging_target_path")
        cap = caps.to_dict(request.volume_capability)
        why = caps.unsupported_reason(cap)
        if why:
            raise invalid(why)
        readonly = request.readonly or caps.is_read_only_mode(cap)
        with self.locks.hold(vid):
            lv = self.vols.get(vid)
            if lv is None or not lv.staged:
                self._known_or_missing(vid, dict(request.secrets))
                raise precondition(f"volume {vid} is not staged on this node; NodeStageVolume first")
            if lv.staged_path != staging:
                raise precondition(f"volume {vid} is staged at {lv.staged_path}, not at {staging}")
            if cap["access_type"] != lv.access_type:
                raise precondition(f"volume {vid} is staged for {lv.access_type} access, not {cap['access_type']}")
            want = {"readonly": readonly, "access_type": cap["access_type"], "mount_flags": cap["mount_flags"]}
            have = lv.targets.get(target)
            if have is not None and have != want:
                raise CsiError(Code.ALREADY_EXISTS, f"volume {vid} is already published at {target} with different options")
            for other in lv.targets:
                if other != target and cap["mode"] == "SINGLE_NODE_SINGLE_WRITER":
                    raise precondition(f"volume {vid} is SINGLE_NODE_SINGLE_WRITER and already published at {other}")
            if cap["access_type"] == "mount":
                Path(target).mkdir(parents=True, exist_ok=True)
                self._bind(lv.staged_path, target, readonly, cap["mount_flags"])
            else:
                if not os.path.exists(target):
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    Path(target).touch()
                # a read-only bind of a device node does not stop writes: use a read-only device
                self._bind(self._device(vid, read_only=readonly), target, readonly, [])

            def published(cur: LocalVolume) -> None:
                cur.targets[target] = want
                if not cur.readonly:
                    cur.dirty = True
            self.vols.update(vid, published, to=Phase.PUBLISHED)
        return pb.NodePublishVolumeResponse()

    @staticmethod
    def _bind(src: str, target: str, readonly: bool, flags: list[str]) -> None:
        try:
            fs.ensure_bind(src, target, readonly=readonly, options=flags)
        except fs.MountConflict as e:
            raise CsiError(Code.ALREADY_EXISTS, e.message) from e

    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        with self._held(request.volume_id, request.target_path, "target_path") as (vid, target, lv):
            fs.ensure_unmounted(target)
            if os.path.isdir(target) and not os.path.islink(target):
                try:
                    os.rmdir(target)
                except OSError as e:
                    raise CsiError(Code.INTERNAL, f"cannot remove target {target}: {e}") from e
            elif os.path.lexists(target):
                os.unlink(target)
            if lv is not None and target in lv.targets:
                last = len(lv.targets) == 1

                def unpublished(cur: LocalVolume) -> None:
                    cur.targets.pop(target, None)
                lv = self.vols.update(vid, unpublished, to=Phase.RELEASED if last else None)
                if last:
                    self.sync.on_release(lv)       # sync, then flush in the background
        return pb.NodeUnpublishVolumeResponse()

    # -- stats / expand --------------------------------------------------------------------
    def NodeGetVolumeStats(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        path = _lookup_path(request.volume_path)
        lv = self.vols.get(vid)
        if lv is None:
            raise not_found(f"volume {vid} is not on this node")
        if path is None or (path != lv.staged_path and path not in lv.targets):
            raise not_found(f"{request.volume_path[:200]!r} is not a path of volume {vid}")
        if not os.path.exists(path):
            raise not_found(f"volume path {path} does not exist")
        Usage = pb.VolumeUsage
        cond = pb.VolumeCondition(abnormal=False, message="ok")
        device_ok = self.backend.exists(vid) and (not lv.device or os.path.exists(lv.device))
        if not device_ok:
            cond = pb.VolumeCondition(abnormal=True, message=f"backing device of volume {vid} is gone")
        if lv.access_type == "block":
            total = fs.block_size(lv.device) if device_ok else 0
            return pb.NodeGetVolumeStatsResponse(usage=[Usage(unit=Usage.BYTES, total=total)], volume_condition=cond)
        if device_ok and fs.mount_info(path) is None:
            cond = pb.VolumeCondition(abnormal=True, message=f"{path} is not mounted")
        st = fs.volume_stats(path)
        return pb.NodeGetVolumeStatsResponse(usage=[
            Usage(unit=Usage.BYTES, total=st.total_bytes, used=st.used_bytes, available=st.available_bytes),
            Usage(unit=Usage.INODES, total=st.total_inodes, used=st.used_inodes, available=st.available_inodes),
        ], volume_condition=cond)

    def NodeExpandVolume(self, request: Any, context: Any) -> Any:
        vid = ids.volume_id(request.volume_id)
        path = _lookup_path(request.volume_path)
        cap = caps.to_dict(request.volume_capability) if request.HasField("volume_capability") else None
        with self.locks.hold(vid):
            lv = self.vols.get(vid)
            if lv is None or not lv.staged:
                raise not_found(f"volume {vid} is not staged on this node")
            if path is None or (path != lv.staged_path and path not in lv.targets):
                raise not_found(f"{request.volume_path[:200]!r} is not a path of volume {vid}")
            if cap is not None and cap["access_type"] != lv.access_type:   # spec: "Exceeds capabilities"
                raise invalid(f"volume {vid} is staged for {lv.access_type} access, not {cap['access_type']}")
            size = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
            if not size:
                size = self._record(vid, dict(request.secrets)).size
            if request.capacity_range.limit_bytes and size > request.capacity_range.limit_bytes:
                raise CsiError(Code.OUT_OF_RANGE, "required_bytes exceeds limit_bytes")
            self.backend.expand(vid, size)
            self.sync.lazy.refresh_size(vid)
            if lv.access_type == "mount":
                fs.grow_fs(lv.device, lv.staged_path, lv.fs_type)
            new_size = self.backend.size(vid)
            lv = self.vols.update(vid, lambda cur: setattr(cur, "size", new_size))
        return pb.NodeExpandVolumeResponse(capacity_bytes=lv.size)

    # -- restart ---------------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: reattach devices, restore staged mounts, resume flush jobs."""
        for lv in self.vols.all():
            try:
                if not self.backend.exists(lv.id):
                    log.warning("volume %s is in the node state but its local data is gone", lv.id)
                    continue
                if lv.staged:
                    self._recover_lazy(lv)
                    self._ensure_staged_mount(lv)
                    for target, opts in lv.targets.items():
                        # a read-only block target gets the read-only device again, as in NodePublish
                        src = lv.staged_path if lv.access_type == "mount" else \
                            self._device(lv.id, read_only=bool(opts["readonly"]))
                        fs.ensure_bind(src, target, readonly=opts["readonly"], options=opts.get("mount_flags", []))
                    log.info("recovered staged volume %s at %s", lv.id, lv.staged_path)
                self.sync.resume(lv)
            except CsiError as e:
                log.error("cannot recover volume %s: %s", lv.id, e)
