"""A scratch XFS file system (reflink=1) mounted at a directory, for tests and the benchmark: the
rawfile backend tracks changes by reflink on such a pool, as on a node whose NVMe is formatted XFS.

    with xfs_dir("/tmp/x/pool", 4 << 30) as path:
        ...                     # path is the mount point

The file system lives in a sparse image next to the mount point (`<path>.xfs.img`), attached as
a direct-I/O loop device. On exit everything below the mount point is unmounted and detached
first (volumes the driver left attached), then the file system, its loop device and the image.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from csi_perssd.local import fs, loop
from .cleanup import cleanup_under

MIN_BYTES = 320 << 20           # mkfs.xfs refuses file systems below 300 MiB


@contextmanager
def xfs_dir(path: str, size: int) -> Iterator[str]:
    path = os.path.abspath(path)
    image = path.rstrip("/") + ".xfs.img"
    os.makedirs(path, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(max(size, MIN_BYTES))
    dev = None
    try:
        dev = loop.attach(image, direct_io=True)
        fs.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev], what="mkfs.xfs")
        fs.ensure_mounted(dev, path, "xfs")
        yield path
    finally:
        try:
            cleanup_under(path)         # inner mounts, loop devices on it, then the XFS itself
        finally:
            if dev is not None and loop.is_attached(dev):
                loop.detach(dev)
            os.unlink(image)
