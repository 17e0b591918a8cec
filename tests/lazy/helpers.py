"""Helpers of the lazy hydration suite: direct (uncached) device I/O, the node's lazy server."""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

from csi_perssd.lazy.manager import LazyManager
from csi_perssd.remote.manifest import Manifest
from tests.harness.blockio import write_at
from tests.harness.cluster import Cluster

MiB = 1 << 20
CHUNK = 4 * MiB
LAZY = {"hydrate": "lazy"}


def pread_direct(path: str, offset: int, length: int) -> bytes:
    """Read with O_DIRECT (no page cache, no readahead: exactly the chunks asked for are read)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, length)
    try:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        buf.close()
        os.close(fd)


def manager(cl: Cluster, node: str) -> LazyManager:
    return LazyManager(cl.nodes[node].state_dir, {})


def status(cl: Cluster, node: str, vid: str) -> dict[str, Any]:
    st = manager(cl, node).status(vid)
    assert st is not None, f"volume {vid} has no lazy hydration state on {node}"
    return st


def server_log(cl: Cluster, node: str, vid: str) -> str:
    p = Path(cl.nodes[node].state_dir) / "lazy" / vid / "server.log"
    return p.read_text(errors="replace") if p.exists() else ""


def committed(cl: Cluster, vid: str) -> Manifest:
    cat = cl.catalog()
    rec = cat.volume(vid)
    return Manifest.decode(cat.get_manifest(vid, rec.generation))


def write_device(path: str, data: bytes, offset: int = 0) -> None:
    write_at(path, offset, data)
