"""Flush a local volume (device, image file, snapshot) and hydrate into one: the remote pipeline
(remote/transfer.py) run on local/fileio.py's reader and writer. The one place that joins
local file I/O and the object store's chunk pipeline."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .local.fileio import ChunkReader, ChunkWriter
from .remote.codec import PLAIN, Codec
from .remote.manifest import Manifest
from .remote.store import ObjectStore
from .remote.transfer import FlushPlan, FlushStats, HydrateStats, Progress, flush_chunks, hydrate_chunks


def flush(store: ObjectStore, source_path: str, plan: FlushPlan,
          progress: Progress | None = None) -> tuple[Manifest, FlushStats]:
    """Upload what `plan` says of the device or file `source_path`; the new manifest + stats."""
    with ChunkReader(source_path, plan.chunk_size) as reader:
        if reader.size < plan.size:
            raise ValueError(f"{source_path} holds {reader.size} bytes, less than {plan.size}")
        return flush_chunks(store, reader, plan, progress)


def flush_path(store: ObjectStore, source_path: str, size: int, chunk_size: int, *,
               progress: Progress | None = None, **plan: Any) -> tuple[Manifest, FlushStats]:
    """flush() with the plan's fields as keywords (see remote.transfer.FlushPlan)."""
    return flush(store, source_path, FlushPlan(size=size, chunk_size=chunk_size, **plan), progress)


def hydrate(store: ObjectStore, manifest: Manifest, dest_path: str, *, workers: int = 8,
            verify: bool = True, zero_holes: bool = False, fsync: bool = True,
            progress: Progress | None = None, codec: Codec = PLAIN) -> HydrateStats:
    """Write the manifest's data chunks into the device or file `dest_path` (at least
    volume_size long, opened O_RDWR without truncation). With `fsync`, writeback starts as each
    chunk lands (O_DIRECT where it can) and the file is fsync'd at the end."""
    with ChunkWriter(dest_path, writeback=fsync, chunk_size=manifest.chunk_size) as writer:
        if writer.size < manifest.volume_size:
            raise ValueError(f"{dest_path} holds {writer.size} bytes, less than {manifest.volume_size}")
        return hydrate_chunks(store, manifest, writer, workers=workers, verify=verify,
                              zero_holes=zero_holes, progress=progress, codec=codec)


def source_of(path: str) -> Callable[[int], ChunkReader]:
    """What FlushGuard.claim re-reads chunks a garbage collection deleted from: the device or
    file `path`, opened (for chunks of the size it is called with) only when it must."""
    return functools.partial(ChunkReader, path)
