"""Lazy hydration on the device-mapper path, measured inside the LVM test VM (QEMU/TCG).

    .venv/bin/python tests/vm/run.py --script benchmarks/lazy_dm.py [-- --reps N --seconds S]

Runs in the guest (PERSSD_VM=1, SeaweedFS on the host). One LVM node (controller too,
`--hydrate lazy`, background hydration on):
  256 MiB   random data written and flushed by the node; the node then loses its copy (the LV is
            deleted) and stages the volume lazily:
    stage   NodeStage time (lazy: nothing is copied before it returns)
    switch  time from NodeStage until the node's `lazy-switch` loop put the dm-linear table on
            the LV (background hydration of the whole volume + the switch)
    fio     after the switch: 4 KiB random read/write IOPS and 1 MiB sequential read/write
            throughput (fio, O_DIRECT, libaio, iodepth 16) on the dm-linear device vs the LV
            itself; REPS rounds, the order of the two devices alternating per round; the ratio
            of each round is reported with its median, min and max (TCG: emulated numbers)
    flush   NodeUnstage after fio wrote: what the flush read (only what was written here)
  2 GiB, 16 GiB sparse (2 GiB data): NodeStage time of a lazy stage of a bench-made generation
            (--big; see synthetic_row: the VM's disks and TCG cannot write GiBs in minutes)
Writes benchmarks/results/<date>-vm-lazy-dm.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from csi_perssd.cli import pool as pool_cli  # noqa: E402
from csi_perssd.config import Config  # noqa: E402
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


def driver(work: Path, cat: str) -> DriverProcess:
    """One LVM node (controller too), lazy by default (it keeps a warm spare lazy server, as a
    production node with `--hydrate lazy` does), background hydration on (the node default, Config.lazy_background_workers)."""
    env = {"AWS_ACCESS_KEY_ID": os.environ["PERSSD_VM_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": os.environ["PERSSD_VM_S3_SECRET_KEY"]}
    n = DriverProcess(work, mode="all", node_id="node-l", catalog=cat, env=env, extra=[
        "--s3-endpoint", os.environ["PERSSD_VM_S3_ENDPOINT"], "--s3-region", "us-east-1",
        "--unstage-wait-seconds", "120", "--backend", "lvm", "--volume-group", VG, "--thin-pool", POOL,
        "--lvm-config", NO_UDEV_CONFIG, "--hydrate", "lazy"])
    return n.start(600)


class Co:
    """ControllerPublish + NodeStage + NodePublish of one raw block volume (what kubelet does)."""

    def __init__(self, ctl: DriverProcess, work: Path, vid: str):
        self.ctl, self.work, self.vid, self.cap = ctl, work, vid, block_cap()

    def paths(self, node: str) -> tuple[str, str]:
        return str(self.work / node / "staging"), str(self.work / node / "target")

    def publish(self, node: DriverProcess) -> Any:
        return self.ctl.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=self.vid, node_id=node.node_id, volume_capability=self.cap)).publish_context

    def attach(self, node: DriverProcess, ctx: Any = None) -> tuple[str, float]:
        staging, target = self.paths(node.node_id)
        os.makedirs(staging, exist_ok=True)
        ctx = self.publish(node) if ctx is None else ctx
        t0 = time.monotonic()
        node.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.vid, staging_target_path=staging, volume_capability=self.cap, publish_context=ctx))
        dt = time.monotonic() - t0
        node.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.vid, staging_target_path=staging, target_path=target, volume_capability=self.cap))
        return target, dt

    def release(self, node: DriverProcess) -> float:
        """NodeUnpublish + NodeUnstage (retried while the flush runs) + ControllerUnpublish;
        the seconds NodeUnstage took."""
        staging, target = self.paths(node.node_id)
        for _ in range(60):                          # ABORTED while another operation holds it: retried, as kubelet does
            try:
                node.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=self.vid, target_path=target))
                break
            except Exception as e:
                log(f"NodeUnpublish: {e.__class__.__name__}, retried")
                time.sleep(0.5)
        t0 = time.monotonic()
        deadline = t0 + 900
        while True:
            try:
                node.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=self.vid, staging_target_path=staging))
                break
            except Exception:                        # ABORTED while the flush runs
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        dt = time.monotonic() - t0
        self.ctl.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=self.vid, node_id=node.node_id))
        return dt


def on_lv(vid: str, lv: str) -> bool:
    out = subprocess.run(["dmsetup", "deps", "-o", "devno", dm.name(vid)], capture_output=True,
                         text=True, timeout=60).stdout
    rdev = os.stat(lv).st_rdev
    return f"({os.major(rdev)}, {os.minor(rdev)})" in out and "dependencies" in out \
        and out.count("(") == 1


def precondition(lv: str, span: int) -> float:
    """One unmeasured sequential write over the span, on the LV (the dm device maps the same
    blocks). After the switch the node holds a thin snapshot of the LV (`lazy-switch`, the base
    of the next flush): the first write to each 64 KiB pool block after it breaks the sharing
    (a new block, the old 64 KiB copied), and a 4 KiB random write job that runs first would pay
    that for both devices. Preconditioned, both jobs write blocks the LV owns alone."""
    t0 = time.monotonic()
    subprocess.run(["fio", "--name=pre", f"--filename={lv}", "--rw=write", "--bs=1M", "--direct=1",
                    "--ioengine=libaio", "--iodepth=16", f"--size={span}", "--output-format=json"],
                   capture_output=True, text=True, timeout=600, check=True)
    return time.monotonic() - t0


def fio_rounds(dmdev: str, lv: str, reps: int, seconds: int, span: int) -> dict[str, Any]:
    """REPS rounds of every job on both devices, the order alternating per round; plus, per
    round, the LV against itself for 4k randwrite (the method's noise floor: 1.0 is exact)."""
    runs: dict[str, list[tuple[float, float]]] = {f"{bs} {rw}": [] for rw, bs in JOBS}
    runs["4k randwrite LV/LV"] = []
    for r in range(reps):
        for rw, bs in JOBS:
            order = (dmdev, lv) if r % 2 == 0 else (lv, dmdev)
            got = {d: fio(d, rw, bs, seconds, span) for d in order}
            runs[f"{bs} {rw}"].append((got[dmdev], got[lv]))
        runs["4k randwrite LV/LV"].append((fio(lv, "randwrite", "4k", seconds, span),
                                           fio(lv, "randwrite", "4k", seconds, span)))
        log(f"fio round {r + 1}/{reps}: " + json.dumps({k: v[-1] for k, v in runs.items()}))
    out: dict[str, Any] = {}
    for job, pairs in runs.items():
        ratios = [a / b for a, b in pairs]
        out[job] = {"dm": [a for a, _ in pairs], "lv": [b for _, b in pairs], "ratios": ratios,
                    "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                    "max_ratio": max(ratios), "median_dm": statistics.median(a for a, _ in pairs),
                    "median_lv": statistics.median(b for _, b in pairs)}
    return out


def spares_warm(n: DriverProcess, count: int, timeout: float = 600.0) -> float:
    """Wait until `count` spare lazy servers of the node have warmed up (the node starts one at
    its start and one after each lazy stage; under TCG a warm-up takes a minute or two of CPU,
    which would land in the next stage or in the fio rounds); the seconds waited."""
    path = Path(n.state_dir) / "lazy" / "spare.log"
    t0 = time.monotonic()
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if text.count("spare warm") >= count:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{count} warm spares not seen in {timeout:.0f}s:\n{text[-2000:]}")
        time.sleep(0.5)


def create(n: DriverProcess, name: str, size: int) -> str:
    return str(n.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[block_cap()], capacity_range=pb.CapacityRange(required_bytes=size),
        parameters={"hydrate": "lazy"})).volume.volume_id)


