"""groupsnap's consistency check for members pinned at their committed generation: a member
that changed hands (owner or ownership epoch) between being observed and the end of the cut
fails the group, on a real catalog (file store)."""
from __future__ import annotations

import grpc
import pytest

from csi_perssd import groupsnap
from csi_perssd.errors import CsiError
from csi_perssd.remote.catalog import Catalog, VolumeRecord
from csi_perssd.remote.filestore import FileStore


@pytest.fixture
def cat(tmp_path) -> Catalog:
    return Catalog(FileStore(str(tmp_path / "store")))


def _volume(cat: Catalog, name: str) -> VolumeRecord:
    rec = VolumeRecord(id=f"pvol-{name}", name=name, size=1 << 20, capabilities=[])
    return cat.create_volume(rec)[0]


def test_unchanged_members_pass(cat):
    a, b = _volume(cat, "a"), _volume(cat, "b")
    seen = {v.id: groupsnap.observe(v) for v in (a, b)}
    cat.update_volume(a.id, lambda r: setattr(r, "generation", r.generation))   # rewritten, not changed hands
    groupsnap.check_unchanged(cat, seen)


@pytest.mark.parametrize("change", ["published", "published and released"])
def test_a_member_that_changed_hands_fails_the_group(cat, change):
    a, b = _volume(cat, "a"), _volume(cat, "b")
    seen = {v.id: groupsnap.observe(v) for v in (a, b)}

    def take(r: VolumeRecord) -> None:
        r.owner, r.epoch = "node-x", r.epoch + 1
    cat.update_volume(b.id, take)
    if change == "published and released":
        cat.update_volume(b.id, lambda r: setattr(r, "owner", ""))   # the epoch still tells
    with pytest.raises(CsiError) as e:
        groupsnap.check_unchanged(cat, seen)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and b.id in e.value.message
