"""`make bench-scale`: what the control plane costs in S3 requests at N = 1,000 and 10,000 volumes.

A private SeaweedFS, a counting proxy in front of it (tests/harness/s3proxy.py), and the driver's
Controller, node heartbeat and snapshot worker in this process, pointed at the proxy. The bucket
is filled with N volume records (2 generations each, synthetic manifests of 16 chunks), N/10
snapshots and 4 node records, written past the proxy. Every figure is counted twice, by the proxy
and by the driver's own store statistics (what perssd_s3_requests_total exports), and the two
must agree. Prices: AWS S3 Standard, PUT/POST/LIST $0.005 per 1,000, GET/HEAD $0.0004, DELETE free.

Results: benchmarks/results/<date>-scale.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from csi_perssd.config import Config  # noqa: E402
from csi_perssd.controller import Controller  # noqa: E402
from csi_perssd.csi import csi_pb2 as pb  # noqa: E402
from csi_perssd.extents import Extent  # noqa: E402
from csi_perssd.remote import layout, transfer  # noqa: E402
from csi_perssd.remote.catalog import NodeRecord, SnapshotRecord, VolumeRecord, _encode  # noqa: E402
from csi_perssd.remote.chunkmap import ChunkMap  # noqa: E402
from csi_perssd.remote.manifest import Manifest  # noqa: E402
from csi_perssd.remote.s3 import S3Store  # noqa: E402
from csi_perssd.snapshots import Snapshots  # noqa: E402
from csi_perssd.stores import Stores  # noqa: E402
from tests.harness.s3proxy import CountingProxy  # noqa: E402
from tests.harness.seaweed import Seaweed  # noqa: E402

PRICE = {"PUT": 0.005e-3, "POST": 0.005e-3, "LIST": 0.005e-3, "GET": 0.0004e-3, "HEAD": 0.0004e-3, "DELETE": 0.0}
STATS_OP = {"put": "PUT", "get": "GET", "head": "HEAD", "list": "LIST", "delete": "DELETE"}
NODES = [f"node-{i}" for i in range(4)]
DAY = 86400.0


def dollars(counts: dict[str, float]) -> float:
    return sum(PRICE.get(op, 0.0) * n for op, n in counts.items())


class Meter:
    """Request counts of a block, by the proxy and by the driver's store statistics."""

    agreed = 0                          # blocks measured, in every run: proxy == driver each time

    def __init__(self, proxy: CountingProxy, stores: Stores):
        self.proxy, self.stores = proxy, stores

    def _driver(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in list(self.stores.factory._cache.values()):
            for op, n in st.stats.snapshot()["requests"].items():   # type: ignore[attr-defined]
                out[STATS_OP.get(op, op.upper())] = out.get(STATS_OP.get(op, op.upper()), 0) + n
        return out

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, int], float]:
        p0, d0 = self.proxy.counts(), self._driver()
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        p1, d1 = self.proxy.counts(), self._driver()
        proxy = {k: p1.get(k, 0) - p0.get(k, 0) for k in p1 if p1.get(k, 0) - p0.get(k, 0)}
        driver = {k: d1.get(k, 0) - d0.get(k, 0) for k in d1 if d1.get(k, 0) - d0.get(k, 0)}
        if proxy != driver:
            raise AssertionError(f"proxy counted {proxy}, the driver {driver}")
        Meter.agreed += 1
        return result, proxy, dt


def _manifest(size: int) -> bytes:
    return Manifest(size, 4 << 20, [secrets.token_hex(32) for _ in range(size >> 22)]).encode()


