"""The Backend protocol: the node's local block storage (rawfile for dev/CI, LVM thin in production).

Every method is idempotent ("make it so"): creating an existing volume of the same size, deleting
a missing one, expanding to the current size all succeed quietly. Volume IDs reaching a backend
are already validated by `csi_perssd.ids`. Failures raise `CsiError` with the code the CSI spec
names (e.g. RESOURCE_EXHAUSTED when space runs out) and the tool's stderr in the message.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..extents import Extent

__all__ = ["Backend", "Capacity", "Extent", "Planned"]


@dataclass(frozen=True)
class Capacity:
    total_bytes: int            # size of the pool
    available_bytes: int        # free for new volumes right now (reservations subtracted)
    max_volume_bytes: int       # largest single volume the backend will create
    metadata_used_ratio: float = 0.0   # LVM thin metadata usage (0 for rawfile)


@dataclass(frozen=True)
class Planned:
    """A volume create_unlisted would make, known before it exists: where its storage will be
    (`disk`), its size as made (rounded as the backend rounds it) and its logical sector size.
    A lazy stage starts serving the volume at that path while the backend makes it."""
    disk: str
    size: int
    sector_size: int


@runtime_checkable
class Backend(Protocol):
    """The contract every backend implements in full (no optional methods, no probing)."""
    name: str

    @property
    def tracks_changes(self) -> bool:
        """True when snapshots cost nothing until written and `changed_ranges` can answer
        (LVM thin: thin_delta; rawfile on a reflink file system: FIEMAP). When False the flush
        keeps no base snapshots and compares chunk hashes instead."""

    def check(self) -> list[str]:
        """What is missing for this backend to work (tools, modules, VG); empty when healthy."""

    def batch(self) -> AbstractContextManager[None]:
        """A block of one thread's work (an RPC) in which the backend may reuse what it read
        about its volumes instead of asking its tools again (LVM: one `lvs`); nothing else
        changes them meanwhile. A no-op where reading is free (rawfile)."""

    def create(self, vid: str, size: int) -> None:
        """Ensure a zero-filled, thinly provisioned volume of `size` bytes exists."""

    def create_unlisted(self, vid: str, size: int) -> bool:
        """Inside batch(), for a volume the caller holds no record of: create it if that is
        cheaper than asking first whether it exists (LVM: no `lvs`). True when it made the
        volume; False, with nothing changed, when the caller is to go the usual way
        (exists(), create()), which is always right."""

    def plan_unlisted(self, vid: str, size: int) -> Planned | None:
        """Inside batch(): what create_unlisted(vid, size) would make, without making anything,
        when it is worth starting work on the volume's path before the volume exists (LVM: the
        lvcreate takes most of a stage); None when create_unlisted would decline or when there
        is nothing to win (rawfile). create_unlisted may still decline afterwards."""

    def exists(self, vid: str) -> bool: ...

    def size(self, vid: str) -> int:
        """Current size in bytes (NOT_FOUND if missing)."""

    def device(self, vid: str, read_only: bool = False) -> str:
        """Ensure the volume is reachable as a block device and return its path (/dev/loopN, /dev/vg/lv).
        read_only: a device that refuses writes (for read-only raw block publishing)."""

    def disk_path(self, vid: str) -> str:
        """The volume's own storage (rawfile: the image file; LVM: the LV's device node), for a
        lazy hydration server that serves the volume from it."""

    def hydrate_path(self, vid: str) -> str:
        """Where to write a fresh volume's content before its first use (rawfile: the backing
        file while no loop device is attached; LVM: the device)."""

    def release(self, vid: str) -> None:
        """Let go of the block device (detach the loop device); data stays. Idempotent."""

    def delete(self, vid: str) -> None:
        """Remove the volume and its snapshots; idempotent."""

    def expand(self, vid: str, size: int) -> None:
        """Grow the volume to at least `size` bytes (never shrinks); the device sees the new size."""

    def allocated_ranges(self, vid: str, snap: str | None = None) -> list[Extent]:
        """Byte ranges that may hold data (everything else reads as zeros), sorted, merged; of the
        snapshot `snap` when given (a flush reading a snapshot must use the snapshot's map)."""

    def snapshot(self, vid: str, snap: str) -> str:
        """Take a point-in-time copy named `snap`; return a path (file or device) it can be read from."""

    def delete_snapshot(self, vid: str, snap: str) -> None: ...

    def snapshot_path(self, vid: str, snap: str) -> str | None:
        """Path of an existing snapshot, None if missing."""

    def changed_ranges(self, vid: str, base_snap: str, snap: str | None = None) -> list[Extent] | None:
        """Ranges where the volume (or its snapshot `snap`, when the flush reads that) differs
        from snapshot `base_snap`, or None when unknown (the caller hashes everything)."""

    def capacity(self) -> Capacity: ...

    def list_volumes(self) -> list[str]: ...
