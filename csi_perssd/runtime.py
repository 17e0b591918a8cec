"""Builds a running driver from a Config: stores, backend, services, background loops."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from . import __version__
from .config import Config
from .controller import Controller
from .errors import CsiError
from .identity import Identity
from .local.backend import Backend
from .remote.catalog import NodeRecord
from .server import Server
from .stores import Stores

log = logging.getLogger(__name__)
CAPACITY_SLACK = 64 << 20      # free-space changes smaller than this (or 1% of the pool) wait for the refresh


def make_backend(cfg: Config) -> Backend:
    if cfg.backend == "rawfile":
        from .local.rawfile import RawfileBackend
        return RawfileBackend(cfg.rawfile_dir, max_volume_bytes=cfg.max_volume_bytes or None,
                              reserve_bytes=cfg.reserve_bytes)
    if cfg.backend == "lvm":
        from .local.lvm import LvmBackend
        if not cfg.volume_group:
            raise ValueError("--backend lvm needs --volume-group")
        return LvmBackend(cfg.volume_group, thin_pool=cfg.thin_pool, lvm_config=cfg.lvm_config or None,
                          max_volume_bytes=cfg.max_volume_bytes, reserve_bytes=cfg.reserve_bytes)
    raise ValueError(f"unknown backend {cfg.backend!r} (rawfile or lvm)")


class Runtime:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stores = Stores(cfg)
        self.stop_event = threading.Event()
        self.backend: Backend | None = None
        self.node: Any = None
        self.volumes: Any = None        # local.volumes.LocalVolumes (node and all modes)
        self.sync: Any = None
        self.controller: Controller | None = None
        self._threads: list[threading.Thread] = []
        self._last_node: NodeRecord | None = None     # what the heartbeat last wrote (heartbeat=0)
        self._node_put_at = self._checked_at = -1e18
        local_node = None
        if cfg.mode in ("node", "all"):
            from .local.state import NodeState
            from .local.volumes import LocalVolumes
            from .node import Node
            from .sync import VolumeSync
            if not cfg.node_id:
                raise ValueError("--node-id is required in node and all modes")
            self.backend = make_backend(cfg)
            self.volumes = LocalVolumes(NodeState(cfg.state_dir))
            from . import events, metrics
            self.sync = VolumeSync(cfg, self.stores, self.backend, self.volumes,
                                   events=events.from_config(cfg))
            metrics.watch_local_volumes(self.volumes.all)
            self.node = Node(cfg, self.stores, self.backend, self.volumes, self.sync)
            local_node = self.node_record()
        if cfg.mode in ("controller", "all"):
            self.controller = Controller(cfg, self.stores, local_node=local_node)
            try:
                from .snapshots import Snapshots
                self.controller.snapshots = Snapshots(cfg, self.stores, self.controller)
            except ImportError:
                pass
        group = None
        if self.controller is not None and self.controller.snapshots is not None:
            from .groupsnap import GroupSnapshots
            group = GroupSnapshots(self.stores, self.controller)
        metadata = None
        if self.controller is not None and cfg.enable_snapshot_metadata:
            from .snapmeta import SnapshotMetadata
            metadata = SnapshotMetadata(self.stores)
        # spec: every instance reports the plugin "as a whole" (controller, group controller),
        # whichever services it serves itself; SnapshotMetadata where the flag enables it
        self.identity = Identity(has_controller=True, problems=self.problems, has_group_controller=True,
                                 has_snapshot_metadata=cfg.enable_snapshot_metadata)
        self.server = Server(cfg.socket_path, self.identity, self.controller, self.node, group=group,
                             metadata=metadata)

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.backend is not None:
            out += self.backend.check()
        return out

    def node_record(self) -> NodeRecord:
        assert self.backend is not None
        try:
            cap = self.backend.capacity()
            total, avail, biggest = cap.total_bytes, cap.available_bytes, cap.max_volume_bytes
        except CsiError:
            total = avail = biggest = 0
        reclaim = self.sync.reclaimable_bytes() if self.sync is not None else 0
        from . import metrics
        metrics.POOL_BYTES.labels("total").set(total)
        metrics.POOL_BYTES.labels("available").set(avail)
        metrics.POOL_BYTES.labels("cache").set(reclaim)
        return NodeRecord(id=self.cfg.node_id, pool=self.cfg.pool, total_bytes=total, available_bytes=avail,
                          reclaimable_bytes=reclaim, max_volume_bytes=biggest,
                          max_volumes=self.cfg.max_volumes_per_node, version=__version__)

    def heartbeat(self) -> None:
        """Idle cost is bounded whatever the catalog holds: the node record is written when it
        changed (or after node_refresh_seconds); each local copy costs one HEAD per
        volume_check_seconds (was its volume deleted?); nothing lists the catalog."""
        rec = self.node_record()
        if self.controller is not None:
            self.controller.local_node = rec
        cat = self.stores.background_catalog()
        now = time.monotonic()
        if self._node_changed(rec) or now - self._node_put_at >= self.cfg.node_refresh_seconds:
            cat.put_node(rec)
            self._last_node, self._node_put_at = rec, now
        if now - self._checked_at >= self.cfg.volume_check_seconds:
            self.sync.drop_deleted(cat.volume_exists)
            self._checked_at = now

    def _node_changed(self, rec: NodeRecord) -> bool:
        """Whether the controller should hear about it: any field but the free-space figures, or
        those by at least CAPACITY_SLACK (a busy pool's free space moves all the time)."""
        last = self._last_node
        if last is None:
            return True
        moved = max(abs(rec.available_bytes - last.available_bytes), abs(rec.reclaimable_bytes - last.reclaimable_bytes))
        same = dataclasses.replace(rec, heartbeat=0.0, available_bytes=0, reclaimable_bytes=0) == dataclasses.replace(
            last, heartbeat=0.0, available_bytes=0, reclaimable_bytes=0)
        return not same or moved >= min(CAPACITY_SLACK, max(rec.total_bytes // 100, 1))

    def _loop(self, name: str, every: float, fn: Any) -> None:
        def run() -> None:
            while not self.stop_event.wait(every):
                try:
                    fn()
                except Exception as e:     # keep the loop alive; the next round retries
                    log.warning("%s failed: %s", name, e)
        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def start(self) -> None:
        if self.cfg.metrics_address:
            from . import metrics
            metrics.watch_stores(self.stores.factory)
            metrics.serve(self.cfg.metrics_address)
        problems = self.problems()
        for p in problems:
            log.error("not ready: %s", p)
        if self.node is not None:
            try:
                self.heartbeat()
            except CsiError as e:
                log.warning("first heartbeat failed (object store unreachable?): %s", e)
            self.node.recover()
            self._loop("heartbeat", self.cfg.heartbeat_seconds, self.heartbeat)
            from .lazy import dm
            if dm.available():          # lazy hydration: completed volumes leave the FUSE path
                self._loop("lazy-switch", 1.0, self.node.switch_completed)
        if self.controller is not None and self.controller.snapshots is not None:
            self.controller.snapshots.start_background(self)
        if self.node is not None:
            try:
                from .groupcut import GroupCutWorker
                from .snapshots import NodeSnapshotWorker
                single = NodeSnapshotWorker(self)
                single.also.append(GroupCutWorker(self, single).poll_once)    # same wake-ups
                single.start()
            except ImportError:
                pass
        self.server.start()

    def stop(self) -> None:
        self.stop_event.set()

    def serve_forever(self) -> None:
        self.start()
        self.server.run_until_signal(self.cfg.grace_seconds, on_stop=self.stop)
