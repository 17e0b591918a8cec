"""Fixtures that run the real `csi-perssd serve --mode all` as a subprocess on a unix socket, and
helpers to build CSI requests for the conformance suite.

`driver` is module-scoped (one server per test module), `fresh_driver` is function-scoped (for
tests that kill or restart the server). Teardown stops the server (SIGTERM), then unmounts
everything mounted under the test's directory (deepest first) and detaches loop devices whose
backing file lives under it: the driver may keep volumes attached by design, the test may not.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.procs import DriverProcess

MiB = 1 << 20
GiB = 1 << 30
XFS_SIZE = 320 * MiB            # mkfs.xfs refuses devices below 300 MiB; sparse, so it is cheap
NODE_ID = "node-a"
POOL = "pool-1"
LOCAL = {"persistence": "local"}          # never flushes: implies mobility=node
AccessMode = pb.VolumeCapability.AccessMode
SNW = AccessMode.SINGLE_NODE_WRITER


# ----------------------------------------------------------------------------- cleanup

from tests.harness.cleanup import cleanup_under, loops_under, mounts_under  # noqa: E402,F401


# ----------------------------------------------------------------------------- requests

def mount_cap(fs_type: str = "ext4", mode: int = SNW, flags: list[str] | None = None) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=flags or []),
                               access_mode=AccessMode(mode=mode))


def block_cap(mode: int = SNW) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=AccessMode(mode=mode))


_counter = itertools.count()


def unique_name(prefix: str = "vol") -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def create_request(name: str | None = None, cap: pb.VolumeCapability | None = None, size: int = 16 * MiB,
                   parameters: dict[str, str] | None = None, **kw: object) -> pb.CreateVolumeRequest:
    req = pb.CreateVolumeRequest(name=unique_name() if name is None else name, volume_capabilities=[cap or mount_cap()],
                                 parameters=LOCAL if parameters is None else parameters, **kw)  # type: ignore[arg-type]
    if size:
        req.capacity_range.required_bytes = size
    return req


def code_of(fn: object, *args: object, **kw: object) -> grpc.StatusCode:
    """Call an RPC and return its status code (OK when it succeeded)."""
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def expect(code: grpc.StatusCode, fn: object, *args: object, **kw: object) -> grpc.RpcError:
    """Call an RPC that must fail with `code`; return the error (for its details)."""
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
        return e
    raise AssertionError(f"expected {code.name}, the call succeeded")


class Csi:
    """A running driver plus the test's directory and the volumes it created (deleted on exit)."""

    def __init__(self, proc: DriverProcess, base: Path):
        self.proc = proc
        self.base = base
        self.created: list[str] = []

    @property
    def identity(self): return self.proc.identity          # noqa: E704

    @property
    def controller(self): return self.proc.controller      # noqa: E704

    @property
    def node(self): return self.proc.node                  # noqa: E704

    @property
    def group(self): return self.proc.group                # noqa: E704

    def path(self, *parts: str) -> str:
        """A path under the test's directory that does not exist yet."""
        return str(self.base.joinpath("paths", *parts, uuid.uuid4().hex[:8]))

    def create(self, req: pb.CreateVolumeRequest | None = None, **kw: object) -> pb.Volume:
        vol = self.controller.CreateVolume(req or create_request(**kw)).volume  # type: ignore[arg-type]
        self.created.append(vol.volume_id)
        return vol

    def publish(self, vid: str, cap: pb.VolumeCapability | None = None, node_id: str = NODE_ID) -> dict[str, str]:
        resp = self.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node_id, volume_capability=cap or mount_cap()))
        return dict(resp.publish_context)

    def stage_request(self, vid: str, staging: str, cap: pb.VolumeCapability | None = None,
                      ctx: dict[str, str] | None = None) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                         volume_capability=cap or mount_cap(), publish_context=ctx or {})

    def publish_request(self, vid: str, staging: str, target: str, cap: pb.VolumeCapability | None = None,
                        readonly: bool = False, ctx: dict[str, str] | None = None) -> pb.NodePublishVolumeRequest:
        return pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging, target_path=target,
                                           volume_capability=cap or mount_cap(), readonly=readonly,
                                           publish_context=ctx or {})

    def staged(self, cap: pb.VolumeCapability | None = None, size: int = 16 * MiB,
               parameters: dict[str, str] | None = None) -> tuple[str, str]:
        """A new volume, controller-published to this node and staged: (volume_id, staging path)."""
        cap = cap or mount_cap()
        vol = self.create(create_request(cap=cap, size=size, parameters=parameters))
        ctx = self.publish(vol.volume_id, cap)
        staging = self.path("staging")
        self.node.NodeStageVolume(self.stage_request(vol.volume_id, staging, cap, ctx))
        return vol.volume_id, staging

    def published(self, cap: pb.VolumeCapability | None = None, size: int = 16 * MiB,
                  parameters: dict[str, str] | None = None, readonly: bool = False) -> tuple[str, str, str]:
        """A new volume staged and published: (volume_id, staging path, target path)."""
        cap = cap or mount_cap()
        vid, staging = self.staged(cap, size, parameters)
        target = self.path("target")
        self.node.NodePublishVolume(self.publish_request(vid, staging, target, cap, readonly))
        return vid, staging, target

    def release(self, vid: str) -> None:
        """Undo everything this node did for a volume (as a CO would) and delete it."""
        from csi_perssd.local.state import NodeState
        lv = NodeState(self.proc.state_dir).get(vid)
        if lv is not None:
            for t in list(lv.targets):
                _retry(self.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=t))
            if lv.staged_path:
                _retry(self.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                                                staging_target_path=lv.staged_path))
        self.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid))
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))

    def release_all(self) -> None:
        errors = []
        for vid in self.created:
            try:
                self.release(vid)
            except grpc.RpcError as e:
                errors.append(f"{vid}: {e.code().name} {e.details()}")
        self.created.clear()
        if errors:
            raise AssertionError("cleaning up volumes failed: " + "; ".join(errors))

    def wait_for_child(self, comm: str, timeout: float = 10.0) -> None:
        """Wait until the driver runs a child process named `comm` (e.g. a tool blocked on a frozen fs)."""
        end = time.monotonic() + timeout
        ppid = str(self.proc.proc.pid)
        while time.monotonic() < end:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                parent = stat[stat.rindex(")") + 2:].split()[1]
                if parent == ppid and name == comm[:15]:
                    return
            time.sleep(0.02)
        raise AssertionError(f"the driver never ran {comm} within {timeout}s")

    def wait_until_busy(self, vid: str, timeout: float = 10.0) -> None:
        """Poll a cheap call on the volume until the driver rejects it as busy (ABORTED): another
        call holds the volume's lock."""
        end = time.monotonic() + timeout
        probe = pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=self.path("probe"))
        while time.monotonic() < end:
            try:
                self.node.NodeUnpublishVolume(probe)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ABORTED:
                    return
                raise
            time.sleep(0.02)
        raise AssertionError(f"no operation on {vid} became busy in {timeout}s")

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


