"""Fixtures of the snapshot / clone / GC suite: a real cluster (SeaweedFS from the session
fixture, a controller and two node processes over loop devices) per test module, each on its own
bucket prefix, and helpers the tests share."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.remote.catalog import Catalog
from csi_perssd.remote.s3 import S3Store
from tests.harness.blockio import write_file
from tests.harness.cluster import Cluster, block_cap, cleanup_under, mount_cap
from tests.harness.seaweed import Seaweed
from tests.plugins.s3 import make_s3_store

MiB = 1 << 20
NODE_EXTRA = ["--flush-workers", "4", "--hydrate-workers", "4"]


class SnapCluster(Cluster):
    """A Cluster plus the calls and bucket views the snapshot tests need."""

    def store(self) -> S3Store:
        return make_s3_store(self.seaweed, self.prefix)

    def catalog(self) -> Catalog:
        return Catalog(self.store())

    def chunk_objects(self) -> dict[str, int]:
        return {i.key: i.size for i in self.store().list("chunks/")}

    @property
    def ctl(self):  # type: ignore[no-untyped-def]
        assert self.controller is not None
        return self.controller.controller

    def snapshot(self, vid: str, name: str, wait: bool = True, timeout: float = 120.0) -> pb.Snapshot:
        snap = self.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name=name)).snapshot
        deadline = time.monotonic() + timeout
        while wait and not snap.ready_to_use:
            assert time.monotonic() < deadline, f"snapshot {snap.snapshot_id} not ready after {timeout}s"
            time.sleep(0.1)
            snap = self.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name=name)).snapshot
        return snap

    def delete_snapshot(self, sid: str) -> None:
        self.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid))

    def restore(self, name: str, size: int, *, snapshot: str = "", volume: str = "",
                cap: pb.VolumeCapability | None = None) -> str:
        src = pb.VolumeContentSource()
        if snapshot:
            src.snapshot.snapshot_id = snapshot
        else:
            src.volume.volume_id = volume
        return self.create(name, size, cap=cap, source=src)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "csi_perssd.cli", *args, "--catalog", self.seaweed.url(self.prefix),
                *self.store_args()]
        res = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **self.env), timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res


@pytest.fixture(scope="module")
def cluster(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnapCluster]:
    work = tmp_path_factory.mktemp("snapcl")
    if not seaweed.running:
        seaweed.start()
    cl = SnapCluster(work, seaweed=seaweed, prefix=f"snap-{secrets.token_hex(4)}", node_extra=NODE_EXTRA)
    try:
        cl.start()
        yield cl
    finally:
        for d in list(cl.nodes.values()):
            if d.proc is not None and d.proc.poll() is not None and d.proc.returncode not in (0, -15):
                print(f"--- {d.name} log tail ---\n{d.tail(80)}")
        cl.stop()
        cleanup_under(work)


def expect_code(code: grpc.StatusCode, fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    assert ei.value.code() == code, f"want {code}, got {ei.value.code()}: {ei.value.details()}"
    return ei.value.details()


__all__ = ["MiB", "SnapCluster", "block_cap", "mount_cap", "expect_code", "write_file"]
