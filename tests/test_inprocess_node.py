"""In-process logic tests of Controller, Node, VolumeSync and the local-volume manager over the
file store and a fake backend (volumes are plain files: no loop devices, no mounts; block access
so NodeStage makes no file system). Beside the real-component suites, which test the same paths
over gRPC with loop devices and SeaweedFS; these cover the decisions: placement, sizing,
retries, fencing, eviction, restart."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from csi_perssd.config import Config
from csi_perssd.controller import Controller
from csi_perssd.csi import csi_pb2 as pb
from csi_perssd.errors import Code, CsiError, Fenced
from csi_perssd.extents import Extent
from csi_perssd.local.backend import Backend, Capacity
from csi_perssd.local.fileio import file_data_extents
from csi_perssd.local.state import NodeState, Phase
from csi_perssd.local.volumes import LocalVolumes
from csi_perssd.node import Node
from csi_perssd.remote.catalog import SCHEMA, NodeRecord
from csi_perssd.remote.factory import StoreFactory
from csi_perssd.remote.layout import volume_key
from csi_perssd.remote.store import ObjectStore
from csi_perssd.stores import Stores
from csi_perssd.sync import VolumeSync

MiB = 1 << 20
MODE = pb.VolumeCapability.AccessMode


class FileBackend:
    """A Backend whose volumes are sparse files; `room` limits the space (for eviction)."""
    name = "fake"
    tracks_changes = False

    def __init__(self, root: Path, room: int = 1 << 40):
        self.root, self.room = root, room
        root.mkdir(parents=True, exist_ok=True)

    def _p(self, vid: str) -> str:
        return str(self.root / vid)

    def check(self) -> list[str]:
        return []

    def create(self, vid: str, size: int) -> None:
        if not self.exists(vid):
            if self.capacity().available_bytes < size:
                raise CsiError(Code.RESOURCE_EXHAUSTED, f"no room for {size} bytes")
            with open(self._p(vid), "wb") as f:
                f.truncate(size)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def create_unlisted(self, vid: str, size: int) -> bool:
        return False

    def plan_unlisted(self, vid: str, size: int) -> None:
        return None

    def exists(self, vid: str) -> bool:
        return os.path.isfile(self._p(vid))

    def size(self, vid: str) -> int:
        return os.path.getsize(self._p(vid))

    def device(self, vid: str, read_only: bool = False) -> str:
        return self._p(vid)

    def disk_path(self, vid: str) -> str:
        return self._p(vid)

    def hydrate_path(self, vid: str) -> str:
        return self._p(vid)

    def release(self, vid: str) -> None:
        pass

    def delete(self, vid: str) -> None:
        Path(self._p(vid)).unlink(missing_ok=True)

    def expand(self, vid: str, size: int) -> None:
        if size > self.size(vid):
            os.truncate(self._p(vid), size)

    def allocated_ranges(self, vid: str, snap: str | None = None) -> list[Extent]:
        return file_data_extents(self._p(vid) if snap is None else self._p(f"{vid}@{snap}"))

    def snapshot(self, vid: str, snap: str) -> str:
        shutil.copyfile(self._p(vid), self._p(f"{vid}@{snap}"))
        return self._p(f"{vid}@{snap}")

    def delete_snapshot(self, vid: str, snap: str) -> None:
        Path(self._p(f"{vid}@{snap}")).unlink(missing_ok=True)

    def snapshot_path(self, vid: str, snap: str) -> str | None:
        return self._p(f"{vid}@{snap}") if os.path.exists(self._p(f"{vid}@{snap}")) else None

    def changed_ranges(self, vid: str, base_snap: str, snap: str | None = None) -> list[Extent] | None:
        return None

    def capacity(self) -> Capacity:
        used = sum(os.path.getsize(self.root / n) for n in os.listdir(self.root))
        return Capacity(total_bytes=self.room, available_bytes=max(0, self.room - used), max_volume_bytes=self.room)

    def list_volumes(self) -> list[str]:
        return [n for n in os.listdir(self.root) if "@" not in n]


class World:
    """A controller and nodes sharing one file-store catalog, called in process."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.catalog = f"file://{tmp / 'catalog'}"
        self.controller = Controller(self.cfg("controller"), Stores(self.cfg("controller")))
        self.nodes: dict[str, tuple[Node, VolumeSync, LocalVolumes, FileBackend]] = {}

    def cfg(self, node: str) -> Config:
        return Config(mode="all", node_id=node if node != "controller" else "", catalog=self.catalog,
                      state_dir=str(self.tmp / node / "state"), unstage_wait_seconds=10.0)

    def node(self, name: str, room: int = 1 << 40) -> tuple[Node, VolumeSync, LocalVolumes, FileBackend]:
        cfg = self.cfg(name)
        backend = FileBackend(self.tmp / name / "volumes", room)
        assert isinstance(backend, Backend)
        vols = LocalVolumes(NodeState(cfg.state_dir))
        sync = VolumeSync(cfg, Stores(cfg), backend, vols)
        self.nodes[name] = (Node(cfg, Stores(cfg), backend, vols, sync), sync, vols, backend)
        Stores(cfg).catalog().put_node(NodeRecord(id=name, pool=cfg.pool, total_bytes=room,
                                                  available_bytes=room, max_volume_bytes=room))
        return self.nodes[name]

    def create(self, name: str, size: int = 8 * MiB) -> str:
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=[_cap()],
                                     capacity_range=pb.CapacityRange(required_bytes=size),
                                     parameters={"chunkSize": str(1 * MiB)})
        return str(self.controller.CreateVolume(req, None).volume.volume_id)

    def publish(self, vid: str, node: str) -> dict[str, str]:
        r = self.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node, volume_capability=_cap()), None)
        return dict(r.publish_context)

    def unpublish(self, vid: str, node: str) -> None:
        self.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node), None)

    def staging(self, node: str, vid: str) -> str:
        return str(self.tmp / node / "kubelet" / vid)

    def stage(self, node: str, vid: str, secrets: dict[str, str] | None = None) -> None:
        ctx = self.publish(vid, node)
        self.nodes[node][0].NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=self.staging(node, vid), volume_capability=_cap(),
            publish_context=ctx, secrets=secrets or {}), None)

    def unstage(self, node: str, vid: str) -> None:
        self.nodes[node][0].NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=self.staging(node, vid)), None)

    def record(self, vid: str):  # type: ignore[no-untyped-def]
        return self.controller.stores.catalog().volume(vid)

    def set_schema(self, vid: str, schema: int) -> None:
        store = self.controller.stores.catalog().store
        data, _ = store.get(volume_key(vid))
        d = json.loads(data)
        d["schema"] = schema
        store.put(volume_key(vid), json.dumps(d).encode())