def _retry(fn, req, attempts: int = 20):  # type: ignore[no-untyped-def]
    """Retry as a CO would: `umount` may find a mount briefly busy when another process on the
    machine walks the tree (a VM exporting / over 9p, a backup, an indexer)."""
    for i in range(attempts):
        try:
            return fn(req)
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED) or i == attempts - 1:
                raise
            time.sleep(0.25)


def _start(base: Path, **kw: object) -> DriverProcess:
    return DriverProcess(base, mode="all", node_id=NODE_ID, pool=POOL, **kw).start()  # type: ignore[arg-type]


def _teardown(csi: Csi) -> None:
    problems = []
    if csi.proc.proc is not None and csi.proc.proc.poll() is None:
        try:
            csi.release_all()
        except AssertionError as e:
            problems.append(str(e))
    rc = csi.proc.stop()
    cleanup_under(str(csi.base))
    if rc not in (0, -9) and not problems:
        problems.append(f"driver exited with {rc}:\n{csi.proc.tail()}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def _serve(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csi]:
    """A `--mode all` server (extra flags: module attribute DRIVER_FLAGS), torn down after use."""
    base = tmp_path_factory.mktemp("csi")
    csi = Csi(_start(base, extra=list(getattr(request.module, "DRIVER_FLAGS", []))), base)
    try:
        yield csi
    finally:
        _teardown(csi)


@pytest.fixture(scope="module")
def driver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csi]:
    """One `--mode all` server for the whole test module (extra flags: module attribute DRIVER_FLAGS)."""
    yield from _serve(request, tmp_path_factory)


@pytest.fixture
def fresh_driver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csi]:
    """A server of its own for one test (for tests that kill, restart or stop it)."""
    yield from _serve(request, tmp_path_factory)
