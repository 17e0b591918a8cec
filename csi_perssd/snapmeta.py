"""SnapshotMetadata service (CSI alpha; off unless `--enable-snapshot-metadata`): the allocated
ranges of a snapshot and the ranges changed between two snapshots of one volume.

Every snapshot pins a manifest (`snapshots/<sid>.manifest`) listing, per chunk, the hash of its
content or a hole. The answers come from those manifests alone — no chunk is ever read:
- allocated: the chunks that are not holes;
- delta: the chunks whose entry differs between the two manifests (a chunk that became a hole
  counts: it reads as zeros now).
Adjacent chunks are coalesced into one range, so the block metadata type is VARIABLE_LENGTH
(always, for every message of every stream). Ranges are chunk-aligned (the last one ends at the
volume size). For a mount volume the ranges are those of the device under its file system
(what an image-level backup copies); for a block volume, of the volume itself.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from . import encryption, ids
from .csi import csi_pb2 as pb
from .csi import csi_pb2_grpc as rpc
from .errors import Code, CsiError, invalid, not_found, precondition
from .remote.catalog import Catalog, SnapshotRecord
from .remote.chunkmap import changed_chunks
from .remote.layout import snapshot_manifest_key
from .remote.manifest import Manifest
from .snapshots import read_manifest
from .stores import Stores

log = logging.getLogger(__name__)
VARIABLE = pb.BlockMetadataType.VARIABLE_LENGTH
DEFAULT_RESULTS = 1024          # tuples per message when the CO leaves max_results at 0


def coalesce(chunks: Iterator[int], chunk_size: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges of ascending chunk indexes, adjacent chunks merged."""
    start = prev = -2
    for i in chunks:
        if i != prev + 1:
            if start >= 0:
                yield start * chunk_size, min((prev + 1) * chunk_size, size) - start * chunk_size
            start = i
        prev = i
    if start >= 0:
        yield start * chunk_size, min((prev + 1) * chunk_size, size) - start * chunk_size


def allocated(m: Manifest) -> Iterator[tuple[int, int]]:
    """The runs of data chunks of the compact table (nothing per chunk)."""
    cs, size = m.chunk_size, m.volume_size
    start = end = -1
    for first, count in m.data_spans():
        if first != end:
            if start >= 0:
                yield start * cs, min(end * cs, size) - start * cs
            start = first
        end = first + count
    if start >= 0:
        yield start * cs, min(end * cs, size) - start * cs


def changed(base: Manifest, target: Manifest) -> Iterator[tuple[int, int]]:
    """Chunks of `target` whose content differs from `base`'s (beyond the base's end: the ones
    holding data). Both manifests must share the chunk size (one volume's always do)."""
    if base.chunk_size != target.chunk_size:
        raise precondition(f"the snapshots have different chunk sizes ({base.chunk_size} and "
                           f"{target.chunk_size}): no delta can be computed, take a full backup")
    return coalesce(changed_chunks(base.chunk_map(), target.chunk_map()), target.chunk_size, target.volume_size)


def from_offset(ranges: Iterator[tuple[int, int]], start: int) -> Iterator[tuple[int, int]]:
    """Spec: no range may end at or before starting_offset; the first one is clipped to it."""
    for off, length in ranges:
        end = off + length
        if end <= start:
            continue
        off = max(off, start)
        yield off, end - off


def messages(ranges: Iterator[tuple[int, int]], per_message: int) -> Iterator[list[pb.BlockMetadata]]:
    """Batches of at most `per_message` tuples; at least one (maybe empty) message, so the CO
    always learns the volume's capacity."""
    batch: list[pb.BlockMetadata] = []
    sent = False
    for off, length in ranges:
        batch.append(pb.BlockMetadata(byte_offset=off, size_bytes=length))
        if len(batch) >= per_message:
            yield batch
            batch, sent = [], True
    if batch or not sent:
        yield batch


def _limits(starting_offset: int, max_results: int) -> int:
    if max_results < 0:
        raise invalid("max_results must not be negative")
    if starting_offset < 0:
        raise CsiError(Code.OUT_OF_RANGE, f"starting_offset {starting_offset} is negative")
    return max_results or DEFAULT_RESULTS


class SnapshotMetadata(rpc.SnapshotMetadataServicer):
    def __init__(self, stores: Stores):
        self.stores = stores

    def _snapshot(self, cat: Catalog, sid: str, what: str,
                  secrets: dict[str, str]) -> tuple[SnapshotRecord, Manifest]:
        sid = ids.snapshot_id(sid) if sid else ""
        if not sid:
            raise invalid(f"{what} is required")
        rec = cat.get_snapshot(sid)
        if rec is None:
            raise not_found(f"snapshot {sid} does not exist")
        if not rec.ready:
            raise precondition(f"snapshot {sid} is not ready yet (its upload is still running)")
        # an encrypted snapshot's allocation map is sealed: the call's secret holds the KEK
        codec = encryption.codec_for(rec.encryption, secrets, self.stores.cfg, f"snapshot {sid}", "snapshotter")
        return rec, read_manifest(cat, rec.manifest_key or snapshot_manifest_key(sid), codec)

    @staticmethod
    def _check_offset(start: int, m: Manifest) -> None:
        if start > m.volume_size:
            raise CsiError(Code.OUT_OF_RANGE, f"starting_offset {start} exceeds the volume size {m.volume_size}")

    def GetMetadataAllocated(self, request: Any, context: Any) -> Iterator[pb.GetMetadataAllocatedResponse]:
        per = _limits(request.starting_offset, request.max_results)
        cat = self.stores.catalog(dict(request.secrets))
        rec, m = self._snapshot(cat, request.snapshot_id, "snapshot_id", dict(request.secrets))
        self._check_offset(request.starting_offset, m)
        log.info("GetMetadataAllocated %s from %d: %d of %d chunks allocated", rec.id, request.starting_offset,
                 m.data_chunks, m.chunk_count)
        return (pb.GetMetadataAllocatedResponse(block_metadata_type=VARIABLE, volume_capacity_bytes=m.volume_size,
                                                block_metadata=batch)
                for batch in messages(from_offset(allocated(m), request.starting_offset), per))

    def GetMetadataDelta(self, request: Any, context: Any) -> Iterator[pb.GetMetadataDeltaResponse]:
        per = _limits(request.starting_offset, request.max_results)
        cat = self.stores.catalog(dict(request.secrets))
        base, bm = self._snapshot(cat, request.base_snapshot_id, "base_snapshot_id", dict(request.secrets))
        target, tm = self._snapshot(cat, request.target_snapshot_id, "target_snapshot_id", dict(request.secrets))
        if base.source_volume != target.source_volume:
            raise invalid(f"snapshots {base.id} and {target.id} are of different volumes "
                          f"({base.source_volume}, {target.source_volume})")
        if base.created_at > target.created_at:
            raise invalid(f"base snapshot {base.id} was taken after target snapshot {target.id}")
        self._check_offset(request.starting_offset, tm)
        ranges = from_offset(changed(bm, tm), request.starting_offset)
        return (pb.GetMetadataDeltaResponse(block_metadata_type=VARIABLE, volume_capacity_bytes=tm.volume_size,
                                            block_metadata=batch)
                for batch in messages(ranges, per))
