"""`make bench`: the driver's flush/hydrate paths side by side with s5cmd, rclone and restic,
on the same images and the same SeaweedFS, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--runs N] [--size BYTES] [--out DIR]
        [--enc-pairs N] [--only-enc | --only-hydrate] [--profile [--profile-native]]

Volumes: (a) random data, fully allocated (raw block volume); (b) ext4 filled 40% with a
realistic mix (compressible CSV/logs, random binaries, many small files); (c) = (a) after 1% is
rewritten in random 1 MiB extents. Every run gets a fresh controller + node-a + node-b and its
own catalog prefix on the one SeaweedFS (so no run finds another run's chunks), and its own
restic repository. Figures are medians of the runs with min and max; ratios are computed inside
each run first. The encryption rows are pairs (unencrypted control, aes-256-gcm) interleaved in
alternating order, `--enc-pairs` of them per run and kind, each ratio taken inside its pair and
the median over all pairs. Writes benchmarks/results/<date>-<host>[-quick][-enc].json and .md,
prints the table.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import data  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
from procstat import Watch  # noqa: E402
from spy import PySpy, summarize  # noqa: E402

from csi_perssd.csi import csi_pb2 as pb  # noqa: E402
from tests.harness.cluster import scrape  # noqa: E402
from csi_perssd.local.rawfile import DISK  # noqa: E402
from tests.harness.cluster import MODE, Cluster, block_cap, mount_cap  # noqa: E402
from tests.harness.procs import DriverProcess  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402
from tests.harness.xfsdir import xfs_dir  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB          # the StorageClass default
DATA_VERSION = 2         # bump when data.py (or prepare) changes what it generates
UPLOADED = 'perssd_transfer_bytes_total{kind="uploaded"}'
READ = 'perssd_transfer_bytes_total{kind="flushed_read"}'
HYDRATED = 'perssd_transfer_bytes_total{kind="hydrated"}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiesce() -> None:
    """Before every measured step: write back what earlier steps left dirty (SeaweedFS's files
    after gigabytes of uploads, the images), so no tool pays for the previous one's writeback."""
    os.sync()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flush_passes(log_path: Path, vid: str) -> dict[str, float]:
    """Durations of the last pre-flush and final pass of `vid`, from the node's log (the driver
    logs both; absent keys when a pass did not run or the format changed)."""
    out: dict[str, float] = {}
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return out
    for key, pat in (("pre_flush_seconds", r"volume %s: background flush uploaded \d+ bytes in ([0-9.]+)s"),
                     ("final_pass_seconds", r"volume %s: committed generation \d+: .* in ([0-9.]+)s \(")):
        found = re.findall(pat % re.escape(vid), text)
        if found:
            out[key] = float(found[-1])
    return out


def s3_requests(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("perssd_s3_requests_total{"))


def delta(m0: dict[str, float], m1: dict[str, float], key: str) -> float:
    return m1.get(key, 0.0) - m0.get(key, 0.0)


