"""Transfer micro-benchmark (perf work, not part of `make bench`): the driver's flush and
hydrate pipelines in process against s5cmd, on one SeaweedFS, in one XFS-on-loop file system.

    .venv/bin/python benchmarks/micro.py [--size BYTES] [--rounds N] [--only flush,hydrate,enc]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402

from csi_perssd import volume_io  # noqa: E402
from csi_perssd.local import loop  # noqa: E402
from csi_perssd.local.fileio import ChunkReader  # noqa: E402
from csi_perssd.remote.stages import run_bounded  # noqa: E402
from csi_perssd.crypto.keys import LineageKeys  # noqa: E402
from csi_perssd.remote.codec import PLAIN, Codec  # noqa: E402
from csi_perssd.remote.s3 import S3Store  # noqa: E402
from csi_perssd.remote.transfer import FlushPlan  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402
from tests.harness.xfsdir import xfs_dir  # noqa: E402

MiB = 1 << 20


def cold(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fresh(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def touch(src: str, size: int) -> None:
    with open(src, "r+b") as f:
        for i in range(size // MiB):
            f.seek(i * MiB)
            f.write(os.urandom(16))
    os.sync()


def fsync_path(path: str) -> float:
    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256 * MiB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush-workers", default="4")
    ap.add_argument("--hydrate-workers", type=int, default=8)
    ap.add_argument("--via-loop", action="store_true")
    ap.add_argument("--only", default="flush,hydrate,enc,s5")
    a = ap.parse_args()
    only = set(a.only.split(","))
    size = a.size
    work = Path(tempfile.mkdtemp(prefix="perssd-micro-", dir="/var/tmp"))
    sw = Seaweed(work / "seaweed")
    sw.start()
    try:
        store = S3Store(sw.url("micro"), endpoint_url=sw.endpoint, access_key=sw.access_key,
                        secret_key=sw.secret_key)
        s5 = peers.S5cmd(peers.S3Target(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key))
        with xfs_dir(str(work / "xfs"), 4 * size + (512 << 20)) as d:
            src = os.path.join(d, "a.img")
            with open(src, "wb") as f:
                if a.via_loop:
                    f.truncate(size)
                else:
                    for _ in range(size // MiB):
                        f.write(os.urandom(MiB))
            if a.via_loop:          # as the bench: written through a direct-I/O loop device
                dev = loop.attach(src, direct_io=True)
                try:
                    with open(dev, "r+b", buffering=0) as fo:
                        for _ in range(size // MiB):
                            fo.write(os.urandom(MiB))
                        os.fsync(fo.fileno())
                finally:
                    loop.detach(dev)
            os.sync()
            codecs: dict[str, tuple[Codec, int]] = {}
            for w in (int(x) for x in a.flush_workers.split(",")):
                codecs[f"plain-w{w}"] = (PLAIN, w)
                if "enc" in only:
                    codecs[f"enc-w{w}"] = (Codec(LineageKeys.generate()), w)
            for r in range(a.rounds):
                for name, (codec, fw) in codecs.items():
                    touch(src, size)            # new content: nothing dedups against the last flush
                    snap = os.path.join(d, "snap.img")
                    if os.path.exists(snap):
                        os.unlink(snap)
                    subprocess.run(["cp", "--reflink=always", src, snap], check=True)
                    cold(snap)
                    os.sync()
                    if "read" in only:
                        t = time.monotonic()
                        with ChunkReader(snap, 4 * MiB) as rd:
                            run_bounded(range(size // (4 * MiB)), lambda i: len(rd.read(i * 4 * MiB, 4 * MiB)),
                                        fw, lambda n: None)
                        print(f"round {r}: cold read {size / (time.monotonic() - t) / 1e6:.0f} MB/s", flush=True)
                        cold(snap)
                    plan = FlushPlan(size=size, chunk_size=4 * MiB, workers=fw, codec=codec,
                                     generation=r * 10 + 1)
                    t = time.monotonic()
                    m, st = volume_io.flush(store, snap, plan)
                    ft = time.monotonic() - t
                    dst = os.path.join(d, "dst.img")
                    fresh(dst, size)
                    os.sync()
                    t = time.monotonic()
                    volume_io.hydrate(store, m, dst, workers=a.hydrate_workers, codec=codec)
                    ht = time.monotonic() - t
                    print(f"round {r} {name}: flush {size / ft / 1e6:.0f} MB/s ({ft:.2f}s), "
                          f"hydrate {size / ht / 1e6:.0f} MB/s ({ht:.2f}s)", flush=True)
                if "s5" in only:
                    os.sync()
                    u = s5.upload(src, f"s5/r{r}.img")
                    for where in (d, str(work)):
                        out = os.path.join(where, "s5dl.img")
                        if os.path.exists(out):
                            os.unlink(out)
                        os.sync()
                        dl = s5.download(f"s5/r{r}.img", out)
                        fs = fsync_path(out)
                        os.unlink(out)
                        print(f"round {r} s5cmd: upload {size / u.seconds / 1e6:.0f} MB/s, download "
                              f"{'xfs' if where == d else 'ext4'} {size / dl.seconds / 1e6:.0f} MB/s, "
                              f"+fsync {size / (dl.seconds + fs) / 1e6:.0f} MB/s", flush=True)
    finally:
        sw.stop()
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