def _cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER))


def _write(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _read(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.node("node-a")
    w.node("node-b")
    return w


def test_a_flush_commits_and_another_node_hydrates_it(world: World) -> None:
    vid = world.create("v1")
    _, _, vols_a, be_a = world.nodes["node-a"]
    world.stage("node-a", vid)
    assert vols_a.phase(vid) == Phase.STAGED
    payload = os.urandom(3 * MiB)
    _write(be_a.device(vid), 2 * MiB, payload)
    world.unstage("node-a", vid)
    assert vols_a.phase(vid) == Phase.CLEAN and vols_a.get(vid).generation == 1
    assert world.record(vid).generation == 1
    world.unpublish(vid, "node-a")
    world.stage("node-b", vid)
    _, _, vols_b, be_b = world.nodes["node-b"]
    assert vols_b.get(vid).generation == 1
    assert _read(be_b.device(vid), 2 * MiB, 3 * MiB) == payload


def test_staging_where_the_volume_is_not_published_is_refused(world: World) -> None:
    vid = world.create("v2")
    world.publish(vid, "node-a")
    node_b = world.nodes["node-b"][0]
    with pytest.raises(CsiError) as e:
        node_b.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=world.staging("node-b", vid), volume_capability=_cap()), None)
    assert e.value.code == Code.FAILED_PRECONDITION and "not published to node node-b" in e.value.message
    assert world.nodes["node-b"][2].phase(vid) == Phase.ABSENT and not world.nodes["node-b"][3].exists(vid)