def populate(store: S3Store, n: int) -> float:
    """N volumes (generations 1, 2; 1 in 10 published), N/10 snapshots, the node records."""
    t0 = time.monotonic()
    size = 64 << 20

    def one(i: int) -> None:
        vid = f"pvol-{i:032x}"
        owner = NODES[i % 4] if i % 10 == 0 else ""
        rec = VolumeRecord(id=vid, name=f"pvc-{i}", size=size, capabilities=[
            {"access_type": "mount", "fs_type": "ext4", "mount_flags": [], "mode": "SINGLE_NODE_WRITER"}],
            pool="default", owner=owner, epoch=1 if owner else 0, generation=2, generation_node=NODES[i % 4])
        for g in (1, 2):
            store.put(layout.manifest_key(vid, g), _manifest(size))
        store.put(layout.volume_key(vid), _encode(rec))
        store.put(layout.name_key("names", rec.name), json.dumps({"id": vid}).encode())
        if i % 10 == 0:
            sid = f"psnap-{i:032x}"
            store.put(layout.snapshot_manifest_key(sid), _manifest(size))
            store.put(layout.snapshot_key(sid), _encode(SnapshotRecord(
                id=sid, name=f"snap-{i}", source_volume=vid, size=size, generation=2, ready=True,
                manifest_key=layout.snapshot_manifest_key(sid))))
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(one, range(n)))
    for node in NODES:
        store.put(layout.node_key(node), _encode(NodeRecord(id=node, pool="default", total_bytes=1 << 40,
                                                           available_bytes=1 << 39, max_volume_bytes=1 << 38)))
    return time.monotonic() - t0


def _cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=pb.VolumeCapability.AccessMode(mode=1))


def _full_listing(ctl: Controller, page: int) -> int:
    token, n, seen = "", 0, set()
    while True:
        r = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=page, starting_token=token), None)
        n += len(r.entries)
        seen.update(e.volume.volume_id for e in r.entries)
        if len(seen) != n:
            raise AssertionError(f"a volume listed twice by the page after {token!r}")
        token = r.next_token
        if not token:
            return n


def _avg(meter: Meter, fn: Callable[[int], Any], reps: int) -> dict[str, float]:
    total: dict[str, float] = {}
    for i in range(reps):
        _, c, _ = meter.measure(lambda i=i: fn(i))
        for k, v in c.items():
            total[k] = total.get(k, 0) + v / reps
    return total


def controller_ops(meter: Meter, ctl: Controller, snaps: Snapshots, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    made: list[str] = []

    def create(i: int) -> None:
        made.append(ctl.CreateVolume(pb.CreateVolumeRequest(name=f"bench-{n}-{i}", volume_capabilities=[_cap()],
                                     capacity_range=pb.CapacityRange(required_bytes=1 << 30)), None).volume.volume_id)
    out["CreateVolume"] = _avg(meter, create, 5)
    out["ControllerPublishVolume"] = _avg(meter, lambda i: ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=made[i], node_id=NODES[0], volume_capability=_cap()), None), 5)
    out["ControllerUnpublishVolume"] = _avg(meter, lambda i: ctl.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=made[i], node_id=NODES[0]), None), 5)
    out["DeleteVolume"] = _avg(meter, lambda i: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made[i]), None), 5)
    out["GetCapacity"] = _avg(meter, lambda i: ctl.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[_cap()]), None), 5)
    fresh = Controller(ctl.cfg, ctl.stores)
    fresh.stores = Stores(ctl.cfg, ctl.stores.factory)          # an empty record cache: a cold controller
    req = pb.ListVolumesRequest(max_entries=100)
    _, out["ListVolumes page of 100 (cold)"], _ = meter.measure(lambda: fresh.ListVolumes(req, None))
    _, out["ListVolumes page of 100 (warm)"], _ = meter.measure(lambda: fresh.ListVolumes(req, None))
    _, out["ListSnapshots page of 100 (cold)"], _ = meter.measure(
        lambda: Snapshots(ctl.cfg, Stores(ctl.cfg, ctl.stores.factory), ctl).list(pb.ListSnapshotsRequest(max_entries=100)))
    meter.measure(lambda: _full_listing(ctl, 0))                   # warm the cache
    got, out["full listing, pages of 100 (warm)"], dt = meter.measure(lambda: _full_listing(ctl, 100))
    assert got == n, f"listed {got} of {n} volumes (pages of 100)"
    out["full listing seconds"] = round(dt, 3)
    _, out["full listing, one page (warm)"], _ = meter.measure(lambda: _full_listing(ctl, 0))
    return out


