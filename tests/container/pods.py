"""The manifests' pods as containers on one machine: a controller and N node plugins.

Each "node" gets its own directory for every hostPath the DaemonSet declares (named after the
volume), except the host's /dev and one kubelet-like directory that all nodes share, made a
shared mount (`mount --bind D D; mount --make-rshared D`) as a kubelet host's /var/lib/kubelet
is, so the Bidirectional mount of the node plugin propagates its mounts back to the host.
Containers are run from translate.RunSpec (rendered manifests -> docker run) and removed by
their ids. ContainerCluster is tests.harness.cluster.Cluster with the processes replaced by
these containers, so the CO-side calls (create, attach, release, ...) are the same.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cleanup import cleanup_under, mounts_under
from tests.harness.cluster import Cluster, free_port, mount_cap
from tests.harness.seaweed import Seaweed
from tests.harness.stubs import CsiStubs

from . import translate as tr
from .daemon import Daemon

DRIVER_CONTAINER = "csi-perssd"
KUBELET_DIR = "/var/lib/kubelet"
DRIVER_NAME = "nvme.perssd.io"
NAMESPACE = "perssd-system"


class ContainerPod(CsiStubs):
    """One container started from a RunSpec; the same surface as tests.harness.procs.DriverProcess."""

    def __init__(self, docker: Daemon, name: str, spec: tr.RunSpec, socket: str):
        self.docker, self.name, self.spec, self.socket = docker, name, spec, socket
        self.id: str | None = None
        self._channel: grpc.Channel | None = None

    def prepare(self) -> None:
        """What kubelet does before starting the container: hostPath dirs, emptyDirs."""
        for d in self.spec.require_dirs:
            if not os.path.isdir(d):
                raise tr.TranslateError(f"hostPath {d} (type Directory) does not exist")
        for d in self.spec.create_dirs:
            os.makedirs(d, exist_ok=True)
        for d, gid in self.spec.empty_dirs.items():
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o777)
            if gid is not None:
                os.chown(d, 0, gid)
                os.chmod(d, 0o2777)

    def start(self, timeout: float = 60.0) -> ContainerPod:
        self.prepare()
        argv = self.spec.argv(self.name, docker=self.docker.cli)
        res = self.docker.run(*argv[1:], timeout=120)       # argv[0] is the client itself
        self.id = res.stdout.strip()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.docker.run("inspect", "--format", "{{.State.Status}}", self.id).stdout.strip()
            if state != "running":
                raise RuntimeError(f"container {self.name} is {state}:\n{self.logs()}")
            if os.path.exists(self.socket):
                try:
                    self.identity.Probe(pb.ProbeRequest(), timeout=5)
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.3)
        raise RuntimeError(f"container {self.name} did not answer on {self.socket}:\n{self.logs()}")

    def logs(self, tail: int = 60) -> str:
        if self.id is None:
            return ""
        res = self.docker.run("logs", "--tail", str(tail), self.id, check=False)
        return (res.stdout + res.stderr)[-6000:]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.id is not None
        return self.docker.run("exec", self.id, *argv, check=check, timeout=120)

    def stop(self, timeout: int = 30) -> int | None:
        """SIGTERM (docker stop), then remove the container by its id; its exit code."""
        self._close()
        if self.id is None:
            return None
        self.docker.run("stop", "-t", str(timeout), self.id, check=False, timeout=timeout + 30)
        code = self.docker.run("inspect", "--format", "{{.State.ExitCode}}", self.id, check=False).stdout.strip()
        self.docker.run("rm", "-f", self.id, check=False)
        self.id = None
        return int(code) if code.lstrip("-").isdigit() else None


def make_shared(path: Path) -> None:
    """Bind `path` onto itself and make it rshared (a kubelet host's /var/lib/kubelet)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True, timeout=30)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True, capture_output=True, timeout=30)


class ContainerCluster(Cluster):
    """Controller + nodes as containers translated from the rendered deploy/kubernetes/base."""

    def __init__(self, workdir: Path, docker: Daemon, image: str, objects: list[dict[str, Any]],
                 seaweed: Seaweed, prefix: str, api: tuple[str, int], sa_dir: Path,
                 nodes: tuple[str, ...] = ("node-a", "node-b"), config_extra: dict[str, str] | None = None):
        super().__init__(workdir, nodes=nodes, seaweed=seaweed, prefix=prefix)
        self.config_extra = dict(config_extra or {})
        self.docker, self.image, self.objects = docker, image, objects
        self.api, self.sa_dir = api, sa_dir
        self.kubelet = self.workdir / "kubelet"
        self.pods: dict[str, ContainerPod] = {}
        self.specs: dict[str, tr.RunSpec] = {}
        self.run_id = uuid.uuid4().hex[:8]
        self.metrics_ports: dict[str, int] = {}

    # -- what kubelet and the API server supply ------------------------------------------------
    def secrets(self) -> dict[str, dict[str, str]]:
        sw = self.seaweed
        return {"perssd-s3": {"endpoint": sw.endpoint, "region": "us-east-1",
                              "accessKeyId": sw.access_key, "secretAccessKey": sw.secret_key}}

    def config_maps(self) -> dict[str, dict[str, str]]:
        """The rendered perssd-config, with the catalog moved to this test's bucket prefix (and the
        caller's extra settings, as an operator would add them)."""
        data = tr.config_map_data(self.objects, "perssd-config")
        assert data["PERSSD_CATALOG"].startswith(f"s3://{self.seaweed.bucket}/"), data["PERSSD_CATALOG"]
        return {"perssd-config": dict(data, PERSSD_CATALOG=self.seaweed.url(self.prefix), **self.config_extra)}

    def kubelet_for(self, pod_name: str, node: str, kind: str) -> tr.Kubelet:
        root = self.workdir / pod_name

        def host_path(volume: str, path: str) -> str:
            if path == "/dev":
                return "/dev"
            if path == KUBELET_DIR:
                return str(self.kubelet)
            return str(root / volume)

        pod = self.pod_spec(kind)
        ports = {int(p["containerPort"]): free_port()
                 for p in tr.container(pod, DRIVER_CONTAINER).get("ports", [])}
        self.metrics_ports[pod_name] = ports.get(9808, 0)
        return tr.Kubelet(node_name=node, pod_name=pod_name, namespace=NAMESPACE, host_path=host_path,
                          empty_dir=lambda v: str(root / "empty" / v), config_maps=self.config_maps(),
                          secrets=self.secrets(), ports=ports, service_account=str(self.sa_dir),
                          api_env={"KUBERNETES_SERVICE_HOST": self.api[0],
                                   "KUBERNETES_SERVICE_PORT": str(self.api[1])})

    def pod_spec(self, kind: str) -> dict[str, Any]:
        name = "perssd-node" if kind == "DaemonSet" else "perssd-controller"
        return tr.workload(self.objects, kind, name)

    def _pod(self, pod_name: str, node: str, kind: str) -> ContainerPod:
        k = self.kubelet_for(pod_name, node, kind)
        spec = tr.translate(self.pod_spec(kind), DRIVER_CONTAINER, self.image, k)
        self.specs[pod_name] = spec
        sock_dir = next(m.source for m in spec.mounts if m.target == "/csi")
        pod = ContainerPod(self.docker, f"perssd-{pod_name}-{self.run_id}", spec, f"{sock_dir}/csi.sock")
        self.pods[pod_name] = pod
        return pod

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> ContainerCluster:
        if not self.seaweed.running:
            self.seaweed.start()
        self.kubelet.mkdir(parents=True, exist_ok=True)
        make_shared(self.kubelet)
        self.controller = self._pod("controller", "", "Deployment").start()   # type: ignore[assignment]
        for n in self.node_names:
            self.nodes[n] = self._pod(n, n, "DaemonSet").start()              # type: ignore[assignment]
        return self

    def stop(self) -> None:
        errors: list[str] = []
        try:
            for name, pod in self.pods.items():
                if pod.id is not None and name in self.nodes:
                    try:
                        self._release_loops(pod)
                    except (AssertionError, RuntimeError) as e:
                        errors.append(f"{name}: {e}")
        finally:
            for pod in self.pods.values():
                pod.stop()
            cleanup_under(str(self.kubelet))         # unmounts the shared bind itself last
            cleanup_under(str(self.workdir))
        assert not mounts_under(str(self.workdir))
        assert not errors, errors

    def _release_loops(self, pod: ContainerPod) -> list[str]:
        """Unmount what the node left under the kubelet dir, then detach the loop devices its
        rawfiles back (the driver keeps clean volumes attached by design; a test may not).
        Returns the devices it detached."""
        for m in sorted(mounts_under(str(self.kubelet)), key=len, reverse=True):
            if m != str(self.kubelet):
                subprocess.run(["umount", m], capture_output=True, timeout=60)
        flag = [a for a in pod.spec.args if a.startswith("--rawfile-dir=")]
        data_dir = flag[0].split("=", 1)[1] if flag else "/var/lib/perssd/volumes"
        res = pod.exec("losetup", "--noheadings", "--list", "--output", "NAME,BACK-FILE", check=False)
        done = []
        for line in res.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].startswith(data_dir.rstrip("/") + "/"):
                pod.exec("losetup", "--detach", parts[0], check=False)
                done.append(parts[0])
        left = pod.exec("losetup", "--noheadings", "--list", "--output", "NAME", check=False).stdout.split()
        assert not set(done) & set(left), f"loop devices still attached after the test: {set(done) & set(left)}"
        return done

    # -- the CO's side, with paths in the node's mount namespace ----------------------------
    def paths(self, node: str, vid: str) -> tuple[str, str]:
        h = hashlib.sha256(f"{node}/{vid}".encode()).hexdigest()[:16]
        staging = f"{KUBELET_DIR}/plugins/kubernetes.io/csi/{DRIVER_NAME}/{h}/globalmount"
        target = f"{KUBELET_DIR}/pods/{h}/volumes/kubernetes.io~csi/{vid}/mount"
        return staging, target

    def on_host(self, container_path: str) -> Path:
        """Where a path under the node's /var/lib/kubelet lives on the host."""
        assert container_path.startswith(KUBELET_DIR + "/"), container_path
        return self.kubelet / container_path[len(KUBELET_DIR) + 1:]

    def attach(self, node: str, vid: str, cap: pb.VolumeCapability | None = None, readonly: bool = False) -> str:
        """ControllerPublish + NodeStage + NodePublish; returns the target path ON THE HOST."""
        assert self.controller is not None
        cap = cap or mount_cap()
        ctx = self.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node, volume_capability=cap)).publish_context
        staging, target = self.paths(node, vid)
        self.on_host(staging).mkdir(parents=True, exist_ok=True)      # kubelet creates these
        self.on_host(target).parent.mkdir(parents=True, exist_ok=True)
        n = self.nodes[node].node
        n.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                    volume_capability=cap, publish_context=ctx))
        n.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                        target_path=target, volume_capability=cap,
                                                        publish_context=ctx, readonly=readonly))
        return str(self.on_host(target))

    def snapshot(self, vid: str, name: str, timeout: float = 120.0) -> pb.Snapshot:
        assert self.controller is not None
        ctl = self.controller.controller
        deadline = time.monotonic() + timeout
        while True:
            snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name=name)).snapshot
            if snap.ready_to_use:
                return snap
            assert time.monotonic() < deadline, f"snapshot {snap.snapshot_id} not ready after {timeout}s"
            time.sleep(0.2)
