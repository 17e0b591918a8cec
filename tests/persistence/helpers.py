"""Helpers of the persistence suite: file trees with checksums, device images, chunk maps."""
from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_perssd.local.rawfile import DISK
from csi_perssd.remote.chunks import chunk_hash, chunk_key, is_zero
from tests.harness.cluster import Cluster

MiB = 1 << 20
CHUNK = 4 * MiB
# crash tests: one upload at a time and short NodeUnstage waits: the flush takes seconds and reports progress
SLOW_FLUSH_CLUSTER = {"node_extra": ["--flush-workers", "1"], "env": {"PERSSD_UNSTAGE_WAIT_SECONDS": "0.3"}}


def run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def write_tree(root: str | Path, random_mib: int, seed: int = 1) -> dict[str, str]:
    """Random binaries (random_mib MiB in all), a compressible log and many small files; returns
    relative path -> sha256. Synced to disk."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    left = random_mib
    i = 0
    while left > 0:
        n = min(left, 16)
        files[f"data/random-{i:02d}.bin"] = os.urandom(n * MiB)
        left -= n
        i += 1
    files["logs/run.log"] = "".join(f"2026-11-23T10:{k // 60 % 60:02d}:{k % 60:02d} INFO step {k} ok\n"
                                    for k in range(60_000)).encode()
    for k in range(120):
        files[f"small/{k // 40}/{k:03d}.txt"] = f"file {k} {rnd.random()}\n".encode() * rnd.randint(1, 80)
    files["empty"] = b""
    for rel, data in files.items():
        p = Path(root) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.sync()
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def tree_sums(root: str | Path) -> dict[str, str]:
    """sha256 of every regular file below root (lost+found skipped)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(4 * MiB)
            if not buf:
                return h.hexdigest()
            h.update(buf)


def image(cl: Cluster, node: str, vid: str) -> Path:
    """The rawfile backing file of a volume on a node."""
    return Path(cl.nodes[node].rawfile_dir) / vid / DISK


def chunk_hashes(path: str | Path, chunk: int = CHUNK) -> list[str | None]:
    """BLAKE3 of every chunk of a device or image (None for all-zero chunks), as the flush sees it."""
    out: list[str | None] = []
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return out
            out.append(None if is_zero(buf) else chunk_hash(buf))


def chunk_keys(hashes: list[str | None] | set[str | None], prefix: str) -> set[str]:
    return {f"{prefix}/{chunk_key(h)}" for h in hashes if h is not None}


@contextmanager
def mounted(device: str, where: str | Path, readonly: bool = False) -> Iterator[Path]:
    """Mount an ext4 device for the body of the block (read-only without journal replay)."""
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", "-o", "ro,noload" if readonly else "rw", str(device), str(where)])
    try:
        yield where
    finally:
        run(["umount", str(where)])


def code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    """Call a gRPC stub method expecting failure; returns (code, details)."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def loop_of(path: str | Path) -> str:
    """The (first) loop device attached to a backing file, '' if none."""
    out = run(["losetup", "--noheadings", "--output", "NAME", "--associated", str(path)])
    return out.split()[0] if out.split() else ""


def unstage_once(cl: Cluster, node: str, vid: str, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    """One NodeUnstage call (no retry); returns (code, details)."""
    from csi_perssd.csi import csi_pb2 as pb
    staging, _ = cl.paths(node, vid)
    return code(cl.nodes[node].node.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging), timeout=timeout)


def fill_random(device: str, nbytes: int) -> str:
    """Write `nbytes` of random data from offset 0, a chunk at a time, and fsync; the device's sha256."""
    fd = os.open(device, os.O_WRONLY)
    try:
        for off in range(0, nbytes, CHUNK):
            os.pwrite(fd, os.urandom(CHUNK), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha256_file(device)


def unpublish_until_flushing(cl: Cluster, node: str, vid: str, timeout: float = 60) -> str:
    """The last NodeUnpublish, then NodeUnstage calls until one answers ABORTED with progress
    (done/total bytes, done > 0): the flush is under way. Returns that message."""
    cl.unpublish(node, vid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c, msg = unstage_once(cl, node, vid, timeout=30)
        assert c == grpc.StatusCode.ABORTED, f"flush ended before the kill ({c}: {msg})"
        m = re.search(r"(\d+)/(\d+) bytes \((\d+)%\)", msg)
        assert m, f"no progress in the ABORTED message: {msg!r}"
        if int(m.group(1)) > 0:
            return msg
    raise AssertionError("the flush never made progress")