def idle_node(meter: Meter, cfg: Config, work: Path, local_copies: int) -> dict[str, Any]:
    """Per-event request counts of an idle node with `local_copies` cached (unstaged) volumes,
    a per-day model at the default cadences, and a real-time window that checks the model."""
    ncfg = Config(**{**cfg.__dict__, "mode": "node", "node_id": NODES[1], "backend": "rawfile",
                     "rawfile_dir": str(work / "raw"), "state_dir": str(work / "state"),
                     "endpoint": f"unix://{work}/csi.sock"})
    (work / "raw").mkdir(parents=True)
    # a private tmpfs: its free space moves only when this node writes (the host's /tmp is busy)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "perssd-scale", str(work / "raw")],
                   check=True, capture_output=True, timeout=30)
    try:
        return _idle_node(meter, ncfg, local_copies)
    finally:
        subprocess.run(["umount", str(work / "raw")], check=True, capture_output=True, timeout=30)


def _idle_node(meter: Meter, ncfg: Config, local_copies: int) -> dict[str, Any]:
    from csi_perssd.runtime import Runtime
    from csi_perssd.snapshots import NodeSnapshotWorker
    rt = Runtime(ncfg)
    rt.stores = meter.stores
    rt.sync.stores = rt.node.stores = meter.stores
    for i in range(local_copies):                     # cached copies whose volumes exist
        rt.backend.create(f"pvol-{i * 7 + 1:032x}", 1 << 20)
    out: dict[str, Any] = {"local copies": local_copies}
    _, out["first heartbeat"], _ = meter.measure(rt.heartbeat)
    _, out["heartbeat, nothing changed"], _ = meter.measure(rt.heartbeat)
    rt._node_put_at = rt._checked_at = -1e18          # as when both periods have passed
    _, out["heartbeat, refresh + volume check due"], _ = meter.measure(rt.heartbeat)
    worker = NodeSnapshotWorker(rt)
    meter.measure(worker.tick)                        # the first round lists once
    _, out["wake-up poll, nothing new"], _ = meter.measure(worker.tick)
    c = ncfg
    staged = {"HEAD": DAY / c.wake_poll_seconds + local_copies * DAY / c.volume_check_seconds,
              "PUT": DAY / c.node_refresh_seconds, "LIST": DAY / c.request_sweep_seconds}
    unstaged = dict(staged, HEAD=DAY / c.wake_idle_seconds + local_copies * DAY / c.volume_check_seconds)
    out["per day, volumes staged (model)"] = {k: round(v) for k, v in staged.items()}
    out["$/day, volumes staged"] = round(dollars(staged), 4)
    out["$/day, nothing staged"] = round(dollars(unstaged), 4)
    window = 60.0

    w = NodeSnapshotWorker(rt, poll_seconds=c.wake_poll_seconds)
    w.tick()                                          # its first round lists once

    def run_window() -> None:
        t_end = time.monotonic() + window
        next_hb = time.monotonic() + c.heartbeat_seconds
        while time.monotonic() < t_end:
            time.sleep(c.wake_poll_seconds)
            w.tick()
            if time.monotonic() >= next_hb:
                rt.heartbeat()
                next_hb += c.heartbeat_seconds
    _, got, _ = meter.measure(run_window)
    out[f"measured {window:.0f} s window (staged cadence)"] = got
    out["window $/day extrapolated"] = round(dollars(got) * DAY / window, 4)
    return out


