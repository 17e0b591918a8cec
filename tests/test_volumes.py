"""The local-volume manager's state machine (no root, no devices): every allowed move works,
every other move raises IllegalTransition and writes nothing; records of older drivers get a
phase; concurrent read-modify-writes of different fields do not overwrite each other."""
from __future__ import annotations

import itertools
import json
import threading

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local.state import FlushJob, FlushState, LocalVolume, NodeState, Phase
from csi_perssd.local.volumes import ALLOWED, IllegalTransition, LocalVolumes, check_transition

LIFECYCLE = [Phase.HYDRATING, Phase.CLEAN, Phase.STAGED, Phase.PUBLISHED, Phase.RELEASED,
             Phase.PUBLISHED, Phase.RELEASED, Phase.FLUSHING, Phase.DIRTY, Phase.FLUSHING,
             Phase.CLEAN, Phase.STAGED, Phase.FLUSHING, Phase.FENCED, Phase.ABSENT]


@pytest.fixture
def vols(tmp_path) -> LocalVolumes:
    return LocalVolumes(NodeState(str(tmp_path)))


def _move(vols: LocalVolumes, vid: str, to: Phase) -> None:
    if to == Phase.HYDRATING:
        vols.create(LocalVolume(id=vid))
    elif to == Phase.ABSENT:
        vols.remove(vid)
    else:
        vols.update(vid, to=to)


def test_a_whole_life_follows_the_machine(vols):
    for to in LIFECYCLE:
        _move(vols, "vol-1", to)
        assert vols.phase("vol-1") == to
    assert vols.get("vol-1") is None


@pytest.mark.parametrize("src,dst", [(a, b) for a, b in itertools.product(Phase, Phase)
                                     if a != b and b not in ALLOWED[a]])
def test_every_other_move_is_refused(src, dst):
    with pytest.raises(IllegalTransition) as e:
        check_transition("vol-1", src, dst)
    assert e.value.code == Code.INTERNAL and f"{src.value} -> {dst.value}" in e.value.message


def test_an_illegal_move_writes_nothing(vols):
    vols.create(LocalVolume(id="vol-1", size=5))
    vols.update("vol-1", lambda lv: setattr(lv, "size", 7), to=Phase.CLEAN)
    with pytest.raises(IllegalTransition):
        vols.update("vol-1", lambda lv: setattr(lv, "size", 9), to=Phase.PUBLISHED)
    with pytest.raises(IllegalTransition):
        vols.create(LocalVolume(id="vol-1"))
    lv = vols.get("vol-1")
    assert (lv.phase, lv.size) == (Phase.CLEAN, 7)


def test_staged_copies_cannot_be_discarded(vols):
    for to in (Phase.HYDRATING, Phase.CLEAN, Phase.STAGED):
        _move(vols, "vol-1", to)
    with pytest.raises(IllegalTransition):
        vols.remove("vol-1")
    vols.update("vol-1", to=Phase.PUBLISHED)
    with pytest.raises(IllegalTransition):
        vols.update("vol-1", to=Phase.CLEAN)         # unstaging needs the last target gone
    assert vols.phase("vol-1") == Phase.PUBLISHED


def test_a_fenced_copy_only_leaves_by_being_discarded(vols):
    for to in (Phase.HYDRATING, Phase.CLEAN, Phase.STAGED, Phase.FLUSHING, Phase.FENCED):
        _move(vols, "vol-1", to)
    for to in (Phase.STAGED, Phase.FLUSHING, Phase.CLEAN, Phase.DIRTY):
        with pytest.raises(IllegalTransition):
            vols.update("vol-1", to=to)
    vols.remove("vol-1")
    assert vols.phase("vol-1") == Phase.ABSENT


def test_update_of_a_missing_record_is_not_found(vols):
    with pytest.raises(CsiError) as e:
        vols.update("vol-9", to=Phase.CLEAN)
    assert e.value.code == Code.NOT_FOUND
    assert vols.update_if("vol-9", to=Phase.CLEAN) is None


def test_the_phase_and_the_flush_state_survive_a_restart(tmp_path):
    vols = LocalVolumes(NodeState(str(tmp_path)))
    vols.create(LocalVolume(id="vol-1"))

    def failed(lv: LocalVolume) -> None:
        lv.flush = FlushJob(generation_base=1, epoch=2, state=FlushState.FAILED, error_code="FAILED_PRECONDITION")
    for to in (Phase.CLEAN, Phase.STAGED, Phase.FLUSHING):
        vols.update("vol-1", to=to)
    vols.update("vol-1", failed, to=Phase.DIRTY)
    again = LocalVolumes(NodeState(str(tmp_path))).get("vol-1")
    assert again.phase == Phase.DIRTY
    assert again.flush.state is FlushState.FAILED and again.flush.error_code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("fields,phase", [
    ({"staged_path": "/s", "targets": {"/t": {"readonly": False}}}, Phase.PUBLISHED),
    ({"staged_path": "/s"}, Phase.STAGED),
    ({"dirty": True, "flush": {"generation_base": 1, "epoch": 1, "state": "fenced"}}, Phase.FENCED),
    ({"dirty": True, "flush": {"generation_base": 1, "epoch": 1, "state": "running", "final": True}}, Phase.FLUSHING),
    ({"dirty": True, "flush": {"generation_base": 1, "epoch": 1, "state": "failed"}}, Phase.DIRTY),
    ({"dirty": True, "persistence": "local"}, Phase.CLEAN),
    ({"generation": 3}, Phase.CLEAN),
])
def test_records_without_a_phase_get_one(tmp_path, fields, phase):
    state = NodeState(str(tmp_path))
    (state.dir / "vol-1.json").write_text(json.dumps({"id": "vol-1", "schema": 1, **fields}))
    assert LocalVolumes(state).phase("vol-1") == phase


def test_concurrent_writers_keep_each_others_fields(vols):
    """The flush thread (generation) and an RPC (targets) update the same record at once."""
    vols.create(LocalVolume(id="vol-1"))
    vols.update("vol-1", to=Phase.CLEAN)
    vols.update("vol-1", to=Phase.STAGED)
    go = threading.Barrier(2)

    def flusher() -> None:
        go.wait()
        for g in range(1, 101):
            vols.update("vol-1", lambda lv, g=g: setattr(lv, "generation", g))

    def rpc() -> None:
        go.wait()
        for i in range(100):
            vols.update("vol-1", lambda lv, i=i: lv.targets.__setitem__(f"/t{i}", {"readonly": False}))
    threads = [threading.Thread(target=flusher), threading.Thread(target=rpc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lv = vols.get("vol-1")
    assert lv.generation == 100 and len(lv.targets) == 100
