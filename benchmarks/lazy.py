"""`make bench` rows for lazy hydration (StorageClass hydrate: lazy) on the FUSE + loop path.

    .venv/bin/python benchmarks/lazy.py [--quick] [--out DIR]

One SeaweedFS, a controller, node-a (writes and flushes the volumes) and node-b (stages them).
Raw block volumes of random data (node-a writes them with O_DIRECT, then releases = flush):
  stage     NodeStage + NodePublish time on node-b, full vs lazy, for each volume
  read      reading DATA bytes sequentially (1 MiB O_DIRECT reads) right after a lazy stage,
            vs the full hydrate's throughput of the same volume (data bytes / hydrate time)
  bg        background hydration with no reader: data bytes / time until complete, vs full
  file      the issue's reader: an ext4 volume of the same size holding one file of random data
            (1 GiB; half the data on smaller rows), written by node-a; node-b stages it lazily and
            reads the file once, buffered, as a program would (dd bs=1M: the kernel's readahead
            through ext4 and the loop device), vs the same round's full-hydrate throughput
  fio       on node-b after hydration completed: 4 KiB random read/write IOPS and 1 MiB
            sequential read/write throughput (fio, O_DIRECT, libaio) on the FUSE-served loop
            device vs the same volume on the plain local file's loop device (full hydrate)
Writes benchmarks/results/<date>-<host>-lazy[-quick].{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import git_commit, spread, write_results  # noqa: E402
from csi_perssd.csi import csi_pb2 as pb  # noqa: E402
from csi_perssd.lazy.manager import LazyManager  # noqa: E402
from tests.harness.cluster import Cluster, block_cap, mount_cap  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def log(msg: str) -> None:
    print(f"[lazy-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_random(path: str, nbytes: int) -> None:
    """nbytes of random data at offset 0 of a device or file (dd from /dev/urandom, O_DIRECT, synced)."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=4M", f"count={nbytes // (4 * MiB)}",
                    "oflag=direct", "conv=fsync", "status=none"], check=True, timeout=1800)


def read_seq(path: str, nbytes: int, direct: bool = True) -> float:
    """Seconds to read nbytes from offset 0 with 1 MiB reads: O_DIRECT, or buffered (what a
    program reading a file does)."""
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={nbytes // MiB}",
                    *(["iflag=direct"] if direct else []), "status=none"], check=True, timeout=1800)
    return time.monotonic() - t0


def fio(dev: str, rw: str, bs: str, seconds: int, span: int) -> float:
    """IOPS (4k jobs) or MB/s (1M jobs) of one fio job on dev."""
    res = subprocess.run(["fio", "--name=j", f"--filename={dev}", f"--rw={rw}", f"--bs={bs}",
                          "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--size={span}",
                          f"--runtime={seconds}", "--time_based", "--output-format=json"],
                         capture_output=True, text=True, timeout=seconds + 120, check=True)
    job = json.loads(res.stdout)["jobs"][0]
    side = job["read"] if "read" in rw or rw == "randread" else job["write"]
    return float(side["iops"]) if bs == "4k" else float(side["bw_bytes"]) / 1e6