def test_a_non_fencing_precondition_keeps_the_writes_and_is_retried(world: World) -> None:
    """The data-loss regression in process: FAILED_PRECONDITION that is not fencing (a record
    of a newer schema) during the flush leaves the copy DIRTY, kept at the next stage."""
    vid = world.create("v3")
    _, _, vols, be = world.nodes["node-a"]
    world.stage("node-a", vid)
    _write(be.device(vid), 0, b"first" * 1000)
    world.unstage("node-a", vid)
    world.stage("node-a", vid)
    later = os.urandom(MiB)
    _write(be.device(vid), 4 * MiB, later)
    world.set_schema(vid, SCHEMA + 1)
    with pytest.raises(CsiError) as e:
        world.unstage("node-a", vid)
    assert e.value.code == Code.ABORTED and not isinstance(e.value, Fenced)
    assert "newer than this driver" in e.value.message
    assert vols.phase(vid) == Phase.DIRTY and vols.get(vid).flush.error_code == "FAILED_PRECONDITION"
    world.set_schema(vid, SCHEMA)
    world.stage("node-a", vid)                       # reused, not discarded
    assert _read(be.device(vid), 4 * MiB, MiB) == later
    world.unstage("node-a", vid)
    assert world.record(vid).generation == 2 and vols.phase(vid) == Phase.CLEAN


def test_a_takeover_fences_and_the_next_stage_discards(world: World) -> None:
    vid = world.create("v4")
    _, _, vols, be = world.nodes["node-a"]
    world.stage("node-a", vid)
    _write(be.device(vid), 0, b"committed")
    world.unstage("node-a", vid)
    world.stage("node-a", vid)
    _write(be.device(vid), 0, b"lost-----")

    def takeover(r) -> None:  # type: ignore[no-untyped-def]
        r.owner, r.epoch = "node-b", r.epoch + 1
    world.controller.stores.catalog().update_volume(vid, takeover)
    for _ in range(2):                               # every retry says so; the data stays meanwhile
        with pytest.raises(Fenced) as e:
            world.unstage("node-a", vid)
        assert "no longer owns" in e.value.message
        assert vols.phase(vid) == Phase.FENCED and _read(be.device(vid), 0, 9) == b"lost-----"

    def back(r) -> None:  # type: ignore[no-untyped-def]
        r.owner = ""
    world.controller.stores.catalog().update_volume(vid, back)
    world.stage("node-a", vid)                       # fenced copy discarded: the committed generation
    assert _read(be.device(vid), 0, 9) == b"committed"
    assert vols.get(vid).generation == 1


def test_clean_cached_copies_are_evicted_least_recently_used_first(world: World) -> None:
    _, sync, vols, be = world.node("node-c", room=20 * MiB)
    vids = [world.create(f"e{i}") for i in range(3)]
    for vid in vids[:2]:
        world.stage("node-c", vid)
        _write(be.device(vid), 0, os.urandom(MiB))
        world.unstage("node-c", vid)
        world.unpublish(vid, "node-c")
    assert [lv.id for lv in sync.clean_cached()] == vids[:2]
    world.stage("node-c", vids[2])                  # 8 MiB more do not fit: the oldest goes
    assert vols.phase(vids[0]) == Phase.ABSENT and not be.exists(vids[0])
    assert vols.phase(vids[1]) == Phase.CLEAN and be.exists(vids[1])


def test_a_flush_left_running_by_a_restart_is_resumed(world: World) -> None:
    vid = world.create("v5")
    _, _, vols, be = world.nodes["node-a"]
    world.stage("node-a", vid)
    _write(be.device(vid), MiB, b"x" * MiB)

    def crashed(lv) -> None:  # type: ignore[no-untyped-def]
        lv.staged_path = ""
    vols.update(vid, crashed, to=Phase.FLUSHING)     # the process died right after the unmount
    node, sync, vols2, _ = world.node("node-a")     # restart: a new process over the same state
    node.recover()
    assert vols2.phase(vid) in (Phase.FLUSHING, Phase.CLEAN)
    sync.finish(vid)
    assert vols2.phase(vid) == Phase.CLEAN and world.record(vid).generation == 1


