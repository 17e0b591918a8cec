"""ids.py: every identifier and path is validated before it becomes a path, device name or key."""
from __future__ import annotations

import pytest

from csi_perssd import ids
from csi_perssd.errors import Code, CsiError


def rejected(fn, value) -> str:
    with pytest.raises(CsiError) as e:
        fn(value)
    assert e.value.code == Code.INVALID_ARGUMENT
    return e.value.message


def test_new_ids_are_valid_and_unique():
    vids = {ids.new_volume_id() for _ in range(100)}
    assert len(vids) == 100
    for v in vids:
        assert v.startswith(ids.VOLUME_PREFIX) and ids.volume_id(v) == v
    sid = ids.new_snapshot_id()
    assert sid.startswith(ids.SNAPSHOT_PREFIX) and ids.snapshot_id(sid) == sid


@pytest.mark.parametrize("value", ["pvol-0123", "a", "A.b_c-1", "x" * 128, "1.2.3", "vol..x"])
def test_volume_ids_that_are_safe_are_accepted(value):
    assert ids.volume_id(value) == value
    assert ids.snapshot_id(value) == value


@pytest.mark.parametrize("value", ["", "..", "../../etc", ".hidden", "-rf", "_x", "a/b", "/abs", "a b", "a\x00b",
                                   "a\nb", "x" * 129, "é", "vol\\x", "a;b", "$(id)", "a*"])
def test_hostile_volume_ids_are_rejected(value):
    rejected(ids.volume_id, value)
    rejected(ids.snapshot_id, value)


def test_required_id_message_names_the_field():
    assert "volume_id is required" in rejected(ids.volume_id, "")
    assert "snapshot_id" in rejected(ids.snapshot_id, "")


@pytest.mark.parametrize("value", ["node-a", "n", "worker-1.example.com", "a" * 253])
def test_node_ids_accepted(value):
    assert ids.node_id(value) == value


@pytest.mark.parametrize("value", ["", "node-", "-node", "a" * 254, "node/a", "node a", "..", "n\x00"])
def test_node_ids_rejected(value):
    rejected(ids.node_id, value)


def test_pool_names_are_short_dns_labels():
    assert ids.pool_name("pool-1") == "pool-1"
    rejected(ids.pool_name, "p" * 64)
    rejected(ids.pool_name, "pool/1")


@pytest.mark.parametrize("value", ["pvc-1234", "../../etc/passwd", "with space", "ünïcode", "n" * 128])
def test_names_are_any_printable_text_up_to_128_bytes(value):
    assert ids.name(value) == value


@pytest.mark.parametrize("value", ["", "n" * 129, "é" * 65, "a\x00b", "a\nb", "tab\there"])
def test_names_too_long_or_with_control_characters_are_rejected(value):
    rejected(ids.name, value)


@pytest.mark.parametrize("value,norm", [("/a/b", "/a/b"), ("/a//b/", "/a/b"), ("/a/./b", "/a/b"), ("/", "/")])
def test_host_paths_are_normalised(value, norm):
    assert ids.host_path(value, "target_path") == norm


@pytest.mark.parametrize("value", ["", "relative", "./x", "/a/../etc", "..", "/a/..", "/a\x00b", "/" + "a" * 5000])
def test_hostile_host_paths_are_rejected(value):
    msg = rejected(lambda v: ids.host_path(v, "target_path"), value)
    assert "target_path" in msg


def test_host_path_accepts_long_but_legal_paths():
    path = "/" + "/".join(["d" * 200] * 15)
    assert len(path) > 128 and ids.host_path(path, "staging_target_path") == path
