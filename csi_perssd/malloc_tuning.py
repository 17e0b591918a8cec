"""glibc malloc settings for the long-running server process (`csi-perssd serve`).

glibc serves a block at least M_MMAP_THRESHOLD large (128 KiB at start) with its own mmap, and
unmaps it when freed. But its threshold is dynamic: freeing such a block raises the threshold
to that block's size (up to 32 MiB), so after the first 4 MiB chunk buffer is freed, later
4 MiB allocations (bytes objects of chunks, compression output, ...) come from the malloc arena
of the allocating thread — one per uploader thread — and stay resident there after free
wherever a small allocation lies above them. Measured (`benchmarks/rss_probe.py`: flush (a),
6 encryption pairs, then flush (b), in one node process): the peak RSS grew ~4.7 MB per flush,
to 214 MB in flush (b); with the threshold fixed at 1 MiB: 144-147 MB in the pairs, 142 MB in
flush (b).

Setting M_MMAP_THRESHOLD explicitly turns the dynamic adjustment off. Left alone when the
process's environment already sets the threshold (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES'
glibc.malloc.mmap_threshold) and when the C library is not glibc (musl has no mallopt).
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("csi_perssd")

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc, else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt                     # noqa: B018 (AttributeError when missing)
    except (ValueError, OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; True when applied."""
    env = os.environ
    if "MALLOC_MMAP_THRESHOLD_" in env or "glibc.malloc.mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
        log.debug("malloc: mmap threshold left as the environment sets it")
        return False
    libc = glibc()
    if libc is None:
        log.debug("malloc: not glibc, mmap threshold not set")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.debug("malloc: mallopt(M_MMAP_THRESHOLD) failed")
        return False
    log.debug("malloc: mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return True
