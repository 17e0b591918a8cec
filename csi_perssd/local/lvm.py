"""LVM thin backend (production): one thin LV per volume in a thin pool on the node's NVMe.

- Volumes are thin LVs named from the volume id (`pv-<id>`, or `ph-<sha256>` when the id would
  break LVM's or device-mapper's name rules) and tagged `<tag>` and `<tag>.vol=<id>`.
- Snapshots are read-only thin snapshots `ps-<sha256(id, snap)>` tagged `<tag>`, `<tag>.snap`,
  `<tag>.of=<id>`, `<tag>.name=<snap>`; delete() removes a volume's snapshots with it.
- Only LVs carrying `<tag>` are ever changed; an untagged LV in the way is FAILED_PRECONDITION.
- allocated_ranges() and changed_ranges() read the pool metadata through a reserved metadata
  snapshot (`dmsetup message <vg>-<pool>-tpool 0 reserve_metadata_snap`), with thin_dump and
  thin_delta, and always release it.
- device() activates the LV; release() deactivates it when nothing holds it open, so an idle
  node keeps no device-mapper tables around (an LV still open is left active and logged).
- capacity() reports the pool's data and metadata usage; create() and snapshot() refuse with
  RESOURCE_EXHAUSTED once metadata (or data) usage passes its threshold.
- Inside `with batch():` (one RPC's work on the calling thread, e.g. NodeStage) the LV listing
  is read once and reused: exists(), size(), device() take it from the listing, create() adds
  the LV it made as lvcreate made it (size rounded up to the VG's extent), any other lvm change
  drops the listing. Block maps, capacity and release always read afresh. Under emulation each
  lvm run costs 0.3-1 s; a lazy NodeStage makes two (lvs, lvcreate) instead of five.
- create_unlisted() makes a volume the node holds no record of without that listing: the pool's
  room is read from its device-mapper status (one ioctl), the LV's fields from the pool as the
  last listing showed it; lvcreate then tells whether the name was free. A stage on a node
  that never held the volume (the usual lazy stage) thus runs one lvm command, lvcreate.
  plan_unlisted() tells beforehand what it would make (path, size, sector size), so a lazy
  stage starts its server and devices on that path while lvcreate runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from .. import ids
from ..errors import Code, CsiError, not_found, precondition
from . import devmapper, fs, proc
from .backend import Backend, Capacity, Extent, Planned
from .lvmcli import DmCli, LvInfo, LvmCli, ThinRange, ToolRunner, dm_name

log = logging.getLogger(__name__)

SECTOR = 512
MAX_DM_NAME = 127
# LVM refuses LV names containing these (they name its internal sub-volumes)
_RESERVED = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage",
             "_mlog", "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin",
             "_wcorig")
TOOLS = {"lvm": "lvm2", "dmsetup": "dmsetup", "thin_delta": "thin-provisioning-tools",
         "thin_dump": "thin-provisioning-tools"}


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Sorted, with overlapping and touching extents joined."""
    out: list[Extent] = []
    for e in sorted((x for x in extents if x.length > 0), key=lambda x: (x.offset, x.length)):
        if out and e.offset <= out[-1].end:
            last = out.pop()
            out.append(Extent(last.offset, max(last.end, e.end) - last.offset))
        else:
            out.append(e)
    return out


def blocks_to_extents(ranges: list[ThinRange], chunk: int, size: int) -> list[Extent]:
    """Thin block ranges (units of `chunk` bytes) -> merged byte extents clipped to `size`."""
    out = []
    for r in ranges:
        start, end = r.begin * chunk, min((r.begin + r.length) * chunk, size)
        if end > start:
            out.append(Extent(start, end - start))
    return merge_extents(out)


