"""Hydrate probe (perf work, not part of `make bench`): the driver's hydrate pipeline in process
against s5cmd's download of the same bytes, interleaved round by round, on one SeaweedFS, into
one XFS-on-loop file system; with the CPU each side costs the server (weed) and the client.

    .venv/bin/python benchmarks/hydrate_probe.py [--size BYTES] [--rounds N] [--workers 4,8,16]
        [--only s5,driver] [--spy DIR]

Prints one line per measurement: wall MB/s, client CPU s, weed CPU s, load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

from csi_perssd import volume_io  # noqa: E402
from csi_perssd.remote import stages, transfer  # noqa: E402
from csi_perssd.remote.manifest import Manifest  # noqa: E402
from csi_perssd.remote.s3 import S3Store  # noqa: E402
from csi_perssd.remote.transfer import FlushPlan  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402
from tests.harness.xfsdir import xfs_dir  # noqa: E402

MiB = 1 << 20


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def self_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Trace:
    """Seconds spent inside S3Store.get and ChunkWriter.write (summed over the worker threads),
    and the kernel's CPU split (/proc/stat, all cores) over a measurement."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.lock = threading.Lock()

    def wrap(self, cls: type, name: str) -> None:
        orig = getattr(cls, name)

        def timed(*args: object, **kw: object) -> object:
            t = time.monotonic()
            try:
                return orig(*args, **kw)
            finally:
                with self.lock:
                    self.t[name] = self.t.get(name, 0.0) + time.monotonic() - t
        setattr(cls, name, timed)

    def take(self) -> dict[str, float]:
        with self.lock:
            out, self.t = self.t, {}
        return out


def cpu_split() -> dict[str, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": (v[0] + v[1]) / tick, "sys": (v[2] + v[5] + v[6]) / tick, "iowait": v[4] / tick,
            "idle": v[3] / tick}


def fresh(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)
    os.sync()


