"""End to end through the containers the manifests declare.

deploy/kubernetes/base is rendered with kustomize; the node DaemonSet's and the controller
Deployment's csi-perssd containers are translated to `docker run` (tests/container/translate.py:
args, env, securityContext, hostPaths, mountPropagation) and run from the image built from the
Dockerfile: the controller as the image's non-root user on an S3 catalog (SeaweedFS on
127.0.0.1), node-a and node-b as root with their own state and data dirs, one shared kubelet-like
dir with Bidirectional (rshared) propagation, and the pool read from their Node label through a
stub API server (TLS, service-account token), as --pool-from-node-label does in a cluster.

What this machine cannot grant is mapped (and printed by test_translation_notes):
privileged -> SYS_ADMIN + MKNOD, unconfined seccomp/AppArmor, all-device cgroup rules;
the pod network -> the host network with the declared ports moved to free ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.local import fs
from tests.harness.cluster import mount_cap, scrape
from tests.harness.seaweed import Seaweed
from tests.test_deploy import render
from tests.test_kube_pool import LABEL, TOKEN, StubApi, _self_signed, _serve

from .conftest import FIGURES
from .daemon import Daemon
from .pods import ContainerCluster

pytestmark = [pytest.mark.root, pytest.mark.s3]
MiB = 1 << 20
POOL = "pool-1"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], Path, StubApi]]:
    d = tmp_path_factory.mktemp("api")
    key, cert = _self_signed(d)
    sa = d / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(cert.read_bytes())
    (sa / "namespace").write_text("perssd-system")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    stub = StubApi(nodes={"node-a": {LABEL: POOL}, "node-b": {LABEL: POOL}})
    for addr in _serve(stub, tls):
        yield addr, sa, stub


@pytest.fixture(scope="module")
def cluster(docker: Daemon, image: str, seaweed: Seaweed, api_server, tmp_path_factory) -> Iterator[ContainerCluster]:
    addr, sa, _ = api_server
    if not seaweed.running:
        seaweed.start()
    cl = ContainerCluster(tmp_path_factory.mktemp("ctr"), docker, image, render("base"), seaweed,
                          prefix=f"ct-{secrets.token_hex(5)}", api=addr, sa_dir=sa)
    try:
        cl.start()
        yield cl
    except BaseException:
        for name, pod in cl.pods.items():
            print(f"--- {name} ---\n{pod.logs()}")
        raise
    finally:
        ids = [p.id for p in cl.pods.values() if p.id]
        cl.stop()
        left = docker.run("ps", "-a", "--no-trunc", "--format", "{{.ID}}").stdout.split()
        assert not set(ids) & set(left), "containers left behind"


def tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "lost+found" not in p.parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_tree(root: Path) -> None:
    for i in range(3):
        d = root / f"dir{i}" / "sub"
        d.mkdir(parents=True)
        for j in range(4):
            (d / f"f{j}.bin").write_bytes(os.urandom(1000 + 70_000 * j))
    (root / "big.bin").write_bytes(os.urandom(3 * MiB))


def test_translation_notes(cluster: ContainerCluster) -> None:
    """What the manifests ask and this machine grants differently (printed with -s or on failure)."""
    notes = {n: s.notes for n, s in cluster.specs.items()}
    print(json.dumps(notes, indent=1))
    assert any("privileged" in x for x in notes["node-a"])
    assert not any("privileged" in x for x in notes["controller"])
    kub = [m for m in cluster.specs["node-a"].mounts if m.target == "/var/lib/kubelet"]
    assert kub and kub[0].propagation == "rshared" and kub[0].source == str(cluster.kubelet)


def test_controller_runs_as_non_root_on_the_s3_catalog(cluster: ContainerCluster, image: str) -> None:
    ctl = cluster.pods["controller"]
    assert ctl.exec("id", "-u").stdout.strip() == "65532"
    assert ctl.exec("sh", "-c", "touch /x 2>&1 || echo read-only", check=False).stdout.strip().endswith("read-only")
    assert cluster.specs["controller"].env["PERSSD_CATALOG"] == cluster.seaweed.url(cluster.prefix)
    for n in cluster.node_names:
        assert cluster.pods[n].exec("id", "-u").stdout.strip() == "0"
        info = cluster.nodes[n].node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert info.node_id == n
        assert dict(info.accessible_topology.segments).get("nvme.perssd.io/pool") == POOL, \
            "the pool must come from the Node label (stub API server)"


def test_two_node_migration_through_containers(cluster: ContainerCluster, api_server) -> None:
    vid = cluster.create("ct-migrate", 64 * MiB)
    target = Path(cluster.attach("node-a", vid))
    # the mount the node made inside its container is a mount on the host (what kubelet needs)
    assert fs.mount_info(str(target)) is not None, f"{target} is not a mount point on the host"
    write_tree(target)
    (cluster.pods["node-a"].exec("sh", "-c", f"echo from-inside > {cluster.paths('node-a', vid)[1]}/inside.txt"))
    assert (target / "inside.txt").read_text() == "from-inside\n"
    before = tree(target)
    assert len(before) == 14
    # node-a's rawfile and state live in its own host directories (the DaemonSet's hostPaths)
    root = cluster.workdir / "node-a"
    assert any(p.name == "disk.img" for p in (root / "data-dir").rglob("*")), "no rawfile in the data-dir hostPath"
    assert any((root / "state-dir").iterdir()), "nothing in the state-dir hostPath"
    cluster.release("node-a", vid)
    assert fs.mount_info(str(target)) is None
    target_b = Path(cluster.attach("node-b", vid))
    try:
        assert tree(target_b) == before
    finally:
        cluster.release("node-b", vid)
    paths = {p for p, _ in api_server[2].requests}
    assert {"/api/v1/nodes/node-a", "/api/v1/nodes/node-b"} <= paths


def test_snapshot_restored_into_a_new_volume(cluster: ContainerCluster) -> None:
    vid = cluster.create("ct-snap-src", 64 * MiB)
    target = Path(cluster.attach("node-a", vid))
    try:
        write_tree(target)
        before = tree(target)
        snap = cluster.snapshot(vid, "ct-snap")
        (target / "after.txt").write_text("written after the snapshot\n")
    finally:
        cluster.release("node-a", vid)
    src = pb.VolumeContentSource()
    src.snapshot.snapshot_id = snap.snapshot_id
    rid = cluster.create("ct-restored", 64 * MiB, source=src)
    rt = Path(cluster.attach("node-b", rid))
    try:
        assert tree(rt) == before
    finally:
        cluster.release("node-b", rid)


def test_stats_and_expansion_of_a_staged_volume(cluster: ContainerCluster) -> None:
    # ext4 grows online only with CAP_SYS_RESOURCE, which this sandbox cannot grant: use xfs then
    fs_type, size = ("ext4", 64 * MiB) if fs.can_grow_ext_online() else ("xfs", 320 * MiB)
    cap = mount_cap(fs_type)
    vid = cluster.create("ct-grow", size, cap=cap)
    target = Path(cluster.attach("node-a", vid, cap=cap))
    try:
        (target / "data.bin").write_bytes(os.urandom(8 * MiB))
        staging, ctarget = cluster.paths("node-a", vid)
        node = cluster.nodes["node-a"].node
        st = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=ctarget))
        usage = {u.unit: u for u in st.usage}
        b = usage[pb.VolumeUsage.BYTES]
        assert 0.7 * size < b.total <= size and b.used >= 8 * MiB, b
        assert not st.volume_condition.abnormal
        new = 2 * size
        ce = cluster.controller.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=new), volume_capability=cap))
        assert ce.capacity_bytes >= new and ce.node_expansion_required
        ne = node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=ctarget, staging_target_path=staging,
            capacity_range=pb.CapacityRange(required_bytes=new), volume_capability=cap))
        assert ne.capacity_bytes >= new
        st2 = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=ctarget))
        total2 = {u.unit: u for u in st2.usage}[pb.VolumeUsage.BYTES].total
        assert total2 > 1.8 * b.total, (b.total, total2)
        statv = os.statvfs(target)                        # the host sees the grown file system
        assert statv.f_blocks * statv.f_frsize == total2
    finally:
        cluster.release("node-a", vid)


def test_node_metrics_on_the_declared_port(cluster: ContainerCluster) -> None:
    samples = scrape(cluster.metrics_ports["node-a"])
    assert any(k.startswith("perssd_") for k in samples), "no perssd_* metrics from the node container"
    FIGURES["e2e"] = "controller + node-a + node-b containers from deploy/kubernetes/base"