class Bench:
    def __init__(self, work: Path, sw: Seaweed, size: int, quick: bool):
        self.work, self.sw, self.size, self.quick = work, sw, size, quick
        self.target = peers.S3Target(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key)
        self.s5 = peers.S5cmd(self.target)
        self.rc = peers.Rclone(self.target, str(work))
        self.change = data.plan_change(size)
        self.profile_dir: Path | None = None     # set: py-spy the node in run 1
        self.profiles: dict[str, str] = {}
        self.run_no = 0
        self.keep_logs = False                   # --keep: copy the driver logs to work/logs-runN
        self.enc_pairs = 1                       # --enc-pairs: control/encrypted pairs per run and kind
        self.only_enc = False                    # --only-enc: the encryption rows alone
        self.only_hydrate = False                # --only-hydrate: (a)'s flush, hydrate and s5cmd alone
        self.native = False                      # --profile-native: py-spy --native
        self._enc_inputs: dict[tuple[str, int], tuple[str, str]] = {}

    def spy(self, pid: int, phase: str) -> Any:
        if self.profile_dir is None or self.run_no != 1 or not phase:
            return contextlib.nullcontext()
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return _Profiled(self, pid, phase)

    # -- data ---------------------------------------------------------------------------------
    def prepare(self, cache: Path | None) -> None:
        """The inputs: (a) random image, (b) file tree. Kept in `cache` between invocations
        (each run still gets its own catalog prefix, so reuse dedups nothing)."""
        base = (cache / f"v{DATA_VERSION}-{self.size}") if cache else self.work / "inputs"
        self.input_dir = base
        stamp = base / "complete.json"
        self.a_img, self.tree = str(base / "a.img"), str(base / "tree-b")
        # the encryption pair's own inputs: the unencrypted control must not dedup against (a)/(b)
        self.a2_img, self.tree2 = str(base / "a2.img"), str(base / "tree-b2")
        if stamp.exists():
            meta = json.loads(stamp.read_text())
            self.a_digest, self.tree_counts, self.tree_digest = meta["a"], meta["tree"], meta["tree_digest"]
            self.a2_digest, self.tree2_digest = meta["a2"], meta["tree2_digest"]
            log(f"inputs from {base}")
            self.prepare_pairs()
            return
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        log(f"generating (a): {self.size // MiB} MiB of random data")
        self.a_digest = data.random_image(self.a_img, self.size)
        log(f"generating (b): a file tree of {0.4 * self.size / MiB:.0f} MiB (realistic mix)")
        os.makedirs(self.tree)
        self.tree_counts = data.write_tree(self.tree, int(self.size * 0.4))
        self.tree_digest = data.tree_digest(self.tree)
        log("generating the encryption pair's (a) and (b) (other data, same kind)")
        self.a2_digest = data.random_image(self.a2_img, self.size)
        os.makedirs(self.tree2)
        data.write_tree(self.tree2, int(self.size * 0.4), seed=8)
        self.tree2_digest = data.tree_digest(self.tree2)
        stamp.write_text(json.dumps({"a": self.a_digest, "tree": self.tree_counts, "tree_digest": self.tree_digest,
                                     "a2": self.a2_digest, "tree2_digest": self.tree2_digest}))
        self.prepare_pairs()

    def prepare_pairs(self) -> None:
        for k in range(1, self.enc_pairs):      # before the runs, not between their steps
            self.enc_input("a", k)
            self.enc_input("b", k)

    def enc_input(self, which: str, pair: int) -> tuple[str, str]:
        """(path, digest) of the input of the encryption pair number `pair` (0-based) for (a) or
        (b). Pair 0 uses a2.img / tree-b2; every further pair has other data of the same kind
        (generated once, kept beside them): the pairs of one run share the run's store, and a
        control given the data an earlier control uploaded would find its chunks there and
        upload nothing."""
        if pair == 0:
            return (self.a2_img, self.a2_digest) if which == "a" else (self.tree2, self.tree2_digest)
        got = self._enc_inputs.get((which, pair))
        if got is not None:
            return got
        path = str(self.input_dir / (f"a2-p{pair}.img" if which == "a" else f"tree-b2-p{pair}"))
        stamp = Path(path + ".json")
        if stamp.exists():
            digest = json.loads(stamp.read_text())["digest"]
        else:
            log(f"generating the encryption pair {pair + 1}'s ({which})")
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if which == "a":
                digest = data.random_image(path, self.size)
            else:
                os.makedirs(path)
                data.write_tree(path, int(self.size * 0.4), seed=8 + 100 * pair)
                digest = data.tree_digest(path)
            stamp.write_text(json.dumps({"digest": digest}))
        self._enc_inputs[(which, pair)] = (path, digest)
        return path, digest

    # -- one run ------------------------------------------------------------------------------
    def node_flush(self, cl: Cluster, node: str, vid: str, port: int, phase: str = "") -> dict[str, Any]:
        """NodeUnpublish + NodeUnstage (retried while ABORTED) until the generation is
        committed, then ControllerUnpublish; with the node's resource use and metric deltas."""
        proc = cl.nodes[node].proc
        assert proc is not None
        quiesce()
        m0 = scrape(port)
        with self.spy(proc.pid, phase), Watch(proc.pid) as w:
            t0 = time.monotonic()
            cl.unpublish(node, vid)
            t1 = time.monotonic()
            calls = cl.unstage(node, vid)
            t2 = time.monotonic()
        cl.controller.controller.ControllerUnpublishVolume(   # type: ignore[union-attr]
            pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node))
        m1 = scrape(port)
        passes = flush_passes(cl.nodes[node].log_path, vid)
        return {"seconds": t2 - t0, "unstage_seconds": t2 - t1, "unstage_calls": calls, **passes,
                "mb_s": self.size / (t2 - t0) / 1e6,
                "uploaded_bytes": delta(m0, m1, UPLOADED), "read_bytes": delta(m0, m1, READ),
                "s3_requests": s3_requests(m1) - s3_requests(m0),
                "cpu_seconds": w.cpu, "peak_rss_bytes": w.peak_rss_bytes}

    def node_stage(self, cl: Cluster, node: str, vid: str, port: int, cap: pb.VolumeCapability,
                   phase: str = "", secrets: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
        proc = cl.nodes[node].proc
        assert proc is not None
        quiesce()
        m0 = scrape(port)
        with self.spy(proc.pid, phase), Watch(proc.pid) as w:
            t0 = time.monotonic()
            target = cl.attach(node, vid, cap, secrets=secrets)
            dt = time.monotonic() - t0
        m1 = scrape(port)
        return target, {"seconds": dt, "mb_s": self.size / dt / 1e6,
                        "hydrated_bytes": delta(m0, m1, HYDRATED),
                        "s3_requests": s3_requests(m1) - s3_requests(m0),
                        "cpu_seconds": w.cpu, "peak_rss_bytes": w.peak_rss_bytes}

    def peer_copy(self, img: str, tag: str, run: int, rclone: bool = True) -> dict[str, Any]:
        """s5cmd and rclone: upload the image, download it again (then delete the copy)."""
        out: dict[str, Any] = {}
        # downloads land in the run's XFS, the file system the driver hydrates into (its pools)
        dl = self.work / f"run{run}" / "dl"
        dl.mkdir(exist_ok=True)
        key = f"peers/r{run}/{tag}"
        for name, up, down in (
                ("s5cmd", lambda: self.s5.upload(img, f"{key}/s5cmd/{tag}.img"),
                 lambda: self.s5.download(f"{key}/s5cmd/{tag}.img", str(dl / f"{tag}.img"))),
                ("rclone", lambda: self.rc.upload(img, f"{key}/rclone"),
                 lambda: self.rc.download(f"{key}/rclone/{os.path.basename(img)}", str(dl)))):
            if name == "rclone" and not rclone:
                continue
            quiesce()
            u = up()
            quiesce()
            d = down()
            got = next(dl.iterdir())
            if got.stat().st_size != self.size:
                raise RuntimeError(f"{name} downloaded {got.stat().st_size} bytes, not {self.size}")
            t0 = time.monotonic()           # the driver's hydrate ends durable (fsync): same here
            fd = os.open(got, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sync_s = time.monotonic() - t0
            shutil.rmtree(dl)
            dl.mkdir()
            for kind, r in (("upload", u), ("download", d)):
                out[f"{name}_{kind}"] = {"seconds": r.seconds, "mb_s": self.size / r.seconds / 1e6,
                                         "cpu_seconds": r.cpu_seconds, "peak_rss_bytes": r.peak_rss_bytes}
            out[f"{name}_download"]["fsync_seconds"] = sync_s
            out[f"{name}_download_synced"] = {"seconds": d.seconds + sync_s,
                                              "mb_s": self.size / (d.seconds + sync_s) / 1e6}
            log(f"  {name} {tag}: upload {self.size / u.seconds / 1e6:.0f} MB/s, "
                f"download {self.size / d.seconds / 1e6:.0f} MB/s")
        shutil.rmtree(dl, ignore_errors=True)
        return out

    def one_run(self, run: int) -> dict[str, Any]:
        rdir = self.work / f"run{run}"
        self.run_no = run
        # every pair after the first leaves up to 6 more volumes' worth cached on the nodes
        # (ctl + enc of (a) and (b), on node-a and node-b; deleted volumes stay cached)
        with xfs_dir(str(rdir), (6 + 6 * (self.enc_pairs - 1)) * self.size + GiB):
            return self._one_run(run, rdir)

    def _one_run(self, run: int, rdir: Path) -> dict[str, Any]:
        """One run in `rdir`, an XFS file system (the nodes' pools: a node's NVMe formatted XFS,
        where the rawfile backend tracks changes with reflinks)."""
        ports = {"node-a": free_port(), "node-b": free_port()}
        cl = Cluster(rdir, nodes=(), seaweed=self.sw, prefix=f"bench-r{run}")
        res: dict[str, Any] = {"run": run}
        try:
            cl.start()
            for n, port in ports.items():
                cl.nodes[n] = DriverProcess(rdir, mode="node", node_id=n, pool=cl.pool,
                                            catalog=self.sw.url(cl.prefix), env=cl.env,
                                            extra=cl.store_args() + ["--metrics-address", f"127.0.0.1:{port}"]).start()
            if self.only_enc:
                self.warm_up(cl, ports, run)
                res.update(self.run_enc(cl, ports, run, "a"))
                res.update(self.run_enc(cl, ports, run, "b"))
            elif self.only_hydrate:
                res.update(self.run_a(cl, ports, run, None))
            else:
                restic = peers.Restic(self.target, f"restic/r{run}", str(rdir / "restic-cache"))
                restic.init()
                res.update(self.run_a(cl, ports, run, restic))
                res.update(self.run_enc(cl, ports, run, "a"))
                res.update(self.run_b(cl, ports, run, restic))
                res.update(self.run_enc(cl, ports, run, "b"))
        except BaseException:
            keep = cl.keep_logs(HERE / "results" / "failed" / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run}")
            log(f"run {run} failed: driver logs kept in {keep}")
            raise
        finally:
            if self.keep_logs:
                cl.keep_logs(self.work / f"logs-run{run}")
            cl.stop()
        return res

    def run_a(self, cl: Cluster, ports: dict[str, int], run: int, restic: peers.Restic | None) -> dict[str, Any]:
        """(a), then (c) and the cached re-stage; without `restic` (--only-hydrate) only (a)'s
        flush, hydrate and s5cmd's upload and download."""
        res: dict[str, Any] = {}
        img = str(self.work / f"run{run}" / "a.img")       # this run's copy: (c) changes it
        shutil.copyfile(self.a_img, img)
        vid = cl.create(f"bench-a-{run}", self.size, block_cap())
        dev = cl.attach("node-a", vid, block_cap())
        data.copy_to_device(img, dev)
        log(f"run {run} (a): flush node-a")
        res["flush_a"] = self.node_flush(cl, "node-a", vid, ports["node-a"], "flush-a")
        log(f"  flush (a): {res['flush_a']['mb_s']:.0f} MB/s, {res['flush_a']['seconds']:.2f}s, "
            f"uploaded {res['flush_a']['uploaded_bytes'] / MiB:.0f} MiB, RSS {res['flush_a']['peak_rss_bytes'] / MiB:.0f} MiB")
        log(f"run {run} (a): hydrate node-b")
        dev_b, res["hydrate_a"] = self.node_stage(cl, "node-b", vid, ports["node-b"], block_cap(), "hydrate-a")
        log(f"  hydrate (a): {res['hydrate_a']['mb_s']:.0f} MB/s, {res['hydrate_a']['seconds']:.2f}s")
        if data.digest(dev_b, self.size) != self.a_digest:
            raise RuntimeError("hydrated volume (a) differs from the image")
        res.update({f"{k}_a": v for k, v in self.peer_copy(img, "a", run, rclone=restic is not None).items()})
        if restic is None:
            cl.release("node-b", vid)
            cl.delete(vid)
            os.unlink(img)
            return res
        quiesce()
        first = restic.backup(img)
        res["restic_first_a"] = {"seconds": first.run.seconds, "mb_s": self.size / first.run.seconds / 1e6,
                                 "data_added_bytes": first.data_added, "cpu_seconds": first.run.cpu_seconds,
                                 "peak_rss_bytes": first.run.peak_rss_bytes}
        log(f"  restic first (a): {res['restic_first_a']['mb_s']:.0f} MB/s")

        log(f"run {run} (c): rewrite {len(self.change.offsets)} x 1 MiB on node-b, incremental flush")
        data.apply_change(self.change, [dev_b, img], seed=100 + run)
        res["flush_c"] = self.node_flush(cl, "node-b", vid, ports["node-b"], "flush-c")
        changed = len(self.change.chunks(CHUNK)) * CHUNK
        res["flush_c"]["changed_chunk_bytes"] = changed
        res["flush_c"]["changed_bytes"] = self.change.bytes()
        quiesce()
        inc = restic.backup(img)
        res["restic_incremental_c"] = {"seconds": inc.run.seconds, "data_added_bytes": inc.data_added,
                                       "cpu_seconds": inc.run.cpu_seconds, "peak_rss_bytes": inc.run.peak_rss_bytes}
        log(f"  flush (c): {res['flush_c']['seconds']:.2f}s uploaded {res['flush_c']['uploaded_bytes'] / MiB:.1f} MiB "
            f"(changed chunks {changed / MiB:.0f} MiB); restic incremental {inc.run.seconds:.2f}s "
            f"added {inc.data_added / MiB:.1f} MiB")

        log(f"run {run}: cached re-stage on node-b")
        ro = block_cap(MODE.SINGLE_NODE_READER_ONLY)
        dev_b, st = self.node_stage(cl, "node-b", vid, ports["node-b"], ro)
        if st["hydrated_bytes"]:
            raise RuntimeError(f"cached re-stage downloaded {st['hydrated_bytes']} bytes")
        if data.digest(dev_b, self.size) != data.digest(img):      # the cache holds (c)
            raise RuntimeError("re-staged volume differs from the changed image")
        res["restage_cached"] = st
        log(f"  cached re-stage: {st['seconds']:.3f}s")
        cl.release("node-b", vid)
        cl.delete(vid)
        os.unlink(img)
        return res

    def run_b(self, cl: Cluster, ports: dict[str, int], run: int, restic: peers.Restic) -> dict[str, Any]:
        res: dict[str, Any] = {}
        vid = cl.create(f"bench-b-{run}", self.size, mount_cap("ext4"))
        tgt = cl.attach("node-a", vid, mount_cap("ext4"))
        data.copy_tree(self.tree, tgt)
        os.sync()
        log(f"run {run} (b): flush node-a")
        res["flush_b"] = self.node_flush(cl, "node-a", vid, ports["node-a"], "flush-b")
        log(f"  flush (b): {res['flush_b']['mb_s']:.0f} MB/s, {res['flush_b']['seconds']:.2f}s, "
            f"read {res['flush_b']['read_bytes'] / MiB:.0f} MiB uploaded {res['flush_b']['uploaded_bytes'] / MiB:.0f} MiB")
        raw = cl.nodes["node-a"].rawfile_dir + f"/{vid}/{DISK}"
        img = str(self.work / f"run{run}" / "b.img")
        r = subprocess.run(["cp", "--sparse=always", raw, img], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cp {raw}: {r.stderr.strip()}")
        res["image_b_allocated_bytes"] = os.stat(img).st_blocks * 512
        log(f"run {run} (b): hydrate node-b")
        tgt_b, res["hydrate_b"] = self.node_stage(cl, "node-b", vid, ports["node-b"], mount_cap("ext4"))
        log(f"  hydrate (b): {res['hydrate_b']['mb_s']:.0f} MB/s, {res['hydrate_b']['seconds']:.2f}s")
        if data.tree_digest(tgt_b) != self.tree_digest:
            raise RuntimeError("hydrated volume (b) holds other files than were written")
        # QUICK keeps to the peers the targets need: no rclone for (b)
        res.update({f"{k}_b": v for k, v in self.peer_copy(img, "b", run, rclone=not self.quick).items()})
        if self.quick:          # keep QUICK short: no restic (b), node-b keeps it (cleaned at stop)
            os.unlink(img)
            return res
        quiesce()
        first = restic.backup(img)
        res["restic_first_b"] = {"seconds": first.run.seconds, "mb_s": self.size / first.run.seconds / 1e6,
                                 "data_added_bytes": first.data_added, "cpu_seconds": first.run.cpu_seconds,
                                 "peak_rss_bytes": first.run.peak_rss_bytes}
        log(f"  restic first (b): {res['restic_first_b']['mb_s']:.0f} MB/s, added {first.data_added / MiB:.0f} MiB")
        log(f"run {run} (b): release node-b (nothing changed: flush finds every chunk known)")
        res["reflush_b_unchanged"] = self.node_flush(cl, "node-b", vid, ports["node-b"])
        cl.delete(vid)
        os.unlink(img)
        return res


    def run_enc(self, cl: Cluster, ports: dict[str, int], run: int, which: str) -> dict[str, Any]:
        """(a) or (b) — other data of the same kind, so nothing dedups against the run's own
        (a)/(b) — once unencrypted (the control, `*_ctl`) and once with encryption:
        aes-256-gcm (`*_enc`), back to back; each is flushed on node-a and hydrated on node-b.
        `enc_pairs` such pairs, interleaved (ctl enc / enc ctl / ...): the order alternates from
        pair to pair and from run to run, so neither gets the other's position (what ran before,
        the store's state). Every pair is kept (`enc_pairs_<which>`, with its order); the
        encryption ratios are taken inside each pair (report.py). The first pair's figures also
        stay under the old keys (`flush_a_ctl`, ...)."""
        pairs: list[dict[str, Any]] = []
        for k in range(self.enc_pairs):
            order = ("ctl", "enc") if (run + k) % 2 else ("enc", "ctl")
            pair: dict[str, Any] = {"pair": k + 1, "order": list(order), "load": round(os.getloadavg()[0], 2)}
            for kind in order:
                pair.update(self._one_volume(cl, ports, run, which, kind, k))
            pairs.append(pair)
        return {**{k: v for k, v in pairs[0].items() if k.startswith(("flush_", "hydrate_"))},
                f"enc_pairs_{which}": pairs}

    def warm_up(self, cl: Cluster, ports: dict[str, int], run: int) -> None:
        """--only-enc: what (a) does for the pairs in a full run, unmeasured: a first flush and
        hydrate through each fresh node process (the first hydrate of a node process runs at
        about half the speed of later ones), once unencrypted and once encrypted, 64 MiB each,
        so neither kind of the first pair pays it."""
        size = min(self.size, 64 * MiB)
        for kind in ("ctl", "enc"):
            sec = {"encryptionKey": base64.b64encode(os.urandom(32)).decode()} if kind == "enc" else None
            vid = cl.create(f"bench-warm-{kind}-{run}", size, block_cap(),
                            params={"encryption": "aes-256-gcm"} if sec else None, secrets=sec)
            dev = cl.attach("node-a", vid, block_cap(), secrets=sec)
            with open(self.a_img, "rb") as fi, open(dev, "r+b", buffering=0) as fo:
                fo.write(fi.read(size))
                os.fsync(fo.fileno())
            self.node_flush(cl, "node-a", vid, ports["node-a"])
            self.node_stage(cl, "node-b", vid, ports["node-b"], block_cap(), secrets=sec)
            cl.release("node-b", vid)
            cl.delete(vid)
        log(f"run {run}: warm-up done (unmeasured)")

    def _one_volume(self, cl: Cluster, ports: dict[str, int], run: int, which: str, kind: str,
                    pair: int = 0) -> dict[str, Any]:
        res: dict[str, Any] = {}
        src, want = self.enc_input(which, pair)
        sec = {"encryptionKey": base64.b64encode(os.urandom(32)).decode()} if kind == "enc" else None
        cap = block_cap() if which == "a" else mount_cap("ext4")
        vid = cl.create(f"bench-{which}-{kind}-{run}-{pair}", self.size, cap,
                        params={"encryption": "aes-256-gcm"} if sec else None, secrets=sec)
        tgt = cl.attach("node-a", vid, cap, secrets=sec)
        if which == "a":
            data.copy_to_device(src, tgt)
        else:
            data.copy_tree(src, tgt)
            os.sync()
        log(f"run {run} ({which}, {kind}, pair {pair + 1}): flush node-a")
        phase = f"{which}-{kind}" if pair == 0 else ""          # --profile: run 1's first pair
        res[f"flush_{which}_{kind}"] = self.node_flush(cl, "node-a", vid, ports["node-a"],
                                                       f"flush-{phase}" if phase else "")
        log(f"run {run} ({which}, {kind}, pair {pair + 1}): hydrate node-b")
        tgt_b, res[f"hydrate_{which}_{kind}"] = self.node_stage(cl, "node-b", vid, ports["node-b"], cap,
                                                                f"hydrate-{phase}" if phase else "", secrets=sec)
        ok = data.digest(tgt_b, self.size) == want if which == "a" else data.tree_digest(tgt_b) == want
        if not ok:
            raise RuntimeError(f"hydrated volume ({which}, {kind}) differs from what was written")
        log(f"  ({which}, {kind}): flush {res[f'flush_{which}_{kind}']['mb_s']:.0f} MB/s, "
            f"hydrate {res[f'hydrate_{which}_{kind}']['mb_s']:.0f} MB/s")
        cl.release("node-b", vid)
        cl.delete(vid)
        return res


class _Profiled:
    def __init__(self, b: Bench, pid: int, phase: str):
        assert b.profile_dir is not None
        self.b, self.phase = b, phase
        self.path = b.profile_dir / f"{phase}.folded"
        self.spy = PySpy(pid, self.path, native=b.native)

    def __enter__(self) -> None:
        self.spy.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.spy.__exit__(*exc)
        text = summarize(str(self.path))
        (self.path.with_suffix(".txt")).write_text(text)
        self.b.profiles[self.phase] = str(self.path.with_suffix(".txt"))


def versions(b: Bench) -> dict[str, str]:
    out = {"python": platform.python_version(), "kernel": platform.release()}
    # restic is looked for only when asked (a run with --only-hydrate never needs it: not
    # installed is reported, not fatal, so the run's results are still written)
    for name, fn in (("s5cmd", b.s5.version), ("rclone", b.rc.version),
                     ("restic", lambda: peers.Restic(b.target, "x", "/tmp").version())):
        try:
            out[name] = fn()
        except Exception as e:      # noqa: BLE001 - reported, not fatal
            out[name] = f"unknown ({e})"
    try:
        out["weed"] = subprocess.run([b.sw.weed, "version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB volumes (default 2 GiB)")
    ap.add_argument("--size", type=int, default=0, help="volume size in bytes (overrides --quick)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--workdir", default="/var/tmp", help="parent of the scratch directory")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (with the driver logs, logs-runN/)")
    ap.add_argument("--cache", default="/var/tmp/perssd-bench-cache", help="generated inputs, reused")
    ap.add_argument("--no-cache", action="store_true", help="generate the inputs in the scratch directory")
    ap.add_argument("--enc-pairs", type=int, default=0,
                    help="unencrypted/encrypted pairs per run for each of (a), (b), interleaved "
                         "(default: 2 with --quick, else 1)")
    ap.add_argument("--only-enc", action="store_true",
                    help="only the encryption rows (the pairs), not the peers, (a)-(c) or restic")
    ap.add_argument("--only-hydrate", action="store_true",
                    help="only (a)'s flush and hydrate and s5cmd's upload and download of it (no rclone, "
                         "restic, (b), (c) or encryption rows): the transfer targets' rows, quickly")
    ap.add_argument("--profile-native", action="store_true",
                    help="with --profile: py-spy --native (C/Rust frames; the profiled phases run slower)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the node during run 1's flushes and hydrate (results/<stem>-profile/)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("make bench needs root (loop devices and mounts)", file=sys.stderr)
        return 1
    size = a.size or (256 * MiB if a.quick else 2 * GiB)
    quick = bool(a.quick and not a.size)
    stem = (f"{datetime.date.today().isoformat()}-{socket.gethostname()}{'-quick' if quick else ''}"
            f"{'-enc' if a.only_enc else ''}{'-hydrate' if a.only_hydrate else ''}")
    out = Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="perssd-bench-", dir=a.workdir))
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    sw = Seaweed(work / "seaweed")
    runs: list[dict[str, Any]] = []
    try:
        sw.start()
        b = Bench(work, sw, size, a.quick)
        b.keep_logs = a.keep
        b.enc_pairs = a.enc_pairs if a.enc_pairs > 0 else (2 if quick else 1)
        b.only_enc, b.native = a.only_enc, a.profile_native
        b.only_hydrate = a.only_hydrate and not a.only_enc
        if b.only_hydrate:
            b.enc_pairs = 1                 # no encryption rows: no pair inputs to prepare
        if a.profile:
            b.profile_dir = out / f"{stem}-profile"
        log(f"SeaweedFS on {sw.endpoint}; scratch {work}; volumes {size // MiB} MiB; {a.runs} runs")
        b.prepare(None if a.no_cache else Path(a.cache))
        for r in range(1, a.runs + 1):
            runs.append(b.one_run(r))
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(), "cpus": os.cpu_count(), "volume_bytes": size,
                "chunk_bytes": CHUNK, "runs": a.runs, "quick": quick, "profiles": b.profiles,
                "enc_pairs": b.enc_pairs, "only_enc": b.only_enc, "only_hydrate": b.only_hydrate,
                "change": {"extents": len(b.change.offsets), "extent_bytes": b.change.extent,
                           "chunks": len(b.change.chunks(CHUNK))},
                "tree_b": b.tree_counts, "versions": versions(b), "commit": report.git_commit(),
                "elapsed_s": round(time.monotonic() - t_start, 1),
                "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    finally:
        sw.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = report.build(meta, runs)
    report.write_results(out, stem, doc, report.markdown(doc))
    log(f"wrote {out / stem}.json and .md in {meta['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
