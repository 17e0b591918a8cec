"""`csi-perssd pool init|status`: set up the node's LVM thin pool on its NVMe and show it.

    csi-perssd pool init --devices auto                      # every empty NVMe namespace
    csi-perssd pool init --devices /dev/nvme0n1,/dev/nvme1n1 --volume-group perssd
    csi-perssd pool status [--json]

init only takes devices that are empty (no partitions, signatures, holders or mounts) and refuses
the rest with the reason; --force wipes signatures and partition tables of explicitly named
devices, but a device that is mounted or held by another device is refused even then. Running
init again is harmless: devices already in the volume group are skipped, an existing pool kept.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from ..errors import CsiError, invalid, precondition
from ..local import devices
from ..local.lvm import LvmBackend
from ..local.lvmcli import LvmCli, ToolRunner

DEFAULT_VG = "perssd"
DEFAULT_POOL = "perssd-pool"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("pool", help="set up or show the node's LVM thin pool")
    sub = p.add_subparsers(dest="pool_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--volume-group", default=DEFAULT_VG, help="LVM volume group (default %(default)s)")
    common.add_argument("--thin-pool", default=DEFAULT_POOL, help="thin pool LV (default %(default)s)")
    common.add_argument("--lvm-config", default=None,
                        help="extra lvm --config string (e.g. for hosts without udev)")
    i = sub.add_parser("init", parents=[common], help="create PVs, the VG and the thin pool")
    i.add_argument("--devices", required=True, help="auto (all empty NVMe namespaces) or /dev/a,/dev/b")
    i.add_argument("--force", action="store_true",
                   help="wipe signatures/partitions on explicitly named devices (never mounted ones)")
    i.add_argument("--chunk-size", default="64k", help="thin pool chunk size (default %(default)s)")
    i.add_argument("--data-percent", type=int, default=90,
                   help="share of the VG's free space for pool data (default %(default)s)")
    i.add_argument("--tag", default="perssd", help="tag put on the VG and the pool")
    s = sub.add_parser("status", parents=[common], help="devices, pool usage and volumes")
    s.add_argument("--tag", default="perssd", help="tag of the driver's LVs")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.pool_command == "init":
        for line in init(args.devices, args.volume_group, args.thin_pool, force=args.force,
                         chunk_size=args.chunk_size, data_percent=args.data_percent,
                         tag=args.tag, lvm_config=args.lvm_config):
            print(line)
        return 0
    st = status(args.volume_group, args.thin_pool, args.tag, args.lvm_config)
    print(json.dumps(st, indent=1, sort_keys=True) if args.json else format_status(st))
    return 1 if st["problems"] else 0


def plan(devs: list[devices.BlockDevice], in_vg: set[str], auto: bool, force: bool
         ) -> tuple[list[devices.BlockDevice], list[devices.BlockDevice], list[str]]:
    """Split devices into (to take, to wipe first, messages); raise when nothing may be taken.

    Pure decision logic: `in_vg` holds the paths already PVs of the target VG."""
    take, wipe, msgs, refused = [], [], [], []
    for d in devs:
        if d.path in in_vg:
            msgs.append(f"{d.path}: already in the volume group")
            continue
        why = d.in_use()
        if not why:
            take.append(d)
        elif auto:
            msgs.append(f"{d.path}: skipped, it {'; '.join(why)}")
        elif force and not d.busy and not d.read_only:
            wipe.append(d)
            take.append(d)
            msgs.append(f"{d.path}: --force: wiping ({'; '.join(why)})")
        else:
            hint = "" if d.busy or d.read_only else " (pass --force to wipe it)"
            refused.append(f"{d.path} {'; '.join(why)}{hint}")
    if refused:
        raise precondition("refusing devices that are not empty: " + " | ".join(refused))
    return take, wipe, msgs


def init(spec: str, vg: str, pool: str, *, force: bool = False, chunk_size: str = "64k",
         data_percent: int = 90, tag: str = "perssd", lvm_config: str | None = None) -> list[str]:
    if not 1 <= data_percent <= 100:
        raise invalid("--data-percent must be within 1..100")
    auto = spec.strip() == "auto"
    if auto and force:
        raise invalid("--force only applies to devices named explicitly, not to auto")
    runner = ToolRunner()
    lvm = LvmCli(lvm_config, runner)
    devs = devices.resolve(spec)
    in_vg = {pv.name for pv in lvm.pvs() if pv.vg == vg}
    take, wipe, msgs = plan(devs, in_vg, auto, force)
    if not take and not in_vg:
        if not devs:
            raise precondition("no NVMe namespace found on this node" if auto else "no device given")
        raise precondition(f"no empty device found for {spec!r}: " + "; ".join(msgs))
    for d in wipe:
        runner.run(["wipefs", "--all", d.path], what=f"wipefs {d.path}")
    paths = [d.path for d in take]
    if paths:
        lvm.run("pvcreate", "-y", *paths)
        if lvm.vg(vg) is None:
            lvm.run("vgcreate", "--addtag", tag, vg, *paths)
            msgs.append(f"created volume group {vg} on {', '.join(paths)}")
        else:
            lvm.run("vgextend", vg, *paths)
            msgs.append(f"extended volume group {vg} with {', '.join(paths)}")
    if any(lv.name == pool for lv in lvm.lvs(vg)):
        msgs.append(f"thin pool {vg}/{pool} exists, kept as it is")
    else:
        lvm.run("lvcreate", "--type", "thin-pool", "-l", f"{data_percent}%FREE", "--zero", "y",
                "--chunksize", chunk_size, "--addtag", tag, "-n", pool, vg)
        msgs.append(f"created thin pool {vg}/{pool} ({data_percent}% of free space, "
                    f"chunk {chunk_size}, zeroing on)")
    return msgs


def status(vg: str, pool: str, tag: str = "perssd", lvm_config: str | None = None) -> dict[str, Any]:
    lvm = LvmCli(lvm_config)
    pvs = [pv for pv in lvm.pvs() if pv.vg == vg]
    pv_paths = {pv.name for pv in pvs}
    out: dict[str, Any] = {"volume_group": vg, "thin_pool": pool, "devices": [], "pool": None,
                           "volumes": [], "problems": []}
    seen = set()
    for d in devices.nvme_namespaces():
        seen.add(d.path)
        state = "in pool" if d.path in pv_paths else ("empty" if d.empty else "in use: " + "; ".join(d.in_use()))
        out["devices"].append({**asdict(d), "state": state})
    for pv in pvs:
        if pv.name not in seen:
            out["devices"].append({"path": pv.name, "size": pv.size, "state": "in pool"})
    backend = LvmBackend(vg, pool, tag, lvm_config)
    if lvm.vg(vg) is None:
        out["problems"].append(f"volume group {vg!r} not found")
        return out
    lvs = lvm.lvs(vg)
    p = next((lv for lv in lvs if lv.name == pool and lv.segtype == "thin-pool"), None)
    if p is None:
        out["problems"].append(f"thin pool {vg}/{pool} not found")
    else:
        out["pool"] = {"size": p.size, "data_percent": p.data_percent,
                       "metadata_percent": p.metadata_percent, "metadata_size": p.metadata_size,
                       "chunk_size": p.chunk_size, "zero": p.zero, "active": p.active}
    vol_prefix, of_prefix = f"{tag}.vol=", f"{tag}.of="
    snaps: dict[str, int] = {}
    for lv in lvs:
        if tag in lv.tags:
            for t in lv.tags:
                if t.startswith(of_prefix):
                    snaps[t[len(of_prefix):]] = snaps.get(t[len(of_prefix):], 0) + 1
    for lv in lvs:
        vid = next((t[len(vol_prefix):] for t in lv.tags if t.startswith(vol_prefix)), None)
        if tag in lv.tags and vid:
            out["volumes"].append({"id": vid, "lv": lv.name, "size": lv.size,
                                   "data_percent": lv.data_percent, "active": lv.active,
                                   "open": lv.open, "snapshots": snaps.get(vid, 0)})
    try:
        out["problems"] += backend.check()
    except CsiError as e:
        out["problems"].append(e.message)
    return out


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_status(st: dict[str, Any]) -> str:
    lines = [f"volume group {st['volume_group']}, thin pool {st['thin_pool']}", "devices:"]
    for d in st["devices"] or [{"path": "(no NVMe namespaces found)", "size": None, "state": ""}]:
        ident = " ".join(x for x in (d.get("model", ""), d.get("serial", "")) if x)
        lines.append(f"  {d['path']:<16} {_gib(d.get('size')):>12}  {d['state']}  {ident}".rstrip())
    p = st["pool"]
    if p:
        lines.append(f"pool: {_gib(p['size'])}, data {p['data_percent'] or 0:.2f}% used, "
                     f"metadata {p['metadata_percent'] or 0:.2f}% of {_gib(p['metadata_size'])}, "
                     f"chunk {p['chunk_size'] // 1024} KiB, zeroing {'on' if p['zero'] else 'OFF'}")
    lines.append(f"volumes: {len(st['volumes'])}")
    for v in st["volumes"]:
        lines.append(f"  {v['id']:<40} {_gib(v['size']):>12}  {v['data_percent'] or 0:6.2f}% used"
                     f"  snapshots {v['snapshots']}{'  active' if v['active'] else ''}")
    for prob in st["problems"]:
        lines.append(f"problem: {prob}")
    return "\n".join(lines)

