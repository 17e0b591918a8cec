"""The node's part of a group snapshot (see groupsnap.py): cut every member at one point in time.

For a request `grouprequests/<this node>/<gid>.json`, with every member volume's node lock held:
1. members not staged here are pinned at their committed generation (their ownership is
   checked again after the cut: nobody may have taken one over meanwhile);
2. the file systems of the staged members are frozen together (`fs.frozen_all`: one watchdog for
   the group), a local point-in-time copy of each is taken, all are thawed;
3. each copy is uploaded like a single snapshot's (`NodeSnapshotWorker.upload_copy`), and the
   group is marked ready with the cut's time.
Writable block volumes cannot be frozen: two or more of them staged in one group cannot be
copied at one instant, so such a group fails with FAILED_PRECONDITION (one is fine: its copy is
atomic). Any other failure fails the group (the controller reports it and retries from scratch
at the next CreateVolumeGroupSnapshot); a busy volume or an unreachable store retries the whole
cut at the next poll, never only part of it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import ids
from .errors import Code, CsiError, precondition
from .groupsnap import check_unchanged, fail_group, mark_group_ready, pin_members
from .local import fs
from .local.state import LocalVolume, Phase
from .local.volumes import STAGED_PHASES
from .remote.catalog import Catalog, GroupSnapshotRecord, SnapshotRecord, VolumeRecord
from .remote.layout import group_requests_prefix
from .remote.store import NotFound
from .snapshots import NodeSnapshotWorker, Snapshots

log = logging.getLogger(__name__)


@dataclass
class Member:
    snap: SnapshotRecord
    vol: VolumeRecord
    lv: LocalVolume | None
    staged: bool


class GroupCutWorker:
    """Polled by the NodeSnapshotWorker on the same wake-ups (the controller rewrites
    nodes/<node>.wake after writing a group request), so it costs no request of its own."""

    def __init__(self, runtime: Any, single: NodeSnapshotWorker):
        self.rt = runtime
        self.single = single
        self.node_id = runtime.cfg.node_id

    def poll_once(self) -> int:
        """Handle this node's group requests; returns how many are still unfinished."""
        cat = self.rt.stores.background_catalog()
        pending = 0
        for info in list(cat.store.list(group_requests_prefix(self.node_id))):
            try:
                gid = ids.group_snapshot_id(json.loads(cat.store.get(info.key)[0])["group"])
            except (NotFound, ValueError, KeyError, CsiError):
                cat.store.delete(info.key)
                continue
            grec = cat.get_group(gid)
            if grec is None or grec.ready or grec.error or self.cut(cat, grec):
                cat.store.delete(info.key)
            else:
                pending += 1
        return pending

    def cut(self, cat: Catalog, grec: GroupSnapshotRecord) -> bool:
        """Returns True when the request is finished (the group is ready or failed)."""
        try:
            with self.rt.volumes.hold(*grec.source_volumes):     # no stage/unstage meanwhile
                members = self._members(cat, grec)
                if members is None:
                    return False            # a member's unstage flush is still running
                seen = pin_members(cat, Snapshots(self.rt.cfg, self.rt.stores, None),
                                   ((m.snap, m.vol) for m in members if not m.staged), self.rt.sync.codec)
                cut_at, copies = self._copy([m for m in members if m.staged])
            self._finish(cat, grec, members, seen, cut_at, copies)
        except CsiError as e:
            if e.code in (Code.ABORTED, Code.UNAVAILABLE):
                log.info("group snapshot %s: %s; the whole cut is retried", grec.id, e.message)
                return False
            log.error("group snapshot %s failed: %s", grec.id, e)
            fail_group(cat, grec.id, e)
        return True

    def _members(self, cat: Catalog, grec: GroupSnapshotRecord) -> list[Member] | None:
        out = []
        for sid, vid in zip(grec.snapshots, grec.source_volumes):
            snap = cat.get_snapshot(sid)
            if snap is None:
                raise precondition(f"member snapshot {sid} of volume {vid} was deleted")
            vol = cat.volume(vid)
            if vol.owner and vol.owner != self.node_id:
                raise precondition(f"volume {vid} is now in use on node {vol.owner}, not on {self.node_id}")
            lv = self.rt.volumes.get(vid)
            staged = bool(lv is not None and lv.phase in STAGED_PHASES and self.rt.backend.exists(vid))
            if lv is not None and lv.phase in (Phase.FLUSHING, Phase.DIRTY):
                return None
            out.append(Member(snap, vol, lv, staged))
        live_block = [m.vol.id for m in out if m.staged and m.lv is not None
                      and m.lv.access_type == "block" and not m.lv.readonly]
        if live_block and len([m for m in out if m.staged]) > 1:
            raise precondition(f"writable block volume(s) {', '.join(live_block)} cannot be frozen, so they cannot "
                               "be copied at the same instant as the group's other staged volumes")
        return out

    def _copy(self, staged: list[Member]) -> tuple[float, dict[str, tuple[str, Any]]]:
        """Freeze all, copy all, thaw all; the copies (and a lazy volume's written extents, taken
        with its copy) by volume ID, dropped again on failure."""
        backend = self.rt.backend
        mounts = [m.lv.staged_path for m in staged if m.lv is not None and m.lv.access_type == "mount"
                  and not m.lv.readonly and fs.mount_info(m.lv.staged_path) is not None]
        copies: dict[str, tuple[str, Any]] = {}
        names = {m.vol.id: m.snap.id for m in staged}
        t0 = time.monotonic()
        try:
            with fs.frozen_all(mounts, self.rt.cfg.freeze_timeout_seconds):
                cut_at = time.time()
                for m in staged:
                    changed = self.rt.sync.lazy.changed_extents(m.vol.id)
                    copies[m.vol.id] = (backend.snapshot(m.vol.id, m.snap.id), changed)
        except BaseException:
            for vid in copies:
                backend.delete_snapshot(vid, names[vid])
            raise
        log.info("group cut: %d file systems frozen together, %d copies taken in %.3fs",
                 len(mounts), len(copies), time.monotonic() - t0)
        return cut_at, copies

    def _finish(self, cat: Catalog, grec: GroupSnapshotRecord, members: list[Member],
                seen: dict[str, dict[str, Any]], cut_at: float, copies: dict[str, tuple[str, Any]]) -> None:
        pending = dict(copies)
        try:
            check_unchanged(cat, seen)
            for m in members:
                if m.vol.id in pending:
                    path, changed = pending.pop(m.vol.id)
                    self.single.upload_copy(cat, m.snap, path, m.vol.id, cut_at, changed)
                else:
                    cat.update_snapshot(m.snap.id, lambda r: setattr(r, "created_at", cut_at))
        finally:
            for m in members:
                if m.vol.id in pending:
                    self.rt.backend.delete_snapshot(m.vol.id, m.snap.id)
        mark_group_ready(cat, grec.id, cut_at)
        log.info("group snapshot %s ready: %d members, %d copied from this node", grec.id, len(members), len(copies))
