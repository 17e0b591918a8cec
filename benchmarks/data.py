"""Benchmark data: (a) random images, (b) a realistic file tree for an ext4 volume, (c) a 1%
rewrite in random 1 MiB extents. Deterministic per seed where it matters (the change)."""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

MiB = 1 << 20
BLOCK = 8 * MiB


def random_image(path: str, size: int) -> str:
    """`size` bytes of incompressible random data; returns its BLAKE3 hex digest."""
    h = blake3(max_threads=blake3.AUTO)
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(BLOCK, left))
            f.write(b)
            h.update(b)
            left -= len(b)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def copy_to_device(src: str, dev: str) -> None:
    """Write an image onto a block device (or file) and fsync it."""
    with open(src, "rb") as fi, open(dev, "r+b", buffering=0) as fo:
        while True:
            b = fi.read(BLOCK)
            if not b:
                break
            fo.write(b)
        os.fsync(fo.fileno())


def digest(path: str, size: int | None = None) -> str:
    h = blake3(max_threads=blake3.AUTO)
    with open(path, "rb", buffering=0) as f:
        left = size if size is not None else os.fstat(f.fileno()).st_size
        while left:
            b = f.read(min(BLOCK, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


@dataclass
class Change:
    offsets: list[int]         # 1 MiB extents rewritten
    extent: int

    def bytes(self) -> int:
        return len(self.offsets) * self.extent

    def chunks(self, chunk_size: int) -> set[int]:
        out: set[int] = set()
        for off in self.offsets:
            out.update(range(off // chunk_size, (off + self.extent - 1) // chunk_size + 1))
        return out


def plan_change(size: int, fraction: float = 0.01, extent: int = MiB, seed: int = 1) -> Change:
    """fraction of the volume in distinct random extent-aligned places."""
    rnd = random.Random(seed)
    slots = size // extent
    n = max(1, round(size * fraction / extent))
    return Change(sorted(o * extent for o in rnd.sample(range(slots), n)), extent)


def apply_change(change: Change, targets: list[str], seed: int = 2) -> None:
    """Write the same new random extents into every target (device and image), fsync'd."""
    rnd = random.Random(seed)
    payloads = [rnd.randbytes(change.extent) for _ in change.offsets]
    for t in targets:
        fd = os.open(t, os.O_WRONLY)
        try:
            for off, data in zip(change.offsets, payloads):
                os.pwrite(fd, data, off)
            os.fsync(fd)
        finally:
            os.close(fd)


# -- (b) a realistic file tree ------------------------------------------------------------------
WORDS = ("alpha beta gamma delta epsilon sample result error warning info debug request response "
         "latency node pod volume chunk flush hydrate stage publish retry timeout ok failed done "
         "user job step task batch queue worker input output metric value status").split()
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


class TextSource:
    """Realistic-looking text fast: pools of distinct CSV rows, log lines and JSON records
    (generated once), assembled per file with a unique sequence number on every line, so files
    compress like real ones (about 2-4x with zstd -3) instead of trivially."""

    def __init__(self, rnd: random.Random, pool: int = 1 << 15):
        self.rnd = rnd
        self.csv = [f"{1763880000 + k * 7},s{rnd.randrange(64):02d},{rnd.gauss(20, 5):.4f},"
                    f"{rnd.random():.3f},{rnd.choice(WORDS)}\n" for k in range(pool)]
        self.log = [f"{rnd.choice(LEVELS)} [{rnd.choice(WORDS)}-{rnd.randrange(16)}] "
                    f"{' '.join(rnd.choices(WORDS, k=rnd.randrange(3, 12)))} "
                    f"id={rnd.getrandbits(48):012x} took={rnd.expovariate(0.05):.1f}ms\n" for _ in range(pool)]
        self.json = [f'"name": "{rnd.choice(WORDS)}-{rnd.randrange(10**6)}", "ok": {str(rnd.random() > .2).lower()}, '
                     f'"values": [{", ".join(f"{rnd.random():.5f}" for _ in range(rnd.randrange(2, 9)))}]}}\n'
                     for _ in range(pool)]

    def _make(self, pool: list[str], fmt: str, target: int) -> bytes:
        out, n, seq = [], 0, self.rnd.randrange(10**9)
        mask = len(pool) - 1                        # pools are a power of two long
        while n < target:
            k = min(4096, (target - n) // 40 + 1)
            idx = memoryview(self.rnd.randbytes(2 * k)).cast("H")
            b = "".join(map(str.__add__, map(fmt.__mod__, range(seq, seq + k)),
                            [pool[i & mask] for i in idx])).encode()
            seq += k
            out.append(b)
            n += len(b)
        return b"".join(out)[:target]

    def csv_file(self, target: int) -> bytes:
        return b"id,timestamp,sensor,value,quality,label\n" + self._make(self.csv, "%d,", target)[:max(0, target - 40)]

    def log_file(self, target: int) -> bytes:
        return self._make(self.log, "2026-11-23T%d ", target)

    def json_file(self, target: int) -> bytes:
        return self._make(self.json, '{"seq": %d, ', target)


def write_tree(root: str, total: int, seed: int = 7) -> dict[str, int]:
    """About `total` bytes: 50% large compressible files (CSV, logs), 20% random binaries,
    30% many small files (mostly text/JSON, some binary). Returns counts by kind."""
    rnd = random.Random(seed)
    text = TextSource(rnd)
    base = Path(root)
    counts = {"csv_log_bytes": 0, "binary_bytes": 0, "small_bytes": 0, "files": 0}
    # large compressible files, 8-64 MiB
    budget = total * 50 // 100
    i = 0
    while budget > 0:
        size = min(budget, rnd.randrange(8, 64) * MiB)
        gen, ext = (text.csv_file, "csv") if i % 2 == 0 else (text.log_file, "log")
        p = base / "data" / f"part-{i:04d}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(gen(size))
        budget -= size
        counts["csv_log_bytes"] += size
        counts["files"] += 1
        i += 1
    # random binaries, 1-32 MiB
    budget = total * 20 // 100
    i = 0
    while budget > 0:
        size = min(budget, rnd.randrange(1, 32) * MiB)
        p = base / "bin" / f"blob-{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(size))
        budget -= size
        counts["binary_bytes"] += size
        counts["files"] += 1
        i += 1
    # many small files, 512 B - 128 KiB (log-uniform)
    budget = total * 30 // 100
    i = 0
    while budget > 0:
        size = min(budget, int(2 ** rnd.uniform(9, 17)))
        kind = rnd.random()
        if kind < 0.45:
            data, ext = text.json_file(size), "json"
        elif kind < 0.85:
            data, ext = text.log_file(size), "txt"
        else:
            data, ext = rnd.randbytes(size), "dat"
        p = base / "small" / f"{i // 500:03d}" / f"f{i:06d}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        budget -= size
        counts["small_bytes"] += size
        counts["files"] += 1
        i += 1
    return counts


def copy_tree(src: str, dst: str) -> None:
    for entry in os.scandir(src):
        d = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, d, dirs_exist_ok=True)
        else:
            shutil.copy2(entry.path, d)


def tree_digest(root: str) -> str:
    """BLAKE3 over (relative path, content) of every file, in sorted order."""
    h = blake3(max_threads=blake3.AUTO)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "lost+found")
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()
