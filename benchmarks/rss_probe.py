"""The node's peak RSS while flushing, on the sequence `make bench` puts node-a through before
flush (b): flush (a) (a fresh volume of random data), `--pairs` unencrypted/aes-256-gcm pairs of
other random data, then flush (b) (ext4 with the realistic file mix), every one measured
(peak RSS as benchmarks/run.py measures it: VmHWM reset at the start of the flush; MB/s).

    .venv/bin/python benchmarks/rss_probe.py [--size BYTES] [--pairs N] [--rounds N] [--json PATH]

`--rounds`: the whole sequence again on the same node process (RSS that stays after a flush
shows up in the next ones). Needs root (loop devices, mounts); one node, one SeaweedFS.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
from run import Bench, free_port, log  # noqa: E402

from tests.harness.cluster import Cluster, block_cap, mount_cap  # noqa: E402
from tests.harness.procs import DriverProcess  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402
from tests.harness.xfsdir import xfs_dir  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def fill_random(dev: str, size: int) -> None:
    with open(dev, "r+b", buffering=0) as fo:
        left = size
        while left:
            b = os.urandom(min(data.BLOCK, left))
            fo.write(b)
            left -= len(b)
        os.fsync(fo.fileno())


def one_flush(b: Bench, cl: Cluster, port: int, name: str, kind: str, enc: bool, tree: str) -> dict[str, Any]:
    sec = {"encryptionKey": base64.b64encode(os.urandom(32)).decode()} if enc else None
    cap = block_cap() if kind == "a" else mount_cap("ext4")
    vid = cl.create(name, b.size, cap, params={"encryption": "aes-256-gcm"} if sec else None, secrets=sec)
    tgt = cl.attach("node-a", vid, cap, secrets=sec)
    if kind == "a":
        fill_random(tgt, b.size)
    else:
        data.copy_tree(tree, tgt)
        os.sync()
    r = b.node_flush(cl, "node-a", vid, port)
    cl.delete(vid)
    out = {"name": name, "mb_s": round(r["mb_s"], 1), "rss_mib": round(r["peak_rss_bytes"] / MiB, 1),
           "rss_mb": round(r["peak_rss_bytes"] / 1e6, 1), "cpu_s": round(r["cpu_seconds"], 2)}
    log(f"  {name}: {out['mb_s']} MB/s, peak RSS {out['rss_mb']} MB, cpu {out['cpu_s']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256 * MiB)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cache", default="/var/tmp/perssd-rss-probe-cache")
    ap.add_argument("--json", default="")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="environment of the node process (e.g. MALLOC_ARENA_MAX=2), for A/B runs")
    a = ap.parse_args(argv)
    tree = os.path.join(a.cache, f"tree-b-{a.size}")
    if not os.path.exists(tree + ".done"):
        shutil.rmtree(tree, ignore_errors=True)
        os.makedirs(tree)
        log(f"generating (b): a file tree of {0.4 * a.size / MiB:.0f} MiB")
        data.write_tree(tree, int(a.size * 0.4))
        Path(tree + ".done").touch()
    work = Path(tempfile.mkdtemp(prefix="perssd-rss-", dir="/var/tmp"))
    sw = Seaweed(work / "seaweed")
    rows: list[dict[str, Any]] = []
    try:
        sw.start()
        b = Bench.__new__(Bench)        # node_flush alone: no peers (s5cmd, rclone) needed
        b.size, b.profile_dir, b.run_no = a.size, None, 0
        rdir = work / "run"
        with xfs_dir(str(rdir), (2 + 2 * a.pairs) * a.rounds * a.size + GiB):
            port = free_port()
            cl = Cluster(rdir, nodes=(), seaweed=sw, prefix="rss", env=dict(kv.split("=", 1) for kv in a.env))
            try:
                cl.start()
                cl.nodes["node-a"] = DriverProcess(rdir, mode="node", node_id="node-a", pool=cl.pool,
                                                   catalog=sw.url(cl.prefix), env=cl.env,
                                                   extra=cl.store_args() + ["--metrics-address", f"127.0.0.1:{port}"]).start()
                for r in range(a.rounds):
                    rows.append(one_flush(b, cl, port, f"r{r}-flush-a", "a", False, tree))
                    for k in range(a.pairs):
                        for enc in ((False, True) if k % 2 else (True, False)):
                            rows.append(one_flush(b, cl, port, f"r{r}-a-{'enc' if enc else 'ctl'}-{k}", "a", enc, tree))
                    rows.append(one_flush(b, cl, port, f"r{r}-flush-b", "b", False, tree))
            finally:
                cl.stop()
    finally:
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    def pick(sub: str) -> list[dict[str, Any]]:
        return [x for x in rows if sub in x["name"]]
    summary = {k: {"rss_mb_max": max(x["rss_mb"] for x in pick(k)),
                   "mb_s_median": statistics.median(x["mb_s"] for x in pick(k))}
               for k in ("flush-a", "-ctl-", "-enc-", "flush-b") if pick(k)}
    summary["all_rss_mb_max"] = max(x["rss_mb"] for x in rows)
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