class LazyBench:
    def __init__(self, work: Path, quick: bool, sparse_gib: int = 16, skip: tuple[str, ...] = (),
                 rounds: int = 1):
        self.work, self.quick, self.sparse_gib, self.skip = work, quick, sparse_gib, skip
        self.rounds = max(1, rounds)
        self.made = 0
        self.sw = Seaweed(work / "seaweed")
        # the nodes look for deleted volumes every second (default 900 s): drop() waits for that
        self.cl = Cluster(work / "cluster", seaweed=self.sw, prefix="lazy",
                          node_extra=["--volume-check-seconds", "1"])
        self.cap = block_cap()

    def make(self, name: str, size: int, data: int, params: dict[str, str],
             cap: pb.VolumeCapability | None = None, file: str = "") -> str:
        """A volume written with `data` random bytes on node-a (into its device, or into `file`
        on its file system), released (flushed)."""
        cap = cap or self.cap
        self.made += 1                  # each round's volumes are new ones (names never reused)
        vid = self.cl.create(f"{name}-{self.made}", size, cap=cap, params=params)
        path = self.cl.attach("node-a", vid, cap=cap)
        write_random(os.path.join(path, file) if file else path, data)
        self.cl.release("node-a", vid)
        return vid

    def stage(self, vid: str, cap: pb.VolumeCapability | None = None) -> tuple[str, float]:
        t0 = time.monotonic()
        path = self.cl.attach("node-b", vid, cap=cap or self.cap)
        return path, time.monotonic() - t0

    def lazy_status(self, vid: str) -> dict[str, Any]:
        st = LazyManager(self.cl.nodes["node-b"].state_dir, {}).status(vid)
        return st or {}

    def wait_complete(self, vid: str, timeout: float = 1800) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.lazy_status(vid).get("complete"):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError(f"{vid}: hydration did not complete in {timeout}s")

    def drop(self, vid: str, timeout: float = 120.0) -> None:
        """Delete the volume and wait until no node holds a copy: a thin-provisioned node reserves
        a volume's whole size while it holds it, so one volume at a time keeps the bench's need
        at about twice the volume size (node-a's and node-b's copy), not six times."""
        self.cl.delete(vid)
        dirs = [Path(n.rawfile_dir) / vid for n in self.cl.nodes.values()]
        deadline = time.monotonic() + timeout
        while any(d.exists() for d in dirs):        # dropped at the next heartbeat (2 s)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vid}: local copies still present after {timeout:.0f}s")
            time.sleep(0.2)

    def one_volume(self, tag: str, size: int, data: int) -> dict[str, Any]:
        """Stage the same content full and lazy on node-b: stage times, read and background
        throughput (each lazy figure from its own volume: nothing fetched before). Each volume
        is deleted before the next one is made."""
        row: dict[str, Any] = {"volume": tag, "size": size, "data": data}
        full = self.make(f"{tag}-full", size, data, {"hydrate": "full"})
        _, row["stage_full_s"] = self.stage(full)
        row["full_mb_s"] = data / row["stage_full_s"] / 1e6
        self.cl.release("node-b", full)
        self.drop(full)
        lazy_read = self.make(f"{tag}-lazy-read", size, data, {"hydrate": "lazy"})
        dev, row["stage_lazy_s"] = self.stage(lazy_read)
        row["read_mb_s"] = data / read_seq(dev, data) / 1e6
        st = self.lazy_status(lazy_read)
        row["read_on_demand_chunks"], row["read_background_chunks"] = st.get("on_demand"), st.get("background")
        # chunks kept in memory for the reader (of them, loaded from the local volume), bytes
        # answered from them
        row["read_kept_chunks"], row["read_loaded_chunks"] = st.get("kept_chunks"), st.get("loaded_chunks")
        row["read_kept_bytes"] = st.get("kept_read_bytes")
        self.wait_complete(lazy_read)
        self.cl.release("node-b", lazy_read)
        self.drop(lazy_read)
        lazy_bg = self.make(f"{tag}-lazy-bg", size, data, {"hydrate": "lazy"})
        dev, row["stage_lazy2_s"] = self.stage(lazy_bg)
        row["bg_mb_s"] = data / (self.wait_complete(lazy_bg) + row["stage_lazy2_s"]) / 1e6
        self.cl.release("node-b", lazy_bg)
        self.drop(lazy_bg)
        self.file_read(tag, size, min(GiB, data // 2), row)
        row["read_ratio"] = row["read_mb_s"] / row["full_mb_s"]
        row["bg_ratio"] = row["bg_mb_s"] / row["full_mb_s"]
        row["file_ratio"] = row["file_mb_s"] / row["full_mb_s"]
        log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        return row

    def file_read(self, tag: str, size: int, nbytes: int, row: dict[str, Any]) -> None:
        """An ext4 volume of `size` holding one file of `nbytes` random bytes (written by node-a,
        flushed at release); node-b stages it lazily and reads the file once, buffered."""
        cap = mount_cap("ext4")
        vid = self.make(f"{tag}-lazy-file", size, nbytes, {"hydrate": "lazy"}, cap=cap, file="data")
        mnt, row["file_stage_lazy_s"] = self.stage(vid, cap)
        row["file_bytes"] = nbytes
        row["file_mb_s"] = nbytes / read_seq(os.path.join(mnt, "data"), nbytes, direct=False) / 1e6
        st = self.lazy_status(vid)
        row["file_on_demand_chunks"], row["file_background_chunks"] = st.get("on_demand"), st.get("background")
        self.wait_complete(vid)
        self.cl.release("node-b", vid)
        self.drop(vid)

    def volume_row(self, tag: str, size: int, data: int) -> dict[str, Any]:
        """one_volume `rounds` times (each round: full, lazy read, lazy background, one after
        the other, so each round's ratios compare stages made minutes apart at most); the row is
        the median of each figure, and each ratio's min and max over the rounds. A sparse volume
        that does not fit (thin provisioning reserves its whole size on each node that holds it)
        is measured at half the size instead, and the row says so."""
        import grpc
        rounds: list[dict[str, Any]] = []
        waited = 0
        while len(rounds) < self.rounds:
            try:
                rounds.append(self.one_volume(tag, size, data))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if rounds:          # it fitted before: the nodes report the space freed at their next heartbeat
                    if waited >= 30:    # the object store keeps deleted volumes' chunks until GC: keep the rounds made
                        log(f"{tag}: no space for round {len(rounds) + 1}; the row has {len(rounds)} round(s)")
                        break
                    log(f"{tag}: {e.details()}; waiting for the nodes to report the space freed")
                    time.sleep(5)
                    waited += 5
                    continue
                if size <= 2 * data:
                    raise
                log(f"{tag}: {e.details()}; measuring {size // 2 // GiB} GiB instead")
                size //= 2
                tag = f"{size // GiB}G-sparse"
        return aggregate(rounds)

    def fio_cost(self, size: int, seconds: int) -> dict[str, Any]:
        """fio on the FUSE-served device (hydration complete) vs the plain local file's device."""
        vid = self.make("fio", size, size, {"hydrate": "lazy"})
        out: dict[str, Any] = {"span": size, "seconds": seconds}
        jobs = [("randread", "4k"), ("randwrite", "4k"), ("read", "1M"), ("write", "1M")]
        dev, _ = self.stage(vid)
        self.wait_complete(vid)
        for rw, bs in jobs:
            out[f"fuse_{rw}_{bs}"] = fio(dev, rw, bs, seconds, size)
        self.cl.release("node-b", vid)            # complete: the next stage uses the plain file
        dev, _ = self.stage(vid)
        assert not self.lazy_status(vid), "a fully hydrated volume is staged natively"
        for rw, bs in jobs:
            out[f"native_{rw}_{bs}"] = fio(dev, rw, bs, seconds, size)
            out[f"ratio_{rw}_{bs}"] = out[f"fuse_{rw}_{bs}"] / out[f"native_{rw}_{bs}"]
        self.cl.release("node-b", vid)
        log(json.dumps({k: round(v, 3) for k, v in out.items()}))
        return out

    def run(self) -> dict[str, Any]:
        self.cl.start()
        try:
            if self.quick:
                vols = [("256M", 256 * MiB, 256 * MiB), ("4G-sparse", 4 * GiB, 256 * MiB)]
            else:
                # 16 GiB sparse (the row): node-a and node-b each reserve 16 GiB (less
                # the 2 GiB written) while they hold it, one volume at a time (--sparse-gib)
                vols = [("256M", 256 * MiB, 256 * MiB), ("2G", 2 * GiB, 2 * GiB),
                        (f"{self.sparse_gib}G-sparse", self.sparse_gib * GiB, 2 * GiB)]
            rows = [self.volume_row(*v) for v in vols if v[0] not in self.skip]
            cost = self.fio_cost(256 * MiB, 5 if self.quick else 10)
        finally:
            self.cl.stop()
        return {"volumes": rows, "fio": cost}


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One volume row from its rounds: a figure that differs between rounds is their median
    (one the rounds agree on, a size or a chunk count, stays as it is), each ratio's min and max
    beside it (`<ratio>_min`, `<ratio>_max`), the rounds themselves under "rounds"."""
    row: dict[str, Any] = {"rounds": rounds}
    for k, v in rounds[0].items():
        nums = [x for x in (r.get(k) for r in rounds) if isinstance(x, (int, float)) and not isinstance(x, bool)]
        row[k] = statistics.median(nums) if len(nums) == len(rounds) and len(set(nums)) > 1 else v
    for k in ("read_ratio", "bg_ratio", "file_ratio"):
        s = spread([r[k] for r in rounds])
        assert s is not None
        row[f"{k}_min"], row[f"{k}_max"] = s["min"], s["max"]
    return row


def _ratio(r: dict[str, Any], k: str) -> str:
    if len(r.get("rounds", ())) < 2:
        return f"{r[k]:.2f}"
    return f"{r[k]:.2f} ({r[k + '_min']:.2f}-{r[k + '_max']:.2f})"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [f"# Lazy hydration (FUSE + loop path), {m['date']} on {m['host']} ({m['cpus']} CPUs), "
             f"commit {m['commit']}{' QUICK' if m['quick'] else ''}", "",
             "load average at the end (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in m.get("load_avg", ()))
             + "; NodeStage lazy of the background-only volume: "
             + ", ".join(f"{r['volume']} {r['stage_lazy2_s']:.2f} s" for r in doc["volumes"]), "",
             f"{m.get('rounds', 1)} round(s) per volume, each: full stage, lazy stage + read, lazy stage "
             "with no reader (a fresh volume each); figures are medians over the rounds, ratios "
             "taken inside each round (median, min-max).", "",
             "| volume (data) | NodeStage full | NodeStage lazy | full hydrate | read after lazy stage "
             "| ratio (≥ 0.7) | background only | ratio (≥ 0.8) | chunks on demand / background during read |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["volumes"]:
        n = len(r.get("rounds", ()))
        fewer = f", {n} round(s): no space for more" if 0 < n < m.get("rounds", 1) else ""
        lines.append(f"| {r['volume']} ({r['data'] // MiB} MiB{fewer}) | {r['stage_full_s']:.2f} s | "
                     f"{r['stage_lazy_s']:.2f} s | {r['full_mb_s']:.0f} MB/s | {r['read_mb_s']:.0f} MB/s | "
                     f"{_ratio(r, 'read_ratio')} | {r['bg_mb_s']:.0f} MB/s | {_ratio(r, 'bg_ratio')} | "
                     f"{r['read_on_demand_chunks']} / {r['read_background_chunks']} |")
    lines += ["", "The issue's reader: one file of random data in an ext4 volume of the row's size, written "
              "on node-a; node-b stages the volume lazily and reads the file once, buffered, 1 MiB at a "
              "time (the kernel's readahead through ext4 and the loop device), vs the same round's "
              "full-hydrate throughput above (median, min-max).", "",
              "| volume | file | NodeStage lazy (ext4) | read the file after lazy stage | ratio (≥ 0.7) "
              "| chunks on demand / background during the read |", "|---|---|---|---|---|---|"]
    for r in doc["volumes"]:
        if "file_mb_s" in r:
            lines.append(f"| {r['volume']} | {r['file_bytes'] // MiB} MiB | {r['file_stage_lazy_s']:.2f} s | "
                         f"{r['file_mb_s']:.0f} MB/s | {_ratio(r, 'file_ratio')} | "
                         f"{r['file_on_demand_chunks']} / {r['file_background_chunks']} |")
    f = doc["fio"]
    lines += ["", f"fio on a fully hydrated {f['span'] // MiB} MiB volume, {f['seconds']} s per job, "
              "iodepth 16, O_DIRECT: the cost of staying on FUSE until the next stage", "",
              "| job | FUSE-served loop | plain file loop | ratio |", "|---|---|---|---|"]
    for rw, bs in [("randread", "4k"), ("randwrite", "4k"), ("read", "1M"), ("write", "1M")]:
        unit = "IOPS" if bs == "4k" else "MB/s"
        lines.append(f"| {bs} {rw} | {f[f'fuse_{rw}_{bs}']:.0f} {unit} | {f[f'native_{rw}_{bs}']:.0f} {unit} | "
                     f"{f[f'ratio_{rw}_{bs}']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB and a 4 GiB sparse volume")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--sparse-gib", type=int, default=16, help="size of the sparse volume (holds 2 GiB)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds per volume row (default 3; 2 with --quick)")
    ap.add_argument("--skip", default="", help="comma-separated volume rows to leave out, e.g. 256M")
    a = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("fio") is None:
        print("the lazy benchmark needs root and fio", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="perssd-lazy-bench-", dir=a.workdir))
    t0 = time.monotonic()
    rounds = a.rounds or (2 if a.quick else 3)
    b = LazyBench(work, a.quick, a.sparse_gib, tuple(x for x in a.skip.split(",") if x), rounds)
    try:
        b.sw.start()
        doc = b.run()
    finally:
        b.sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    commit = git_commit()
    doc["meta"] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "host": socket.gethostname(), "cpus": os.cpu_count(), "quick": a.quick,
                   "commit": commit, "rounds": rounds, "elapsed_s": round(time.monotonic() - t0, 1),
                   "load_avg": os.getloadavg()}
    stem = f"{datetime.date.today().isoformat()}-{socket.gethostname()}-lazy{'-quick' if a.quick else ''}"
    write_results(Path(a.out), stem, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
