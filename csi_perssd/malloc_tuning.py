"""glibc malloc settings for the long-running server process (`csi-perssd serve`).

glibc gives each thread that allocates while another holds its arena's lock an arena of its
own (up to 8 per core), and a freed block stays in its arena, resident, wherever a live block
lies above it. Its mmap threshold is dynamic as well: freeing a 4 MiB mmapped block raises the
threshold to 4 MiB, so later chunk-sized buffers (chunks, compression output, PUT bodies) come
from those per-thread arenas. Measured (`benchmarks/rss_probe.py`: flush (a), 6 encryption pairs,
then flush (b), in one node process): the peak RSS grew ~5 MB per flush, to 222 MB in flush (b).

Two fixes were measured, the same probe, one run each:
  - M_MMAP_THRESHOLD fixed at 1 MiB (every chunk-sized buffer its own mmap, unmapped at free):
    flush (b) 150 MB, but node CPU per 256 MiB flush 0.56 -> 0.76 s (+36%: page faults and
    zeroing of each new mapping);
  - M_ARENA_MAX = 2 (the worker threads share two arenas, freed buffers are reused across
    threads): flush (b) 169 MB, CPU 0.55 s (unchanged). This one is applied.

Left alone when the process's environment already sets it (MALLOC_ARENA_MAX or GLIBC_TUNABLES'
glibc.malloc.arena_max) and when the C library is not glibc (musl has no mallopt).
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("csi_perssd")

M_ARENA_MAX = -8
ARENA_MAX = 2


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
    """Limit glibc to ARENA_MAX malloc arenas; True when applied."""
    env = os.environ
    if "MALLOC_ARENA_MAX" in env or "glibc.malloc.arena_max" in env.get("GLIBC_TUNABLES", ""):
        log.debug("malloc: arena limit left as the environment sets it")
        return False
    libc = glibc()
    if libc is None:
        log.debug("malloc: not glibc, arena limit not set")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        log.debug("malloc: mallopt(M_ARENA_MAX) failed")
        return False
    log.debug("malloc: at most %d malloc arenas", ARENA_MAX)
    return True