def stage_tools(n: DriverProcess, vid: str) -> str:
    """The tool runs of the volume's last NodeStage, as the node logged them."""
    lines = [ln for ln in n.log_path.read_text(errors="replace").splitlines() if f"volume {vid} staged at" in ln]
    return lines[-1].split("; ", 1)[-1].rstrip(")") if lines else "?"


def committed_log(n: DriverProcess, vid: str, gen: int) -> str:
    lines = [ln for ln in n.log_path.read_text(errors="replace").splitlines()
             if vid in ln and (f"committed generation {gen}" in ln or "written on this node" in ln
                               or "background flush uploaded" in ln or "since the pre-flush" in ln)]
    # the pre-flush (background flush at NodeUnstage) uploads what was written; the final pass
    # then reads only what changed since it, so its own "read/uploaded" figures can be 0
    return " | ".join(ln.split(": ", 1)[-1] for ln in lines[-4:])


def full_row(work: Path, n: DriverProcess, backend: LvmBackend, size: int, reps: int,
             seconds: int) -> dict[str, Any]:
    """A volume full of random data written on this node and committed; the node then loses its
    copy (the LV is deleted) and stages it lazily: stage time, time to the switch onto the LV
    (background hydration of every chunk), fio dm-linear vs the LV, and the next flush."""
    vid = create(n, f"lazy-dm-{size // MiB}m", size)
    try:
        co = Co(n, work, vid)
        target, _ = co.attach(n)                     # generation 0: the plain LV
        write_random(target, size)                  # every chunk holds data: all of it is fetched
        co.release(n)
        log(f"{size // MiB} MiB: generation 1 committed")
        backend.delete(vid)                         # this node loses its copy: the next stage is lazy
        log(f"spare warm after {spares_warm(n, 1):.1f}s more")
        t0 = time.monotonic()
        _, stage_s = co.attach(n)
        lv = backend.device(vid)
        deadline = time.monotonic() + 1800
        while not on_lv(vid, lv):
            assert time.monotonic() < deadline, "no switch to the LV within 30 min"
            time.sleep(0.2)
        switch_s = time.monotonic() - t0
        log(f"{size // MiB} MiB: NodeStage {stage_s:.2f}s; on the LV after {switch_s:.1f}s")
        log(f"the next spare warm after {spares_warm(n, 2):.1f}s more (before fio)")
        span = min(size, 64 * MiB)
        pre_s = precondition(lv, span)
        log(f"span preconditioned (1 MiB writes on the LV) in {pre_s:.1f}s")
        row = {"size": size, "data": size, "stage_lazy_s": stage_s, "switch_s": switch_s,
               "stage_tools": stage_tools(n, vid), "precondition_s": pre_s,
               "fio": fio_rounds(dm.path(vid), lv, reps, seconds, span), "fio_span": span}
        row["unstage_s"] = co.release(n)
        row["flush_after_switch"] = committed_log(n, vid, 2)
        log(f"{size // MiB} MiB: NodeUnstage {row['unstage_s']:.1f}s: {row['flush_after_switch']}")
        return row
    finally:
        drop(n, backend, vid)