def test_a_volume_is_never_served_or_flushed_with_another_volumes_secrets(world: World) -> None:
    a, b = world.create("sec-a"), world.create("sec-b")
    secrets_a = {"accessKeyId": "AKVOLUMEA", "secretAccessKey": "volume-a-secret"}
    world.stage("node-a", b)                            # staged without secrets
    world.stage("node-a", a, secrets=secrets_a)
    _, sync, _, be = world.nodes["node-a"]
    assert sync.secrets_for(a) == secrets_a
    assert sync.secrets_for(b) == {}, "volume B got volume A's credentials"
    _write(be.device(b), 0, b"b" * MiB)
    node, sync, vols, _ = world.node("node-a")         # restart: NodeStage secrets are gone
    node.recover()
    sync.stores.catalog(secrets_a)                      # a later call with A's secrets worked
    assert sync.secrets_for(b) == {} and sync.secrets_for(a) == {}, \
        "after a restart a volume must use the driver's own credentials, not another volume's"
    world.unstage("node-a", b)                          # flushed with the driver's own settings
    assert vols.phase(b) == Phase.CLEAN and world.record(b).generation == 1


class _RecordingFactory(StoreFactory):
    """The store factory, remembering the secrets of every store it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[dict[str, str]] = []

    def open(self, url: str, secrets: Mapping[str, str] | None = None, defaults: Any = None,
             *, cache: bool = True, **opts: Any) -> ObjectStore:
        self.asked.append(dict(secrets or {}))
        return super().open(url, secrets, defaults, cache=cache, **opts)


def test_node_record_reads_never_use_another_calls_secrets(world: World) -> None:
    c, d, a = world.create("sec-c"), world.create("sec-d"), world.create("sec-a2")
    world.stage("node-a", c)
    _write(world.nodes["node-a"][3].device(c), 0, b"c" * MiB)
    world.unstage("node-a", c)
    world.unpublish(c, "node-a")
    assert world.record(c).generation == 1
    node, sync, vols, _ = world.nodes["node-b"]
    factory = _RecordingFactory()
    node.stores.factory = sync.stores.factory = factory
    secrets_a = {"accessKeyId": "AKVOLUMEA", "secretAccessKey": "volume-a-secret"}
    world.stage("node-b", a, secrets=secrets_a)         # these secrets work: they are adopted
    assert secrets_a in factory.asked
    factory.asked.clear()
    world.stage("node-b", c)                            # record read + hydrate, no secrets given
    assert vols.phase(c) == Phase.STAGED and vols.get(c).generation == 1
    world.unstage("node-b", d)                          # not on this node: existence check only
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
        volume_id=d, target_path=str(world.tmp / "node-b" / "pods" / d)), None)
    assert factory.asked and all(s == {} for s in factory.asked), \
        f"a call without secrets read the catalog with another volume's: {factory.asked}"


def _snapshotting_controller(world: World, alpha: bool) -> Controller:
    from csi_perssd.snapshots import Snapshots
    cfg = dataclasses.replace(world.cfg("controller"), enable_alpha=alpha)
    ctl = Controller(cfg, Stores(cfg))
    ctl.snapshots = Snapshots(cfg, ctl.stores, ctl)
    return ctl


def test_get_snapshot_is_alpha_and_reports_a_snapshot_until_it_is_deleted(world: World) -> None:
    Cap = pb.ControllerServiceCapability.RPC
    off = _snapshotting_controller(world, alpha=False)
    assert Cap.GET_SNAPSHOT not in {c.rpc.type for c in off.ControllerGetCapabilities(None, None).capabilities}
    with pytest.raises(CsiError) as e:
        off.GetSnapshot(pb.GetSnapshotRequest(snapshot_id="snap-x"), None)
    assert e.value.code == Code.UNIMPLEMENTED
    ctl = _snapshotting_controller(world, alpha=True)
    assert Cap.GET_SNAPSHOT in {c.rpc.type for c in ctl.ControllerGetCapabilities(None, None).capabilities}
    vid = world.create("gs")
    made = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="gs-snap", source_volume_id=vid), None).snapshot
    got = ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=made.snapshot_id), None).snapshot
    assert got == made and got.source_volume_id == vid
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=made.snapshot_id), None)
    for sid, code in ((made.snapshot_id, Code.NOT_FOUND), ("", Code.INVALID_ARGUMENT)):
        with pytest.raises(CsiError) as e:
            ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=sid), None)
        assert e.value.code == code, (sid, e.value)
