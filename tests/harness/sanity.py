"""Run the csi-sanity conformance tool against a `--mode all` driver (`make sanity CSI_SANITY=...`).

Starts `csi-perssd serve --mode all` under a temporary directory (file:// catalog that is also
the object store, rawfile backend, a small attach limit), runs csi-sanity with a small test
volume, mount and staging directories that do not exist yet (their parent does: csi-sanity
makes them with a plain mkdir), a parameters file (default StorageClass parameters) and a
mutable-parameters file (ModifyVolume specs), with the node attach limit spec enabled; then
stops the server, unmounts what is left under the temporary directory, detaches its loop
devices, and exits with csi-sanity's exit code.

    python -m tests.harness.sanity /path/to/csi-sanity [--param persistence=object] [-- -ginkgo.focus=Node]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .procs import DriverProcess

DEFAULT_PARAMS: dict[str, str] = {}            # the default StorageClass: persistence=object
MUTABLE_PARAMS = {"compression": "3"}          # a VolumeAttributesClass for the ModifyVolume specs
ATTACH_LIMIT = 4                               # max_volumes_per_node: the attach limit spec makes this many
TEST_VOLUME_SIZE = 64 << 20
XFS_VOLUME_SIZE = 320 << 20                     # mkfs.xfs wants >= 300 MiB (sparse: costs nothing)


def default_params() -> tuple[dict[str, str], int, str]:
    """Parameters and volume size for csi-sanity's test volumes, and why. Without CAP_SYS_RESOURCE
    (some sandboxes) ext4 cannot grow while mounted, which csi-sanity's "node-expand after
    node-publish" needs: use xfs there, which grows online without it."""
    from csi_perssd.local import fs
    if fs.can_grow_ext_online():
        return dict(DEFAULT_PARAMS), TEST_VOLUME_SIZE, ""
    return (dict(DEFAULT_PARAMS, fsType="xfs"), XFS_VOLUME_SIZE,
            "no CAP_SYS_RESOURCE here (online ext4 resize impossible): test volumes use xfs")


def sanity_argv(binary: str, socket: str, workdir: Path, params_file: Path, size: int, extra: list[str],
                mutable_file: Path | None = None) -> list[str]:
    more = [f"--csi.testvolumemutableparameters={mutable_file}"] if mutable_file else []
    return [binary,
            f"--csi.endpoint=unix://{socket}",
            f"--csi.testvolumesize={size}",
            f"--csi.testvolumeexpandsize={2 * size}",
            f"--csi.mountdir={workdir / 'sanity' / 'target'}",        # csi-sanity creates them
            f"--csi.stagingdir={workdir / 'sanity' / 'staging'}",
            f"--csi.testvolumeparameters={params_file}",
            "--csi.testnodevolumeattachlimit=true",
            *more, *extra]


def _mount_points_under(base: str) -> list[str]:
    base = os.path.realpath(base).rstrip("/")
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == base or mp.startswith(base + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def cleanup(base: str) -> list[str]:
    """Unmount everything under `base` (deepest first), detach loop devices backed by files under
    it; return what was cleaned up."""
    done = []
    for mp in _mount_points_under(base):
        res = subprocess.run(["umount", mp], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        done.append(mp)
    res = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"], capture_output=True, text=True)
    if res.returncode == 0 and res.stdout.strip():
        real = os.path.realpath(base).rstrip("/") + "/"
        for row in json.loads(res.stdout).get("loopdevices", []):
            back = (row.get("back-file") or "").removesuffix(" (deleted)")
            if back.startswith(real):
                det = subprocess.run(["losetup", "-d", row["name"]], capture_output=True, text=True)
                if det.returncode != 0:
                    print(f"sanity: cannot detach {row['name']}: {det.stderr.strip()}", file=sys.stderr)
                done.append(row["name"])
    return done


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m tests.harness.sanity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary", help="path to the csi-sanity executable")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help=f"StorageClass parameter for test volumes (default {DEFAULT_PARAMS})")
    p.add_argument("--volume-size", type=int, default=0, help="test volume size in bytes (default 64 MiB; "
                   "320 MiB with xfs when online ext4 resize is impossible)")
    p.add_argument("--node-id", default="sanity-node")
    p.add_argument("--pool", default="sanity-pool")
    p.add_argument("--workdir", default=None, help="create the temporary directory under this one")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (driver log, catalog)")
    p.add_argument("--block", action="store_true", help="test volumes in block access mode (default: mount)")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.block:
        extra = ["--csi.testvolumeaccesstype=block", *extra]
    if not (os.path.isfile(args.binary) and os.access(args.binary, os.X_OK)):
        print(f"sanity: {args.binary} is not an executable file", file=sys.stderr)
        return 2
    params, size, why = default_params()
    if args.volume_size:
        size = args.volume_size
    if why:
        print(f"sanity: {why}", flush=True)
    for kv in args.param:
        key, sep, value = kv.partition("=")
        if not sep:
            print(f"sanity: --param {kv!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = value
    if params.get("fsType", "xfs") != "xfs" and size == XFS_VOLUME_SIZE and not args.volume_size:
        size = TEST_VOLUME_SIZE
    work = Path(tempfile.mkdtemp(prefix="perssd-sanity-", dir=args.workdir))
    params_file = work / "parameters.yaml"
    params_file.write_text(json.dumps(params) + "\n")          # JSON is YAML
    mutable_file = work / "mutable-parameters.yaml"
    mutable_file.write_text(json.dumps(MUTABLE_PARAMS) + "\n")
    (work / "sanity").mkdir()            # csi-sanity makes target/ and staging/ with a plain mkdir
    driver = DriverProcess(work, mode="all", node_id=args.node_id, pool=args.pool,
                           extra=["--max-volumes-per-node", str(ATTACH_LIMIT)])
    if len(driver.socket.encode()) > 107:
        print(f"sanity: socket path {driver.socket} is longer than a unix socket allows; use a shorter --workdir",
              file=sys.stderr)
        return 2
    rc = 1
    try:
        driver.start()
        cmd = sanity_argv(args.binary, driver.socket, work, params_file, size, extra, mutable_file)
        print("sanity: " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
    except RuntimeError as e:           # the driver did not come up
        print(f"sanity: {e}", file=sys.stderr)
        rc = 1
    finally:
        code = driver.stop()
        left = cleanup(str(work))
        if left:
            print(f"sanity: cleaned up after the run: {', '.join(left)}", file=sys.stderr)
        if code not in (0, None):
            print(f"sanity: driver exited with {code}; log: {driver.log_path}", file=sys.stderr)
        if args.keep or rc != 0:
            print(f"sanity: driver log and catalog kept in {work}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    print(f"sanity: csi-sanity exited with {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