def snapshot_latency(meter: Meter, cfg: Config, ctl: Controller, snaps: Snapshots, work: Path) -> dict[str, Any]:
    """CreateSnapshot of a volume owned by a node -> that node's worker marks it ready."""
    from csi_perssd.runtime import Runtime
    from csi_perssd.snapshots import NodeSnapshotWorker
    ncfg = Config(**{**cfg.__dict__, "mode": "node", "node_id": NODES[0], "backend": "rawfile",
                     "rawfile_dir": str(work / "raw0"), "state_dir": str(work / "state0"),
                     "endpoint": f"unix://{work}/csi0.sock"})
    rt = Runtime(ncfg)
    rt.stores = rt.sync.stores = rt.node.stores = meter.stores
    worker = NodeSnapshotWorker(rt, poll_seconds=ncfg.wake_poll_seconds)
    worker.start()
    lat = []
    try:
        for i in range(4):
            vid = f"pvol-{i * 20:032x}"                # owned by node-0 (populate)
            t0 = time.monotonic()
            sid = snaps.create(pb.CreateSnapshotRequest(source_volume_id=vid, name=f"lat-{i}")).snapshot.snapshot_id
            cat = meter.stores.catalog()
            while not cat.get_snapshot(sid).ready:
                if time.monotonic() - t0 > 30:
                    raise AssertionError("snapshot not picked up within 30 s")
                time.sleep(0.05)
            lat.append(time.monotonic() - t0)
    finally:
        rt.stop_event.set()
    return {"poll seconds (staged cadence)": ncfg.wake_poll_seconds, "latencies s": [round(x, 2) for x in lat],
            "max s": round(max(lat), 2)}


def gc_runs(meter: Meter) -> dict[str, Any]:
    from csi_perssd.remote import gc
    cat = meter.stores.catalog()
    cache = gc.ManifestCache()
    out: dict[str, Any] = {}
    for label in ("first run", "second run, nothing new"):
        rep, counts, dt = meter.measure(lambda: gc.collect(cat, grace=3600, keep=2, dry_run=False, cache=cache))
        out[label] = {"requests": counts, "seconds": round(dt, 2), "manifests read": rep.manifests_read,
                      "manifests cached": rep.manifests_cached, "bytes read": rep.bytes_read,
                      "deleted": len(rep.deleted_chunks) + len(rep.deleted_manifests) + len(rep.deleted_other)}
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def _flush_over(base: Manifest) -> Manifest:
    """What a flush of a big volume does with its base manifest when one chunk changed: plan
    (known chunks, the base's table kept), look up the new chunk's name, settle it, build."""
    cs = base.chunk_size
    plan = transfer.FlushPlan(size=base.volume_size, chunk_size=cs, base=base, ranges=[Extent(0, cs)],
                              ranges_mode="changed")
    st = transfer._start(plan, transfer.FlushStats())
    h = os.urandom(32).hex()
    assert h not in st.chunks.known and st.to_read == [0]
    st.builder.record(0, h, 1234, journal=False)
    return st.builder.build()


def _codec_one(tib: int) -> dict[str, Any]:
    n, cs = tib << 18, 4 << 20                            # 4 MiB chunks, every one written
    cm = ChunkMap(n, array("I", [n]), os.urandom(32 * n), array("I", [2_500_000]) * n)
    m = Manifest.from_map(n * cs, cs, cm, generation=7, parent=6)
    data, enc = _timed(m.encode)
    d, dec = _timed(partial(Manifest.decode, data))
    new, flush = _timed(partial(_flush_over, d))
    data2, enc2 = _timed(new.encode)
    slots: dict[str, int] = {}
    more: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for i, h in d.data_items():                           # what hydrate_chunks plans before its GETs
        if slots.setdefault(h, i) != i:
            more.setdefault(h, []).append(i)
    hydrate = round(time.perf_counter() - t0, 3)
    names, gc = _timed(d.referenced_hashes)
    e = Manifest.decode(data)
    entries, listed = _timed(lambda: e.entries)
    ok = (entries == [cm.digests[32 * i:32 * i + 32].hex() for i in range(n)] and d.encode() == data
          and Manifest.decode(data2).hash_at(1) == d.hash_at(1) and len(names) == len(slots) == n)
    return {"chunks": n, "bytes": len(data), "bytes/chunk": round(len(data) / n, 2),
            "encode s": enc, "decode+validate s": dec, "encode+decode s": round(enc + dec, 3),
            "reader: decode + 1-chunk flush plan/build + encode s": round(dec + flush + enc2, 3),
            "hydrate plan (name -> first index, per chunk) s": hydrate, "GC set of names s": gc,
            "entry list on demand (cli/tests only) s": listed,
            "json (schema 1) bytes/chunk": round(len(e.encode_json()) / n, 2) if tib == 1 else None,
            "round trip equal": ok}


