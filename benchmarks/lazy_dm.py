"""Lazy hydration on the device-mapper path, measured inside the LVM test VM (QEMU/TCG).

    .venv/bin/python tests/vm/run.py --script benchmarks/lazy_dm.py [-- --reps N --seconds S]

Runs in the guest (PERSSD_VM=1, SeaweedFS on the host). node-w (controller + rawfile node) writes
a raw block volume full of random data and flushes it; node-l (LVM thin, `hydrate: lazy`,
background hydration on) stages it:
  stage     NodeStage time on node-l (lazy: nothing is copied before it returns)
  switch    time from NodeStage until the node's `lazy-switch` loop put the dm-linear table on
            the LV (background hydration of the whole volume + the switch)
  fio       after the switch: 4 KiB random read/write IOPS and 1 MiB sequential read/write
            throughput (fio, O_DIRECT, libaio, iodepth 16) on the dm-linear device vs the LV
            itself; REPS rounds, the order of the two devices alternating per round; the ratio
            of each round is reported with its median, min and max (TCG: emulated numbers)
Writes benchmarks/results/<date>-vm-lazy-dm.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from csi_perssd.cli import pool as pool_cli  # noqa: E402
from csi_perssd.csi import csi_pb2 as pb  # noqa: E402
from csi_perssd.lazy import dm  # noqa: E402
from csi_perssd.local.lvm import LvmBackend  # noqa: E402
from csi_perssd.local.lvmcli import NO_UDEV_CONFIG  # noqa: E402
from tests.harness.cluster import block_cap  # noqa: E402
from tests.harness.procs import DriverProcess  # noqa: E402
from tests.lvm.util import POOL, POOL_DEVICE, VG  # noqa: E402

from benchmarks.lazy import fio, write_random  # noqa: E402
from benchmarks.report import git_commit, write_results  # noqa: E402

MiB = 1 << 20
JOBS = (("randread", "4k"), ("randwrite", "4k"), ("read", "1M"), ("write", "1M"))


def log(msg: str) -> None:
    print(f"[lazy-dm-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drivers(work: Path, cat: str) -> tuple[DriverProcess, DriverProcess]:
    env = {"AWS_ACCESS_KEY_ID": os.environ["PERSSD_VM_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": os.environ["PERSSD_VM_S3_SECRET_KEY"]}
    s3 = ["--s3-endpoint", os.environ["PERSSD_VM_S3_ENDPOINT"], "--s3-region", "us-east-1",
          "--unstage-wait-seconds", "120"]
    w = DriverProcess(work, mode="all", node_id="node-w", catalog=cat, env=env, extra=s3)
    n = DriverProcess(work, mode="node", node_id="node-l", catalog=cat, env=env, extra=s3 + [
        "--backend", "lvm", "--volume-group", VG, "--thin-pool", POOL, "--lvm-config", NO_UDEV_CONFIG])
    return w.start(300), n.start(300)


class Co:
    """ControllerPublish + NodeStage + NodePublish of one raw block volume (what kubelet does)."""

    def __init__(self, ctl: DriverProcess, work: Path, vid: str):
        self.ctl, self.work, self.vid, self.cap = ctl, work, vid, block_cap()

    def paths(self, node: str) -> tuple[str, str]:
        return str(self.work / node / "staging"), str(self.work / node / "target")

    def attach(self, node: DriverProcess) -> tuple[str, float]:
        staging, target = self.paths(node.node_id)
        os.makedirs(staging, exist_ok=True)
        ctx = self.ctl.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=self.vid, node_id=node.node_id, volume_capability=self.cap)).publish_context
        t0 = time.monotonic()
        node.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.vid, staging_target_path=staging, volume_capability=self.cap, publish_context=ctx))
        dt = time.monotonic() - t0
        node.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.vid, staging_target_path=staging, target_path=target, volume_capability=self.cap))
        return target, dt

    def release(self, node: DriverProcess) -> None:
        staging, target = self.paths(node.node_id)
        node.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=self.vid, target_path=target))
        deadline = time.monotonic() + 900
        while True:
            try:
                node.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=self.vid, staging_target_path=staging))
                break
            except Exception:                        # ABORTED while the flush runs
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.ctl.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=self.vid, node_id=node.node_id))


def on_lv(vid: str, lv: str) -> bool:
    out = subprocess.run(["dmsetup", "deps", "-o", "devno", dm.name(vid)], capture_output=True,
                         text=True, timeout=60).stdout
    rdev = os.stat(lv).st_rdev
    return f"({os.major(rdev)}, {os.minor(rdev)})" in out and "dependencies" in out \
        and out.count("(") == 1


def fio_rounds(dmdev: str, lv: str, reps: int, seconds: int, span: int) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float]]] = {f"{bs} {rw}": [] for rw, bs in JOBS}
    for r in range(reps):
        for rw, bs in JOBS:
            order = (dmdev, lv) if r % 2 == 0 else (lv, dmdev)
            got = {d: fio(d, rw, bs, seconds, span) for d in order}
            runs[f"{bs} {rw}"].append((got[dmdev], got[lv]))
        log(f"fio round {r + 1}/{reps}: " + json.dumps({k: v[-1] for k, v in runs.items()}))
    out: dict[str, Any] = {}
    for job, pairs in runs.items():
        ratios = [a / b for a, b in pairs]
        out[job] = {"dm": [a for a, _ in pairs], "lv": [b for _, b in pairs], "ratios": ratios,
                    "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                    "max_ratio": max(ratios), "median_dm": statistics.median(a for a, _ in pairs),
                    "median_lv": statistics.median(b for _, b in pairs)}
    return out


def measure(work: Path, size: int, reps: int, seconds: int) -> dict[str, Any]:
    cat = f"s3://{os.environ['PERSSD_VM_S3_BUCKET']}/lazy-dm-bench-{uuid.uuid4().hex[:8]}"
    w, n = drivers(work, cat)
    backend = LvmBackend(VG, POOL, lvm_config=NO_UDEV_CONFIG)
    vid, doc = "", {}
    try:
        vid = w.controller.CreateVolume(pb.CreateVolumeRequest(
            name="lazy-dm-bench", volume_capabilities=[block_cap()],
            capacity_range=pb.CapacityRange(required_bytes=size),
            parameters={"hydrate": "lazy"})).volume.volume_id
        co = Co(w, work, vid)
        target, _ = co.attach(w)
        write_random(target, size)                  # every chunk holds data: all of it is fetched
        co.release(w)
        log(f"generation 1: {size // MiB} MiB of random data committed")
        t0 = time.monotonic()
        _, stage_s = co.attach(n)
        lv = backend.device(vid)
        deadline = time.monotonic() + 1800
        while not on_lv(vid, lv):
            assert time.monotonic() < deadline, "no switch to the LV within 30 min"
            time.sleep(0.2)
        switch_s = time.monotonic() - t0
        log(f"NodeStage {stage_s:.2f}s; on the LV after {switch_s:.1f}s")
        doc = {"size": size, "stage_lazy_s": stage_s, "switch_s": switch_s, "reps": reps,
               "seconds": seconds, "fio": fio_rounds(dm.path(vid), lv, reps, seconds, min(size, 64 * MiB))}
        co.release(n)
    finally:
        if vid:
            try:
                w.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
            except Exception:
                pass
        n.stop()
        w.stop()
        if vid and backend.exists(vid):
            backend.delete(vid)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    unit = {"4k": "IOPS", "1M": "MB/s"}
    lines = [f"# Lazy hydration, device-mapper path (LVM VM, QEMU TCG), {doc['date']}, commit {doc['commit']}",
             "",
             f"Volume {doc['size'] // MiB} MiB of random data, staged with `hydrate: lazy` on an LVM node "
             f"(background hydration on). NodeStage: **{doc['stage_lazy_s']:.2f} s**; on the LV (background "
             f"hydration done and switched by the node's lazy-switch loop) {doc['switch_s']:.1f} s after "
             "NodeStage began.",
             "",
             f"fio after the switch, dm-linear device vs the LV itself: {doc['reps']} rounds of "
             f"{doc['seconds']} s per job and device, order alternating, iodepth 16, O_DIRECT, libaio. "
             f"Guest load average before: {doc['loadavg']}. Emulated CPU (TCG): absolute figures are not a disk's.",
             "",
             "| job | dm-linear (median) | LV (median) | ratio median | ratio min | ratio max |",
             "|---|---|---|---|---|---|"]
    for job, r in doc["fio"].items():
        u = unit[job.split()[0]]
        lines.append(f"| {job} | {r['median_dm']:.0f} {u} | {r['median_lv']:.0f} {u} | "
                     f"{r['median_ratio']:.2f} | {r['min_ratio']:.2f} | {r['max_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if os.environ.get("PERSSD_VM") != "1":
        print("lazy_dm.py runs inside the test VM: tests/vm/run.py --script benchmarks/lazy_dm.py",
              file=sys.stderr)
        return 2
    load = open("/proc/loadavg").read().split()[:3]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lazy-dm-bench"
    pool_cli.init(POOL_DEVICE, VG, POOL, chunk_size="64k", lvm_config=NO_UDEV_CONFIG)
    try:
        doc = measure(work, args.size_mib * MiB, args.reps, args.seconds)
    finally:
        subprocess.run(["lvm", "vgremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", VG], capture_output=True)
    doc.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=git_commit(), loadavg=" ".join(load))
    write_results(Path(args.out), f"{datetime.date.today().isoformat()}-vm-lazy-dm", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