def synthetic_row(work: Path, n: DriverProcess, backend: LvmBackend, size: int, data: int,
                  spare: int) -> dict[str, Any]:
    """NodeStage time of a lazily staged volume of `size` bytes holding `data` bytes. Generation 1
    is made by the bench, not written through a node (the VM's disks and TCG cannot hold and push
    GiBs in minutes): one 4 MiB random chunk uploaded once, a manifest whose data chunks (data /
    4 MiB of them, spread evenly) all name it, committed as this node's publish. A lazy stage reads
    only the manifest, so its work is that of any volume with as many data chunks."""
    from csi_perssd.remote.manifest import Manifest
    from csi_perssd.remote.codec import PLAIN
    from csi_perssd.stores import Stores
    from csi_perssd import volume_io
    vid = create(n, f"lazy-dm-{size // MiB}m-{data // MiB}m", size)
    try:
        co = Co(n, work, vid)
        ctx = co.publish(n)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", os.environ["PERSSD_VM_S3_ACCESS_KEY"])
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", os.environ["PERSSD_VM_S3_SECRET_KEY"])
        cat = Stores(Config(catalog=n.catalog, s3_endpoint=os.environ["PERSSD_VM_S3_ENDPOINT"],
                            s3_region="us-east-1")).catalog()
        rec = cat.volume(vid)
        cs = rec.chunk_size
        one = work / "one-chunk"
        one.write_bytes(os.urandom(cs))
        m1, _ = volume_io.flush_path(cat.store, str(one), cs, cs)
        h = m1.entries[0]
        assert h is not None
        chunks = -(-size // cs)
        stride = max(1, chunks // max(1, data // cs))
        entries: list[str | None] = [h if i % stride == 0 and i // stride < data // cs else None
                                     for i in range(chunks)]
        m = Manifest(size, cs, entries, generation=1, sizes={h: m1.sizes[h]})
        gen = cat.put_manifest(vid, 1, PLAIN.encode_manifest(m))
        cat.commit_generation(vid, gen, n.node_id, int(ctx["epoch"]))
        log(f"spare warm after {spares_warm(n, spare):.1f}s more")
        _, stage_s = co.attach(n, ctx)
        tools = stage_tools(n, vid)
        log(f"{size // MiB} MiB holding {data // MiB} MiB ({sum(e is not None for e in entries)} data chunks): "
            f"NodeStage {stage_s:.2f}s ({tools})")
        co.release(n)
        return {"size": size, "data": data, "data_chunks": sum(e is not None for e in entries),
                "stage_lazy_s": stage_s, "stage_tools": tools, "synthetic": True}
    finally:
        drop(n, backend, vid)


def drop(n: DriverProcess, backend: LvmBackend, vid: str) -> None:
    try:
        n.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    except Exception as e:
        log(f"DeleteVolume {vid}: {e}")
    if backend.exists(vid):
        backend.delete(vid)


def measure(work: Path, size: int, reps: int, seconds: int, big: list[tuple[int, int]],
            save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The rows; `save` gets the document after each row (a later row's failure, or the VM's
    timeout, keeps the rows before it)."""
    cat = f"s3://{os.environ['PERSSD_VM_S3_BUCKET']}/lazy-dm-bench-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    n = driver(work, cat)
    log(f"driver up in {time.monotonic() - t0:.1f}s")
    backend = LvmBackend(VG, POOL, lvm_config=NO_UDEV_CONFIG)
    doc: dict[str, Any] = {"rows": [], "reps": reps, "seconds": seconds, "complete": False}
    try:
        doc["rows"].append(full_row(work, n, backend, size, reps, seconds))
        save(doc)
        for k, (sz, data) in enumerate(big):
            try:
                doc["rows"].append(synthetic_row(work, n, backend, sz, data, spare=2 + k))
            except Exception as e:          # recorded; the next row still runs
                log(f"{sz // MiB} MiB row failed: {e}")
                doc["rows"].append({"size": sz, "data": data, "error": f"{type(e).__name__}: {e}"[:500],
                                    "synthetic": True})
            save(doc)
        doc["complete"] = True
    except BaseException:
        log("driver log tail:\n" + "\n".join(ln for ln in n.tail(3000).splitlines() if " DEBUG " not in ln)[-6000:])
        raise
    finally:
        n.stop()
        keep = Path(os.environ.get("PERSSD_VM_WORK", str(work))) / "logs"
        keep.mkdir(parents=True, exist_ok=True)         # on the host: the guest's files vanish with the VM
        shutil.copyfile(n.log_path, keep / "lazy-dm-bench-driver.log")
        for f in (Path(n.state_dir) / "lazy").glob("*.log"):
            shutil.copyfile(f, keep / f"lazy-dm-bench-{f.name}")
        for f in (Path(n.state_dir) / "lazy").glob("*/server.log"):    # each volume's server
            shutil.copyfile(f, keep / f"lazy-dm-bench-server-{f.parent.name}.log")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    unit = {"4k": "IOPS", "1M": "MB/s"}
    a = doc["rows"][0]
    lines = [f"# Lazy hydration, device-mapper path (LVM VM, QEMU TCG), {doc['date']}, commit {doc['commit']}",
             "",
             "One LVM node (`--hydrate lazy`: it keeps a warm spare lazy server; background hydration on, "
             f"{Config.lazy_background_workers} workers). Guest load average before: {doc['loadavg']}; host at the VM's start: "
             f"{doc.get('host_loadavg', '?')}. Emulated CPU (TCG): absolute figures are not a machine's; "
             "compare inside the run." + ("" if doc.get("complete") else " **Incomplete run** (rows so far)."),
             "",
             "## NodeStage (target < 2 s, independent of size)",
             "",
             "| volume | data | data chunks | NodeStage lazy | tools the node ran in it | generation 1 |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        how = ("bench-made: one 4 MiB chunk named by every data entry; the node never held the volume"
               if r.get("synthetic") else "random data written and flushed by the node, which then lost "
               "its LV but kept its record (so it lists the VG to learn the LV is gone)")
        chunks = r.get("data_chunks", r["data"] // (4 * MiB))
        stage = f"{r['stage_lazy_s']:.2f} s" if "stage_lazy_s" in r else f"failed: {r.get('error', '?')}"
        lines.append(f"| {r['size'] // MiB} MiB | {r['data'] // MiB} MiB | {chunks} | "
                     f"{stage} | {r.get('stage_tools', '')} | {how} |")
    lines += ["",
              f"## After the switch ({a['size'] // MiB} MiB volume; target >= 0.9x the LV itself)",
              "",
              f"On the LV {a['switch_s']:.1f} s after NodeStage began (background hydration of every chunk "
              "+ the node's lazy-switch loop). The span was then written once (1 MiB, on the LV, "
              f"{a.get('precondition_s', 0):.1f} s, unmeasured): the node's `lazy-switch` thin snapshot "
              "makes the first write to each pool block a copy, which the first device to write would "
              "pay alone. fio on the dm-linear device vs the LV itself: "
              f"{doc['reps']} rounds of {doc['seconds']} s per job and device over {a['fio_span'] // MiB} MiB, "
              "order alternating, iodepth 16, O_DIRECT, libaio; `LV/LV`: the LV against itself "
              "(the method's noise).",
              "",
              "| job | dm-linear (median) | LV (median) | ratio per round | ratio median | ratio min | ratio max |",
              "|---|---|---|---|---|---|---|"]
    for job, r in a["fio"].items():
        u = unit[job.split()[0]]
        lines.append(f"| {job} | {r['median_dm']:.0f} {u} | {r['median_lv']:.0f} {u} | "
                     f"{' '.join(f'{x:.2f}' for x in r['ratios'])} | "
                     f"{r['median_ratio']:.2f} | {r['min_ratio']:.2f} | {r['max_ratio']:.2f} |")
    if "unstage_s" in a:
        lines += ["", f"NodeUnstage after the fio writes: {a['unstage_s']:.1f} s; {a['flush_after_switch']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--big", default="256:256,2048:2048,16384:2048",
                    help="SIZE_MIB:DATA_MIB,... lazily staged volumes whose NodeStage is timed ('' for none)")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if os.environ.get("PERSSD_VM") != "1":
        print("lazy_dm.py runs inside the test VM: tests/vm/run.py --script benchmarks/lazy_dm.py",
              file=sys.stderr)
        return 2
    big = [(int(a) * MiB, int(b) * MiB) for a, b in (x.split(":") for x in args.big.split(",") if x)]
    load = open("/proc/loadavg").read().split()[:3]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lazy-dm-bench"
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"date": now.isoformat(timespec="seconds"), "commit": git_commit(), "loadavg": " ".join(load),
            "host_loadavg": os.environ.get("PERSSD_HOST_LOADAVG", "?")}

    def save(doc: dict[str, Any]) -> None:
        doc.update(meta)
        write_results(Path(args.out), f"{now.date().isoformat()}-vm-lazy-dm", doc, markdown(doc))

    pool_cli.init(POOL_DEVICE, VG, POOL, chunk_size="64k", lvm_config=NO_UDEV_CONFIG)
    try:
        doc = measure(work, args.size_mib * MiB, args.reps, args.seconds, big, save)
    finally:
        subprocess.run(["lvm", "vgremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", VG], capture_output=True,
                       timeout=300)
    save(doc)
    return 0 if all("error" not in r for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