def manifest_codec() -> dict[str, Any]:
    """Per size: the compact manifest a flush builds, encoded; decoded with full validation; and
    what a reader then does (a 1-chunk incremental flush over it, the new generation encoded;
    a hydrate's per-name plan; GC's set of names; the entry list some callers still build)."""
    return {f"{tib} TiB": _codec_one(tib) for tib in (1, 16)}


def idle_controller(ops: dict[str, Any], gc: dict[str, Any], gc_interval: float) -> dict[str, Any]:
    """The external-attacher's reconciler (a full listing a minute) plus a periodic GC."""
    out: dict[str, Any] = {"gc interval s": gc_interval}
    gc_day = {k: v * DAY / gc_interval for k, v in gc["second run, nothing new"]["requests"].items()}
    for label in ("full listing, pages of 100 (warm)", "full listing, one page (warm)"):
        day = {k: v * 1440 for k, v in ops[label].items()}
        out[f"reconciler $/day ({label})"] = round(dollars(day), 4)
        total = dict(day)
        for k, v in gc_day.items():
            total[k] = total.get(k, 0) + v
        out[f"idle controller $/day ({label} + gc)"] = round(dollars(total), 4)
    out["gc $/day"] = round(dollars(gc_day), 4)
    return out


def run_n(sw: Seaweed, proxy: CountingProxy, n: int, work: Path, gc_interval: float, latency: bool) -> dict[str, Any]:
    prefix = f"scale-{n}-{secrets.token_hex(3)}"
    raw = S3Store(sw.url(prefix), endpoint_url=sw.endpoint, access_key=sw.access_key, secret_key=sw.secret_key)
    fill_s = populate(raw, n)
    cfg = Config(mode="controller", catalog=sw.url(prefix), s3_endpoint=proxy.endpoint)
    stores = Stores(cfg)
    meter = Meter(proxy, stores)
    ctl = Controller(cfg, stores)  # type: ignore[abstract]
    snaps = Snapshots(cfg, stores, ctl)
    ctl.snapshots = snaps
    res: dict[str, Any] = {"volumes": n, "snapshots": n // 10, "populate s": round(fill_s, 1)}
    res["controller"] = controller_ops(meter, ctl, snaps, n)
    res["gc"] = gc_runs(meter)
    res["idle controller"] = idle_controller(res["controller"], res["gc"], gc_interval)
    res["idle node"] = idle_node(meter, cfg, work / f"node-{n}", local_copies=20)
    if latency:
        res["snapshot pick-up"] = snapshot_latency(meter, cfg, ctl, snaps, work / f"snap-{n}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--gc-interval", type=float, default=3600.0, help="periodic GC assumed for the idle controller")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-manifest", action="store_true", help="skip the manifest encode/decode timing")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perssd-scale-"))
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "prices": PRICE, "runs": []}
    load0 = round(os.getloadavg()[0], 2)
    with Seaweed(work / "seaweed") as sw:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = sw.access_key, sw.secret_key
        with CountingProxy(sw.endpoint) as proxy:
            for i, n in enumerate(int(x) for x in args.sizes.split(",")):
                print(f"N = {n} ...", flush=True)
                results["runs"].append(run_n(sw, proxy, n, work, args.gc_interval, latency=i == 0))
                print(json.dumps(results["runs"][-1], indent=1), flush=True)
    load1 = round(os.getloadavg()[0], 2)
    results["proxy == driver blocks"] = Meter.agreed
    print("manifest encode/decode ...", flush=True)
    results["manifest"] = {} if args.no_manifest else manifest_codec()
    results["load average (1 min) at start, before manifests, end"] = [load0, load1, round(os.getloadavg()[0], 2)]
    print(json.dumps(results["manifest"], indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-scale"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(report_md(results))
    print(f"wrote {stem}.json and .md")
    return 0


def _fmt(c: Any) -> str:
    if isinstance(c, dict):
        return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in sorted(c.items()))
    return str(c)


# the "before" table (N = 300 / 1,000, the code before issue 13)
BEFORE = {"CreateVolume requests": "8", "ListVolumes page of 100 requests": "301 (N=300), 1,001 (N=1,000)",
          "idle node $/day": "1.20 (N=300), 1.95 (N=1,000)", "reconciler $/day": "0.54 (N=300), ~5.8 (N=1,000)",
          "snapshot pick-up": "0.5 s LIST polling (172,800 LISTs/day/node)",
          "GC run, nothing new": "reads every manifest", "manifest bytes/chunk": "~67 (JSON, hex)"}


def _total(c: dict[str, float]) -> str:
    return f"{sum(c.values()):g}" if c else "0"


def _after_rows(r: dict[str, Any]) -> list[str]:
    runs = {run["volumes"]: run for run in r["runs"]}

    def col(fn: Callable[[dict[str, Any]], Any]) -> str:
        return " | ".join(str(fn(runs[n])) if n in runs else "-" for n in (1000, 10000))
    rows = [
        ("CreateVolume requests", BEFORE["CreateVolume requests"], col(lambda x: _total(x["controller"]["CreateVolume"]))),
        ("ListVolumes page of 100 requests, cold / warm", BEFORE["ListVolumes page of 100 requests"],
         col(lambda x: f"{_total(x['controller']['ListVolumes page of 100 (cold)'])} / "
                       f"{_total(x['controller']['ListVolumes page of 100 (warm)'])}")),
        ("reconciler (full listing a minute, pages of 100) $/day", BEFORE["reconciler $/day"],
         col(lambda x: x["idle controller"]["reconciler $/day (full listing, pages of 100 (warm))"])),
        ("idle node $/day (volumes staged / none)", BEFORE["idle node $/day"],
         col(lambda x: f"{x['idle node']['$/day, volumes staged']} / {x['idle node']['$/day, nothing staged']}")),
        ("idle controller $/day (reconciler + hourly GC)", "-",
         col(lambda x: x["idle controller"]["idle controller $/day (full listing, pages of 100 (warm) + gc)"])),
        ("GC $/day (hourly, nothing new)", BEFORE["GC run, nothing new"], col(lambda x: x["idle controller"]["gc $/day"])),
        ("GC second run: manifests read, seconds", BEFORE["GC run, nothing new"],
         col(lambda x: f"{x['gc']['second run, nothing new']['manifests read']}, "
                       f"{x['gc']['second run, nothing new']['seconds']} s")),
        ("snapshot pick-up max s", BEFORE["snapshot pick-up"],
         col(lambda x: x.get("snapshot pick-up", {}).get("max s", "-"))),
    ]
    return [f"| {a} | {b} | {c} |" for a, b, c in rows]


def _target_rows(r: dict[str, Any]) -> list[str]:
    runs = {run["volumes"]: run for run in r["runs"]}
    m16, m1 = r["manifest"].get("16 TiB", {}), r["manifest"].get("1 TiB", {})
    one = runs.get(1000, {})
    pick = max((x.get("snapshot pick-up", {}).get("max s", 0) for x in runs.values()), default=None)
    rec = one.get("idle controller", {}).get("reconciler $/day (full listing, pages of 100 (warm))")
    ctl = one.get("idle controller", {}).get("idle controller $/day (full listing, pages of 100 (warm) + gc)")
    node = max((x["idle node"]["$/day, volumes staged"] for x in runs.values()), default=None)
    page = max((sum(x["controller"]["ListVolumes page of 100 (cold)"].values()) for x in runs.values()), default=None)

    def ok(v: Any, limit: float) -> str:
        return "-" if v is None else ("met" if v <= limit else "MISSED")
    rows = [
        ("ListVolumes page of 100 <= 110 requests", f"{page} at N=1,000/10,000 (cold); tests/test_scale.py asserts it at 500",
         ok(page, 110)),
        ("reconciler at 1,000 unchanged <= $0.10/day", rec, ok(rec, 0.10)),
        ("idle node <= $0.02/day", node, ok(node, 0.02)),
        ("idle controller at 1,000 with GC <= $0.05/day", ctl, ok(ctl, 0.05)),
        ("snapshot pick-up <= 5 s", pick, ok(pick, 5.0)),
        ("manifest <= 40 B/chunk", m16.get("bytes/chunk"), ok(m16.get("bytes/chunk"), 40)),
        ("16 TiB manifest encode + decode/validate < 2 s", m16.get("encode+decode s"), ok(m16.get("encode+decode s"), 1.999)),
        ("16 TiB reader path (decode + 1-chunk flush + encode) < 2 s",
         m16.get("reader: decode + 1-chunk flush plan/build + encode s"),
         ok(m16.get("reader: decode + 1-chunk flush plan/build + encode s"), 1.999)),
        ("1 TiB encode + decode", m1.get("encode+decode s"), ok(m1.get("encode+decode s"), 1.999)),
        ("proxy counts == driver counts", f"{r.get('proxy == driver blocks')} blocks, all equal (the bench aborts otherwise)",
         "met" if r.get("proxy == driver blocks") else "-"),
    ]
    return [f"| {a} | {b} | {c} |" for a, b, c in rows]


def report_md(r: dict[str, Any]) -> str:
    lines = [f"# Scale benchmark ({r['date']})", "",
             "`make bench-scale` (benchmarks/scale.py). Requests counted by a proxy in front of SeaweedFS and by "
             "the driver's store statistics (they agreed on every figure). Prices: AWS S3 Standard. "
             f"Load average (1 min) at start / before the manifest timings / end: "
             f"{r.get('load average (1 min) at start, before manifests, end')} (2 shared cores).", "",
             "## Issue 13 targets", "", "| target | measured | |", "|---|---|---|", *_target_rows(r), "",
             "## Before (the issue's table) / after", "", "| what | before | after N = 1,000 | after N = 10,000 |",
             "|---|---|---|---|", *_after_rows(r), ""]
    for run in r["runs"]:
        lines += [f"## N = {run['volumes']} volumes, {run['snapshots']} snapshots", "", "| what | requests |", "|---|---|"]
        for k, v in run["controller"].items():
            lines.append(f"| {k} | {_fmt(v)} |")
        for k, v in run["gc"].items():
            lines.append(f"| GC {k} | {_fmt(v)} |")
        for k, v in {**run["idle controller"], **run["idle node"], **run.get("snapshot pick-up", {})}.items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    lines += ["## Manifests (4 MiB chunks, every chunk written)", "",
              "Before (issue-13 code, 16 TiB): encode 6.6 s, decode+validate 0.28 s, entry list on first read 5.4 s "
              "(4 Mi hex strs + a 4 Mi-entry sizes dict in memory). After: the compact form (remote/chunkmap.py). "
              "The target covers encode, decode with full validation and the reader path (decode, a 1-chunk "
              "incremental flush's plan and build over it, the new generation encoded). Still one str per chunk, "
              "outside the target: the hydrate's name -> index plan (then one GET per chunk: 4 Mi GETs), GC's set "
              "of names (its LIST of the chunks is one object per chunk too), and the entry list, built only when "
              "a caller reads `entries` (cli inspect/tests).", "",
              "| volume | result |", "|---|---|"]
    for k, v in r["manifest"].items():
        lines.append(f"| {k} | {_fmt(v)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