class LvmBackend:
    name = "lvm"
    tracks_changes = True       # thin_delta between thin snapshots: sync.py flushes only changed blocks

    def __init__(self, volume_group: str, thin_pool: str = "perssd-pool", tag: str = "perssd",
                 lvm_config: str | None = None, *, metadata_full_ratio: float = 0.90,
                 data_full_ratio: float = 0.98, max_volume_bytes: int = 0,
                 reserve_bytes: int = 0, overprovision_ratio: float = 1.0,
                 deactivate_on_release: bool = True, timeout_s: float = 300.0):
        self.vg = volume_group
        self.pool = thin_pool
        self.tag = tag
        self.metadata_full_ratio = metadata_full_ratio
        self.data_full_ratio = data_full_ratio
        self.max_volume_bytes = max_volume_bytes
        self.reserve_bytes = reserve_bytes
        self.overprovision_ratio = overprovision_ratio
        self.deactivate_on_release = deactivate_on_release
        runner = ToolRunner(timeout_s)
        self.lvm = LvmCli(lvm_config, runner)
        self.dm = DmCli(runner)
        self._meta_lock = threading.Lock()
        self._local = threading.local()         # .listing: the batch's LV list (None: read it)
        # .made: LVs create_unlisted made in the batch (no listing read)
        self._pool_seen: LvInfo | None = None   # the thin pool as the latest listing showed it

    # -- names and tags -----------------------------------------------------------------------
    def _fits(self, lv: str) -> bool:
        return (len(lv) <= 120 and not any(r in lv for r in _RESERVED)
                and len(dm_name(self.vg, lv)) + len("-tpool") <= MAX_DM_NAME)

    def volume_lv(self, vid: str) -> str:
        ids.volume_id(vid)
        cand = f"pv-{vid}"
        return cand if self._fits(cand) else f"ph-{_digest(vid)}"

    def snapshot_lv(self, vid: str, snap: str) -> str:
        ids.volume_id(vid)
        ids.snapshot_id(snap)
        return f"ps-{_digest(vid, snap)}"

    def _vol_tag(self, vid: str) -> str:
        return f"{self.tag}.vol={vid}"

    def _of_tag(self, vid: str) -> str:
        return f"{self.tag}.of={vid}"

    def _name_tag(self, snap: str) -> str:
        return f"{self.tag}.name={snap}"

    # -- state --------------------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Reuse one LV listing on this thread until the block ends (see the module doc)."""
        if self._batching:
            yield
            return
        self._local.batch, self._local.listing, self._local.made = True, None, {}
        try:
            yield
        finally:
            self._local.batch, self._local.listing, self._local.made = False, None, {}

    @property
    def _batching(self) -> bool:
        """Inside a `batch()` block on this thread."""
        return bool(getattr(self._local, "batch", False))

    def _lvs(self, cached: bool = False) -> list[LvInfo]:
        """The VG's LVs; inside a batch, `cached` takes the batch's listing when it has one."""
        if cached and self._batching and self._local.listing is not None:
            listing: list[LvInfo] = self._local.listing
            return listing
        lvs = self.lvm.lvs(self.vg)
        if self._batching:
            self._local.listing = lvs
        self._pool_seen = next((lv for lv in lvs if lv.name == self.pool and lv.segtype == "thin-pool"),
                               self._pool_seen)
        return lvs

    def _made_here(self, vid: str) -> LvInfo | None:
        """The volume's LV if create_unlisted made it in this batch."""
        made: dict[str, LvInfo] = getattr(self._local, "made", None) or {}
        return made.get(self.volume_lv(vid)) if self._batching else None

    def _run(self, *args: str, what: str = "", made: LvInfo | None = None) -> None:
        """An lvm command that changes the VG: the batch's listing is dropped, or, for an LV
        whose every field is known (`made`), extended with it."""
        try:
            self.lvm.run(*args, what=what)
        finally:
            if self._batching:
                listing = self._local.listing
                self._local.listing = [*listing, made] if made is not None and listing is not None else None
                if made is None:
                    self._local.made = {}

    def _owned(self, lvs: list[LvInfo], name: str) -> LvInfo | None:
        for lv in lvs:
            if lv.name == name:
                if self.tag not in lv.tags:
                    raise precondition(f"LV {self.vg}/{name} exists but is not tagged "
                                       f"{self.tag!r}: refusing to touch it")
                return lv
        return None

    def _volume(self, lvs: list[LvInfo], vid: str) -> LvInfo | None:
        lv = self._owned(lvs, self.volume_lv(vid))
        if lv is not None and self._vol_tag(vid) not in lv.tags:
            raise precondition(f"LV {self.vg}/{lv.name} is not tagged {self._vol_tag(vid)!r}")
        return lv

    def _need_volume(self, lvs: list[LvInfo], vid: str) -> LvInfo:
        lv = self._volume(lvs, vid)
        if lv is None:
            raise not_found(f"volume {vid} not found in {self.vg}/{self.pool}")
        return lv

    def _snapshot(self, lvs: list[LvInfo], vid: str, snap: str) -> LvInfo | None:
        lv = self._owned(lvs, self.snapshot_lv(vid, snap))
        if lv is not None and self._of_tag(vid) not in lv.tags:
            raise precondition(f"LV {self.vg}/{lv.name} is not a snapshot of {vid}")
        return lv

    def _pool(self, lvs: list[LvInfo]) -> LvInfo:
        for lv in lvs:
            if lv.name == self.pool:
                if lv.segtype != "thin-pool":
                    raise precondition(f"{self.vg}/{self.pool} is a {lv.segtype} LV, not a thin pool")
                return lv
        raise precondition(f"thin pool {self.vg}/{self.pool} not found "
                           f"(create it with `csi-perssd pool init`)")

    def _path(self, lv: LvInfo) -> str:
        return lv.path if lv.path and os.path.exists(lv.path) else lv.dm_path

    def _activate(self, lv: LvInfo) -> str:
        if not lv.active:
            self._run("lvchange", "-ay", "-K", f"{self.vg}/{lv.name}")
        path = self._path(lv)
        if not os.path.exists(path):
            raise CsiError(Code.INTERNAL, f"LV {self.vg}/{lv.name} is active but {path} is missing")
        return path

    def _check_room(self, pool: LvInfo, what: str) -> None:
        meta = (pool.metadata_percent or 0.0) / 100
        data = (pool.data_percent or 0.0) / 100
        if meta >= self.metadata_full_ratio:
            raise CsiError(Code.RESOURCE_EXHAUSTED,
                           f"{what}: thin pool {self.vg}/{self.pool} metadata is {meta:.1%} full "
                           f"(limit {self.metadata_full_ratio:.0%}); extend the metadata LV")
        if data >= self.data_full_ratio:
            raise CsiError(Code.RESOURCE_EXHAUSTED,
                           f"{what}: thin pool {self.vg}/{self.pool} data is {data:.1%} full "
                           f"(limit {self.data_full_ratio:.0%})")

    def _pool_active(self, lvs: list[LvInfo]) -> LvInfo:
        pool = self._pool(lvs)
        if not pool.active or pool.data_percent is None:
            self._run("lvchange", "-ay", f"{self.vg}/{self.pool}")
            pool = self._pool(self._lvs())
        return pool

    # -- Backend: lifecycle -------------------------------------------------------------------
    def create(self, vid: str, size: int) -> None:
        if size <= 0:
            raise CsiError(Code.INVALID_ARGUMENT, f"volume size must be positive, got {size}")
        lvs = self._lvs(cached=True)
        lv = self._volume(lvs, vid)
        if lv is not None:
            if lv.size >= size:
                return
            raise CsiError(Code.ALREADY_EXISTS, f"volume {vid} exists with {lv.size} bytes, "
                                                f"smaller than the requested {size}")
        if self.max_volume_bytes and size > self.max_volume_bytes:
            raise CsiError(Code.OUT_OF_RANGE, f"volume size {size} exceeds the node limit "
                                              f"{self.max_volume_bytes}")
        pool = self._pool_active(lvs)
        self._check_room(pool, f"create volume {vid}")
        name = self.volume_lv(vid)
        self._run("lvcreate", "--type", "thin", "-V", f"{_round_up(size, SECTOR)}b",
                  "--thinpool", self.pool, "-n", name,
                  "--addtag", self.tag, "--addtag", self._vol_tag(vid),
                  "--setactivationskip", "n", "-y", self.vg, what=f"create volume {vid}",
                  made=self._made(pool, name, vid, size))

    def _made(self, pool: LvInfo, name: str, vid: str, size: int) -> LvInfo | None:
        """The thin LV lvcreate has just made, as `lvs` would list it (active, its size rounded
        up to whole extents); None when the extent size is unknown."""
        if pool.extent_size <= 0:
            return None
        return replace(pool, name=name, path=f"/dev/{self.vg}/{name}", dm_path=f"/dev/mapper/{dm_name(self.vg, name)}",
                       size=_round_up(size, pool.extent_size), tags=(self.tag, self._vol_tag(vid)),
                       attr="Vwi-a-tz--", segtype="thin", pool_lv=self.pool, origin="", thin_id=None,
                       data_percent=0.0, metadata_percent=None, active=True, open=False, metadata_size=0)

    def _unlisted_pool(self, size: int) -> LvInfo | None:
        """The pool as last listed when create_unlisted may try lvcreate alone (a batch, the
        pool seen with its extent size, no size limit in the way); None otherwise."""
        pool = self._pool_seen
        if (not self._batching or pool is None or pool.extent_size <= 0 or size <= 0
                or (self.max_volume_bytes and size > self.max_volume_bytes)):
            return None
        return pool

    def plan_unlisted(self, vid: str, size: int) -> Planned | None:
        """What create_unlisted would make: /dev/<vg>/<lv>, the size rounded up to whole
        extents, the thin pool's logical sector size (a thin LV has its pool's). None when
        create_unlisted would decline from what is known now (it may still decline later)."""
        pool = self._unlisted_pool(size)
        if pool is None:
            return None
        tpool = f"/dev/mapper/{dm_name(self.vg, self.pool)}-tpool"
        try:
            sector = fs.logical_sector_size(tpool)
        except OSError as e:
            log.info("volume %s: the thin pool's sector size is unknown (%s): no plan", vid, e)
            return None
        return Planned(disk=f"/dev/{self.vg}/{self.volume_lv(vid)}", size=_round_up(size, pool.extent_size),
                       sector_size=sector)

    def create_unlisted(self, vid: str, size: int) -> bool:
        """Inside a batch: create a volume the caller holds no record of without listing the VG
        (see the module doc). False, with nothing changed, whenever that cannot be decided so
        (no batch, the pool never listed or inactive, little room, a size limit, lvcreate
        refusing, e.g. because the LV exists): the caller then goes the listed way (create()),
        which gives any refusal its proper error."""
        pool = self._unlisted_pool(size)
        if pool is None:
            return False
        room = self._pool_room()
        if room is None:
            return False
        data, meta = room
        if meta >= self.metadata_full_ratio or data >= self.data_full_ratio:
            return False
        name = self.volume_lv(vid)
        made = self._made(pool, name, vid, size)
        assert made is not None          # extent_size > 0
        try:
            self.lvm.run("lvcreate", "--type", "thin", "-V", f"{_round_up(size, SECTOR)}b",
                         "--thinpool", self.pool, "-n", name,
                         "--addtag", self.tag, "--addtag", self._vol_tag(vid),
                         "--setactivationskip", "n", "-y", self.vg, what=f"create volume {vid}")
        except CsiError as e:
            log.info("volume %s: lvcreate without a listing refused (%s): listing the VG", vid, e.message)
            self._local.listing = None
            return False
        self._local.listing = None if self._local.listing is None else [*self._local.listing, made]
        self._local.made[name] = made
        return True

    def _pool_room(self) -> tuple[float, float] | None:
        """(data, metadata) used ratios of the active thin pool from its status line
        ('<transaction> <used>/<total metadata blocks> <used>/<total data blocks> ...');
        None when the pool is not active or the status cannot be read."""
        if not devmapper.available():
            return None
        try:
            targets = devmapper.status(dm_name(self.vg, self.pool) + "-tpool")
        except CsiError:
            return None
        try:
            (t,) = targets
            meta, data = (tuple(int(x) for x in f.split("/")) for f in t.params.split()[1:3])
            return data[0] / data[1], meta[0] / meta[1]
        except (ValueError, ZeroDivisionError):
            return None

    def exists(self, vid: str) -> bool:
        return self._made_here(vid) is not None or self._volume(self._lvs(cached=True), vid) is not None

    def size(self, vid: str) -> int:
        made = self._made_here(vid)
        return made.size if made is not None else self._need_volume(self._lvs(cached=True), vid).size

    def device(self, vid: str, read_only: bool = False) -> str:
        if read_only:
            # a read-only bind of a device node does not stop writes, and flipping the LV's
            # permission would also stop a read-write user of the same volume: refuse clearly
            raise CsiError(Code.FAILED_PRECONDITION, f"volume {vid}: read-only raw block publishing is not "
                           "supported by the lvm backend (read-only mounts are)")
        return self._activate(self._made_here(vid) or self._need_volume(self._lvs(cached=True), vid))

    def disk_path(self, vid: str) -> str:
        """The LV's device node (activated)."""
        return self.device(vid)

    def hydrate_path(self, vid: str) -> str:
        """A fresh thin volume is hydrated through its device."""
        return self.device(vid)

    def release(self, vid: str) -> None:
        lv = self._volume(self._lvs(), vid)
        if lv is None or not lv.active or not self.deactivate_on_release:
            return
        if lv.open:
            log.warning("release %s: %s/%s is still open, leaving it active", vid, self.vg, lv.name)
            return
        self._run("lvchange", "-an", f"{self.vg}/{lv.name}", what=f"deactivate volume {vid}")

    def delete(self, vid: str) -> None:
        lvs = self._lvs()
        vol = self._volume(lvs, vid)
        doomed = [lv for lv in lvs if self.tag in lv.tags and self._of_tag(vid) in lv.tags]
        if vol is not None:
            doomed.append(vol)
        # no "open" pre-check: udev probing a fresh device opens it for a moment, and lvremove
        # retries that itself; a device really in use fails with FAILED_PRECONDITION ("in use")
        if doomed:
            self._run("lvremove", "-y", *[f"{self.vg}/{lv.name}" for lv in doomed],
                      what=f"delete volume {vid}")

    def expand(self, vid: str, size: int) -> None:
        lv = self._need_volume(self._lvs(), vid)
        if lv.size >= size:
            return
        if self.max_volume_bytes and size > self.max_volume_bytes:
            raise CsiError(Code.OUT_OF_RANGE, f"volume size {size} exceeds the node limit "
                                              f"{self.max_volume_bytes}")
        self._run("lvextend", "-L", f"{_round_up(size, SECTOR)}b", f"{self.vg}/{lv.name}",
                  what=f"expand volume {vid}")

    def list_volumes(self) -> list[str]:
        prefix = f"{self.tag}.vol="
        out = []
        for lv in self._lvs():
            if self.tag in lv.tags:
                out += [t[len(prefix):] for t in lv.tags if t.startswith(prefix)]
        return sorted(out)

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, vid: str, snap: str) -> str:
        lvs = self._lvs()
        vol = self._need_volume(lvs, vid)
        lv = self._snapshot(lvs, vid, snap)
        if lv is not None:
            return self._activate(lv)
        self._check_room(self._pool_active(lvs), f"snapshot {snap} of {vid}")
        name = self.snapshot_lv(vid, snap)
        self._run("lvcreate", "-s", "-pr", "-K", "-ay", "-n", name,
                  "--addtag", self.tag, "--addtag", f"{self.tag}.snap",
                  "--addtag", self._of_tag(vid), "--addtag", self._name_tag(snap),
                  f"{self.vg}/{vol.name}", what=f"snapshot {snap} of {vid}")
        lv = self._snapshot(self._lvs(), vid, snap)
        if lv is None:
            raise CsiError(Code.INTERNAL, f"snapshot {snap} of {vid} vanished after lvcreate")
        return self._activate(lv)

    def delete_snapshot(self, vid: str, snap: str) -> None:
        lv = self._snapshot(self._lvs(), vid, snap)
        if lv is None:
            return
        self._run("lvremove", "-y", f"{self.vg}/{lv.name}", what=f"delete snapshot {snap}")

    def snapshot_path(self, vid: str, snap: str) -> str | None:
        lv = self._snapshot(self._lvs(), vid, snap)
        return None if lv is None else self._activate(lv)

    def snapshots(self, vid: str) -> list[str]:
        prefix = f"{self.tag}.name="
        out = []
        for lv in self._lvs():
            if self.tag in lv.tags and self._of_tag(vid) in lv.tags:
                out += [t[len(prefix):] for t in lv.tags if t.startswith(prefix)]
        return sorted(out)

    # -- block maps ---------------------------------------------------------------------------
    @contextmanager
    def _metadata_snapshot(self, lvs: list[LvInfo]) -> Iterator[str]:
        """Reserve the pool's metadata snapshot, yield the _tmeta device, always release."""
        self._pool_active(lvs)
        tpool = dm_name(self.vg, self.pool) + "-tpool"
        tmeta = "/dev/mapper/" + dm_name(self.vg, self.pool) + "_tmeta"
        with self._meta_lock:
            rc, err = self.dm.message_status(tpool, "reserve_metadata_snap")
            if rc != 0 and "busy" in err.lower():
                # left over from a crash between reserve and release: drop it and retry once
                log.warning("pool %s/%s holds a stale metadata snapshot; releasing it", self.vg, self.pool)
                self.dm.message_status(tpool, "release_metadata_snap")
                rc, err = self.dm.message_status(tpool, "reserve_metadata_snap")
            if rc != 0:
                raise CsiError(Code.INTERNAL, f"reserve_metadata_snap on {tpool} failed: {err}")
            try:
                yield tmeta
            finally:
                rc, err = self.dm.message_status(tpool, "release_metadata_snap")
                if rc != 0:
                    log.error("release_metadata_snap on %s failed: %s", tpool, err)

    def _flush_device(self, lv: LvInfo) -> None:
        """Push buffered writes of an active LV into the pool so the metadata maps them."""
        if lv.active and os.path.exists(self._path(lv)):
            fd = os.open(self._path(lv), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _source(self, lvs: list[LvInfo], vid: str, snap: str | None) -> LvInfo:
        """The volume itself, or its snapshot `snap` (NOT_FOUND if missing)."""
        vol = self._need_volume(lvs, vid)
        if snap is None:
            self._flush_device(vol)
            return vol
        lv = self._snapshot(lvs, vid, snap)
        if lv is None:
            raise not_found(f"snapshot {snap} of volume {vid} not found")
        return lv

    def allocated_ranges(self, vid: str, snap: str | None = None) -> list[Extent]:
        """Mapped ranges of the volume, or of its snapshot `snap` when given.

        For a flush read from a snapshot, pass that snapshot: the volume may have discarded
        blocks since, which the snapshot still holds."""
        lvs = self._lvs()
        src = self._source(lvs, vid, snap)
        pool = self._pool(lvs)
        assert src.thin_id is not None
        with self._metadata_snapshot(lvs) as tmeta:
            mapped = self.dm.thin_dump(tmeta, src.thin_id)
        return blocks_to_extents(mapped, pool.chunk_size, src.size)

    def changed_ranges(self, vid: str, base_snap: str, snap: str | None = None
                       ) -> list[Extent] | None:
        """Ranges that differ between snapshot `base_snap` and the volume (or its snapshot
        `snap` when given — use that when the flush reads from `snap`); None without the base.
        Blocks mapped in only one of the two (written, or discarded) count as changed."""
        lvs = self._lvs()
        base = self._snapshot(lvs, vid, base_snap)
        src = self._source(lvs, vid, snap)
        if base is None or base.thin_id is None:
            return None
        pool = self._pool(lvs)
        assert src.thin_id is not None
        with self._metadata_snapshot(lvs) as tmeta:
            delta = self.dm.thin_delta(tmeta, base.thin_id, src.thin_id)
        changed = [r for r in delta if r.kind in ("different", "left_only", "right_only")]
        return blocks_to_extents(changed, pool.chunk_size, src.size)

    # -- pool ---------------------------------------------------------------------------------
    def capacity(self) -> Capacity:
        lvs = self._lvs()
        pool = self._pool_active(lvs)
        total = pool.size
        used = int(total * (pool.data_percent or 0.0) / 100)
        meta = (pool.metadata_percent or 0.0) / 100
        promised = sum(lv.size for lv in lvs
                       if lv.segtype == "thin" and lv.pool_lv == self.pool
                       and self.tag in lv.tags and f"{self.tag}.snap" not in lv.tags)
        free = min(total - used, int(total * self.overprovision_ratio) - promised)
        available = max(0, free - self.reserve_bytes)
        if meta >= self.metadata_full_ratio:
            available = 0
        max_vol = self.max_volume_bytes or int(total * self.overprovision_ratio)
        return Capacity(total_bytes=total, available_bytes=available,
                        max_volume_bytes=min(max_vol, available),
                        metadata_used_ratio=meta)

    def check(self) -> list[str]:
        problems = [f"{tool} not found on PATH (install {pkg})"
                    for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
        if not os.path.isdir("/sys/module/dm_thin_pool"):
            try:
                rc, _, err = proc.status(["modprobe", "dm_thin_pool"], timeout=60)
            except CsiError as e:
                rc, err = -1, e.message
            if rc != 0 or not os.path.isdir("/sys/module/dm_thin_pool"):
                problems.append("kernel module dm_thin_pool is not loaded and modprobe failed: "
                                + (err or f"exit {rc}"))
        if shutil.which("lvm") is None:
            return problems
        try:
            if self.lvm.vg(self.vg) is None:
                return problems + [f"volume group {self.vg!r} not found "
                                   f"(create it with `csi-perssd pool init`)"]
            pool = self._pool(self._lvs())
            if not pool.zero:
                problems.append(f"thin pool {self.vg}/{self.pool} does not zero new blocks: "
                                f"volumes could expose old data (lvchange --zero y)")
        except CsiError as e:
            problems.append(e.message)
        return problems


def startup_problems(backend: Backend) -> list[str]:
    """What the node lacks to serve volumes (logged at startup, Probe not ready while non-empty)."""
    return backend.check()