def lazy_hydrate(store: S3Store, m: Manifest, dst: str) -> None:
    """The lazy server's background hydration of dst (a sparse file) with no reader, until
    complete: its LazyVolume and fetcher, in this process."""
    from csi_perssd.lazy.server import _Fetcher
    from csi_perssd.lazy.state import HydrationState
    from csi_perssd.lazy.volume import LazyVolume
    fetcher = _Fetcher({"fetch_timeout": 30}, {}, m.chunk_size, opened=lambda: store)
    vol = LazyVolume(dst, m, HydrationState.for_manifest(m), dst + ".state.json", fetcher)
    vol.start()
    try:
        while not vol.state.complete:
            time.sleep(0.002)
    finally:
        vol.stop()
        vol.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256 * MiB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="4,8,16")
    ap.add_argument("--only", default="s5,driver",
                    help="s5, driver, lazy (LazyVolume's background hydration in process, no reader: "
                         "the lazy server's engine, 8 workers)")
    ap.add_argument("--boto", action="store_true",
                    help="also each driver config through boto3's get_object (S3Store's lean GET off): wN-boto")
    ap.add_argument("--no-ahead", action="store_true",
                    help="also each driver config with no chunk names queued ahead of the workers: wN-noahead")
    ap.add_argument("--no-verify", action="store_true",
                    help="also each driver config without BLAKE3 verification of the chunks (what "
                         "verification costs; the driver always verifies): wN-noverify")
    ap.add_argument("--spy", default="", help="py-spy record the driver hydrates into DIR (--native)")
    ap.add_argument("--fresh-space", action="store_true",
                    help="every download into a new file, none deleted: never-written blocks of the "
                         "XFS and of its sparse loop image, as for the bench's first hydrate of a run")
    a = ap.parse_args()
    trace = Trace()
    from csi_perssd.local.fileio import ChunkWriter
    trace.wrap(S3Store, "get_into")
    trace.wrap(ChunkWriter, "write")
    only, size = set(a.only.split(",")), a.size
    work = Path(tempfile.mkdtemp(prefix="perssd-hprobe-", dir="/var/tmp"))
    sw = Seaweed(work / "seaweed")
    sw.start()
    assert sw.proc is not None
    weed = sw.proc.pid
    try:
        s5 = peers.S5cmd(peers.S3Target(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key))
        n_cfg = len(a.workers.split(",")) + 1
        space = (a.rounds * n_cfg + 2) * size if a.fresh_space else 3 * size
        with xfs_dir(str(work / "xfs"), space + (512 << 20)) as d:
            src = os.path.join(d, "a.img")
            with open(src, "wb") as f:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
            os.sync()
            store = S3Store(sw.url("probe"), endpoint_url=sw.endpoint, access_key=sw.access_key,
                            secret_key=sw.secret_key)
            m, _ = volume_io.flush(store, src, FlushPlan(size=size, chunk_size=4 * MiB, workers=8))
            s5.upload(src, "s5/a.img")
            dst = os.path.join(d, "dst.img")
            for r in range(a.rounds):
                for cfg in (["s5"] if "s5" in only else []) + (
                        [f"w{w}{b}" for w in a.workers.split(",")
                         for b in ("", *(["-boto"] if a.boto else []), *(["-noahead"] if a.no_ahead else []),
                                      *(["-noverify"] if a.no_verify else []))]
                        if "driver" in only else []) + (["lazy"] if "lazy" in only else []):
                    if a.fresh_space:
                        dst = os.path.join(d, f"dst-{r}-{cfg}.img")
                    fresh(dst, size)
                    if cfg == "s5":
                        os.unlink(dst)
                    w0, t0 = cpu_seconds(weed), time.monotonic()
                    k0 = cpu_split()
                    trace.take()
                    if cfg == "s5":
                        run = s5.download("s5/a.img", dst)
                        fd = os.open(dst, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                        wall, ccpu = time.monotonic() - t0, run.cpu_seconds
                        extra = f" (without fsync {size / run.seconds / 1e6:.0f} MB/s)"
                    else:
                        c0, f0 = self_cpu(), self_faults()
                        spy = None
                        if a.spy:
                            os.makedirs(a.spy, exist_ok=True)
                            spy = subprocess.Popen(
                                [str(Path(sys.executable).parent / "py-spy"), "record", "--native", "-r", "200", "-f", "raw", "-o",
                                 os.path.join(a.spy, f"{cfg}-r{r}.folded"), "--pid", str(os.getpid())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            time.sleep(1.0)
                            w0, t0 = cpu_seconds(weed), time.monotonic()
                        lean, store._lean = store._lean, None if cfg.endswith("-boto") else store._lean
                        if cfg.endswith("-noahead"):
                            transfer.run_bounded = lambda *p, **k: stages.run_bounded(*p, **{**k, "ahead": 0})
                        try:
                            if cfg == "lazy":
                                lazy_hydrate(store, m, dst)
                            else:
                                volume_io.hydrate(store, m, dst, workers=int(cfg[1:].split("-")[0]),
                                                  verify=not cfg.endswith("-noverify"))
                        finally:
                            store._lean = lean
                            transfer.run_bounded = stages.run_bounded
                        wall, ccpu = time.monotonic() - t0, self_cpu() - c0
                        extra = f" {self_faults() - f0} faults"
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)
                            spy.wait(timeout=30)
                    wcpu = cpu_seconds(weed) - w0
                    k1 = cpu_split()
                    k = " ".join(f"{n} {k1[n] - k0[n]:.2f}" for n in k0)
                    tr = " ".join(f"{n} {v:.2f}s" for n, v in trace.take().items())
                    print(f"round {r} {cfg:>4}: {size / wall / 1e6:4.0f} MB/s {wall:.2f}s client CPU {ccpu:.2f}s "
                          f"weed CPU {wcpu:.2f}s load {os.getloadavg()[0]:.2f}{extra}\n"
                          f"      machine: {k}; in workers: {tr}", flush=True)
    finally:
        sw.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
