"""A small csi-perssd cluster on one machine: SeaweedFS, a controller and N node processes,
and the CO-side calls a volume's life needs (what kubelet and the sidecars would do).
Used by `make demo`, the multi-node integration tests and `make bench`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from csi_perssd.csi import csi_pb2 as pb
from .cleanup import cleanup_under
from .procs import DriverProcess
from .seaweed import Seaweed

MODE = pb.VolumeCapability.AccessMode


def mount_cap(fs_type: str = "ext4", mode: int = MODE.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
                               access_mode=MODE(mode=mode))


def block_cap(mode: int = MODE.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=MODE(mode=mode))


class Cluster:
    def __init__(self, workdir: str | os.PathLike[str], nodes: tuple[str, ...] = ("node-a", "node-b"),
                 seaweed: Seaweed | None = None, prefix: str = "cluster", pool: str = "pool-1",
                 node_extra: list[str] | None = None, metrics: bool = False,
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.own_seaweed = seaweed is None
        self.seaweed = seaweed or Seaweed(self.workdir / "seaweed")
        self.prefix = prefix
        self.pool = pool
        self.node_names = nodes
        self.node_extra = node_extra or []
        self.metrics = metrics
        self.extra_env = dict(env or {})
        self._s3: Any = None
        self.metrics_ports: dict[str, int] = {}
        self.controller: DriverProcess | None = None
        self.nodes: dict[str, DriverProcess] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.seaweed.access_key, "AWS_SECRET_ACCESS_KEY": self.seaweed.secret_key,
                **self.extra_env}

    def store_args(self) -> list[str]:
        return ["--s3-endpoint", self.seaweed.endpoint, "--s3-region", "us-east-1"]

    def start(self) -> Cluster:
        if not self.seaweed.running:
            self.seaweed.start()
        cat = self.seaweed.url(self.prefix)
        self.controller = DriverProcess(self.workdir, mode="controller", catalog=cat, env=self.env,
                                        extra=self.store_args())
        procs = [self.controller] + [self._node_process(n) for n in self.node_names]
        with ThreadPoolExecutor(len(procs)) as pool:         # each takes seconds to come up
            for f in [pool.submit(p.start) for p in procs]:
                f.result()
        return self

    def _node_process(self, name: str, extra: list[str] | None = None, pool: str | None = None) -> DriverProcess:
        args = self.store_args() + self.node_extra + list(extra or [])
        if self.metrics:
            self.metrics_ports[name] = free_port()
            args += ["--metrics-address", f"127.0.0.1:{self.metrics_ports[name]}"]
        self.nodes[name] = DriverProcess(self.workdir, mode="node", node_id=name, pool=pool or self.pool,
                                         catalog=self.seaweed.url(self.prefix), env=self.env, extra=args)
        return self.nodes[name]

    def add_node(self, name: str, extra: list[str] | None = None, pool: str | None = None) -> DriverProcess:
        """Start one more node process (its own state and rawfile dirs under workdir/NAME)."""
        return self._node_process(name, extra, pool).start()

    # -- observation --------------------------------------------------------------------------
    def scrape(self, node: str) -> dict[str, float]:
        """The node's perssd_* Prometheus samples (needs metrics=True)."""
        return scrape(self.metrics_ports[node])

    def transferred(self, node: str, kind: str) -> float:
        """perssd_transfer_bytes_total{kind=KIND} of a node since its process started."""
        return self.scrape(node).get(f'perssd_transfer_bytes_total{{kind="{kind}"}}', 0.0)

    def objects(self, under: str = "") -> dict[str, int]:
        """Keys (relative to the bucket) and sizes of the objects below PREFIX/UNDER; under=None:
        the whole bucket."""
        if self._s3 is None:
            self._s3 = self.seaweed.client()        # a boto3 client takes ~0.5 s to build
        client = self._s3
        prefix = f"{self.prefix}/{under}" if under is not None else ""
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.seaweed.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def catalog(self) -> Any:
        """The cluster's catalog, read directly from the bucket (as the CLI does)."""
        from csi_perssd.remote.catalog import Catalog
        from csi_perssd.remote.s3 import S3Store
        sw = self.seaweed
        return Catalog(S3Store(sw.url(self.prefix), endpoint_url=sw.endpoint, access_key=sw.access_key,
                               secret_key=sw.secret_key))

    def committed_chunks(self, vid: str) -> set[str]:
        """Bucket keys of the data chunks the volume's committed generation references."""
        from csi_perssd.remote.layout import chunk_key
        from csi_perssd.remote.manifest import Manifest
        cat = self.catalog()
        rec = cat.volume(vid)
        if not rec.generation:
            return set()
        m = Manifest.decode(cat.get_manifest(vid, rec.generation))
        return {f"{self.prefix}/{chunk_key(h)}" for h in m.entries if h is not None}

    def chunks(self) -> dict[str, int]:
        return self.objects("chunks/")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `csi-perssd ARGS` against this cluster's bucket (never raises on exit codes)."""
        argv = [sys.executable, "-m", "csi_perssd.cli", *args, "--catalog", self.seaweed.url(self.prefix),
                *self.store_args()]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **self.env))

    def keep_logs(self, dest: Path) -> Path:
        """Copy every driver process's log that exists into `dest` (made if missing), as
        <name>.log: what a failed or kept run leaves to read after the cluster is gone."""
        dest.mkdir(parents=True, exist_ok=True)
        for d in [self.controller, *self.nodes.values()]:
            if d is not None and d.log_path.exists():
                shutil.copy(d.log_path, dest / f"{d.name}.log")
        return dest

    def stop(self) -> None:
        procs = list(self.nodes.values()) + ([self.controller] if self.controller else [])
        if procs:
            with ThreadPoolExecutor(len(procs)) as pool:
                list(pool.map(lambda d: d.stop(), procs))
        cleanup_under(self.workdir)
        if self.own_seaweed:
            self.seaweed.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the CO's side ----------------------------------------------------------------------
    def create(self, name: str, size: int, cap: pb.VolumeCapability | None = None,
               params: dict[str, str] | None = None, source: pb.VolumeContentSource | None = None,
               secrets: dict[str, str] | None = None) -> str:
        assert self.controller is not None
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap or mount_cap()],
                                     capacity_range=pb.CapacityRange(required_bytes=size),
                                     parameters=params or {}, secrets=secrets or {})
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        return self.controller.controller.CreateVolume(req).volume.volume_id

    def paths(self, node: str, vid: str) -> tuple[str, str]:
        base = self.workdir / node / "kubelet" / vid
        return str(base / "staging"), str(base / "target")

    def attach(self, node: str, vid: str, cap: pb.VolumeCapability | None = None, readonly: bool = False,
               secrets: dict[str, str] | None = None) -> str:
        """ControllerPublish + NodeStage + NodePublish; returns the target path."""
        assert self.controller is not None
        cap = cap or mount_cap()
        ctx = self.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node, volume_capability=cap)).publish_context
        staging, target = self.paths(node, vid)
        Path(staging).mkdir(parents=True, exist_ok=True)
        n = self.nodes[node].node
        n.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                    volume_capability=cap, publish_context=ctx,
                                                    secrets=secrets or {}))
        n.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                        target_path=target, volume_capability=cap,
                                                        publish_context=ctx, readonly=readonly))
        return target

    def unpublish(self, node: str, vid: str) -> None:
        _, target = self.paths(node, vid)
        self.nodes[node].node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))

    def unstage(self, node: str, vid: str, timeout: float = 600.0, on_progress: Any = None) -> int:
        """NodeUnstage, retried while it answers ABORTED (flush in progress), as kubelet does.
        Returns the number of calls."""
        staging, _ = self.paths(node, vid)
        deadline = time.monotonic() + timeout
        calls = 0
        while True:
            calls += 1
            try:
                self.nodes[node].node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=staging))
                return calls
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE) or time.monotonic() > deadline:
                    raise
                if on_progress:
                    on_progress(e.details())
                time.sleep(0.2)

    def release(self, node: str, vid: str) -> int:
        """NodeUnpublish + NodeUnstage (until the flush committed) + ControllerUnpublish."""
        assert self.controller is not None
        self.unpublish(node, vid)
        calls = self.unstage(node, vid)
        self.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=node))
        return calls

    def delete(self, vid: str) -> None:
        assert self.controller is not None
        self.controller.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """perssd_* samples of a Prometheus endpoint on 127.0.0.1:PORT."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("perssd_"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
    return out
