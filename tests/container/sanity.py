"""csi-sanity against the containerized driver (`make sanity CSI_SANITY=... SANITY_TARGET=container`).

Builds the image as `make test-image` does, starts SeaweedFS on 127.0.0.1, the stub API server,
the controller container and one node container translated from deploy/kubernetes/base, and
runs csi-sanity with --csi.endpoint on the node's socket and --csi.controllerendpoint on the
controller's. The staging and target paths csi-sanity hands to the node live under the node's
/var/lib/kubelet (the Bidirectional mount): path commands generated in the work directory
create, check and remove them at their host location (the shared kubelet-like directory) and
print the path the node sees. Everything started is stopped, containers are removed by id.

    python -m tests.container.sanity /path/to/csi-sanity [--junit FILE] [-- -ginkgo.focus=Node]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.harness.sanity import MUTABLE_PARAMS, default_params, sanity_argv
from tests.harness.seaweed import Seaweed
from tests.test_deploy import render
from tests.test_kube_pool import LABEL, TOKEN, StubApi, _self_signed, _serve

from . import images
from .daemon import connect
from .images import IMAGE_TAG
from .pods import KUBELET_DIR, ContainerCluster

ATTACH_LIMIT = 4            # PERSSD_MAX_VOLUMES_PER_NODE in the ConfigMap: the attach-limit spec makes this many
# csi-sanity path commands: argument PATH as the node sees it (under /var/lib/kubelet); they act
# on its host location under the shared kubelet-like dir. Plain sh: csi-sanity kills a command
# that takes over its timeout (10 s), and a Python start-up can take that long on a busy machine.
PATHCMD = {
    "create": 'mkdir -p "$h" && printf "%s\\n" "$1"',
    "remove": 'if [ -d "$h" ] && [ ! -L "$h" ]; then rmdir "$h"; else rm -f "$h"; fi',
    "check": 'if [ ! -e "$h" ] && [ ! -L "$h" ]; then echo not_found; elif [ -d "$h" ]; then echo directory; '
             'elif [ -f "$h" ]; then echo file; else echo other; fi',
}


def pathcmd_script(op: str, kubelet_host: Path) -> str:
    return (f"#!/bin/sh\n# csi-sanity path command ({op}): {KUBELET_DIR}/X in the node is {kubelet_host}/X here\n"
            f'case "$1" in {KUBELET_DIR}/*) ;; *) echo "$1 is not under {KUBELET_DIR}" >&2; exit 1;; esac\n'
            f'h="{kubelet_host}/${{1#{KUBELET_DIR}/}}"\n{PATHCMD[op]}\n')


def _pathcmds(work: Path, kubelet_host: Path) -> list[str]:
    flags = []
    for op, names in (("create", ("createmountpathcmd", "createstagingpathcmd")),
                      ("remove", ("removemountpathcmd", "removestagingpathcmd")),
                      ("check", ("checkpathcmd",))):
        script = work / f"path-{op}.sh"
        script.write_text(pathcmd_script(op, kubelet_host))
        script.chmod(0o755)
        flags += [f"--csi.{n}={script}" for n in names]
    return flags


def summary(junit: Path) -> dict[str, int]:
    """passed / failed / skipped / total specs of a ginkgo JUnit report."""
    cases = ET.parse(junit).getroot().iter("testcase")
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for c in cases:
        if c.get("name", "").startswith("[BeforeSuite]") or c.get("name", "").startswith("[AfterSuite]"):
            continue
        kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
            "skipped" if c.find("skipped") is not None else "passed"
        out[kind] += 1
    out["total"] = sum(out.values())
    return out


def run(binary: str, extra: list[str], junit: Path | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="perssd-csan-"))
    d = connect()
    sw = Seaweed(work / "seaweed")
    cl: ContainerCluster | None = None
    rc = 1
    try:
        base = images.ensure_base(d)
        images.build_driver_image(d, base.image, IMAGE_TAG)
        sw.start()
        key, cert = _self_signed(work)
        sa = work / "sa"
        sa.mkdir()
        (sa / "token").write_text(TOKEN)
        shutil.copyfile(cert, sa / "ca.crt")
        (sa / "namespace").write_text("perssd-system")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        for addr in _serve(StubApi(nodes={"node-a": {LABEL: "sanity-pool"}}), tls):
            cl = ContainerCluster(work / "c", d, IMAGE_TAG, render("base"), sw, prefix=f"san-{secrets.token_hex(4)}",
                                  api=addr, sa_dir=sa, nodes=("node-a",),
                                  config_extra={"PERSSD_MAX_VOLUMES_PER_NODE": str(ATTACH_LIMIT)})
            cl.start()
            rc = _sanity(binary, cl, work, extra, junit or work / "junit.xml")
    finally:
        if cl is not None:
            cl.stop()
        sw.stop()
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rc


def _sanity(binary: str, cl: ContainerCluster, work: Path, extra: list[str], junit: Path) -> int:
    params, size, why = default_params()
    if why:
        print(f"sanity: {why}", flush=True)
    (work / "params.yaml").write_text(json.dumps(params) + "\n")
    (work / "mutable.yaml").write_text(json.dumps(MUTABLE_PARAMS) + "\n")
    base = Path(f"{KUBELET_DIR}/sanity-{secrets.token_hex(3)}")
    (cl.on_host(str(base)) / "sanity").mkdir(parents=True)
    cmd = sanity_argv(binary, cl.nodes["node-a"].socket, base, work / "params.yaml", size,
                      [f"--csi.controllerendpoint=unix://{cl.controller.socket}",   # type: ignore[union-attr]
                       *_pathcmds(work, cl.kubelet), f"--ginkgo.junit-report={junit}", *extra],
                      work / "mutable.yaml")
    print("sanity: " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if junit.exists():
        print(f"sanity (containers): {json.dumps(summary(junit))}", flush=True)
    if rc != 0:
        for name, pod in cl.pods.items():
            print(f"--- {name} (last lines) ---\n{pod.logs(30)}", file=sys.stderr)
    print(f"sanity: csi-sanity exited with {rc}", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m tests.container.sanity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary")
    p.add_argument("--junit", type=Path, default=None, help="keep the JUnit report here")
    p.add_argument("--block", action="store_true", help="test volumes in block access mode (default: mount)")
    args = p.parse_args(argv)
    if args.block:
        extra = ["--csi.testvolumeaccesstype=block", *extra]
    if not (os.path.isfile(args.binary) and os.access(args.binary, os.X_OK)):
        print(f"sanity: {args.binary} is not an executable file", file=sys.stderr)
        return 2
    return run(os.path.abspath(args.binary), extra, args.junit)


if __name__ == "__main__":
    sys.exit(main())
