"""Stage probe (perf work, not part of `make bench`): the bench's hydrate (a) step — flush a
random raw block volume on node-a, NodeStage it on node-b — repeated on fresh volumes in the
same driver processes, with s5cmd's download of the same image between, so the first hydrate of
a node process is seen next to the later ones. Optionally py-spy (--native) on node-b.

    .venv/bin/python benchmarks/stage_probe.py [--volumes N] [--spy DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
import run  # noqa: E402
from spy import PySpy, summarize  # noqa: E402

from tests.harness.cluster import Cluster, block_cap  # noqa: E402
from tests.harness.procs import DriverProcess  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402
from tests.harness.xfsdir import xfs_dir  # noqa: E402

MiB = 1 << 20


class NativeSpy(PySpy):
    def __enter__(self) -> NativeSpy:
        import subprocess
        from peers import find_tool
        argv = [find_tool("py-spy"), "record", "--pid", str(self.pid), "--rate", str(self.rate),
                "--format", "raw", "--output", self.out, "--nonblocking", "--threads", "--native"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        time.sleep(0.5)
        return self


def minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--size", type=int, default=256 * MiB)
    ap.add_argument("--spy", default="")
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--node-args", default="", help="extra driver arguments for node-b, e.g. '--hydrate-workers 8'")
    a = ap.parse_args()
    size = a.size
    work = Path(tempfile.mkdtemp(prefix="perssd-sprobe-", dir="/var/tmp"))
    sw = Seaweed(work / "seaweed")
    sw.start()
    try:
        b = run.Bench(work, sw, size, True)
        rdir = work / "run1"
        with xfs_dir(str(rdir), (a.volumes * 3 + 2) * size + (1 << 30)):
            ports = {"node-a": run.free_port(), "node-b": run.free_port()}
            cl = Cluster(rdir, nodes=(), seaweed=sw, prefix="probe")
            try:
                cl.start()
                for n, port in ports.items():
                    extra = a.node_args.split() if (n == "node-b" and a.node_args) else []
                    cl.nodes[n] = DriverProcess(rdir, mode="node", node_id=n, pool=cl.pool,
                                                catalog=sw.url(cl.prefix), env=cl.env,
                                                extra=cl.store_args() + ["--metrics-address", f"127.0.0.1:{port}"]
                                                + extra).start()
                img = str(rdir / "a.img")
                (rdir / "dl").mkdir()
                for v in range(a.volumes):
                    data.random_image(img, size)
                    vid = cl.create(f"probe-{v}", size, block_cap())
                    dev = cl.attach("node-a", vid, block_cap())
                    data.copy_to_device(img, dev)
                    f = b.node_flush(cl, "node-a", vid, ports["node-a"])
                    proc = cl.nodes["node-b"].proc
                    assert proc is not None
                    spy = None
                    if a.spy:
                        os.makedirs(a.spy, exist_ok=True)
                        cls = NativeSpy if a.native else PySpy
                        spy = cls(proc.pid, os.path.join(a.spy, f"hydrate-{v}.folded"))
                        spy.__enter__()
                    f0 = minflt(proc.pid)
                    try:
                        _, st = b.node_stage(cl, "node-b", vid, ports["node-b"], block_cap())
                    finally:
                        if spy is not None:
                            spy.__exit__(None, None, None)
                            Path(a.spy, f"hydrate-{v}.txt").write_text(summarize(spy.out, top=40))
                    faults = minflt(proc.pid) - f0
                    text = cl.nodes["node-b"].log_path.read_text(errors="replace")
                    inner = re.findall(r"hydrated 64 chunks .*?([0-9.]+) MB/s", text)
                    run.quiesce()
                    s5 = b.s5.upload(img, f"s5/{v}.img")
                    run.quiesce()
                    d = b.s5.download(f"s5/{v}.img", str(rdir / "dl" / "x.img"))
                    t0 = time.monotonic()
                    fd = os.open(rdir / "dl" / "x.img", os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                    fs = time.monotonic() - t0
                    print(f"volume {v}: flush {f['mb_s']:.0f} MB/s (s5cmd up {size / s5.seconds / 1e6:.0f}); "
                          f"stage {st['mb_s']:.0f} MB/s {st['seconds']:.2f}s node CPU {st['cpu_seconds']:.2f}s {faults} faults "
                          f"(pipeline {inner[-1] if inner else '?'} MB/s); s5cmd down {size / d.seconds / 1e6:.0f} MB/s "
                          f"+fsync {size / (d.seconds + fs) / 1e6:.0f}; ratio {d.seconds / st['seconds']:.2f}; "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
                    os.unlink(rdir / "dl" / "x.img")
                    cl.release("node-b", vid)
                    cl.delete(vid)
            finally:
                cl.keep_logs(work.parent / f"{work.name}-logs")
                cl.stop()
    finally:
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
